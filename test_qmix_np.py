"""The companion to qmix_np.py: gradient checks first, then the learner's parts, then learning.

Gradient checks: float64, centred differences (h = 1e-5), the output contracted with a RANDOM
upstream gradient (all-ones would hide transpose bugs), relative error ||a - n|| / (||a|| + ||n||)
per tensor, tolerance 1e-7. A correct check lands near 1e-10; a bug lands near 1. The largest
error of the run is printed at the end of the session.

Other tests sit beside this file: test_envs.py (environments and the env interface),
test_checkpoints.py (checkpoints and bad input), test_pymarl_parity.py (against a PyTorch
restatement of pymarl's learner; skipped without torch), test_examples.py (the scripts).
"""
import contextlib
import copy
import dataclasses
import math
import sys
import types
import warnings

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


@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
def test_linear_gradients(grouped):
    rng = np.random.default_rng(1)
    lead = (3,) if grouped else ()
    x = rng.normal(size=lead + (4, 5))
    params = {"weight": rng.normal(size=lead + (6, 5)), "bias": rng.normal(size=lead + (6,))}
    upstream = rng.normal(size=lead + (4, 6))

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
# Gradient checks: the agent network and the mixers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
def test_gru_cell_gradients(grouped):
    """One step of the GRU cell: dL/dx, dL/dh and all four parameter tensors."""
    rng = np.random.default_rng(11)
    lead = (3,) if grouped else ()
    x, h = rng.normal(size=lead + (4, 5)), rng.normal(size=lead + (4, 6))
    params = {"weight_ih": rng.normal(size=lead + (18, 5)), "weight_hh": rng.normal(size=lead + (18, 6)),
              "bias_ih": rng.normal(size=lead + (18,)), "bias_hh": rng.normal(size=lead + (18,))}
    upstream = rng.normal(size=lead + (4, 6))

    def f():
        return np.sum(q.gru_cell_forward(x, h, **params)[0] * upstream)

    dx, dh, grads = q.gru_cell_backward(upstream, q.gru_cell_forward(x, h, **params)[1])
    check_gradients(f, {"x": x, "h": h, **params}, {"x": dx, "h": dh, **grads}, f"gru_cell[{grouped}]")


@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
def test_gru_unroll_gradients_through_time(grouped):
    """Six steps, a random upstream gradient at EVERY step: backpropagation through time, with the
    input products of all steps as one product and the weights' gradients summed after the loop."""
    rng = np.random.default_rng(12)
    lead = (3,) if grouped else ()
    x, h0 = rng.normal(size=lead + (6, 4, 5)), rng.normal(size=lead + (4, 3))
    params = q.init_gru_cell(rng, "rnn", 5, 3, 3 if grouped else None)
    weights = {k.split(".")[1]: v for k, v in params.items()}
    upstream = rng.normal(size=lead + (6, 4, 3))

    def f():
        return np.sum(q.gru_forward(x, h0, weights)[0] * upstream)

    dx, grads = q.gru_backward(upstream, q.gru_forward(x, h0, weights)[1])
    check_gradients(f, {"x": x, **weights}, {"x": dx, **grads}, f"gru_unroll[{grouped}]")


@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
def test_gru_sequence_equals_stepping_the_cell(grouped):
    """gru_forward / gru_backward compute what stepping gru_cell_forward / gru_cell_backward through
    time computes, on a batch of episodes of lengths 1, 4 and 7 padded to 7 steps (the loss's
    gradient is zero after each episode's end, as the masked TD loss makes it)."""
    rng = np.random.default_rng(14)
    lead, lengths, steps = (2,) if grouped else (), np.array([1, 4, 7]), 7
    x, h0 = rng.normal(size=lead + (steps, 3, 5)), rng.normal(size=lead + (3, 4))
    weights = {k.split(".")[1]: v for k, v in q.init_gru_cell(rng, "rnn", 5, 4, 2 if grouped else None).items()}
    upstream = rng.normal(size=lead + (steps, 3, 4)) * (np.arange(steps)[:, None] < lengths)[..., None]

    hs, cache = q.gru_forward(x, h0, weights)
    dx, grads = q.gru_backward(upstream, cache)

    h, cell_caches = h0, []
    for t in range(steps):
        h, cell_cache = q.gru_cell_forward(x[..., t, :, :], h, **weights)
        np.testing.assert_allclose(hs[..., t, :, :], h, rtol=1e-13, atol=1e-15)
        cell_caches.append(cell_cache)
    dh, cell_grads = 0.0, {k: 0.0 for k in weights}
    for t in reversed(range(steps)):
        dx_t, dh, step_grads = q.gru_cell_backward(upstream[..., t, :, :] + dh, cell_caches[t])
        np.testing.assert_allclose(dx[..., t, :, :], dx_t, rtol=1e-12, atol=1e-14)
        cell_grads = {k: cell_grads[k] + step_grads[k] for k in weights}
    for k in weights:
        np.testing.assert_allclose(grads[k], cell_grads[k], rtol=1e-12, atol=1e-14, err_msg=k)
    np.testing.assert_array_equal(dx[..., 1:, 0, :], 0)  # nothing reaches an input after its episode's end


def test_gru_cell_matches_its_equations_written_with_loops():
    """An independent, entry-by-entry reading of the GRUCell equations (REFERENCE: torch.nn.GRUCell)."""
    rng = np.random.default_rng(13)
    x, h = rng.normal(size=(2, 3)), rng.normal(size=(2, 4))
    w_ih, w_hh, b_ih, b_hh = rng.normal(size=(12, 3)), rng.normal(size=(12, 4)), rng.normal(size=12), rng.normal(size=12)
    out, _ = q.gru_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh)

    def gate(row, m):
        return (sum(w_ih[row, k] * x[m, k] for k in range(3)) + b_ih[row],
                sum(w_hh[row, k] * h[m, k] for k in range(4)) + b_hh[row])

    for m in range(2):
        for j in range(4):
            r = 1 / (1 + math.exp(-sum(gate(j, m))))
            z = 1 / (1 + math.exp(-sum(gate(4 + j, m))))
            i_n, h_n = gate(8 + j, m)
            n = math.tanh(i_n + r * h_n)
            assert out[m, j] == pytest.approx((1 - z) * n + z * h[m, j], rel=1e-12)


