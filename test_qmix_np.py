"""Tests for qmix_np and envs: gradient checks first, then the learner's parts, then learning.

Gradient checks: float64, centred differences (h = 1e-5), the output contracted with a RANDOM
upstream gradient (all-ones would hide transpose bugs), relative error ||a - n|| / (||a|| + ||n||)
per tensor, tolerance 1e-7. A correct check lands near 1e-10; a bug lands near 1. The largest
error of the run is printed at the end of the session.
"""
import copy
import math

import numpy as np
import pytest

import envs
import qmix_np as q

TOLERANCE = 1e-7
H = 1e-5
CHECKED = []  # (what, relative error) for every tensor checked this session


@pytest.fixture(scope="session", autouse=True)
def report_largest_gradient_error(request):
    yield
    if CHECKED:
        what, worst = max(CHECKED, key=lambda item: item[1])
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\ngradient checks: {len(CHECKED)} tensors, largest relative error "
                  f"{worst:.2e} ({what}), tolerance {TOLERANCE:.0e}")


def relative_error(a, n):
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a) + np.linalg.norm(n), 1e-300))


def numerical_gradient(f, x):
    """Centred differences of the scalar f() with respect to every entry of x (changed in place)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + H
        up = f()
        x[i] = saved - H
        down = f()
        x[i] = saved
        grad[i] = (up - down) / (2 * H)
    return grad


def check_gradients(f, tensors, analytic, label):
    """Assert analytic[k] matches d f / d tensors[k] for EVERY key of tensors."""
    assert set(analytic) == set(tensors), f"{label}: gradient keys {set(analytic)} != {set(tensors)}"
    for key, x in tensors.items():
        assert x.dtype == np.float64, f"{label}/{key}: gradient checks need float64"
        assert analytic[key].shape == x.shape, f"{label}/{key}: gradient shape"
        error = relative_error(analytic[key], numerical_gradient(f, x))
        CHECKED.append((f"{label}/{key}", error))
        assert error < TOLERANCE, f"{label}/{key}: relative error {error:.2e}"


def away_from_zero(rng, shape):
    """Random values with |x| >= 0.1, so a nudge of H never crosses the kink of ReLU or |.|."""
    x = rng.uniform(0.1, 1.0, shape)
    return x * rng.choice([-1.0, 1.0], shape)


# ------------------------------------------------------------------------------------------
# Gradient checks: primitives
# ------------------------------------------------------------------------------------------


def linear_case(rng, grouped):
    lead = (3,) if grouped else ()
    x = rng.normal(size=lead + (4, 5))
    return x, {"weight": rng.normal(size=lead + (6, 5)), "bias": rng.normal(size=lead + (6,))}


@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
def test_linear_gradients(grouped):
    rng = np.random.default_rng(1)
    x, params = linear_case(rng, grouped)
    upstream = rng.normal(size=q.linear_forward(x, params["weight"], params["bias"])[0].shape)

    def f():
        return np.sum(q.linear_forward(x, params["weight"], params["bias"])[0] * upstream)

    dx, grads = q.linear_backward(upstream, q.linear_forward(x, params["weight"], params["bias"])[1])
    check_gradients(f, {"x": x, **params}, {"x": dx, **grads}, f"linear[{grouped}]")


@pytest.mark.parametrize("name", ["relu", "elu", "abs"])
def test_elementwise_gradients(name):
    forward, backward = getattr(q, f"{name}_forward"), getattr(q, f"{name}_backward")
    rng = np.random.default_rng(2)
    x = away_from_zero(rng, (5, 7))
    upstream = rng.normal(size=x.shape)
    dx, grads = backward(upstream, forward(x)[1])
    assert grads == {}
    check_gradients(lambda: np.sum(forward(x)[0] * upstream), {"x": x}, {"x": dx}, name)


def test_elu_values_and_large_inputs():
    x = np.array([-800.0, -1.0, 0.0, 2.0, 800.0])
    out, _ = q.elu_forward(x)
    np.testing.assert_allclose(out, [-1.0, math.exp(-1) - 1, 0.0, 2.0, 800.0])


# ------------------------------------------------------------------------------------------
# Gradient checks: agent networks and mixers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-agent"])
def test_agent_network_gradients(shared):
    rng = np.random.default_rng(3)
    batch, n_agents, in_dim, n_actions = 4, 3, 5, 4
    params = q.init_agent_params(rng, in_dim, (8, 7), n_actions, None if shared else n_agents)
    inputs = rng.normal(size=(batch, n_agents, in_dim))
    upstream = rng.normal(size=(batch, n_agents, n_actions))

    def f():
        return np.sum(q.agent_forward(params, inputs)[0] * upstream)

    dx, grads = q.agent_backward(upstream, q.agent_forward(params, inputs)[1])
    check_gradients(f, {"inputs": inputs, **params}, {"inputs": dx, **grads}, f"agent[{shared}]")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-agent"])
def test_agent_backward_of_leading_inputs_equals_their_own_forward_and_backward(shared):
    """The learner runs o and o' in one forward and backpropagates o's rows only: that must give
    exactly what a forward and backward of o alone give."""
    rng = np.random.default_rng(5)
    params = q.init_agent_params(rng, 5, (8, 7), 4, None if shared else 3)
    inputs = rng.normal(size=(6, 3, 5))  # 6 inputs, of which the first 4 get a gradient
    upstream = rng.normal(size=(4, 3, 4))
    dx, grads = q.agent_backward(upstream, q.agent_forward(params, inputs)[1])
    dx_alone, grads_alone = q.agent_backward(upstream, q.agent_forward(params, inputs[:4])[1])
    assert dx.shape == (4, 3, 5)
    np.testing.assert_allclose(dx, dx_alone, rtol=1e-12, atol=0)
    for name in params:
        np.testing.assert_allclose(grads[name], grads_alone[name], rtol=1e-12, atol=0, err_msg=name)


def test_per_agent_networks_are_independent():
    """Agent i's Qs depend only on agent i's slice of the stacked parameters."""
    rng = np.random.default_rng(4)
    params = q.init_agent_params(rng, 3, (5,), 2, n_agents=2)
    inputs = rng.normal(size=(6, 2, 3))
    before, _ = q.agent_forward(params, inputs)
    params["fc1.weight"][1] += 1.0
    after, _ = q.agent_forward(params, inputs)
    np.testing.assert_array_equal(before[:, 0], after[:, 0])
    assert not np.allclose(before[:, 1], after[:, 1])


def test_agent_inputs_append_one_hot_ids_from_a_cache_no_caller_can_change():
    obs = np.arange(12.0).reshape(2, 3, 2)  # (B 2, N 3, O 2)
    inputs = q.build_agent_inputs(obs, True, np.float32)
    assert inputs.shape == (2, 3, 5) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[..., :2], obs)
    np.testing.assert_array_equal(inputs[1, :, 2:], np.eye(3))
    inputs[..., 2:] = 7.0  # the caller's copy: the cached ids stay one-hot
    np.testing.assert_array_equal(q.build_agent_inputs(obs, True, np.float32)[0, :, 2:], np.eye(3))
    with pytest.raises(ValueError, match="read-only"):
        q.agent_ids(3, np.dtype(np.float32))[0, 0] = 7.0


def test_relu_zeros_are_made_once_read_only_and_never_handed_out():
    zeros = q.zeros((2, 3), np.dtype(np.float32))
    assert zeros is q.zeros((2, 3), np.dtype(np.float32)) and not zeros.any()
    with pytest.raises(ValueError, match="read-only"):
        zeros[0, 0] = 1.0
    out, _ = q.relu_forward(np.full((2, 3), -1.0, np.float32))
    out[...] = 5.0  # ReLU's output is the caller's own array, not the cached zeros
    assert not zeros.any()


def test_all_true_is_all_and_minus_inf_is_a_read_only_cache():
    rng = np.random.default_rng(3)
    for shape in [(), (0,), (2, 5), (3, 4, 5)]:
        for p_true in (0.0, 0.9, 1.0):
            mask = np.asarray(rng.random(shape) < p_true)
            assert q.all_true(mask) == mask.all()
    minus_inf = q.minus_inf(np.dtype(np.float32))
    assert minus_inf is q.minus_inf(np.dtype(np.float32)) and minus_inf.dtype == np.float32
    assert minus_inf.shape == () and minus_inf == -np.inf
    with pytest.raises(ValueError, match="read-only"):
        minus_inf[...] = 0.0


def mixer_case(hypernet_layers, seed=5, batch=5, n_agents=3, state_dim=4):
    rng = np.random.default_rng(seed)
    params = q.init_qmix_mixer(rng, n_agents, state_dim, mixing_embed_dim=6,
                               hypernet_layers=hypernet_layers, hypernet_embed=7)
    return rng, params, rng.normal(size=(batch, n_agents)), rng.normal(size=(batch, state_dim))


@pytest.mark.parametrize("hypernet_layers", [1, 2])
def test_qmix_mixer_gradients(hypernet_layers):
    rng, params, agent_qs, states = mixer_case(hypernet_layers)
    upstream = rng.normal(size=len(agent_qs))

    def f():
        return np.sum(q.qmix_mixer_forward(params, agent_qs, states)[0] * upstream)

    dqs, grads = q.qmix_mixer_backward(upstream, q.qmix_mixer_forward(params, agent_qs, states)[1])
    check_gradients(f, {"agent_qs": agent_qs, **params}, {"agent_qs": dqs, **grads},
                    f"qmix[{hypernet_layers}]")


def test_vdn_mixer_gradients():
    rng = np.random.default_rng(6)
    agent_qs = rng.normal(size=(5, 3))
    upstream = rng.normal(size=5)
    out, cache = q.vdn_mixer_forward({}, agent_qs, None)
    np.testing.assert_allclose(out, agent_qs.sum(axis=1))
    dqs, grads = q.vdn_mixer_backward(upstream, cache)
    assert grads == {}
    check_gradients(lambda: np.sum(q.vdn_mixer_forward({}, agent_qs, None)[0] * upstream),
                    {"agent_qs": agent_qs}, {"agent_qs": dqs}, "vdn")


def test_qmix_forward_matches_the_paper_equation_written_with_loops():
    """An independent, entry-by-entry reading of REFERENCE section 1."""
    _, p, agent_qs, states = mixer_case(1, batch=3, n_agents=2)
    q_tot, _ = q.qmix_mixer_forward(p, agent_qs, states)

    def lin(name, x):
        return p[f"{name}.weight"] @ x + p[f"{name}.bias"]

    for b in range(3):
        s = states[b]
        w1 = np.abs(lin("hyper_w_1", s)).reshape(2, 6)  # (N, E), row-major as pymarl's view
        hidden = [0.0] * 6
        for e in range(6):
            x = agent_qs[b, 0] * w1[0, e] + agent_qs[b, 1] * w1[1, e] + lin("hyper_b_1", s)[e]
            hidden[e] = x if x > 0 else math.exp(x) - 1
        wf = np.abs(lin("hyper_w_final", s))
        v = lin("V.2", np.maximum(lin("V.0", s), 0))[0]
        assert q_tot[b] == pytest.approx(sum(h * w for h, w in zip(hidden, wf)) + v, rel=1e-12)


def pymarl_shapes(n, s, e, h, layers):
    """The shapes of pymarl's QMixer.state_dict(), written out by hand from its __init__."""
    if layers == 1:
        hyper = {"hyper_w_1.weight": (e * n, s), "hyper_w_1.bias": (e * n,),
                 "hyper_w_final.weight": (e, s), "hyper_w_final.bias": (e,)}
    else:
        hyper = {"hyper_w_1.0.weight": (h, s), "hyper_w_1.0.bias": (h,),
                 "hyper_w_1.2.weight": (e * n, h), "hyper_w_1.2.bias": (e * n,),
                 "hyper_w_final.0.weight": (h, s), "hyper_w_final.0.bias": (h,),
                 "hyper_w_final.2.weight": (e, h), "hyper_w_final.2.bias": (e,)}
    return {**hyper, "hyper_b_1.weight": (e, s), "hyper_b_1.bias": (e,),
            "V.0.weight": (e, s), "V.0.bias": (e,), "V.2.weight": (1, e), "V.2.bias": (1,)}


