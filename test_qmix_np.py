"""Tests for qmix_np and envs: gradient checks first, then the learner's parts, then learning.

Gradient checks: float64, centred differences (h = 1e-5), the output contracted with a RANDOM
upstream gradient (all-ones would hide transpose bugs), relative error ||a - n|| / (||a|| + ||n||)
per tensor, tolerance 1e-7. A correct check lands near 1e-10; a bug lands near 1. The largest
error of the run is printed at the end of the session.
"""
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
    config = q.Config(mixer=mixer, mixing_embed_dim=5, hypernet_embed=6, agent_hidden_dims=(7, 6),
                      dtype="float64", **overrides)
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
    targets = q.td_targets(learner.params, learner.target_params, batch, learner.config)
    _, grads, _ = q.loss_and_grads(learner.params, batch, targets, learner.config)

    def f():
        return q.loss_and_grads(learner.params, batch, targets, learner.config)[0]

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