AGENT_KEYS = {True: ["fc1.weight", "fc1.bias", "rnn.weight_ih", "rnn.weight_hh", "rnn.bias_ih", "rnn.bias_hh",
                     "fc2.weight", "fc2.bias"],  # pymarl's RNNAgent.state_dict(), in its order
              False: ["fc1.weight", "fc1.bias", "rnn.weight", "rnn.bias", "fc2.weight", "fc2.bias"]}


@pytest.mark.parametrize("use_rnn", [True, False], ids=["gru", "mlp"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-agent"])
def test_agent_network_gradients(shared, use_rnn):
    """Over B episodes of T steps at once, as the learner runs it, with a random upstream
    gradient at every step: for the GRU, backpropagation through the whole unroll."""
    rng = np.random.default_rng(7)  # seed 7: every ReLU input lies over 1e-4 from the kink, far beyond H
    batch, steps, n_agents, in_dim, n_actions = 3, 4, 3, 5, 4
    params = q.init_agent_params(rng, in_dim, 8, n_actions, use_rnn, None if shared else n_agents)
    assert list(params) == AGENT_KEYS[use_rnn]
    inputs = rng.normal(size=(batch, steps, n_agents, in_dim))
    upstream = rng.normal(size=(batch, steps, n_agents, n_actions))

    def f():
        return np.sum(q.agent_forward(params, inputs)[0] * upstream)

    grads = q.agent_backward(upstream, q.agent_forward(params, inputs)[2])
    check_gradients(f, params, grads, f"agent[{'shared' if shared else 'per-agent'},use_rnn={use_rnn}]")


@pytest.mark.parametrize("use_rnn", [True, False], ids=["gru", "mlp"])
def test_per_agent_networks_are_independent(use_rnn):
    """Agent i's Qs depend only on agent i's slice of the stacked parameters."""
    rng = np.random.default_rng(4)
    params = q.init_agent_params(rng, 3, 5, 2, use_rnn, n_agents=2)
    inputs = rng.normal(size=(2, 6, 2, 3))
    before, _, _ = q.agent_forward(params, inputs)
    params["fc1.weight"][1] += 1.0
    after, _, _ = q.agent_forward(params, inputs)
    np.testing.assert_array_equal(before[..., 0, :], after[..., 0, :])
    assert not np.allclose(before[..., 1, :], after[..., 1, :])


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-agent"])
def test_each_agents_qs_depend_only_on_its_own_inputs(shared):
    """Decentralised execution with memory: changing agent 1's inputs at step 2 changes no Q of
    agents 0 and 2 at any step, and agent 1's only from step 2 on."""
    rng = np.random.default_rng(5)
    params = q.init_agent_params(rng, 4, 6, 3, True, None if shared else 3)
    inputs = rng.normal(size=(2, 5, 3, 4))
    before, _, _ = q.agent_forward(params, inputs)
    inputs[:, 2, 1] += 1.0
    after, _, _ = q.agent_forward(params, inputs)
    np.testing.assert_array_equal(before[:, :, [0, 2]], after[:, :, [0, 2]])
    np.testing.assert_array_equal(before[:, :2, 1], after[:, :2, 1])
    assert not np.allclose(before[:, 4, 1], after[:, 4, 1])  # remembered two steps later


def test_running_step_by_step_equals_running_the_episode():
    """Acting feeds one step at a time and carries the hidden state; training unrolls the whole
    episode at once. The two must give the same Qs."""
    rng = np.random.default_rng(6)
    params = q.init_agent_params(rng, 4, 6, 3, True, 3)
    inputs = rng.normal(size=(1, 5, 3, 4))
    whole, last_hidden, _ = q.agent_forward(params, inputs)
    hidden = None
    for t in range(5):
        step_q, hidden, _ = q.agent_forward(params, inputs[:, t:t + 1], hidden)
        np.testing.assert_allclose(step_q[:, 0], whole[:, t], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(hidden, last_hidden, rtol=1e-13, atol=1e-13)


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
# Gradient checks: the masked TD loss over a batch of episodes, end to end
# ------------------------------------------------------------------------------------------

ENV_INFO = {"n_agents": 3, "obs_shape": 4, "state_shape": 5, "n_actions": 4, "episode_limit": 6}


def small_learner(mixer="qmix", **overrides):
    config = q.Config(**{"mixer": mixer, "mixing_embed_dim": 5, "hypernet_embed": 6, "hidden_dim": 7,
                         "dtype": "float64", "batch_size": 4, "buffer_size": 20, **overrides})
    return q.Learner(config, ENV_INFO)


def random_episode(rng, learner, length, terminal, tag=None):
    """An episode of `length` steps with random inputs, some actions unavailable, ending in a
    terminal step or (terminal False) at a time limit. `tag` fills obs and reward, to find it again."""
    n, o, s, a = learner.n_agents, learner.obs_dim, learner.state_dim, learner.n_actions
    avail = rng.random((length + 1, n, a)) < 0.6
    avail[..., rng.integers(a)] = True  # one action always available
    actions = np.where(avail[:-1], rng.random((length, n, a)), -1).argmax(-1)  # (T, N): available ones
    obs = rng.normal(size=(length + 1, n, o)) if tag is None else np.full((length + 1, n, o), float(tag))
    reward = rng.normal(size=length) if tag is None else np.full(length, float(tag))
    return {"obs": obs, "state": rng.normal(size=(length + 1, s)), "avail_actions": avail,
            "actions": actions, "reward": reward, "terminated": np.arange(length) == length - 1 if terminal
            else np.zeros(length, bool)}


def episode_batch(learner, seed=7):
    """A batch of 4 episodes of lengths 2 to 6, terminal and time-limited ends, through the buffer."""
    rng = np.random.default_rng(seed)
    for length, terminal in ((3, True), (6, False), (2, True), (5, True)):
        learner.buffer.insert(random_episode(rng, learner, length, terminal))
    return learner.buffer.sample(4, rng)


@pytest.mark.parametrize("mixer,layers,shared,double_q,use_rnn", [
    ("qmix", 1, True, True, True), ("qmix", 2, True, True, True), ("qmix", 2, False, True, True),
    ("qmix", 2, True, False, True), ("vdn", 1, True, True, True), ("vdn", 1, False, True, True),
    ("none", 1, True, True, True), ("none", 1, False, True, True),
    ("qmix", 2, True, True, False), ("qmix", 2, False, True, False), ("vdn", 1, True, True, False),
    ("none", 1, False, True, False)])
def test_masked_episode_loss_gradients_end_to_end(mixer, layers, shared, double_q, use_rnn):
    learner = small_learner(mixer, hypernet_layers=layers, shared_agent=shared, double_q=double_q,
                            use_rnn=use_rnn)
    rng = np.random.default_rng(7)
    learner.target_theta += rng.normal(scale=0.1, size=learner.theta.shape)
    batch = episode_batch(learner)
    assert batch["actions"].shape == (4, 6, 3) and batch["obs"].shape == (4, 7, 3, 4)
    _, grads, _ = q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)

    def f():  # the targets move with params only through double Q's argmax: piecewise constant
        return q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)[0]

    label = (f"episode_loss[{mixer},{layers},{'shared' if shared else 'per-agent'},double_q={double_q},"
             f"use_rnn={use_rnn}]")
    for group in ("agent", "mixer"):
        check_gradients(f, learner.params[group], grads[group], f"{label}/{group}")
    assert len(learner.params["mixer"]) == {"qmix": 10 if layers == 1 else 14, "vdn": 0, "none": 0}[mixer]


@pytest.mark.parametrize("use_rnn", [True, False], ids=["gru", "mlp"])
def test_padding_after_an_episode_changes_no_gradient(use_rnn):
    """Whatever lies in the steps after an episode's end reaches neither the loss nor any
    gradient, also through the GRU's unroll: the loss, every gradient, bit for bit."""
    learner = small_learner("qmix", use_rnn=use_rnn, shared_agent=False)
    learner.target_theta += np.random.default_rng(1).normal(scale=0.1, size=learner.theta.shape)
    batch = episode_batch(learner)
    loss, grads, _ = q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)
    rng, noisy = np.random.default_rng(2), copy.deepcopy(batch)
    lengths = batch["filled"].sum(axis=1).astype(int)
    assert lengths.min() < batch["actions"].shape[1], "the batch must hold padding"
    for b, length in enumerate(lengths):  # obs, state, avail at t = length are real: the final observation
        for name, start in (("obs", length + 1), ("state", length + 1), ("reward", length), ("terminated", length)):
            noisy[name][b, start:] = rng.normal(size=noisy[name][b, start:].shape)
        noisy["actions"][b, length:] = rng.integers(0, 4, size=noisy["actions"][b, length:].shape)
        noisy["avail_actions"][b, length + 1:] = True
    noisy_loss, noisy_grads, _ = q.loss_and_grads(learner.params, learner.target_params, noisy, learner.config)
    assert noisy_loss == loss
    for group in grads:
        for key in grads[group]:
            np.testing.assert_array_equal(noisy_grads[group][key], grads[group][key], err_msg=key)