@pytest.mark.parametrize("layers", [1, 2])
def test_mixer_keys_and_shapes_are_pymarls(layers):
    params = q.init_qmix_mixer(np.random.default_rng(0), 3, 10, 32, layers, 64)
    assert list(params) == list(pymarl_shapes(3, 10, 32, 64, layers))  # state_dict order too
    assert {k: v.shape for k, v in params.items()} == pymarl_shapes(3, 10, 32, 64, layers)


def test_mixer_rejects_three_hypernet_layers():
    with pytest.raises(ValueError, match="hypernet_layers"):
        q.init_qmix_mixer(np.random.default_rng(0), 2, 3, hypernet_layers=3)


# ------------------------------------------------------------------------------------------
# Gradient checks: the end-to-end TD loss
# ------------------------------------------------------------------------------------------


def random_batch(rng, batch, n_agents, obs_dim, state_dim, n_actions):
    avail = rng.random((batch, n_agents, n_actions)) < 0.7
    avail[..., 0] = True
    next_avail = rng.random((batch, n_agents, n_actions)) < 0.7
    next_avail[..., -1] = True
    return {"obs": rng.normal(size=(batch, n_agents, obs_dim)),
            "state": rng.normal(size=(batch, state_dim)),
            "actions": np.where(avail, rng.random(avail.shape), -1).argmax(-1),
            "avail_actions": avail, "reward": rng.normal(size=batch),
            "terminated": rng.random(batch) < 0.3,
            "next_obs": rng.normal(size=(batch, n_agents, obs_dim)),
            "next_state": rng.normal(size=(batch, state_dim)),
            "next_avail_actions": next_avail}


