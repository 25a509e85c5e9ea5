"""QMIX in plain NumPy: every forward and backward pass written out.

QMIX (Rashid et al., "QMIX: Monotonic Value Function Factorisation for Deep Multi-Agent
Reinforcement Learning", ICML 2018, arXiv:1803.11485) learns one Q-network per agent and mixes
the agents' chosen Qs into a joint value with a network whose weights are produced from the
global state by hypernetworks and made non-negative by an absolute value:

    W1 = |hyper_w_1(s)| (N, E)      b1 = hyper_b_1(s) (E,)
    h  = ELU(q W1 + b1)             q = the N agents' chosen Qs
    Wf = |hyper_w_final(s)| (E,)    V(s) = Linear -> ReLU -> Linear
    Q_tot = h . Wf + V(s)

Since W1, Wf >= 0 and ELU is increasing, dQ_tot/dQ_i >= 0: the joint argmax of Q_tot is the
tuple of per-agent argmaxes, so the agents act greedily on their own Qs. Training minimises
the squared TD error of Q_tot against y = r + gamma (1 - terminated) Q_tot^-(s', a'), where the
target networks (^-) are hard copies and a' is chosen by double Q.

Names and defaults follow the canonical PyTorch code, oxwhirl/pymarl (QMixer, QLearner), so the
two can be read side by side; the README lists where this file departs from the paper and pymarl.

Sections follow the data: config -> primitives -> agent network -> mixers -> TD loss ->
optimiser -> replay buffer -> checkpoint format -> learner -> train / evaluate. Every forward returns (out, cache)
and every backward takes (dout, cache) and returns (d_input, {param name: grad}); nothing keeps
hidden state, so online and target networks can both run forward before any backward.

Shapes: B batch, N agents, O observation, I agent input (O + N with agent ids), A actions,
S state, E mixing_embed_dim, H hypernet_embed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import pathlib
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------

@dataclass
class Config:
    """Every setting of a run. Field names and defaults are pymarl's where pymarl has one."""

    # --- the method
    mixer: str = "qmix"  # "qmix", "vdn" (sum of Qs) or "none" (independent learners)
    mixing_embed_dim: int = 32  # E: width of the mixing network's hidden layer
    hypernet_layers: int = 2  # 1 or 2 Linear layers in hyper_w_1 / hyper_w_final (pymarl qmix.yaml: 2)
    hypernet_embed: int = 64  # H: hidden width of the 2-layer hypernetworks
    agent_hidden_dims: tuple = (64, 64)  # MLP agent's hidden layers (pymarl: a GRU of 64)
    shared_agent: bool = True  # one network shared by all agents (pymarl), else one per agent
    obs_agent_id: bool = True  # append a one-hot agent id to each observation
    # --- the learner
    gamma: float = 0.99  # discount
    lr: float = 5e-4  # Adam step size
    adam_betas: tuple = (0.9, 0.999)  # Adam's moment decay rates (PyTorch defaults)
    adam_eps: float = 1e-8  # Adam's denominator guard (PyTorch default)
    batch_size: int = 32  # transitions per train step (pymarl: 32 whole episodes)
    buffer_size: int = 5000  # transitions held by the replay buffer (pymarl: 5000 episodes)
    double_q: bool = True  # online net picks a', target net values it
    grad_norm_clip: float = 10.0  # max global L2 norm over all gradients
    target_update_interval: int = 200  # EPISODES between hard target copies (pymarl's unit)
    # --- exploration
    epsilon_start: float = 1.0  # epsilon at env step 0
    epsilon_finish: float = 0.05  # epsilon after epsilon_anneal_time env steps
    epsilon_anneal_time: int = 50000  # ENV STEPS of linear annealing
    # --- the run
    t_max: int = 50000  # env steps of training (rounded up to whole episodes)
    seed: int = 0  # seeds the one Generator behind everything random
    dtype: str = "float32"  # training dtype, "float32" or "float64" (README: measured choice)
    on_nonfinite: str = "raise"  # a NaN/inf loss or gradient norm: "raise" FloatingPointError, or "skip" the step

    def __post_init__(self):
        self.agent_hidden_dims = _as_tuple("agent_hidden_dims", self.agent_hidden_dims)
        self.adam_betas = _as_tuple("adam_betas", self.adam_betas)
        for name, ok, expected in _CONFIG_RULES:
            value = getattr(self, name)
            try:
                good = ok(value)
            except TypeError:
                good = False
            if not good:
                raise ValueError(f"Config.{name} must be {expected}, got {value!r}")


def _as_tuple(name, value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"Config.{name} must be a sequence, got {value!r}")
    return tuple(value)


def _is_int(x, low):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= low


def _is_real(x, low, high):
    return (isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)
            and math.isfinite(x) and low <= x <= high)


_CONFIG_RULES = (  # (field, test, what it must be)
    ("mixer", lambda v: v in MIXERS, "one of 'qmix', 'vdn', 'none'"),  # MIXERS: see Mixers
    ("mixing_embed_dim", lambda v: _is_int(v, 1), "an int >= 1"),
    ("hypernet_layers", lambda v: _is_int(v, 1) and v <= 2, "1 or 2"),
    ("hypernet_embed", lambda v: _is_int(v, 1), "an int >= 1"),
    ("agent_hidden_dims", lambda v: all(_is_int(d, 1) for d in v), "a sequence of ints >= 1"),
    ("shared_agent", lambda v: isinstance(v, bool), "True or False"),
    ("obs_agent_id", lambda v: isinstance(v, bool), "True or False"),
    ("gamma", lambda v: _is_real(v, 0.0, 1.0), "a number in [0, 1]"),
    ("lr", lambda v: _is_real(v, 0.0, math.inf) and v > 0, "a number > 0"),
    ("adam_betas", lambda v: len(v) == 2 and all(_is_real(b, 0.0, 1.0) and b < 1 for b in v),
     "two numbers in [0, 1)"),
    ("adam_eps", lambda v: _is_real(v, 0.0, math.inf) and v > 0, "a number > 0"),
    ("batch_size", lambda v: _is_int(v, 1), "an int >= 1"),
    ("buffer_size", lambda v: _is_int(v, 1), "an int >= 1"),
    ("double_q", lambda v: isinstance(v, bool), "True or False"),
    ("grad_norm_clip", lambda v: _is_real(v, 0.0, math.inf) and v > 0, "a number > 0"),
    ("target_update_interval", lambda v: _is_int(v, 1), "an int >= 1 (episodes)"),
    ("epsilon_start", lambda v: _is_real(v, 0.0, 1.0), "a number in [0, 1]"),
    ("epsilon_finish", lambda v: _is_real(v, 0.0, 1.0), "a number in [0, 1]"),
    ("epsilon_anneal_time", lambda v: _is_int(v, 1), "an int >= 1 (env steps)"),
    ("t_max", lambda v: _is_int(v, 0), "an int >= 0 (env steps)"),
    ("seed", lambda v: _is_int(v, 0), "an int >= 0"),
    ("dtype", lambda v: v in ("float64", "float32"), "'float64' or 'float32'"),
    ("on_nonfinite", lambda v: v in ("raise", "skip"), "'raise' or 'skip'"),
)