def test_the_checker_fails_a_planted_bug(monkeypatch):
    """Swap ReLU's backward for the identity: the check must fail, loudly."""
    monkeypatch.setattr(q, "relu_backward", lambda dout, cache: (dout, {}))
    with pytest.raises(AssertionError, match="relative error"):
        test_agent_network_gradients(shared=True, use_rnn=False)
    what, error = CHECKED.pop()  # the planted failure is not one of the real checks
    assert what.startswith("agent[shared,use_rnn=False]/") and error > 1e-2


def test_loss_is_pymarls_masked_mean_written_with_loops():
    """An independent, step-by-step reading of QLearner.train's targets, mask and loss (VDN)."""
    learner = small_learner("vdn", gamma=0.9)
    learner.target_theta += np.random.default_rng(1).normal(scale=0.3, size=learner.theta.shape)
    batch = episode_batch(learner, seed=2)
    c = learner.config
    loss, _, _ = q.loss_and_grads(learner.params, learner.target_params, batch, c)
    inputs = q.episode_agent_inputs(batch, c)
    online, _, _ = q.agent_forward(learner.params["agent"], inputs)
    target, _, _ = q.agent_forward(learner.target_params["agent"], inputs)
    total, count = 0.0, 0
    for b in range(4):
        for t in range(batch["actions"].shape[1]):
            if not batch["filled"][b, t] or (t > 0 and batch["terminated"][b, t - 1]):
                continue
            chosen = sum(online[b, t, i, batch["actions"][b, t, i]] for i in range(3))
            nxt = 0.0
            for i in range(3):
                avail = np.flatnonzero(batch["avail_actions"][b, t + 1, i])
                best = avail[np.argmax(online[b, t + 1, i, avail])]
                nxt += target[b, t + 1, i, best]
            y = batch["reward"][b, t] + 0.9 * (1 - batch["terminated"][b, t]) * nxt
            total += (chosen - y) ** 2
            count += 1
    assert count == 3 + 6 + 2 + 5  # every step of every episode, nothing after its end
    assert loss == pytest.approx(total / count, rel=1e-12)


@pytest.mark.parametrize("mixer", ["qmix", "vdn", "none"])
def test_padding_and_after_terminal_steps_change_neither_loss_nor_gradients(mixer):
    learner = small_learner(mixer)
    batch = episode_batch(learner)
    loss, grads, _ = q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)
    rng = np.random.default_rng(8)
    noisy = {k: v.copy() for k, v in batch.items()}
    steps = batch["filled"].sum(axis=1).astype(int)  # each episode's length
    for b, length in enumerate(steps):
        for name in ("obs", "state"):
            noisy[name][b, length + 1:] = rng.normal(size=noisy[name][b, length + 1:].shape)
        noisy["avail_actions"][b, length + 1:] = rng.random(noisy["avail_actions"][b, length + 1:].shape) < 0.5
        noisy["actions"][b, length:] = rng.integers(0, 4, size=noisy["actions"][b, length:].shape)
        noisy["reward"][b, length:] = rng.normal(size=noisy["reward"][b, length:].shape)
        noisy["terminated"][b, length:] = rng.random(noisy["terminated"][b, length:].shape) < 0.5
    assert not np.array_equal(noisy["obs"], batch["obs"])
    noisy_loss, noisy_grads, _ = q.loss_and_grads(learner.params, learner.target_params, noisy, learner.config)
    assert noisy_loss == loss
    for group in grads:
        for key in grads[group]:
            np.testing.assert_array_equal(noisy_grads[group][key], grads[group][key], err_msg=key)


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
        config = q.Config(mixer=mixer, hidden_dim=8, mixing_embed_dim=4, seed=seed)
        env_info = {"n_agents": 3, "obs_shape": 2, "state_shape": 3, "n_actions": 3, "episode_limit": 1}
        learner = q.Learner(config, env_info)
        rng = np.random.default_rng(seed)
        obs, state, actions = rng.normal(size=(3, 3, 2)), rng.normal(size=3), rng.integers(0, 3, (2, 3))
        table = q.joint_q_tot(learner.params, config, obs, state, actions)  # at step 2, after a history
        joint_best = np.unravel_index(np.argmax(table), table.shape)
        for t, last in enumerate([None, *actions]):  # the agents act through the same history
            greedy = learner.select_actions(obs[t], np.ones((3, 3)), last)
        assert tuple(greedy) == tuple(int(a) for a in joint_best)