def small_learner(mixer, **overrides):
    config = q.Config(**{"mixer": mixer, "mixing_embed_dim": 5, "hypernet_embed": 6,
                         "agent_hidden_dims": (7, 6), "dtype": "float64", **overrides})
    env_info = {"n_agents": 3, "obs_shape": 4, "state_shape": 5, "n_actions": 4, "episode_limit": 10}
    return q.Learner(config, env_info)


@pytest.mark.parametrize("mixer,layers,shared", [("qmix", 1, True), ("qmix", 2, True),
                                                 ("qmix", 2, False), ("vdn", 1, True),
                                                 ("none", 1, True)])
def test_td_loss_gradients_end_to_end(mixer, layers, shared):
    learner = small_learner(mixer, hypernet_layers=layers, shared_agent=shared)
    rng = np.random.default_rng(7)
    learner.target_theta += rng.normal(scale=0.1, size=learner.theta.shape)
    batch = random_batch(rng, 6, 3, 4, 5, 4)
    _, grads, diagnostics = q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)
    targets = q.td_targets(learner.params, learner.target_params, batch, learner.config)
    assert diagnostics["target_mean"] == pytest.approx(targets.mean(), rel=1e-12)

    def f():  # the targets move with params only through double Q's argmax: piecewise constant
        return q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)[0]

    for group in ("agent", "mixer"):
        check_gradients(f, learner.params[group], grads[group], f"td[{mixer},{layers},{shared}]/{group}")
    expected_tensors = {"qmix": 10 if layers == 1 else 14, "vdn": 0, "none": 0}[mixer]
    assert len(learner.params["mixer"]) == expected_tensors


def test_the_checker_fails_a_planted_bug(monkeypatch):
    """Swap ReLU's backward for the identity: the check must fail, loudly."""
    monkeypatch.setattr(q, "relu_backward", lambda dout, cache: (dout, {}))
    with pytest.raises(AssertionError, match="relative error"):
        test_agent_network_gradients(shared=True)
    what, error = CHECKED.pop()  # the planted failure is not one of the real checks
    assert what == "agent[True]/inputs" and error > 1e-2


# ------------------------------------------------------------------------------------------
# Monotonicity and IGM
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
def test_qmix_is_monotonic_in_every_agent_q(layers):
    for seed in range(30):
        _, params, agent_qs, states = mixer_case(layers, seed=seed, batch=50)
        agent_qs *= 10
        _, cache = q.qmix_mixer_forward(params, agent_qs, states)
        dqs, _ = q.qmix_mixer_backward(np.ones(50), cache)
        assert np.all(dqs >= 0)


@pytest.mark.parametrize("mixer", ["qmix", "vdn", "none"])
def test_joint_argmax_is_the_per_agent_argmaxes(mixer):
    """IGM by brute force over all A^N joint actions, for random networks and situations."""
    for seed in range(20):
        config = q.Config(mixer=mixer, agent_hidden_dims=(8,), mixing_embed_dim=4, seed=seed)
        env_info = {"n_agents": 3, "obs_shape": 2, "state_shape": 3, "n_actions": 3, "episode_limit": 1}
        learner = q.Learner(config, env_info)
        rng = np.random.default_rng(seed)
        obs, state = rng.normal(size=(3, 2)), rng.normal(size=3)
        table = q.joint_q_tot(learner.params, config, obs, state)
        joint_best = np.unravel_index(np.argmax(table), table.shape)
        greedy = learner.select_actions(obs, np.ones((3, 3)))
        assert tuple(greedy) == tuple(int(a) for a in joint_best)


# ------------------------------------------------------------------------------------------
# Optimiser and clipping
# ------------------------------------------------------------------------------------------


def test_adam_constant_gradient_closed_form():
    """With a constant g the bias-corrected moments are g and g^2: each step moves lr g / (|g| + eps)."""
    p = np.array([0.5, -1.0, 2.0])
    g = np.array([0.3, -2.0, 1e-9])
    adam = q.Adam(p, lr=0.01, eps=1e-8)
    start = p.copy()
    for _ in range(7):
        adam.step(p, g)
    np.testing.assert_allclose(p, start - 7 * 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12, atol=1e-15)


def test_adam_matches_the_textbook_update_over_several_steps():
    rng = np.random.default_rng(8)
    p = rng.normal(size=10)
    adam = q.Adam(p, lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    ref, m, v = p.copy(), np.zeros(10), np.zeros(10)
    for t in range(1, 6):
        g = rng.normal(size=10)
        adam.step(p, g)
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * g * g
        ref = ref - 0.1 * (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.9**t)) + 1e-6)
        np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert adam.t == 5


def test_clipping_scales_to_exactly_the_max_norm():
    g = np.array([3.0, 4.0, 12.0])  # norm 13
    direction = g / 13
    assert q.clip_grad_norm(g, 10.0) == 13.0
    assert np.linalg.norm(g) == pytest.approx(10.0, rel=1e-15)
    np.testing.assert_allclose(g / 10.0, direction, rtol=1e-15)


def test_clipping_leaves_small_gradients_untouched():
    g = np.array([3.0, 4.0])
    before = g.copy()
    assert q.clip_grad_norm(g, 10.0) == 5.0
    np.testing.assert_array_equal(g, before)


def test_one_optimiser_covers_agent_nets_and_mixer():
    learner = small_learner("qmix")
    rng = np.random.default_rng(9)
    for _ in range(40):
        learner.buffer.add(**transition(rng, learner))
    before = {g: {k: v.copy() for k, v in d.items()} for g, d in learner.params.items()}
    learner.train_step()
    for group, inner in learner.params.items():
        for key, value in inner.items():
            assert not np.array_equal(value, before[group][key]), f"{group}/{key} did not move"