# ------------------------------------------------------------------------------------------
# Primitives: forward(x, ...) -> (out, cache); backward(dout, cache) -> (dx, {param: grad})
# ------------------------------------------------------------------------------------------


def linear_forward(x, weight, bias):
    """y = x W^T + b, with PyTorch's layout W (out, in).

    Shared layer:  x (M, I), W (O, I), b (O,)       -> y (M, O)
    One per group: x (G, M, I), W (G, O, I), b (G, O) -> y (G, M, O)   (G = agents)
    """
    out = x @ weight.swapaxes(-1, -2)
    out += bias[..., None, :]
    return out, (x, weight)


def linear_backward(dout, cache, input_grad=True):
    """dL/dx = dL/dy W;  dL/dW = dL/dy^T x (summed over the M rows);  dL/db = sum_M dL/dy.

    input_grad=False skips dL/dx (returns None) where the input is data, not a parameter's output.
    """
    x, weight = cache
    dx = dout @ weight if input_grad else None
    dweight = dout.swapaxes(-1, -2) @ x
    dbias = dout.sum(axis=-2)
    return dx, {"weight": dweight, "bias": dbias}


def made_once(make):
    """Decorator: make(*args) runs once per distinct args; every call gets that one array,
    read-only, so that no caller can change what the others see."""
    @functools.lru_cache(maxsize=64)
    def cached(*args):
        array = make(*args)
        array.flags.writeable = False
        return array
    return functools.update_wrapper(cached, make)


@made_once
def indices(n):
    """0, 1, ..., n - 1: (n,)."""
    return np.arange(n)


@made_once
def zeros(shape, dtype):
    """An array of zeros of this (shape, dtype). Shape () gives a 0-d zero, which NumPy takes as
    is, where it converts a Python 0 on every call."""
    return np.zeros(shape, dtype)


@made_once
def minus_inf(dtype):
    """-inf as a 0-d array of `dtype`. NumPy converts a Python scalar operand on every call; this
    one it takes as is (np.where on one env step's Qs: 0.9 us, against 1.2 with -np.inf)."""
    return np.array(-np.inf, dtype)


def all_true(mask):
    """mask.all() for a bool array. count_nonzero skips the ufunc reduction machinery: on the
    few elements of one env step it takes 0.3 us, where .all() takes 1 us."""
    return np.count_nonzero(mask) == mask.size


def relu_forward(x):
    """y = max(x, 0)."""
    out = np.maximum(x, zeros(x.shape, x.dtype))  # NumPy's max(x, 0) with a scalar is not vectorised
    return out, out  # y > 0 exactly where x > 0: the mask is made only if backward runs


def relu_backward(dout, cache):
    return dout * (cache > zeros((), cache.dtype)), {}  # ReLU'(x) = 1 if x > 0 else 0


def elu_forward(x):
    """y = x if x > 0 else exp(x) - 1  (alpha = 1, as torch.nn.functional.elu).

    Computed as max(x, exp(min(x, 0)) - 1): for x > 0 that is max(x, 0) = x, and for x <= 0 it
    is exp(x) - 1, since exp(x) - 1 >= x everywhere. min() keeps exp from overflowing.
    """
    out = np.expm1(np.minimum(x, zeros(x.shape, x.dtype)))  # zeros: see relu_forward
    np.maximum(out, x, out=out)
    return out, out


def elu_backward(dout, cache):
    # ELU'(x) = 1 if x > 0 else ELU(x) + 1, i.e. min(ELU(x), 0) + 1 (ELU(x) > 0 iff x > 0)
    slope = np.minimum(cache, zeros(cache.shape, cache.dtype))
    slope += 1
    return dout * slope, {}


def abs_forward(x):
    """y = |x|: how QMIX keeps its mixing weights non-negative."""
    return np.abs(x), x


def abs_backward(dout, cache):
    return dout * np.sign(cache), {}  # d|x|/dx = sign(x)


def mlp_forward(params, layers, x):
    """Linear layers named `layers` (keys `{name}.weight`, `{name}.bias`), ReLU between them.

    This is both the agent network (fc1, fc2, ...) and pymarl's nn.Sequential hypernetworks
    (e.g. V.0 -> ReLU -> V.2). The last layer has no activation.
    """
    caches = []
    for i, name in enumerate(layers):
        relu_cache = None
        if i > 0:
            x, relu_cache = relu_forward(x)
        x, linear_cache = linear_forward(x, params[f"{name}.weight"], params[f"{name}.bias"])
        caches.append((name, relu_cache, linear_cache))
    return x, caches


def mlp_backward(dout, cache, input_grad=True):
    grads = {}
    for name, relu_cache, linear_cache in reversed(cache):
        first = name == cache[0][0]
        dout, layer_grads = linear_backward(dout, linear_cache, input_grad or not first)
        grads[f"{name}.weight"], grads[f"{name}.bias"] = layer_grads["weight"], layer_grads["bias"]
        if relu_cache is not None:
            dout, _ = relu_backward(dout, relu_cache)
    return dout, grads


def init_linear(rng, name, in_dim, out_dim, groups=None, dtype=np.float64):
    """PyTorch's nn.Linear initialisation: W and b uniform in +-1/sqrt(in_dim).

    `groups` stacks that many independent layers (one per agent) on a leading axis.
    """
    lead = () if groups is None else (groups,)
    bound = 1.0 / math.sqrt(in_dim)
    weight = rng.uniform(-bound, bound, lead + (out_dim, in_dim)).astype(dtype)
    bias = rng.uniform(-bound, bound, lead + (out_dim,)).astype(dtype)
    return {f"{name}.weight": weight, f"{name}.bias": bias}


def hypernet_layer_names(params, name):
    """pymarl's names for a hypernetwork: one Linear `name`, or `name.0` -> ReLU -> `name.2`."""
    return (name,) if f"{name}.weight" in params else (f"{name}.0", f"{name}.2")


# ------------------------------------------------------------------------------------------
# Agent network: Q_i(o_i, .) for every agent at once
# ------------------------------------------------------------------------------------------


def init_agent_params(rng, input_dim, hidden_dims, n_actions, n_agents=None, dtype=np.float64):
    """MLP input_dim -> hidden_dims -> n_actions, layers fc1, fc2, ...

    n_agents None: one network shared by all agents (fcK.weight (out, in)), as in pymarl.
    n_agents N: one network per agent, stacked (fcK.weight (N, out, in)).
    """
    dims = [input_dim, *hidden_dims, n_actions]
    params = {}
    for k, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
        params.update(init_linear(rng, f"fc{k}", d_in, d_out, n_agents, dtype))
    return params