# ------------------------------------------------------------------------------------------
# Agent inputs, optimisers and clipping
# ------------------------------------------------------------------------------------------


def test_agent_inputs_are_obs_then_last_action_then_agent_id():
    learner = small_learner("vdn")
    batch = episode_batch(learner)
    inputs = q.episode_agent_inputs(batch, learner.config)  # (B, T + 1, N, O + A + N)
    assert inputs.shape == (4, 7, 3, 4 + 4 + 3)
    np.testing.assert_array_equal(inputs[..., :4], batch["obs"])
    np.testing.assert_array_equal(inputs[:, 0, :, 4:8], 0)  # no previous action at t = 0
    np.testing.assert_array_equal(inputs[:, 1:, :, 4:8], np.eye(4)[batch["actions"]])
    np.testing.assert_array_equal(inputs[..., 8:], np.broadcast_to(np.eye(3), (4, 7, 3, 3)))
    without = q.episode_agent_inputs(batch, q.Config(obs_last_action=False, obs_agent_id=False))
    np.testing.assert_array_equal(without, batch["obs"].astype(np.float32))


def test_joint_q_tot_at_the_first_step_under_the_default_config():
    """t = 0 (actions=None) with obs_last_action on, pymarl's default: the last-action block is
    zeros, so the table is that of the agents' first step as acting computes it."""
    learner = q.Learner(q.Config(dtype="float64"), {"n_agents": 2, "obs_shape": 3, "state_shape": 4,
                                                    "n_actions": 2, "episode_limit": 5})
    obs, state = np.random.default_rng(3).normal(size=(1, 2, 3)), np.zeros(4)
    table = q.joint_q_tot(learner.params, learner.config, obs, state)
    inputs = q.build_agent_inputs(obs[0], np.zeros((2, 2)), learner.config)[None, None]
    agent_q = q.agent_forward(learner.params["agent"], inputs)[0][0, 0]  # (N, A)
    for a0, a1 in np.ndindex(2, 2):
        q_tot, _ = q.qmix_mixer_forward(learner.params["mixer"], agent_q[[0, 1], [a0, a1]][None], state[None])
        assert table[a0, a1] == pytest.approx(q_tot[0], rel=1e-12)


def test_acting_feeds_each_agent_its_own_previous_action():
    """The input the learner trains on at step t is the input the agent acted on at step t."""
    env = envs.MeetingGridworld(grid_size=4, n_agents=3, max_steps=6, seed=1)
    learner = q.Learner(q.Config(dtype="float64", batch_size=1, buffer_size=2, hidden_dim=8), env.get_env_info())
    seen = []
    real = learner.act

    def spy(obs, avail, last_actions, epsilon, hidden):
        last = np.zeros((1, 3, 5)) if last_actions is None else np.eye(5)[last_actions]
        seen.append(q.build_agent_inputs(obs, last, learner.config)[0])
        return real(obs, avail, last_actions, epsilon, hidden)

    learner.act = spy
    env.reset(seed=3)
    [(_, length, _)] = q.run_episodes([env], learner, learn=False)
    assert length == len(seen) and length >= 2
    learner.rng = np.random.default_rng(0)
    env.reset(seed=3)
    seen.clear()
    q.run_episodes([env], learner, learn=True)  # epsilon 1 now: other actions, the same rule
    batch = learner.buffer.sample(1, np.random.default_rng(0))  # the one episode, cut to its length
    np.testing.assert_array_equal(q.episode_agent_inputs(batch, learner.config)[0, :-1], np.array(seen))


def test_acting_restarts_the_hidden_state_every_episode(monkeypatch):
    """The Qs each agent acted on, step by step with its hidden state carried, in three episodes
    in a row, are the Qs of the training unroll of each stored episode from a zero state."""
    env = envs.MeetingGridworld(grid_size=4, n_agents=3, max_steps=6, seed=1)
    config = q.Config(dtype="float64", batch_size=8, buffer_size=8, hidden_dim=8, epsilon_start=0.5)
    learner = q.Learner(config, env.get_env_info())
    acted, real = [], q.agent_forward

    def spy(params, inputs, hidden=None):
        out = real(params, inputs, hidden)
        acted.append(out[0][0, 0])  # (N, A): one step of one episode
        return out

    monkeypatch.setattr(q, "agent_forward", spy)
    for seed in (3, 4, 5):
        env.reset(seed=seed)
        q.run_episodes([env], learner, learn=True)  # stored; no train step (batch_size 8)
    monkeypatch.undo()
    batch = {name: array[:3] for name, array in learner.buffer.data.items()}
    unrolled, _, _ = q.agent_forward(learner.params["agent"], q.episode_agent_inputs(batch, config))
    lengths = batch["filled"].sum(axis=1).astype(int)
    expected = np.concatenate([unrolled[b, :length] for b, length in enumerate(lengths)])
    np.testing.assert_allclose(np.array(acted), expected, rtol=1e-12, atol=1e-12)


def take_step(optimiser, params, grad):
    """What Learner.train_step does with a finite proposal: store it."""
    params[...], state = optimiser.step(params, grad)
    optimiser.commit(state)


@pytest.mark.parametrize("optimizer", [q.Adam, q.RMSprop])
def test_a_proposed_step_changes_nothing_until_committed(optimizer):
    p, g = np.array([0.5, -1.0, 2.0]), np.array([0.3, -2.0, 1.0])
    opt = optimizer(p, lr=0.1)
    before = p.copy(), {k: v.copy() for k, v in opt.state.items()}
    new_p, state = opt.step(p, g)
    assert not np.array_equal(new_p, p) and opt.t == 0
    np.testing.assert_array_equal(p, before[0])
    for key, value in opt.state.items():
        np.testing.assert_array_equal(value, before[1][key])


def test_adam_constant_gradient_closed_form():
    """With a constant g the bias-corrected moments are g and g^2: each step moves lr g / (|g| + eps)."""
    p = np.array([0.5, -1.0, 2.0])
    g = np.array([0.3, -2.0, 1e-9])
    adam = q.Adam(p, lr=0.01, eps=1e-8)
    start = p.copy()
    for _ in range(7):
        take_step(adam, p, g)
    np.testing.assert_allclose(p, start - 7 * 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12, atol=1e-15)