# ------------------------------------------------------------------------------------------
# Replay buffer
# ------------------------------------------------------------------------------------------


def transition(rng, learner, tag=0.0):
    n, a = learner.n_agents, learner.n_actions
    return dict(obs=np.full((n, learner.obs_dim), tag), state=rng.normal(size=learner.state_dim),
                actions=rng.integers(0, a, n), avail_actions=np.ones((n, a)), reward=float(tag),
                terminated=False, next_obs=rng.normal(size=(n, learner.obs_dim)),
                next_state=rng.normal(size=learner.state_dim), next_avail_actions=np.ones((n, a)))


def test_replay_wraps_around_keeping_the_newest_in_order():
    learner = small_learner("vdn", buffer_size=5)
    rng = np.random.default_rng(10)
    for tag in range(12):
        learner.buffer.add(**transition(rng, learner, float(tag)))
    assert len(learner.buffer) == 5
    np.testing.assert_array_equal(learner.buffer.in_order()["reward"], [7, 8, 9, 10, 11])
    np.testing.assert_array_equal(learner.buffer.in_order()["obs"][:, 0, 0], [7, 8, 9, 10, 11])


def test_replay_partly_filled_is_in_order():
    learner = small_learner("vdn", buffer_size=5)
    rng = np.random.default_rng(10)
    for tag in range(3):
        learner.buffer.add(**transition(rng, learner, float(tag)))
    np.testing.assert_array_equal(learner.buffer.in_order()["reward"], [0, 1, 2])


def test_replay_copies_what_it_is_given():
    learner = small_learner("vdn")
    item = transition(np.random.default_rng(11), learner, 1.0)
    learner.buffer.add(**item)
    item["obs"][:] = 99.0
    item["actions"][:] = 0
    item["next_state"][:] = 99.0
    stored = learner.buffer.in_order()
    assert np.all(stored["obs"] == 1.0) and not np.any(stored["next_state"] == 99.0)


def test_replay_sampling_is_reproducible_from_the_seed():
    learner = small_learner("vdn")
    rng = np.random.default_rng(12)
    for tag in range(50):
        learner.buffer.add(**transition(rng, learner, float(tag)))
    first = learner.buffer.sample(16, np.random.default_rng(3))
    second = learner.buffer.sample(16, np.random.default_rng(3))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


# ------------------------------------------------------------------------------------------
# Double Q and available actions
# ------------------------------------------------------------------------------------------


def test_double_q_picks_with_online_and_values_with_target():
    learner = small_learner("vdn", gamma=0.9)
    rng = np.random.default_rng(13)
    learner.target_theta[:] = rng.normal(size=learner.theta.shape)  # a very different target net
    batch = random_batch(rng, 64, 3, 4, 5, 4)
    c = learner.config
    inputs = q.build_agent_inputs(batch["next_obs"], True, np.float64)
    online = np.where(batch["next_avail_actions"], q.agent_forward(learner.params["agent"], inputs)[0], -np.inf)
    target = np.where(batch["next_avail_actions"], q.agent_forward(learner.target_params["agent"], inputs)[0], -np.inf)
    picked = online.argmax(-1)
    assert np.any(picked != target.argmax(-1)), "the case must tell double Q from a plain max"
    value = np.take_along_axis(target, picked[..., None], -1)[..., 0].sum(-1)
    expected = batch["reward"] + 0.9 * (1 - batch["terminated"]) * value
    np.testing.assert_allclose(q.td_targets(learner.params, learner.target_params, batch, c), expected)

    plain = batch["reward"] + 0.9 * (1 - batch["terminated"]) * target.max(-1).sum(-1)
    c.double_q = False
    np.testing.assert_allclose(q.td_targets(learner.params, learner.target_params, batch, c), plain)


def test_targets_never_use_an_unavailable_action():
    learner = small_learner("vdn", gamma=1.0)
    learner.params["agent"]["fc3.bias"][0] = 1e6  # action 0 would win everywhere...
    learner.target_params["agent"]["fc3.bias"][0] = 1e6
    rng = np.random.default_rng(14)
    batch = random_batch(rng, 32, 3, 4, 5, 4)
    batch["next_avail_actions"][..., 0] = False  # ...but it is never available
    batch["terminated"][:] = False
    for double_q in (True, False):
        learner.config.double_q = double_q
        y = q.td_targets(learner.params, learner.target_params, batch, learner.config)
        assert np.all(np.abs(y - batch["reward"]) < 1e5)


def test_exploration_and_greedy_choose_only_available_actions():
    learner = small_learner("qmix")
    learner.params["agent"]["fc3.bias"][2] = 1e6  # greedy would pick action 2
    avail = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 1]])
    obs = np.zeros((3, 4))
    assert np.all(avail[np.arange(3), learner.select_actions(obs, avail, 0.0)] == 1)
    seen = np.array([learner.select_actions(obs, avail, 1.0) for _ in range(2000)])
    for agent in range(3):
        chosen = np.bincount(seen[:, agent], minlength=4)
        assert np.all(chosen[avail[agent] == 0] == 0)
        assert np.all(chosen[avail[agent] == 1] > 2000 / avail[agent].sum() * 0.8)  # ~uniform


def test_epsilon_greedy_draws_per_agent_and_runs_the_network_only_for_greedy_agents(monkeypatch):
    learner = small_learner("qmix")
    rng = np.random.default_rng(17)
    obs, avail = rng.normal(size=(3, 4)), rng.random((3, 4)) < 0.6
    avail[:, 1] = True  # every agent has an available action
    greedy = learner.select_actions(obs, avail, 0.0)
    twin = copy.deepcopy(learner.rng)  # draws what select_actions should draw, in the same order
    for _ in range(200):  # with 3 agents at epsilon 0.5, about 1 step in 8 has every agent exploring
        explore = twin.random(3) < 0.5
        random_actions = q.masked_argmax(twin.random((3, 4)), avail)
        np.testing.assert_array_equal(learner.select_actions(obs, avail, 0.5),
                                      np.where(explore, random_actions, greedy))

    def no_network(*args):
        raise AssertionError("the agent network ran although every agent explores")

    monkeypatch.setattr(q, "agent_forward", no_network)
    for _ in range(20):
        assert avail[np.arange(3), learner.select_actions(obs, avail, 1.0)].all()


def test_epsilon_anneals_linearly_in_env_steps():
    learner = small_learner("qmix", epsilon_start=1.0, epsilon_finish=0.1, epsilon_anneal_time=100)
    for t_env, expected in ((0, 1.0), (50, 0.55), (100, 0.1), (1000, 0.1)):
        learner.t_env = t_env
        assert learner.epsilon() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------