@made_once
def agent_ids(n_agents, dtype):
    """The one-hot ids of N agents, row i = e_i: (N, N)."""
    return np.eye(n_agents, dtype=dtype)


@functools.lru_cache(maxsize=16)
def agent_layers(n_layers):
    """The agent network's layer names, fc1 ... fcK (made once per K)."""
    return tuple(f"fc{k}" for k in range(1, n_layers + 1))


def build_agent_inputs(obs, obs_agent_id, dtype):
    """Append each agent's one-hot id to its observation: (..., N, O) -> (..., N, O + N) of `dtype`."""
    if not obs_agent_id:
        return np.asarray(obs, dtype=dtype)
    *lead, n_agents, obs_dim = np.shape(obs)
    inputs = np.empty((*lead, n_agents, obs_dim + n_agents), dtype)
    inputs[..., :obs_dim] = obs  # converted to dtype as it is copied in
    inputs[..., obs_dim:] = agent_ids(n_agents, np.dtype(dtype))  # broadcast over the leading axes
    return inputs


def agent_forward(params, inputs):
    """Q-values of every agent: inputs (B, N, I) -> q (B, N, A).

    A shared network sees all B*N rows as one batch, so its gradient sums over agents and batch;
    per-agent networks run as one batched matmul over the agent axis.
    """
    batch, n_agents, in_dim = inputs.shape
    shared = params["fc1.weight"].ndim == 2
    x = inputs.reshape(batch * n_agents, in_dim) if shared else inputs.transpose(1, 0, 2)
    layers = agent_layers(len(params) // 2)
    q, mlp_cache = mlp_forward(params, layers, x)  # (B*N, A) or (N, B, A)
    q = q.reshape(batch, n_agents, -1) if shared else q.transpose(1, 0, 2)  # (B, N, A)
    return q, (shared, inputs.shape, mlp_cache)


def agent_backward(dq, cache, input_grad=True):
    """(dL/d inputs (B', N, I) or None if not input_grad, grads of every fcK).

    dq (B', N, A) may cover only the first B' <= B inputs of the forward; the others then have
    no gradient, and the backward skips their rows. (The learner's one forward covers o and o',
    and only the Qs at o get a gradient.)
    """
    shared, (_, n_agents, in_dim), mlp_cache = cache
    rows = len(dq)
    mlp_cache = leading_rows(mlp_cache, rows * n_agents if shared else rows)  # all of them if B' = B
    dq = dq.reshape(rows * n_agents, -1) if shared else dq.transpose(1, 0, 2)
    dx, grads = mlp_backward(dq, mlp_cache, input_grad)
    if input_grad:
        dx = dx.reshape(rows, n_agents, in_dim) if shared else dx.transpose(1, 0, 2)  # (B', N, I)
    return dx, grads


def leading_rows(mlp_cache, rows):
    """The cache of mlp_forward for its first `rows` rows (axis -2) alone: views, no copies."""
    return [(name, None if relu_out is None else relu_out[..., :rows, :], (x[..., :rows, :], weight))
            for name, relu_out, (x, weight) in mlp_cache]


# ------------------------------------------------------------------------------------------
# Mixers: (agent_qs (B, N), states (B, S)) -> Q_tot (B,)
# ------------------------------------------------------------------------------------------


def init_qmix_mixer(rng, n_agents, state_dim, mixing_embed_dim=32, hypernet_layers=1,
                    hypernet_embed=64, dtype=np.float64):
    """Parameters with exactly the keys and shapes of pymarl's QMixer.state_dict().

    hypernet_layers 1: hyper_w_1 = Linear(S, E*N), hyper_w_final = Linear(S, E).
    hypernet_layers 2: each is Linear(S, H) -> ReLU -> Linear(H, out), keys `.0.` and `.2.`.
    Always: hyper_b_1 = Linear(S, E); V = Linear(S, E) -> ReLU -> Linear(E, 1) (keys V.0, V.2).
    """
    if hypernet_layers not in (1, 2):
        raise ValueError(f"hypernet_layers must be 1 or 2, got {hypernet_layers!r}")
    n, s, e, h = n_agents, state_dim, mixing_embed_dim, hypernet_embed

    def hypernet(name, out_dim):
        if hypernet_layers == 1:
            return init_linear(rng, name, s, out_dim, dtype=dtype)
        return {**init_linear(rng, f"{name}.0", s, h, dtype=dtype),
                **init_linear(rng, f"{name}.2", h, out_dim, dtype=dtype)}

    return {**hypernet("hyper_w_1", e * n), **hypernet("hyper_w_final", e),
            **init_linear(rng, "hyper_b_1", s, e, dtype=dtype),
            **init_linear(rng, "V.0", s, e, dtype=dtype), **init_linear(rng, "V.2", e, 1, dtype=dtype)}


def linear_stack_forward(params, layers, x):
    """Several Linear layers that read the same x, as ONE matmul, split back per layer:

        [y_1, y_2, ...] = x [W_1; W_2; ...]^T + [b_1, b_2, ...]
    """
    weights = [params[f"{name}.weight"] for name in layers]  # (out_k, I) each
    biases = [params[f"{name}.bias"] for name in layers]  # (out_k,) each
    out, cache = linear_forward(x, np.concatenate(weights), np.concatenate(biases))
    outs, start = [], 0
    for weight in weights:  # y_k: the next out_k columns
        outs.append(out[..., start:start + len(weight)])
        start += len(weight)
    return outs, (layers, cache)


def linear_stack_backward(douts, cache):
    """Gradients of every stacked layer's weight and bias; x is data, so no dL/dx."""
    layers, linear_cache = cache
    _, stacked = linear_backward(np.concatenate(douts, axis=-1), linear_cache, input_grad=False)
    grads, start = {}, 0
    for name, dout in zip(layers, douts):  # layer k's rows of the stacked gradients
        end = start + dout.shape[-1]
        grads[f"{name}.weight"] = stacked["weight"][start:end]
        grads[f"{name}.bias"] = stacked["bias"][start:end]
        start = end
    return grads


def tail_forward(params, layers, z):
    """What follows a layer that reads s: nothing, or ReLU -> `layers` (V.2; 2-layer hypernets)."""
    if not layers:
        return z, None
    h, relu_cache = relu_forward(z)
    out, mlp_cache = mlp_forward(params, layers, h)
    return out, (relu_cache, mlp_cache)


def tail_backward(dout, cache):
    if cache is None:
        return dout, {}
    relu_cache, mlp_cache = cache
    dh, grads = mlp_backward(dout, mlp_cache)
    return relu_backward(dh, relu_cache)[0], grads


def qmix_mixer_forward(params, agent_qs, states):
    """Q_tot = ELU(q |W1(s)| + b1(s)) . |Wf(s)| + V(s).  agent_qs (B, N), states (B, S) -> (B,).

    The four layers that read s (the first of hyper_w_1, of hyper_w_final, hyper_b_1, V.0) run
    as one matmul; what follows each of them is its own.
    """
    batch, n_agents = agent_qs.shape
    w1_layers, wf_layers = hypernet_layer_names(params, "hyper_w_1"), hypernet_layer_names(params, "hyper_w_final")
    (w1_z, wf_z, b1, v_z), state_cache = linear_stack_forward(
        params, [w1_layers[0], wf_layers[0], "hyper_b_1", "V.0"], states)
    w1_raw, w1_tail = tail_forward(params, w1_layers[1:], w1_z)  # (B, N*E)
    w1, w1_abs_cache = abs_forward(w1_raw)
    w1 = w1.reshape(batch, n_agents, -1)  # (B, N, E), pymarl's view(-1, N, E)
    pre = (agent_qs[:, None, :] @ w1)[:, 0, :] + b1  # (B, E)
    hidden, elu_cache = elu_forward(pre)
    wf_raw, wf_tail = tail_forward(params, wf_layers[1:], wf_z)  # (B, E)
    wf, wf_abs_cache = abs_forward(wf_raw)
    v, v_tail = tail_forward(params, ["V.2"], v_z)  # (B, 1)
    q_tot = np.einsum("be,be->b", hidden, wf) + v[:, 0]  # (B,)
    cache = (agent_qs, w1, hidden, wf, state_cache, w1_tail, w1_abs_cache, elu_cache,
             wf_tail, wf_abs_cache, v_tail)
    return q_tot, cache


def qmix_mixer_backward(dq_tot, cache):
    """Returns dL/d agent_qs (B, N) and the gradient of every mixer parameter."""
    (agent_qs, w1, hidden, wf, state_cache, w1_tail, w1_abs_cache, elu_cache,
     wf_tail, wf_abs_cache, v_tail) = cache
    dq_tot = dq_tot[:, None]  # (B, 1)
    dhidden = dq_tot * wf  # dQ_tot/dh = Wf
    dwf, _ = abs_backward(dq_tot * hidden, wf_abs_cache)  # dQ_tot/dWf = h
    dpre, _ = elu_backward(dhidden, elu_cache)  # (B, E); d pre/db1 = 1
    dagent_qs = (w1 @ dpre[:, :, None])[:, :, 0]  # d pre/dq = W1: (B, N)
    dw1 = agent_qs[:, :, None] * dpre[:, None, :]  # d pre/dW1 = q outer 1: (B, N, E)
    dw1, _ = abs_backward(dw1.reshape(len(dw1), -1), w1_abs_cache)  # (B, N*E)
    dw1_z, grads = tail_backward(dw1, w1_tail)
    dwf_z, wf_grads = tail_backward(dwf, wf_tail)
    dv_z, v_grads = tail_backward(dq_tot, v_tail)  # dQ_tot/dV = 1
    grads.update(wf_grads)
    grads.update(v_grads)
    grads.update(linear_stack_backward([dw1_z, dwf_z, dpre, dv_z], state_cache))
    return dagent_qs, grads


def vdn_mixer_forward(params, agent_qs, states):
    """VDN: Q_tot = sum_i Q_i. No parameters; the state is not used."""
    return agent_qs.sum(axis=-1), agent_qs.shape


def vdn_mixer_backward(dq_tot, cache):
    return np.broadcast_to(dq_tot[:, None], cache).copy(), {}  # dQ_tot/dQ_i = 1


def independent_mixer_forward(params, agent_qs, states):
    """Independent learners: no mixing; each agent's Q (B, N) gets its own TD error."""
    return agent_qs, None


def independent_mixer_backward(dq, cache):
    return dq, {}


MIXERS = {  # name -> (forward, backward)
    "qmix": (qmix_mixer_forward, qmix_mixer_backward),
    "vdn": (vdn_mixer_forward, vdn_mixer_backward),
    "none": (independent_mixer_forward, independent_mixer_backward),
}


def init_mixer(rng, config, n_agents, state_dim):
    """The mixer parameters a config asks for ({} for the parameter-free VDN and "none")."""
    if config.mixer != "qmix":
        return {}
    return init_qmix_mixer(rng, n_agents, state_dim, config.mixing_embed_dim,
                           config.hypernet_layers, config.hypernet_embed, np.dtype(config.dtype))


def get_mixer(name):
    """(forward, backward) for a mixer name, or a ValueError naming the choices."""
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {tuple(MIXERS)}, got {name!r}")
    return MIXERS[name]


# ------------------------------------------------------------------------------------------
# TD loss
# ------------------------------------------------------------------------------------------


def masked_argmax(q, avail):
    """argmax over the last axis among available actions only (pymarl: -inf elsewhere)."""
    return np.where(avail, q, minus_inf(q.dtype)).argmax(axis=-1)


def action_index(actions):
    """Index of q[b, i, actions[b, i]] for every b, i: actions (B, N) -> a fancy index."""
    batch, n_agents = actions.shape
    return indices(batch)[:, None], indices(n_agents), actions


def take_actions(q, actions):
    """Q of the taken actions: q (B, N, A), actions (B, N) -> (B, N)."""
    return q[action_index(actions)]


def td_targets(params, target_params, batch, config, next_inputs=None, online_next_q=None):
    """y = r + gamma (1 - terminated) Q_tot^-(s', a'): a constant for the loss (stop-gradient).

    Double Q: a'_i = argmax over available actions of the ONLINE agent net at o'_i, valued by
    the TARGET agent net and mixed by the TARGET mixer at s'. Without it: the target net's max.
    next_inputs (B, N, I), the agent inputs at o', and online_next_q (B, N, A), the online net's
    Qs at o': pass them if already computed (loss_and_grads computes both with those at o);
    otherwise they are computed here.
    Returns (B,), or (B, N) for independent learners.
    """
    if next_inputs is None:
        next_inputs = build_agent_inputs(batch["next_obs"], config.obs_agent_id, config.dtype)
    q_next, _ = agent_forward(target_params["agent"], next_inputs)  # (B, N, A)
    if not config.double_q:
        chooser = q_next
    elif online_next_q is None:
        chooser, _ = agent_forward(params["agent"], next_inputs)
    else:
        chooser = online_next_q
    best = masked_argmax(chooser, batch["next_avail_actions"])  # (B, N)
    mix_forward, _ = get_mixer(config.mixer)
    q_tot_next, _ = mix_forward(target_params["mixer"], take_actions(q_next, best), batch["next_state"])
    reward, terminated = batch["reward"], batch["terminated"]
    if q_tot_next.ndim == 2:  # independent learners: the team reward for every agent
        reward, terminated = reward[:, None], terminated[:, None]
    return np.where(terminated, reward, reward + config.gamma * q_tot_next)  # y = r where terminated


def td_loss_forward(q_tot, targets):
    """L = mean((Q_tot - y)^2) over the batch (and the agents, for independent learners)."""
    td_error = q_tot - targets
    return float(np.vdot(td_error, td_error)) / td_error.size, td_error


def td_loss_backward(dloss, cache):
    td_error = cache
    return dloss * 2.0 * td_error / td_error.size, {}  # dL/dQ_tot = 2 (Q_tot - y) / n


def loss_and_grads(params, target_params, batch, config):
    """Forward and backward of the TD loss through mixer and agent nets; the targets y are constants.

    As in pymarl, ONE forward of the online agent net covers o and o' (2B inputs). Its Qs at o'
    only choose double Q's a' for td_targets, so the backward covers the B inputs of o alone.
    Returns (loss, grads keyed like params, diagnostics).
    """
    mix_forward, mix_backward = get_mixer(config.mixer)
    n_batch = len(batch["obs"])
    inputs = build_agent_inputs(np.concatenate([batch["obs"], batch["next_obs"]]), config.obs_agent_id,
                                config.dtype)  # (2B, N, I): o, then o'
    q_both, agent_cache = agent_forward(params["agent"], inputs)  # (2B, N, A)
    q = q_both[:n_batch]  # (B, N, A)
    targets = td_targets(params, target_params, batch, config, inputs[n_batch:], q_both[n_batch:])
    taken = action_index(batch["actions"])  # q[taken] gathers the taken actions' Qs
    q_taken = q[taken]  # (B, N)
    q_tot, mix_cache = mix_forward(params["mixer"], q_taken, batch["state"])
    loss, loss_cache = td_loss_forward(q_tot, targets)

    dq_tot, _ = td_loss_backward(1.0, loss_cache)
    dq_taken, mixer_grads = mix_backward(dq_tot, mix_cache)
    dq = np.zeros_like(q)
    dq[taken] = dq_taken  # the gather's transpose: a scatter
    _, agent_grads = agent_backward(dq, agent_cache, input_grad=False)
    n = targets.size
    diagnostics = {"td_error_abs": float(np.abs(loss_cache).sum()) / n,
                   "q_taken_mean": float(q_tot.sum()) / n, "target_mean": float(targets.sum()) / n}
    return loss, {"agent": agent_grads, "mixer": mixer_grads}, diagnostics


def joint_q_tot(params, config, obs, state):
    """Q_tot of EVERY joint action in one situation: obs (N, O), state (S,) -> (A,) * N.

    For independent learners ("none") there is no Q_tot; this returns sum_i Q_i, the joint
    utility their greedy actions maximise. Used to print tables and to check IGM by brute force.
    """
    inputs = build_agent_inputs(np.asarray(obs)[None], config.obs_agent_id, config.dtype)
    q = agent_forward(params["agent"], inputs)[0][0]  # (N, A)
    n_agents, n_actions = q.shape
    joint = np.indices((n_actions,) * n_agents).reshape(n_agents, -1).T  # (A^N, N)
    agent_qs = q[np.arange(n_agents), joint]  # (A^N, N)
    states = np.broadcast_to(np.asarray(state, dtype=q.dtype), (len(joint), len(state)))
    mix_forward, _ = get_mixer(config.mixer)
    q_tot, _ = mix_forward(params["mixer"], agent_qs, states)
    if q_tot.ndim == 2:
        q_tot = q_tot.sum(axis=-1)
    return q_tot.reshape((n_actions,) * n_agents)


# ------------------------------------------------------------------------------------------
# Optimiser and gradient clipping
# ------------------------------------------------------------------------------------------


def pack(tree):
    """Lay every tensor of {group: {name: array}} end to end in ONE vector.

    Returns (vector, tree of views into it): code reads and writes the named views (the keys
    stay pymarl's), while the optimiser, clipping and target copies each touch one vector.
    """
    arrays = [a for inner in tree.values() for a in inner.values()]
    dtype = np.result_type(*arrays) if arrays else np.float64
    vector = np.concatenate([a.ravel() for a in arrays]).astype(dtype) if arrays else np.zeros(0)
    views, offset = {}, 0
    for group, inner in tree.items():
        views[group] = {}
        for name, a in inner.items():
            views[group][name] = vector[offset: offset + a.size].reshape(a.shape)
            offset += a.size
    return vector, views


def flat_grad(grads, like):
    """The gradient tree as one vector, in the order pack() laid out the tree `like`."""
    return np.concatenate([grads[g][k] for g, inner in like.items() for k in inner], axis=None)


def clip_grad_norm(grad, max_norm):
    """Scale the gradient vector in place so that its global L2 norm is at most max_norm.

    g <- g * max_norm / ||g|| when ||g|| > max_norm. Returns ||g|| before clipping.
    """
    norm = math.sqrt(float(np.dot(grad, grad)))
    if norm > max_norm:
        grad *= max_norm / norm
    return norm


class Adam:
    """Adam with PyTorch's semantics (torch.optim.Adam, no weight decay). At step t:

        m <- b1 m + (1 - b1) g        v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = np.zeros_like(params)  # first moment, shaped like params
        self.v = np.zeros_like(params)  # second moment
        self.t = 0  # steps taken

    def step(self, params, grad):
        """Update the array `params` in place from its gradient."""
        self.t += 1
        b1, b2 = self.betas
        self.m *= b1
        self.m += (1 - b1) * grad
        self.v *= b2
        self.v += (1 - b2) * np.square(grad)
        denom = np.sqrt(self.v)
        denom *= 1 / math.sqrt(1 - b2**self.t)
        denom += self.eps
        update = np.divide(self.m, denom, out=denom)
        update *= self.lr / (1 - b1**self.t)
        params -= update


# ------------------------------------------------------------------------------------------
# Replay buffer
# ------------------------------------------------------------------------------------------


def _check_array(name, value, shape, kind):
    """`value` as an array of `shape`, or an error naming `name`.

    kind "float": finite numbers; "int": integers; "bool": 0/1 or booleans.
    """
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:  # ragged nested lists
        raise ValueError(f"{name} must be an array of shape {shape}: {err}") from None
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    dtype_kind = array.dtype.kind
    if kind == "int":
        if dtype_kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    elif dtype_kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    elif kind == "float" and dtype_kind == "f" and not all_true(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array[~np.isfinite(array)][:3]} in it")
    elif kind == "bool" and dtype_kind != "b" and not all_true((array == 0) | (array == 1)):
        raise ValueError(f"{name} must hold only 0/1 (or booleans)")
    return array


def check_avail_actions(name, avail, n_agents, n_actions):
    """A (N, A) 0/1 mask with at least one available action per agent."""
    avail = _check_array(name, avail, (n_agents, n_actions), "bool").astype(bool, copy=False)
    if not all_true(avail.any(axis=-1)):
        empty = np.flatnonzero(~avail.any(axis=-1))
        raise ValueError(f"{name}: agent(s) {empty.tolist()} have no available action")
    return avail


def check_actions(name, actions, avail):
    """(N,) integer actions, each in range and available under `avail` (N, A)."""
    n_agents, n_actions = avail.shape
    actions = _check_array(name, actions, (n_agents,), "int")
    if actions.min() < 0 or actions.max() >= n_actions:
        bad = np.flatnonzero((actions < 0) | (actions >= n_actions))
        raise ValueError(f"{name} must lie in [0, {n_actions}), agent(s) {bad.tolist()} "
                         f"chose {actions[bad].tolist()}")
    chosen_available = avail[indices(n_agents), actions]  # (N,)
    if not all_true(chosen_available):
        unavailable = np.flatnonzero(~chosen_available)
        raise ValueError(f"{name}: agent(s) {unavailable.tolist()} chose unavailable action(s) "
                         f"{actions[unavailable].tolist()}")
    return actions


class ReplayBuffer:
    """A ring of the last `capacity` transitions, in arrays allocated once.

    `add` copies its arguments in (a caller mutating them later changes nothing stored) after
    checking every one of them, so a rejected call stores nothing. When full, the oldest
    transition is overwritten. `sample` draws uniformly with the caller's Generator.
    """

    def __init__(self, capacity, n_agents, obs_dim, state_dim, n_actions, dtype=np.float64):
        n, o, s, a = n_agents, obs_dim, state_dim, n_actions
        self.capacity = capacity
        self.spec = {  # field -> (shape of one transition, checked kind, stored dtype)
            "obs": ((n, o), "float", dtype), "state": ((s,), "float", dtype),
            "actions": ((n,), "int", np.int64), "avail_actions": ((n, a), "bool", bool),
            "reward": ((), "float", dtype), "terminated": ((), "bool", bool),
            "next_obs": ((n, o), "float", dtype), "next_state": ((s,), "float", dtype),
            "next_avail_actions": ((n, a), "bool", bool),
        }
        self.data = {k: np.zeros((capacity,) + shape, dt) for k, (shape, _, dt) in self.spec.items()}
        self.size = 0  # transitions held
        self.next_index = 0  # where the next transition goes

    def __len__(self):
        return self.size

    def add(self, obs, state, actions, avail_actions, reward, terminated, next_obs, next_state,
            next_avail_actions):
        """Store one transition; every argument is checked before anything is written."""
        given = dict(obs=obs, state=state, actions=actions, avail_actions=avail_actions,
                     reward=reward, terminated=terminated, next_obs=next_obs,
                     next_state=next_state, next_avail_actions=next_avail_actions)
        n, a = self.spec["avail_actions"][0]
        checked = {k: _check_array(k, v, self.spec[k][0], self.spec[k][1]) for k, v in given.items()}
        checked["avail_actions"] = check_avail_actions("avail_actions", avail_actions, n, a)
        checked["next_avail_actions"] = check_avail_actions("next_avail_actions", next_avail_actions, n, a)
        checked["actions"] = check_actions("actions", actions, checked["avail_actions"])
        self._write(checked)

    def _write(self, transition):
        """Store a transition whose every field has been checked (by add, or as it left the env)."""
        for key, value in transition.items():
            self.data[key][self.next_index] = value
        self.next_index = (self.next_index + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, rng):
        """batch_size transitions drawn uniformly (with replacement), as fresh arrays."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return self._gather(rng.integers(0, self.size, size=batch_size))

    def in_order(self):
        """Every stored transition, oldest first."""
        start = self.next_index if self.size == self.capacity else 0
        return self._gather((start + np.arange(self.size)) % self.capacity)

    def _gather(self, index):
        return {key: array.take(index, axis=0) for key, array in self.data.items()}


# ------------------------------------------------------------------------------------------
# Checkpoint format: named arrays in one .npz, no pickles, a SHA-256 digest over all of them
# ------------------------------------------------------------------------------------------

ENV_INFO_KEYS = ("n_agents", "n_actions", "obs_shape", "state_shape", "episode_limit")
COUNTERS = ("t_env", "episode", "train_steps", "last_target_update_episode", "skipped_steps")
CHECKPOINT_FORMAT = "qmix-np checkpoint"
CHECKPOINT_VERSION = 1


def _digest(arrays):
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _read_checkpoint(path):
    """Every array of a checkpoint file, checked for format, version, keys and digest."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{path}: not a readable checkpoint (truncated, corrupt or not .npz): {err}") from None
    if str(arrays.get("format", "")) != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a qmix-np checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    version = arrays.get("version")
    if version is None or version.shape != () or int(version) != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {version}, this code reads {CHECKPOINT_VERSION}")
    required = {"format", "version", "config", "env_info", "theta", "target_theta", "adam_m",
                "adam_v", "adam_t", "counters", "rng_state", "sha256"}
    missing = required - set(arrays)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {sorted(missing)}")
    stored = str(arrays.pop("sha256"))
    if _digest(arrays) != stored:
        raise ValueError(f"{path}: the contents do not match the stored SHA-256 digest (tampered or corrupt)")
    return arrays


# ------------------------------------------------------------------------------------------
# Learner
# ------------------------------------------------------------------------------------------


class Learner:
    """Agent nets, mixer, their targets, Adam, the replay buffer and the run's counters.

    Everything random (initialisation, exploration, sampling, episode seeds) draws from
    `self.rng`, one Generator seeded from config.seed.
    """

    def __init__(self, config, env_info):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a Config, got {type(config).__name__}")
        missing = [k for k in ENV_INFO_KEYS if k not in env_info]
        if missing:
            raise ValueError(f"env_info lacks {missing} (pymarl's get_env_info() has all of {ENV_INFO_KEYS})")
        self.config = config
        self.env_info = {k: int(np.prod(env_info[k])) for k in ENV_INFO_KEYS}
        self.n_agents = int(env_info["n_agents"])
        self.n_actions = int(env_info["n_actions"])
        self.obs_dim = int(np.prod(env_info["obs_shape"]))
        self.state_dim = int(np.prod(env_info["state_shape"]))
        self.dtype = np.dtype(config.dtype)
        self.rng = np.random.default_rng(config.seed)

        input_dim = self.obs_dim + (self.n_agents if config.obs_agent_id else 0)
        groups = None if config.shared_agent else self.n_agents
        self.theta, self.params = pack({  # all parameters in one vector; params: named views
            "agent": init_agent_params(self.rng, input_dim, config.agent_hidden_dims,
                                       self.n_actions, groups, self.dtype),
            "mixer": init_mixer(self.rng, config, self.n_agents, self.state_dim),
        })
        self.target_theta, self.target_params = pack(self.params)
        self.optimiser = Adam(self.theta, config.lr, config.adam_betas, config.adam_eps)
        self.buffer = ReplayBuffer(config.buffer_size, self.n_agents, self.obs_dim,
                                   self.state_dim, self.n_actions, self.dtype)
        self.t_env = 0  # env steps taken in training
        self.episode = 0  # training episodes finished
        self.train_steps = 0  # gradient steps taken
        self.last_target_update_episode = 0
        self.skipped_steps = 0  # train steps skipped for a non-finite loss or gradient norm
        self.last_diagnostics = None  # what the latest train_step returned

    def epsilon(self):
        """Linear from epsilon_start to epsilon_finish over epsilon_anneal_time env steps."""
        c = self.config
        fraction = min(self.t_env / c.epsilon_anneal_time, 1.0)
        return c.epsilon_start + fraction * (c.epsilon_finish - c.epsilon_start)

    def select_actions(self, obs, avail_actions, epsilon=0.0):
        """Epsilon-greedy actions (N,) for one env step; random ones are uniform over AVAILABLE actions.

        obs (N, O), avail_actions (N, A), epsilon in [0, 1]. epsilon 0 is greedy and draws nothing
        from the Generator.
        """
        if not _is_real(epsilon, 0.0, 1.0):
            raise ValueError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
        obs = _check_array("obs", obs, (self.n_agents, self.obs_dim), "float")
        avail = check_avail_actions("avail_actions", avail_actions, self.n_agents, self.n_actions)
        return self._select_actions(obs, avail, epsilon)

    def _select_actions(self, obs, avail, epsilon):
        """select_actions on inputs already checked: obs (N, O) finite, avail (N, A) bool."""
        if epsilon == 0:
            return self._greedy_actions(obs, avail)
        explore = self.rng.random(self.n_agents) < epsilon  # (N,): these agents act at random
        random_actions = masked_argmax(self.rng.random((self.n_agents, self.n_actions)), avail)
        if all_true(explore):  # no agent needs the network: most steps while epsilon is near 1
            return random_actions
        return np.where(explore, random_actions, self._greedy_actions(obs, avail))

    def _greedy_actions(self, obs, avail):
        """Each agent's argmax over its available actions: obs (N, O), avail (N, A) -> (N,)."""
        inputs = build_agent_inputs(obs[None], self.config.obs_agent_id, self.dtype)  # (1, N, I)
        q, _ = agent_forward(self.params["agent"], inputs)
        return masked_argmax(q[0], avail)

    def train_step(self):
        """One gradient step on a sampled batch. Returns its diagnostics."""
        c = self.config
        batch = self.buffer.sample(c.batch_size, self.rng)
        loss, grads, diagnostics = loss_and_grads(self.params, self.target_params, batch, c)
        grad = flat_grad(grads, self.params)  # a fresh vector: clipping it changes nothing stored
        grad_norm = clip_grad_norm(grad, c.grad_norm_clip)  # NaN/inf if an element is, or if g.g overflows
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # nothing is updated below
            if c.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"train step {self.train_steps + 1}: the loss ({loss}) or the gradient's norm "
                    f"({grad_norm}) is not finite; parameters and optimiser state are unchanged "
                    "(Config.on_nonfinite='skip' skips such steps instead)")
            self.skipped_steps += 1
            return {"loss": loss, "grad_norm": grad_norm, "skipped": True, **diagnostics}
        self.optimiser.step(self.theta, grad)
        self.train_steps += 1
        return {"loss": loss, "grad_norm": grad_norm, "skipped": False, **diagnostics}

    def end_episode(self):
        """Count a finished training episode; refresh the targets every target_update_interval."""
        self.episode += 1
        if self.episode - self.last_target_update_episode >= self.config.target_update_interval:
            self.update_targets()
            self.last_target_update_episode = self.episode

    def update_targets(self):
        """Hard copy: target agent nets and target mixer <- online."""
        np.copyto(self.target_theta, self.theta)

    # --- checkpoints -------------------------------------------------------------------------

    def state_arrays(self, include_buffer=True):
        """Everything a run needs to continue bit for bit, as named arrays (no Python objects)."""
        arrays = {
            "format": np.array(CHECKPOINT_FORMAT), "version": np.array(CHECKPOINT_VERSION),
            "config": np.array(json.dumps(dataclasses.asdict(self.config))),
            "env_info": np.array(json.dumps(self.env_info)),
            "theta": self.theta, "target_theta": self.target_theta,
            "adam_m": self.optimiser.m, "adam_v": self.optimiser.v, "adam_t": np.array(self.optimiser.t),
            "counters": np.array([getattr(self, name) for name in COUNTERS], dtype=np.int64),
            "rng_state": np.array(json.dumps(self.rng.bit_generator.state)),
        }
        if include_buffer:
            arrays["buffer_position"] = np.array([self.buffer.size, self.buffer.next_index], dtype=np.int64)
            arrays.update({f"buffer/{k}": v for k, v in self.buffer.data.items()})
        return arrays

    def save(self, path, include_buffer=True):
        """Write a checkpoint: one .npz (allow_pickle=False), replaced atomically.

        It holds the config, parameters and targets, Adam's moments and step count, the counters,
        the Generator's state, optionally the replay buffer, and a SHA-256 digest of all of it.
        It is written to a temporary file in the same folder and then renamed over `path`, so a
        crash mid-save leaves any previous checkpoint at `path` intact.
        """
        path = pathlib.Path(path)
        arrays = self.state_arrays(include_buffer)
        arrays["sha256"] = np.array(_digest(arrays))
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                with zipfile.ZipFile(f, "w") as archive:
                    for key, value in arrays.items():
                        with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                            np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path, env_info=None, config=None):
        """A Learner restored from a checkpoint written by save().

        Never unpickles. Refuses (ValueError, saying what is wrong) a file that is not a complete
        qmix-np checkpoint of this format version, whose digest does not match its contents, or
        whose arrays do not have the shapes and dtypes its config implies; and, if given, an
        env_info or config that differs from the checkpoint's (config may differ in t_max).
        """
        arrays = _read_checkpoint(path)
        try:
            saved_config = Config(**json.loads(str(arrays["config"])))
            saved_env_info = json.loads(str(arrays["env_info"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: the stored config or env_info is invalid: {err}") from None
        if env_info is not None:
            wanted = {k: int(np.prod(env_info[k])) for k in ENV_INFO_KEYS}
            if wanted != saved_env_info:
                raise ValueError(f"{path}: the checkpoint is for an environment with {saved_env_info}, "
                                 f"not {wanted}")
        if config is not None and dataclasses.replace(config, t_max=saved_config.t_max) != saved_config:
            differ = [f.name for f in dataclasses.fields(Config)
                      if f.name != "t_max" and getattr(config, f.name) != getattr(saved_config, f.name)]
            raise ValueError(f"{path}: the checkpoint's config differs in {differ}")
        learner = cls(saved_config if config is None else config, saved_env_info)
        learner._restore(path, arrays)
        return learner

    def _restore(self, path, arrays):
        expected = self.state_arrays(include_buffer="buffer_position" in arrays)
        unexpected = set(arrays) - set(expected)
        if unexpected:
            raise ValueError(f"{path}: unexpected entries {sorted(unexpected)}")
        for key, value in expected.items():
            if key in ("format", "version", "config", "env_info", "rng_state"):
                continue
            got = arrays[key]
            if got.shape != value.shape or got.dtype != value.dtype:
                raise ValueError(f"{path}: {key} has shape {got.shape} and dtype {got.dtype}, but this "
                                 f"config needs shape {value.shape} and dtype {value.dtype}")
        for key in ("theta", "target_theta", "adam_m", "adam_v"):
            if not np.isfinite(arrays[key]).all():
                raise ValueError(f"{path}: {key} holds non-finite values")
        counters, adam_t = arrays["counters"], int(arrays["adam_t"])
        if counters.min() < 0 or adam_t < 0:
            raise ValueError(f"{path}: negative counters {counters.tolist()} or Adam step {adam_t}")
        try:
            self.rng.bit_generator.state = json.loads(str(arrays["rng_state"]))
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: the stored Generator state is invalid: {err}") from None
        if "buffer_position" in arrays:
            size, next_index = (int(v) for v in arrays["buffer_position"])
            capacity = self.buffer.capacity
            if not (0 <= size <= capacity and 0 <= next_index < capacity
                    and (size == capacity or next_index == size)):
                raise ValueError(f"{path}: buffer size {size} and next index {next_index} are "
                                 f"inconsistent with capacity {capacity}")
            for key in self.buffer.data:
                self.buffer.data[key][...] = arrays[f"buffer/{key}"]
            self.buffer.size, self.buffer.next_index = size, next_index
        self.theta[...], self.target_theta[...] = arrays["theta"], arrays["target_theta"]
        self.optimiser.m[...], self.optimiser.v[...] = arrays["adam_m"], arrays["adam_v"]
        self.optimiser.t = adam_t
        for name, value in zip(COUNTERS, counters.tolist()):
            setattr(self, name, value)


# ------------------------------------------------------------------------------------------
# Train and evaluate, for any environment with pymarl's interface
# ------------------------------------------------------------------------------------------


def _reset(env, seed):
    """env.reset(seed=seed) where the env takes a seed (pymarl's interface has none)."""
    if seed is not None and "seed" in inspect.signature(env.reset).parameters:
        env.reset(seed=seed)
    else:
        env.reset()


def observe(env, learner):
    """The env's (obs, state, avail_actions), each checked once, here, as it enters the loop."""
    n, o, s, a = learner.n_agents, learner.obs_dim, learner.state_dim, learner.n_actions
    return (_check_array("env.get_obs()", env.get_obs(), (n, o), "float"),
            _check_array("env.get_state()", env.get_state(), (s,), "float"),
            check_avail_actions("env.get_avail_actions()", env.get_avail_actions(), n, a))


def run_episode(env, learner, learn=False):
    """Play one episode from a freshly reset env; returns (return, length, success).

    learn=False: greedy, nothing stored, nothing drawn from the learner's Generator.
    learn=True: epsilon-greedy; each transition is stored and followed by one train step once
    the buffer holds a batch. A time limit (info["episode_limit"]) is not terminal: it is stored
    with terminated False so that the target bootstraps. Success = ended before the time limit.
    """
    obs, state, avail = observe(env, learner)
    episode_return, length, terminated, info = 0.0, 0, False, {}
    while not terminated:
        epsilon = learner.epsilon() if learn else 0.0
        actions = learner._select_actions(obs, avail, epsilon)
        reward, terminated, info = env.step(actions)
        reward = float(_check_array("reward", reward, (), "float"))
        episode_return += reward
        length += 1
        next_obs, next_state, next_avail = observe(env, learner)
        if learn:
            truly_terminal = bool(terminated) and not info.get("episode_limit", False)
            learner.buffer._write(dict(obs=obs, state=state, actions=actions, avail_actions=avail,
                                       reward=reward, terminated=truly_terminal, next_obs=next_obs,
                                       next_state=next_state, next_avail_actions=next_avail))
            learner.t_env += 1
            if len(learner.buffer) >= learner.config.batch_size:
                learner.last_diagnostics = learner.train_step()
        obs, state, avail = next_obs, next_state, next_avail
    if learn:
        learner.end_episode()
    return episode_return, length, not info.get("episode_limit", False)


def train(env, config, learner=None, callback=None):
    """Train until config.t_max env steps (whole episodes); returns the Learner.

    learner: continue this one (its config may differ from `config` only in t_max).
    callback(learner, episode_return, length, success) runs after every episode.
    Each episode's reset seed is drawn from the learner's Generator when env.reset takes one.
    """
    if learner is None:
        learner = Learner(config, env.get_env_info())
    elif dataclasses.replace(learner.config, t_max=config.t_max) != config:
        raise ValueError("config must equal learner.config except for t_max")
    learner.config = config
    while learner.t_env < config.t_max:
        _reset(env, int(learner.rng.integers(2**31)))
        result = run_episode(env, learner, learn=True)
        if callback is not None:
            callback(learner, *result)
    return learner


def evaluate(env, learner, n_episodes, seed):
    """Greedy play on n_episodes fresh episodes with reset seeds seed, seed + 1, ...

    Returns mean_return, success_rate (terminated before the time limit), mean_length, and,
    if the env defines optimal_length() (the shortest possible length of the current episode),
    optimality_ratio: the mean of length / optimal_length over successful episodes.
    """
    returns, lengths, successes, ratios = [], [], [], []
    for i in range(n_episodes):
        _reset(env, seed + i)
        optimal = env.optimal_length() if hasattr(env, "optimal_length") else None
        episode_return, length, success = run_episode(env, learner)
        returns.append(episode_return)
        lengths.append(length)
        successes.append(success)
        if success and optimal:
            ratios.append(length / optimal)
    result = {"mean_return": float(np.mean(returns)), "success_rate": float(np.mean(successes)),
              "mean_length": float(np.mean(lengths)), "episodes": n_episodes}
    if hasattr(env, "optimal_length"):
        result["optimality_ratio"] = float(np.mean(ratios)) if ratios else float("nan")
    return result