def test_adam_matches_the_textbook_update_over_several_steps():
    rng = np.random.default_rng(8)
    p = rng.normal(size=10)
    adam = q.Adam(p, lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    ref, m, v = p.copy(), np.zeros(10), np.zeros(10)
    for t in range(1, 6):
        g = rng.normal(size=10)
        take_step(adam, p, g)
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * g * g
        ref = ref - 0.1 * (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.9**t)) + 1e-6)
        np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert adam.t == 5


def test_rmsprop_constant_gradient_closed_form():
    """With a constant g, v_t = (1 - alpha^t) g^2, so step t moves lr g / (sqrt(1 - alpha^t) |g| + eps)."""
    p = np.array([0.5, -1.0, 2.0])
    g = np.array([0.3, -2.0, 1e-3])
    rmsprop = q.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-5)
    expected = p.copy()
    for t in range(1, 8):
        take_step(rmsprop, p, g)
        expected -= 0.01 * g / (np.sqrt(1 - 0.9**t) * np.abs(g) + 1e-5)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert rmsprop.t == 7


def test_running_mean_std_merges_batches_as_epymarl():
    """EPyMARL's update_from_moments, restated line by line, over three batches."""
    rng = np.random.default_rng(4)
    stats, mean, var, count = q.RunningMeanStd(), 0.0, 1.0, 1e-4
    for size in (12, 7, 30):
        x = rng.normal(2.0, 3.0, size)
        stats = stats.updated(x)
        batch_mean, batch_var = x.mean(), x.var(ddof=1)
        delta, tot = batch_mean - mean, count + size
        m_2 = var * count + batch_var * size + delta**2 * count * size / (count + size)
        mean, var, count = mean + delta * size / tot, m_2 / (count + size), size + count
        assert (stats.mean, stats.var, stats.count) == pytest.approx((mean, var, count), rel=1e-12)
    np.testing.assert_allclose(stats.standardise(np.array([mean])), [0.0], atol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_standardised_rewards_are_what_the_train_step_learns_from_and_kept_only_with_the_step():
    learner = small_learner("qmix", standardise_rewards=True, lr=1e38, optimizer="rmsprop", dtype="float32")
    episode_batch(learner)
    with pytest.raises(FloatingPointError):  # lr 1e38: the update overflows float32 and is refused...
        learner.train_step()
    assert learner.reward_stats == q.RunningMeanStd()  # ...and so are the statistics
    learner.optimiser.lr = 1e-3
    learner.rng = np.random.default_rng(0)
    batch = learner.buffer.sample(4, copy.deepcopy(learner.rng))
    expected = q.RunningMeanStd().updated(batch["reward"])
    standardised = {**batch, "reward": expected.standardise(batch["reward"])}
    loss, _, _ = q.loss_and_grads(learner.params, learner.target_params, standardised, learner.config)
    assert learner.train_step()["loss"] == loss
    assert learner.reward_stats == expected


def test_clipping_scales_as_pytorch_clip_grad_norm():
    g = np.array([3.0, 4.0, 12.0])  # norm 13
    direction = g / 13
    assert q.clip_grad_norm(g, 10.0) == 13.0
    np.testing.assert_allclose(g, direction * 13 * 10.0 / (13 + 1e-6), rtol=1e-15)


def test_clipping_leaves_small_gradients_untouched():
    g = np.array([3.0, 4.0])
    before = g.copy()
    assert q.clip_grad_norm(g, 10.0) == 5.0
    np.testing.assert_array_equal(g, before)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_one_optimiser_covers_agent_nets_and_mixer(optimizer):
    learner = small_learner("qmix", optimizer=optimizer)
    episode_batch(learner)
    before = {g: {k: v.copy() for k, v in d.items()} for g, d in learner.params.items()}
    learner.train_step()
    for group, inner in learner.params.items():
        for key, value in inner.items():
            assert not np.array_equal(value, before[group][key]), f"{group}/{key} did not move"


# ------------------------------------------------------------------------------------------
# The episode buffer
# ------------------------------------------------------------------------------------------


def test_buffer_pads_each_episode_and_marks_its_steps_filled():
    learner = small_learner("vdn")
    episode = random_episode(np.random.default_rng(1), learner, 3, True)
    learner.buffer.insert(episode)
    data = learner.buffer.data
    np.testing.assert_array_equal(data["obs"][0, :4], episode["obs"])
    np.testing.assert_array_equal(data["obs"][0, 4:], 0)
    np.testing.assert_array_equal(data["filled"][0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(data["terminated"][0], [0, 0, 1, 0, 0, 0])
    assert not data["avail_actions"][0, 4:].any()


def test_buffer_is_a_ring_of_episodes_that_overwrites_the_oldest():
    learner = small_learner("vdn", buffer_size=5, batch_size=5)
    rng = np.random.default_rng(10)
    for tag in range(12):
        learner.buffer.insert(random_episode(rng, learner, 1 + tag % 6, True, tag=tag))
    assert len(learner.buffer) == 5 and learner.buffer.next_index == 12 % 5
    np.testing.assert_array_equal(np.sort(learner.buffer.data["reward"][:, 0]), [7, 8, 9, 10, 11])
    # a shorter episode overwriting a longer one leaves nothing of the old one behind
    slot = learner.buffer.data["obs"][(11 % 5)]
    np.testing.assert_array_equal(slot[:1 + 11 % 6 + 1], 11)
    np.testing.assert_array_equal(slot[1 + 11 % 6 + 1:], 0)


def test_buffer_copies_what_it_is_given():
    learner = small_learner("vdn")
    episode = random_episode(np.random.default_rng(11), learner, 4, False, tag=1)
    learner.buffer.insert(episode)
    episode["obs"][:] = 99.0
    episode["actions"][:] = 0
    assert np.all(learner.buffer.data["obs"][0, :5] == 1.0)


def test_buffer_samples_distinct_episodes_cut_to_the_longest():
    learner = small_learner("vdn", buffer_size=10, batch_size=3)
    rng = np.random.default_rng(12)
    for tag, length in enumerate((2, 3, 2, 4, 3, 2)):
        learner.buffer.insert(random_episode(rng, learner, length, True, tag=tag))
    for seed in range(30):
        batch = learner.buffer.sample(3, np.random.default_rng(seed))
        tags = batch["obs"][:, 0, 0, 0]
        assert len(set(tags.tolist())) == 3  # distinct episodes
        longest = int(batch["filled"].sum(axis=1).max())
        assert batch["actions"].shape == (3, longest, 3) and batch["obs"].shape == (3, longest + 1, 3, 4)
        assert longest == max((2, 3, 2, 4, 3, 2)[int(t)] for t in tags)
    first = learner.buffer.sample(3, np.random.default_rng(3))
    second = learner.buffer.sample(3, np.random.default_rng(3))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    counts = np.zeros(6)
    draws = np.random.default_rng(4)
    for _ in range(3000):
        counts[learner.buffer.sample(3, draws)["obs"][:, 0, 0, 0].astype(int)] += 1
    assert np.all(np.abs(counts / 3000 - 0.5) < 0.05)  # each episode in half the batches: uniform


# ------------------------------------------------------------------------------------------
# Double Q and available actions
# ------------------------------------------------------------------------------------------


def test_double_q_picks_with_online_and_values_with_target():
    learner = small_learner("vdn", gamma=0.9)
    rng = np.random.default_rng(13)
    learner.target_theta[:] = rng.normal(size=learner.theta.shape)  # a very different target net
    batch = episode_batch(learner)
    c = learner.config
    inputs = q.episode_agent_inputs(batch, c)
    online_q = q.agent_forward(learner.params["agent"], inputs)[0]
    avail = batch["avail_actions"][:, 1:]
    online = np.where(avail, online_q[:, 1:], -np.inf)
    target = np.where(avail, q.agent_forward(learner.target_params["agent"], inputs)[0][:, 1:], -np.inf)
    real = batch["filled"].astype(bool)
    picked = online.argmax(-1)
    assert np.any((picked != target.argmax(-1))[real]), "the case must tell double Q from a plain max"
    value = np.take_along_axis(target, picked[..., None], -1)[..., 0].sum(-1)
    expected = batch["reward"] + 0.9 * (1 - batch["terminated"]) * value
    np.testing.assert_allclose(q.td_targets(learner.target_params, batch, inputs, online_q, c)[real], expected[real])

    plain = batch["reward"] + 0.9 * (1 - batch["terminated"]) * target.max(-1).sum(-1)
    c = dataclasses.replace(c, double_q=False)
    np.testing.assert_allclose(q.td_targets(learner.target_params, batch, inputs, online_q, c)[real], plain[real])


def test_targets_never_use_an_unavailable_action():
    learner = small_learner("vdn", gamma=1.0)
    learner.params["agent"]["fc2.bias"][0] = 1e6  # action 0 would win everywhere...
    learner.target_params["agent"]["fc2.bias"][0] = 1e6
    batch = episode_batch(learner)
    batch["avail_actions"][..., 0] = False  # ...but it is never available
    batch["avail_actions"][..., 1] = True
    inputs = q.episode_agent_inputs(batch, learner.config)
    online_q = q.agent_forward(learner.params["agent"], inputs)[0]
    for double_q in (True, False):
        y = q.td_targets(learner.target_params, batch, inputs, online_q, dataclasses.replace(learner.config, double_q=double_q))
        assert np.all(np.abs(y - batch["reward"]) < 1e5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_acting_on_non_finite_q_values_is_an_error():
    """Finite but huge weights overflow the Qs: greedy or not, no action is chosen from them."""
    learner = small_learner("qmix", dtype="float32")
    learner.params["agent"]["fc2.bias"][:] = 3e38
    learner.params["agent"]["fc2.weight"][:] = 3e38
    assert np.isfinite(learner.theta).all()
    for epsilon in (0.0, 0.5):
        with pytest.raises(FloatingPointError, match="non-finite Q-values"):
            learner.select_actions(np.ones((3, 4)), np.ones((3, 4)), epsilon=epsilon)


def test_exploration_and_greedy_choose_only_available_actions():
    learner = small_learner("qmix")
    learner.params["agent"]["fc2.bias"][2] = 1e6  # greedy would pick action 2
    avail = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 1]])
    obs = np.zeros((3, 4))
    assert np.all(avail[np.arange(3), learner.select_actions(obs, avail)] == 1)
    seen = np.array([learner.select_actions(obs, avail, epsilon=1.0) for _ in range(2000)])
    for agent in range(3):
        chosen = np.bincount(seen[:, agent], minlength=4)
        assert np.all(chosen[avail[agent] == 0] == 0)
        assert np.all(chosen[avail[agent] == 1] > 2000 / avail[agent].sum() * 0.8)  # ~uniform


def test_epsilon_greedy_draws_per_agent_from_the_learners_generator():
    learner = small_learner("qmix")
    rng = np.random.default_rng(17)
    obs, avail = rng.normal(size=(3, 4)), rng.random((3, 4)) < 0.6
    avail[:, 1] = True  # every agent has an available action
    greedy = learner.select_actions(obs, avail)
    twin = copy.deepcopy(learner.rng)  # draws what select_actions should draw, in the same order
    for _ in range(200):
        explore = twin.random(3) < 0.5
        random_actions = q.masked_argmax(twin.random((3, 4)), avail)
        learner.init_hidden()  # every call is the first step of an episode: the same greedy actions
        np.testing.assert_array_equal(learner.select_actions(obs, avail, epsilon=0.5),
                                      np.where(explore, random_actions, greedy))


def test_epsilon_anneals_linearly_in_env_steps():
    learner = small_learner("qmix", epsilon_start=1.0, epsilon_finish=0.1, epsilon_anneal_time=100)
    for t_env, expected in ((0, 1.0), (50, 0.55), (100, 0.1), (1000, 0.1)):
        learner.t_env = t_env
        assert learner.epsilon() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------
# The loop and learning
# ------------------------------------------------------------------------------------------


def test_one_train_step_per_episode_once_the_buffer_holds_a_batch_and_targets_every_interval():
    env = envs.MeetingGridworld(grid_size=3, max_steps=4)
    config = q.Config(t_max=10**6, batch_size=3, buffer_size=10, target_update_interval=4, hidden_dim=8)
    learner = q.Learner(config, env.get_env_info())
    updates = []
    learner.update_targets = lambda: updates.append(learner.episode)
    for episode in range(12):
        env.reset(seed=episode)
        q.run_episodes([env], learner, learn=True)
        assert learner.episode == episode + 1 and len(learner.buffer) == min(episode + 1, 10)
        assert learner.train_steps == max(0, episode + 1 - 2)
    assert updates == [4, 8]  # pymarl: after the train step of episode (0-based) 4, 8, ...
    assert learner.t_env == sum(learner.history["length"])


class Countdown:
    """A test env whose episode length is set by its reset seed: 1 + seed % 6 steps, the last of
    them flagged as the time limit when it is the 6th. Observations depend on the step and the
    agents' last actions; agent 1 has one action unavailable at every step."""

    def get_env_info(self):
        return {"n_agents": 2, "n_actions": 3, "obs_shape": 2, "state_shape": 3, "episode_limit": 6}

    def reset(self, seed=None):
        self.length, self.t, self.last = 1 + seed % 6, 0, np.zeros(2)

    def step(self, actions):
        self.t, self.last = self.t + 1, np.asarray(actions, float)
        done = self.t == self.length
        return float(self.last.sum()), done, {"episode_limit": done and self.t == 6}

    def get_obs(self):
        return np.stack([np.full(2, self.t / 6), self.last], axis=1)

    def get_state(self):
        return np.array([self.t, *self.last]) / 6

    def get_avail_actions(self):
        avail = np.ones((2, 3))
        avail[1, self.t % 3] = 0
        return avail


def test_batch_size_run_1_is_pymarls_episode_runner_bit_for_bit():
    """train with one env equals the episode runner written with the public per-step API
    (select_actions carrying the hidden state), then learn_from: parameters and history."""
    config = q.Config(t_max=400, batch_size=4, buffer_size=20, hidden_dim=8, mixing_embed_dim=4,
                      hypernet_embed=8, epsilon_anneal_time=200, target_update_interval=3, seed=2)
    trained = q.train(Countdown(), config)
    learner, env = q.Learner(config, Countdown().get_env_info()), Countdown()
    while learner.t_env < config.t_max:
        env.reset(seed=int(learner.rng.integers(2**31)))
        epsilon, actions, done = learner.epsilon(), None, False
        learner.init_hidden()
        episode = {"obs": [env.get_obs()], "state": [env.get_state()], "avail_actions": [env.get_avail_actions()],
                   "actions": [], "reward": [], "terminated": []}
        while not done:
            actions = learner.select_actions(episode["obs"][-1], episode["avail_actions"][-1], actions, epsilon)
            reward, done, info = env.step(actions)
            for name, value in (("actions", actions), ("reward", reward), ("terminated", done and not info["episode_limit"]),
                                ("obs", env.get_obs()), ("state", env.get_state()), ("avail_actions", env.get_avail_actions())):
                episode[name].append(value)
        q.learn_from(learner, [episode], [(sum(episode["reward"]), len(episode["actions"]), not info["episode_limit"])])
    assert learner.train_steps > 20
    np.testing.assert_array_equal(learner.theta, trained.theta)
    np.testing.assert_equal(learner.history, trained.history)  # NaN losses before the first train step


def test_a_collection_of_k_episodes_is_stored_as_each_played_alone_with_its_own_hidden_state(monkeypatch):
    """Three envs in lockstep, episodes of 2, 6 (the time limit) and 4 steps, then 5, 1 and 3:
    each stored episode (every field, padding and mask included) is what playing it alone stores,
    and the Qs each env's agents acted on are the unroll of its own episode from a zero state:
    no hidden state passes between envs, to the envs still running, or into the next collection."""
    config = q.Config(dtype="float64", batch_size=8, buffer_size=8, hidden_dim=8, epsilon_start=0.0,
                      epsilon_finish=0.0, batch_size_run=3)
    seeds = [[1, 5, 3], [4, 0, 2]]
    together = q.Learner(config, Countdown().get_env_info())
    alone = q.Learner(dataclasses.replace(config, batch_size_run=1), Countdown().get_env_info())
    acted, real = [], q.agent_forward

    def spy(params, inputs, hidden=None):
        out = real(params, inputs, hidden)
        acted.append(out[0][:, 0])  # (K', N, A): one step of the envs still running
        return out

    monkeypatch.setattr(q, "agent_forward", spy)
    for collection in seeds:
        envs_ = [Countdown() for _ in collection]
        for env, seed in zip(envs_, collection):
            env.reset(seed=seed)
        results = q.run_episodes(envs_, together, learn=True)
        assert [length for _, length, _ in results] == [1 + seed % 6 for seed in collection]
        assert [success for _, _, success in results] == [1 + seed % 6 < 6 for seed in collection]
    monkeypatch.undo()
    for seed in sum(seeds, []):
        env = Countdown()
        env.reset(seed=seed)
        q.run_episodes([env], alone, learn=True)
    for name, array in together.buffer.data.items():
        np.testing.assert_array_equal(array[:6], alone.buffer.data[name][:6], err_msg=name)
    assert together.t_env == alone.t_env == 21 and together.episode == alone.episode == 6

    batch = {name: array[:6] for name, array in together.buffer.data.items()}
    unrolled, _, _ = q.agent_forward(together.params["agent"], q.episode_agent_inputs(batch, config))
    lengths = batch["filled"].sum(axis=1).astype(int)
    expected = [unrolled[[c * 3 + k for k in range(3) if lengths[c * 3 + k] > t], t]
                for c in range(2) for t in range(lengths[c * 3: c * 3 + 3].max())]
    assert len(acted) == len(expected) == 6 + 5
    for got, want in zip(acted, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_k_envs_in_lockstep_one_train_step_per_collection_reproducibly():
    """pymarl's run loop with batch_size_run 3: t_env counts every env's steps, the episode count
    grows by 3, one train step per collection once the buffer holds a batch, target updates read
    the episode count; the same seed gives the same run, bit for bit."""
    config = q.Config(t_max=300, batch_size=4, buffer_size=30, hidden_dim=8, target_update_interval=5,
                      epsilon_anneal_time=100, batch_size_run=3, seed=4)
    runs = []
    for _ in range(2):
        learner = q.Learner(config, Countdown().get_env_info())
        updates = []
        learner.update_targets = lambda learner=learner: updates.append(learner.episode)
        runs.append((q.train([Countdown(), Countdown(), Countdown()], config, learner=learner), updates))
    (first, updates), (second, _) = runs
    collections = first.episode // 3
    assert first.episode % 3 == 0 and first.t_env == sum(first.history["length"]) >= 300
    assert first.train_steps == collections - 1  # the first collection leaves 3 < 4 episodes
    assert len(updates) >= 5 and updates == list(range(6, 6 * len(updates) + 1, 6))  # 5 episodes reached in steps of 3
    np.testing.assert_array_equal(first.theta, second.theta)
    np.testing.assert_equal(first.history, second.history)


def test_train_and_evaluate_run_blas_on_one_thread_unless_the_user_chose(monkeypatch):
    """A user's thread count is left alone; otherwise threadpoolctl (optional) limits BLAS to one
    thread around train and evaluate, and without it a warning says how."""
    assert isinstance(q.one_blas_thread(), type(contextlib.nullcontext()))  # conftest set the variables
    for name in q.BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(q.os, "cpu_count", lambda: 2)
    calls = []
    fake = types.ModuleType("threadpoolctl")
    fake.threadpool_limits = lambda **kwargs: calls.append(kwargs) or contextlib.nullcontext()
    monkeypatch.setitem(sys.modules, "threadpoolctl", fake)
    env = Countdown()
    learner = q.train(env, q.Config(t_max=20, batch_size=2, buffer_size=4, hidden_dim=4))
    q.evaluate(env, learner, 2, seed=0)
    assert calls == [{"limits": 1, "user_api": "blas"}] * 2
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # not installed
    with pytest.warns(UserWarning, match="pip install threadpoolctl"):
        q.evaluate(env, learner, 2, seed=0)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.evaluate(env, learner, 2, seed=0)


def two_step_config(mixer, seed=0):
    """Full exploration as in the paper, sized to learn the game in a few seconds."""
    return q.Config(mixer=mixer, epsilon_start=1.0, epsilon_finish=1.0, t_max=3000, hidden_dim=32,
                    hypernet_layers=1, target_update_interval=100, lr=1e-3, obs_last_action=False,
                    buffer_size=500, seed=seed)


@pytest.mark.parametrize("mixer,expected", [("qmix", 8.0), ("vdn", 7.0)])
def test_two_step_game_qmix_earns_8_and_vdn_7(mixer, expected):
    env = envs.TwoStepGame()
    learner = q.train(env, two_step_config(mixer))
    assert q.evaluate(env, learner, 1, seed=0)["mean_return"] == expected


def test_same_seed_same_losses_bit_for_bit():
    def losses(seed):
        config = q.Config(mixer="qmix", t_max=600, hidden_dim=16, batch_size=8, buffer_size=50, seed=seed)
        history = q.train(envs.MeetingGridworld(grid_size=3, max_steps=10), config).history["loss"]
        return [loss for loss in history if not math.isnan(loss)]  # NaN: before the first train step

    first = losses(3)
    assert len(first) > 10
    assert first == losses(3)
    assert first != losses(4)


def test_train_reports_progress_and_keeps_the_history(capsys):
    config = q.Config(t_max=400, hidden_dim=8, batch_size=4, buffer_size=20)
    learner = q.train(envs.MeetingGridworld(grid_size=3, max_steps=10), config, progress=1e-9)
    h = learner.history
    assert len(h["return"]) == len(h["length"]) == len(h["success"]) == len(h["loss"]) == learner.episode
    assert h["t_env"][-1] == learner.t_env >= 400 and sum(h["length"]) == learner.t_env
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == learner.episode
    assert "env steps" in lines[-1] and "epsilon" in lines[-1] and "env steps/s" in lines[-1]
    assert "Q_tot" in lines[-1] and "grad norm" in lines[-1]
    trained = [i for i, loss in enumerate(h["loss"]) if not math.isnan(loss)]
    assert trained and len(h["q_taken_mean"]) == len(h["target_mean"]) == len(h["grad_norm"]) == learner.episode
    assert np.isnan([h[k][:trained[0]] for k in ("q_taken_mean", "target_mean", "grad_norm")]).all()
    assert [h[k][-1] for k in ("loss", "q_taken_mean", "target_mean", "grad_norm")] == \
        [learner.last_diagnostics[k] for k in ("loss", "q_taken_mean", "target_mean", "grad_norm")]


@pytest.mark.parametrize("standardise_rewards", [False, True])
def test_a_q_tot_above_any_discounted_return_is_warned_once(standardise_rewards):
    learner = small_learner("vdn", standardise_rewards=standardise_rewards)
    episode_batch(learner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.train_step()  # a fresh learner's Q_tot is near 0: no warning
    stored = learner.buffer.data["reward"][:len(learner.buffer)]
    if standardise_rewards:
        stored = learner.reward_stats.standardise(stored)
    bound = stored.max() / (1 - learner.config.gamma)
    learner.params["agent"]["fc2.bias"][:] = bound  # every agent's Q near the bound: Q_tot near n_agents x it
    with pytest.warns(RuntimeWarning, match=r"mean Q_tot \(.*\) is above what any discounted return allows"):
        learner.train_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.train_step()  # once


@pytest.mark.parametrize("reward,bias", [(-0.01, 0.5), (-0.01, -5.0)])
def test_no_warning_before_a_positive_reward_nor_below(reward, bias):
    """Before a positive reward the bound is 0, which a fresh network's Q_tot crosses; the lower
    side, made of step costs, is smaller than a fresh network's outputs: neither is checked."""
    learner = small_learner("vdn")
    rng = np.random.default_rng(3)
    for length in (3, 6, 2, 5):
        episode = random_episode(rng, learner, length, terminal=True)
        learner.buffer.insert({**episode, "reward": np.full(length, reward)})
    learner.params["agent"]["fc2.bias"][:] = bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.train_step()


def gridworld_learning_config(t_max):
    """As examples/meeting_gridworld.py (gamma 0.95: the README says why), sized for 3x3."""
    return q.Config(mixer="qmix", t_max=t_max, epsilon_anneal_time=max(1, t_max // 2), gamma=0.95, lr=2e-3,
                    target_update_interval=20, hypernet_layers=1, batch_size=16, buffer_size=100, seed=0)


def test_qmix_solves_a_small_gridworld_and_an_untrained_one_cannot():
    """3x3, 2 agents: QMIX must succeed almost always and almost on the shortest path."""
    env = envs.MeetingGridworld(grid_size=3, n_agents=2, max_steps=20)
    bar = {"success_rate": 0.97, "optimality_ratio": 1.10}
    untrained = q.evaluate(env, q.Learner(gridworld_learning_config(0), env.get_env_info()), 300, seed=2**31)
    assert untrained["success_rate"] < bar["success_rate"]
    learner = q.train(env, gridworld_learning_config(12000))
    result = q.evaluate(env, learner, 300, seed=2**31)
    assert result["success_rate"] >= bar["success_rate"], result
    assert result["optimality_ratio"] <= bar["optimality_ratio"], result