# The environment, the loop and learning
# ------------------------------------------------------------------------------------------


def test_two_step_game_rules():
    env = envs.TwoStepGame()
    info = env.get_env_info()
    assert info == {"state_shape": 3, "obs_shape": 3, "n_actions": 2, "n_agents": 2, "episode_limit": 2}
    for a1, a2, b1, b2, reward in ((0, 1, 1, 0, 7.0), (1, 0, 0, 0, 0.0), (1, 1, 1, 1, 8.0),
                                   (1, 0, 1, 0, 1.0), (1, 1, 0, 1, 1.0)):
        env.reset()
        np.testing.assert_array_equal(env.get_obs(), [[1, 0, 0], [1, 0, 0]])
        assert env.step([a1, a2]) == (0.0, False, {"episode_limit": False})
        assert env.get_state().tolist() == ([0, 1, 0] if a1 == 0 else [0, 0, 1])
        assert env.step(np.array([b1, b2])) == (reward, True, {"episode_limit": False})
        assert env.get_state().tolist() == [0, 0, 0]
        with pytest.raises(RuntimeError):
            env.step([0, 0])


@pytest.mark.parametrize("actions", [[0], [0, 2], [-1, 0], [0.5, 1], [0, 0, 0]])
def test_two_step_game_rejects_bad_actions(actions):
    env = envs.TwoStepGame()
    with pytest.raises((ValueError, TypeError), match="actions"):
        env.step(actions)
    assert env.get_state().tolist() == [1, 0, 0]  # nothing happened


def test_time_limit_is_not_stored_as_terminal():
    class Corridor(envs.MultiAgentEnv):
        """One agent, never terminates by itself; stops at the time limit."""
        n_agents, n_actions, episode_limit = 1, 2, 3

        def __init__(self):
            self.reset()

        def reset(self, seed=None):
            self.t = 0

        def step(self, actions):
            self.t += 1
            return 1.0, self.t >= 3, {"episode_limit": self.t >= 3}

        def get_obs(self):
            return np.full((1, 1), self.t, dtype=float)

        def get_state(self):
            return np.full(1, self.t, dtype=float)

        def get_avail_actions(self):
            return np.ones((1, 2))

    config = q.Config(mixer="vdn", t_max=3, batch_size=8)
    learner = q.train(Corridor(), config)
    stored = learner.buffer.in_order()
    assert stored["terminated"].tolist() == [False, False, False]
    assert q.evaluate(Corridor(), learner, 2, seed=0)["success_rate"] == 0.0


def two_step_config(mixer, seed=0):
    """Full exploration as in the paper, sized to learn the game in a few seconds."""
    return q.Config(mixer=mixer, epsilon_start=1.0, epsilon_finish=1.0, t_max=4000,
                    agent_hidden_dims=(32,), hypernet_layers=1, target_update_interval=100,
                    lr=1e-3, seed=seed)


@pytest.mark.parametrize("mixer,expected", [("qmix", 8.0), ("vdn", 7.0)])
def test_two_step_game_qmix_earns_8_and_vdn_7(mixer, expected):
    env = envs.TwoStepGame()
    learner = q.train(env, two_step_config(mixer))
    assert q.evaluate(env, learner, 1, seed=0)["mean_return"] == expected


def test_same_seed_same_losses_bit_for_bit():
    def losses(seed):
        seen = []
        config = q.Config(mixer="qmix", t_max=300, agent_hidden_dims=(16,), seed=seed)
        q.train(envs.TwoStepGame(), config,
                callback=lambda learner, *_: seen.append(learner.last_diagnostics))
        return [d["loss"] for d in seen if d is not None]

    first = losses(3)
    assert first == losses(3)
    assert first != losses(4)


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("mixer", "qmax"), ("hypernet_layers", 3), ("gamma", 1.5),
                                         ("lr", 0), ("batch_size", 0), ("dtype", "float16"),
                                         ("agent_hidden_dims", (64, 0)), ("double_q", "yes"),
                                         ("grad_norm_clip", float("nan")), ("t_max", -1),
                                         ("adam_betas", (0.9,)), ("epsilon_finish", 2.0)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"Config.{field}"):
        q.Config(**{field: value})


# ------------------------------------------------------------------------------------------
# Meeting Gridworld
# ------------------------------------------------------------------------------------------


def gridworld_at(positions, goal, **kwargs):
    """A MeetingGridworld with its agents and goal put where a test wants them."""
    env = envs.MeetingGridworld(n_agents=len(positions), **kwargs)
    env.positions, env.goal = np.array(positions), np.array(goal)
    return env


@pytest.mark.parametrize("start,expected", [
    ((2, 2), [(1, 2), (3, 2), (2, 1), (2, 3), (2, 2)]),  # centre: up, down, left, right, stay
    ((0, 0), [(0, 0), (1, 0), (0, 0), (0, 1), (0, 0)]),  # top-left corner: up and left clip
    ((4, 4), [(3, 4), (4, 4), (4, 3), (4, 4), (4, 4)]),  # bottom-right: down and right clip
    ((0, 4), [(0, 4), (1, 4), (0, 3), (0, 4), (0, 4)]),
])
def test_gridworld_every_action_and_wall_clipping(start, expected):
    for action, target in enumerate(expected):
        env = gridworld_at([start], goal=(3, 0) if start != (3, 0) else (1, 1))
        env.step([action])
        assert tuple(env.positions[0]) == target, f"action {action} from {start}"


def test_gridworld_moves_are_simultaneous_and_cells_may_be_shared():
    env = gridworld_at([(1, 1), (1, 3)], goal=(4, 4))
    env.step([3, 2])  # right, left: both into (1, 2) at once
    np.testing.assert_array_equal(env.positions, [[1, 2], [1, 2]])
    env.step([1, 0])  # down, up: they pass each other
    np.testing.assert_array_equal(env.positions, [[2, 2], [0, 2]])


def test_gridworld_reward_and_termination():
    env = gridworld_at([(2, 1), (2, 4)], goal=(2, 2))
    assert env.step([3, 4]) == (-0.01, False, {"episode_limit": False})  # one agent arrives alone
    assert env.step([4, 2]) == (-0.01, False, {"episode_limit": False})
    assert env.step([4, 2]) == (10.0, True, {"episode_limit": False})  # all on the goal at once
    with pytest.raises(RuntimeError):
        env.step([4, 4])


def test_gridworld_time_limit_is_flagged_and_not_terminal_for_the_learner():
    env = gridworld_at([(0, 0), (4, 4)], goal=(2, 2), max_steps=3)
    assert env.step([4, 4])[1:] == (False, {"episode_limit": False})
    assert env.step([4, 4])[1:] == (False, {"episode_limit": False})
    assert env.step([4, 4]) == (-0.01, True, {"episode_limit": True})
    learner = q.train(envs.MeetingGridworld(max_steps=3), q.Config(t_max=30, batch_size=64))
    stored = learner.buffer.in_order()
    assert not stored["terminated"][stored["reward"] < 0].any()  # time-outs bootstrap


def test_gridworld_reaching_the_goal_on_the_last_step_is_a_success():
    env = gridworld_at([(2, 1), (2, 3)], goal=(2, 2), max_steps=1)
    assert env.step([3, 2]) == (10.0, True, {"episode_limit": False})


def test_gridworld_starts_on_distinct_cells():
    for n_agents, grid_size in ((2, 5), (3, 2), (1, 2)):
        env = envs.MeetingGridworld(grid_size=grid_size, n_agents=n_agents)
        for seed in range(200):
            env.reset(seed=seed)
            cells = {tuple(p) for p in env.positions} | {tuple(env.goal)}
            assert len(cells) == n_agents + 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(grid_size=2, n_agents=4), "too few"), (dict(grid_size=1), "grid_size"),
    (dict(n_agents=0), "n_agents"), (dict(max_steps=0), "max_steps"), (dict(grid_size=2.5), "grid_size")])
def test_gridworld_says_clearly_when_it_cannot_be_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        envs.MeetingGridworld(**kwargs)


@pytest.mark.parametrize("observe_others", [False, True])
def test_gridworld_observation_and_state_shapes_and_scaling(observe_others):
    env = gridworld_at([(0, 1), (2, 3), (4, 0)], goal=(3, 3), observe_others=observe_others)
    obs, state = env.get_obs(), env.get_state()
    expected_obs = [[0, 1, 3, 3], [2, 3, 3, 3], [4, 0, 3, 3]]
    if observe_others:
        expected_obs = [row + others for row, others in
                        zip(expected_obs, [[2, 3, 4, 0], [0, 1, 4, 0], [0, 1, 2, 3]])]
    np.testing.assert_allclose(obs, np.array(expected_obs) / 5)
    np.testing.assert_allclose(state, np.array([0, 1, 2, 3, 4, 0, 3, 3]) / 5)
    info = env.get_env_info()
    assert (info["obs_shape"], info["state_shape"]) == ((8 if observe_others else 4), 8)
    assert info["n_actions"] == 5 and info["n_agents"] == 3 and info["episode_limit"] == 50
    assert obs.min() >= 0 and obs.max() < 1
    np.testing.assert_array_equal(env.get_avail_actions(), np.ones((3, 5)))


def test_gridworld_seeded_reset_replays_an_episode():
    def trajectory(seed):
        env = envs.MeetingGridworld(n_agents=3, grid_size=6)
        env.reset(seed=seed)
        seen = [env.get_state()]
        for actions in np.random.default_rng(0).integers(0, 5, (20, 3)):
            env.step(actions)
            seen.append(env.get_state())
            if env.done:
                break
        return np.array(seen)

    np.testing.assert_array_equal(trajectory(11), trajectory(11))
    assert not np.array_equal(trajectory(11)[0], trajectory(12)[0])


@pytest.mark.parametrize("actions,error", [([5, 0], ValueError), ([-1, 0], ValueError), ([0], ValueError),
                                           ([0, 0, 0], ValueError), ([1.0, 0.0], TypeError)])
def test_gridworld_rejects_bad_actions_and_changes_nothing(actions, error):
    env = gridworld_at([(1, 1), (3, 3)], goal=(0, 4))
    with pytest.raises(error, match="actions"):
        env.step(actions)
    np.testing.assert_array_equal(env.positions, [[1, 1], [3, 3]])
    assert env.steps == 0


@pytest.mark.parametrize("positions,goal,shortest", [
    ([(0, 0), (4, 4)], (2, 2), 4), ([(0, 0), (0, 1)], (0, 4), 4), ([(1, 1), (4, 4)], (1, 2), 5),
    ([(3, 3)], (3, 0), 3), ([(2, 2), (2, 0), (2, 4)], (2, 3), 3)])
def test_gridworld_shortest_length(positions, goal, shortest):
    assert gridworld_at(positions, goal).optimal_length() == shortest


def gridworld_learning_config(t_max):
    """gamma 0.95, as in examples/meeting_gridworld.py (the README says why)."""
    return q.Config(mixer="qmix", t_max=t_max, epsilon_anneal_time=4000, buffer_size=10000, gamma=0.95,
                    target_update_interval=20, hypernet_layers=1, seed=0)


def test_qmix_solves_a_small_gridworld_and_an_untrained_one_cannot():
    """3x3, 2 agents: QMIX must succeed almost always and almost on the shortest path."""
    env = envs.MeetingGridworld(grid_size=3, n_agents=2, max_steps=20)
    bar = {"success_rate": 0.97, "optimality_ratio": 1.10}
    untrained = q.evaluate(env, q.Learner(gridworld_learning_config(0), env.get_env_info()), 300, seed=2**31)
    assert untrained["success_rate"] < bar["success_rate"]
    learner = q.train(env, gridworld_learning_config(10000))
    result = q.evaluate(env, learner, 300, seed=2**31)
    assert result["success_rate"] >= bar["success_rate"], result
    assert result["optimality_ratio"] <= bar["optimality_ratio"], result


# ------------------------------------------------------------------------------------------
# Checkpoints, bad input and numerical failure
# ------------------------------------------------------------------------------------------

import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def resume_config(t_max):
    return q.Config(t_max=t_max, agent_hidden_dims=(16,), mixing_embed_dim=8, hypernet_embed=8,
                    batch_size=16, buffer_size=300, target_update_interval=3, epsilon_anneal_time=500, seed=5)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    """Train N steps, save with the buffer, load in a NEW process, train to N + M: the same
    parameters, optimiser state, counters and buffer as N + M steps without stopping."""
    straight = q.train(envs.MeetingGridworld(grid_size=4), resume_config(900))
    first = q.train(envs.MeetingGridworld(grid_size=4), resume_config(400))
    first.save(tmp_path / "half.npz")
    script = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import envs, qmix_np as q
from test_qmix_np import resume_config
env = envs.MeetingGridworld(grid_size=4)
learner = q.Learner.load({str(tmp_path / 'half.npz')!r}, env_info=env.get_env_info(), config=resume_config(900))
q.train(env, resume_config(900), learner=learner).save({str(tmp_path / 'resumed.npz')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=HERE)
    resumed = q.Learner.load(tmp_path / "resumed.npz")
    assert resumed.t_env == straight.t_env and resumed.t_env >= 900 > first.t_env
    for key, value in straight.state_arrays().items():
        if key != "config":  # t_max is the only difference
            np.testing.assert_array_equal(resumed.state_arrays()[key], value, err_msg=key)
    assert resumed.train_steps == straight.train_steps and resumed.episode == straight.episode


def saved(tmp_path, **overrides):
    learner = q.train(envs.TwoStepGame(), q.Config(t_max=80, agent_hidden_dims=(8,), **overrides))
    path = tmp_path / "run.npz"
    learner.save(path)
    return learner, path


def rewrite(path, change):
    """Rewrite a checkpoint's arrays through change(dict) -> dict, with np.savez (no digest fix-up)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(path, **change(arrays))


def test_checkpoint_round_trip_without_the_buffer(tmp_path):
    learner, _ = saved(tmp_path)
    learner.save(tmp_path / "small.npz", include_buffer=False)
    restored = q.Learner.load(tmp_path / "small.npz")
    np.testing.assert_array_equal(restored.theta, learner.theta)
    assert len(restored.buffer) == 0 and restored.t_env == learner.t_env
    assert restored.rng.integers(1 << 30) == learner.rng.integers(1 << 30)


def test_a_pickled_object_array_is_refused_without_being_unpickled(tmp_path):
    _, path = saved(tmp_path)
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    rewrite(path, lambda a: {**a, "theta": np.array([Trap()], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle|Object arrays"):
        q.Learner.load(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_refused(tmp_path):
    _, path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt or not .npz"):
        q.Learner.load(path)


def test_a_checkpoint_from_another_configuration_is_refused(tmp_path):
    _, path = saved(tmp_path)
    with pytest.raises(ValueError, match="differs in \\['agent_hidden_dims'\\]"):
        q.Learner.load(path, config=q.Config(agent_hidden_dims=(9,)))
    with pytest.raises(ValueError, match="environment"):
        q.Learner.load(path, env_info=envs.MeetingGridworld().get_env_info())


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "theta": a["theta"][:-1]}, "digest"),
    (lambda a: {k: v for k, v in a.items() if k != "adam_v"}, "lacks \\['adam_v'\\]"),
    (lambda a: {**a, "version": np.array(2)}, "version 2"),
    (lambda a: {k: v for k, v in a.items() if k != "format"}, "not a qmix-np checkpoint"),
])
def test_a_tampered_checkpoint_is_refused(tmp_path, change, message):
    _, path = saved(tmp_path)
    rewrite(path, change)
    with pytest.raises(ValueError, match=message):
        q.Learner.load(path)


def test_a_consistent_but_wrong_shaped_checkpoint_is_refused(tmp_path):
    """Even with a recomputed digest, arrays must fit the stored config."""
    _, path = saved(tmp_path)

    def shrink(a):
        a = {k: v for k, v in a.items() if k != "sha256"}
        a["adam_m"] = a["adam_m"][:10]
        return {**a, "sha256": np.array(q._digest(a))}

    rewrite(path, shrink)
    with pytest.raises(ValueError, match="adam_m has shape \\(10,\\)"):
        q.Learner.load(path)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    learner, path = saved(tmp_path)
    before = path.read_bytes()
    learner.train_step()
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    real_write = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        learner.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.npz"]  # no temporary left behind


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
@pytest.mark.parametrize("q_bias,what,finite_elements", [
    (1e30, "loss \\(inf\\)", False),  # Q ~ 1e30: the squared TD error overflows float32
    (3e9, "norm \\(inf\\)", True),  # loss ~ 1e19, every gradient element finite, their sum of squares not
])
def test_a_non_finite_step_raises_and_changes_nothing(q_bias, what, finite_elements):
    learner = small_learner("qmix", dtype="float32")
    rng = np.random.default_rng(15)
    for _ in range(40):
        learner.buffer.add(**transition(rng, learner))
    learner.params["agent"]["fc3.bias"][:] = q_bias
    batch = learner.buffer.sample(learner.config.batch_size, copy.deepcopy(learner.rng))  # train_step's batch
    loss, grads, _ = q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)
    assert np.isfinite(q.flat_grad(grads, learner.params)).all() == math.isfinite(loss) == finite_elements
    theta, m, v = learner.theta.copy(), learner.optimiser.m.copy(), learner.optimiser.v.copy()
    with pytest.raises(FloatingPointError, match=f"{what}.* is not finite"):
        learner.train_step()
    np.testing.assert_array_equal(learner.theta, theta)
    np.testing.assert_array_equal(learner.optimiser.m, m)
    np.testing.assert_array_equal(learner.optimiser.v, v)
    assert learner.optimiser.t == 0 and learner.train_steps == 0

    learner.config.on_nonfinite = "skip"
    assert learner.train_step()["skipped"] is True
    assert learner.skipped_steps == 1 and learner.train_steps == 0
    np.testing.assert_array_equal(learner.theta, theta)


def bad_input_cases():
    """(name, call(learner, env, good), expected error, words the message must contain)."""
    def add(**change):
        return lambda learner, env, good: learner.buffer.add(**{**good, **change})

    nan_obs = np.zeros((3, 4))
    nan_obs[1, 2] = np.nan
    return [
        ("env: too few actions", lambda l, e, g: e.step([0]), ValueError, "actions must have shape (2,)"),
        ("env: too many actions", lambda l, e, g: e.step([0, 0, 0]), ValueError, "actions must have shape"),
        ("env: action out of range", lambda l, e, g: e.step([0, 5]), ValueError, "[0, 5)"),
        ("env: negative action", lambda l, e, g: e.step([-1, 0]), ValueError, "[0, 5)"),
        ("env: float actions", lambda l, e, g: e.step([0.0, 1.0]), TypeError, "integers"),
        ("env: unavailable action", lambda l, e, g: e.step([4, 4]), ValueError, "unavailable"),
        ("buffer: obs shape", add(obs=np.zeros((3, 5))), ValueError, "obs must have shape (3, 4)"),
        ("buffer: state shape", add(state=np.zeros(4)), ValueError, "state must have shape (5,)"),
        ("buffer: actions shape", add(actions=np.zeros(2, int)), ValueError, "actions must have shape (3,)"),
        ("buffer: action out of range", add(actions=np.array([0, 4, 0])), ValueError, "[0, 4)"),
        ("buffer: nan reward", add(reward=float("nan")), ValueError, "reward must be finite"),
        ("buffer: inf reward", add(reward=np.inf), ValueError, "reward must be finite"),
        ("buffer: nan obs", add(obs=nan_obs), ValueError, "obs must be finite"),
        ("buffer: inf next_obs", add(next_obs=np.full((3, 4), -np.inf)), ValueError, "next_obs must be finite"),
        ("buffer: text obs", add(obs=np.full((3, 4), "a")), TypeError, "obs must hold numbers"),
        ("buffer: avail not 0/1", add(avail_actions=np.full((3, 4), 2)), ValueError, "0/1"),
        ("buffer: no available action", add(next_avail_actions=np.zeros((3, 4))), ValueError, "no available action"),
        ("select: obs shape", lambda l, e, g: l.select_actions(np.zeros((2, 4)), np.ones((3, 4))), ValueError, "obs must have shape (3, 4)"),
        ("select: avail shape", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.ones((3, 5))), ValueError, "avail_actions must have shape (3, 4)"),
        ("select: nan obs", lambda l, e, g: l.select_actions(nan_obs, np.ones((3, 4))), ValueError, "obs must be finite"),
        ("select: an agent with no action", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.eye(3, 4) * np.array([[1], [0], [1]])), ValueError, "agent(s) [1] have no available action"),
        ("select: epsilon above 1", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.ones((3, 4)), 1.5), ValueError, "epsilon must be a number in [0, 1], got 1.5"),
        ("select: nan epsilon", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.ones((3, 4)), float("nan")), ValueError, "epsilon must be a number in [0, 1], got nan"),
        ("config: unknown mixer", lambda l, e, g: q.Config(mixer="qtran"), ValueError, "Config.mixer"),
        ("config: negative lr", lambda l, e, g: q.Config(lr=-1.0), ValueError, "Config.lr"),
        ("config: float batch", lambda l, e, g: q.Config(batch_size=32.0), ValueError, "Config.batch_size"),
        ("learner: not a Config", lambda l, e, g: q.Learner({"mixer": "qmix"}, e.get_env_info()), TypeError, "config must be a Config"),
        ("mixer: unknown name", lambda l, e, g: q.get_mixer("sum"), ValueError, "mixer must be one of"),
        ("learner: env_info without n_actions", lambda l, e, g: q.Learner(q.Config(), {"n_agents": 2}), ValueError, "lacks ['n_actions'"),
    ]


class OneUnavailable(envs.MeetingGridworld):
    """Meeting Gridworld where 'stay' is never available, so an unavailable action exists."""

    def get_avail_actions(self):
        avail = super().get_avail_actions()
        avail[:, 4] = 0
        return avail


@pytest.mark.parametrize("name,call,error,words", bad_input_cases(), ids=[c[0] for c in bad_input_cases()])
def test_bad_input_is_refused_clearly_and_nothing_stored_changes(name, call, error, words):
    learner = small_learner("qmix")
    rng = np.random.default_rng(16)
    for tag in range(5):
        learner.buffer.add(**transition(rng, learner, float(tag)))
    env = OneUnavailable(seed=3)
    good = transition(rng, learner, 9.0)
    stored = {k: v.copy() for k, v in learner.buffer.data.items()}
    theta, rng_state = learner.theta.copy(), json.dumps(learner.rng.bit_generator.state)
    positions, steps = env.positions.copy(), env.steps

    with pytest.raises(error) as caught:
        call(learner, env, good)
    assert words in str(caught.value)
    for key, value in stored.items():
        np.testing.assert_array_equal(learner.buffer.data[key], value, err_msg=key)
    assert len(learner.buffer) == 5 and learner.buffer.next_index == 5
    np.testing.assert_array_equal(learner.theta, theta)
    assert json.dumps(learner.rng.bit_generator.state) == rng_state
    np.testing.assert_array_equal(env.positions, positions)
    assert env.steps == steps


# ------------------------------------------------------------------------------------------
# The example scripts, at tiny budgets, and the benchmark (its timings are not asserted: this is
# a shared machine)
# ------------------------------------------------------------------------------------------


def run_example(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True)


def test_the_examples_run_to_their_last_line_at_tiny_budgets(tmp_path):
    two_step = run_example("examples/vdn_vs_qmix.py", "--seeds", "1", "--episodes", "50")
    assert two_step.returncode == 0, two_step.stderr
    assert "QMIX: greedy return per seed" in two_step.stdout and "IQL: greedy return" in two_step.stdout

    gridworld = run_example("examples/meeting_gridworld.py", "--seeds", "1", "--t-max", "300",
                            "--eval-episodes", "10", "--curve-every", "150", "--curve-episodes", "5",
                            "--out", str(tmp_path))
    assert gridworld.returncode == 0, gridworld.stderr
    assert "wrote" in gridworld.stdout and (tmp_path / "meeting_gridworld_5x5_2agents.csv").exists()

    soak = run_example("examples/soak.py", "--t-max", "300", "--check-every", "150", "--eval-episodes", "10")
    *_, bounds, success = ["", "", *soak.stdout.strip().splitlines()]  # its last two lines
    assert success.startswith("greedy success after the soak"), soak.stderr
    assert soak.returncode == (0 if "within 0.5 of the bounds" in bounds else 1)  # its verdict


def test_benchmark_runs_and_reports_every_part_as_json():
    run = run_example("examples/benchmark.py", "--json", "--reps", "3", "--warmup", "1",
                      "--sizes", "2,3,2,2,4", "3,2,4,5,6", "--e2e-steps", "100")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["blas_threads"].startswith("1 ") and result["dtype"] == "float32"
    assert [row["size"] for row in result["train_step"]] == [dict(N=2, O=3, A=2, S=2, B=4),
                                                            dict(N=3, O=2, A=4, S=5, B=6)]
    timed = [*result["train_step"], result["greedy_actions_2_agents"], result["epsilon_greedy_actions_2_agents"]]
    assert all(0 < t["p10_us"] <= t["median_us"] <= t["p90_us"] for t in timed)
    training = result["training"]
    assert result["gridworld_random_steps_per_s"] > 0 and training["env_steps_per_s"] > 0
    assert 0 < training["train_step_median_us"] and 0 < training["rest_per_env_step_us"]
    assert 0 <= training["epsilon_to"] < training["epsilon_from"] <= 1
    per_env_step_us = training["train_step_mean_us"] + training["rest_per_env_step_us"]
    assert per_env_step_us == pytest.approx(1e6 / training["env_steps_per_s"], rel=0.01)
