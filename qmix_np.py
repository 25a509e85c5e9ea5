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
tuple of per-agent argmaxes, so the agents act greedily on their own Qs. Training minimises the
squared TD error of Q_tot against y_t = r_t + gamma (1 - terminated_t) Q_tot^-(s_{t+1}, a'_{t+1}),
where the target networks (^-) are hard copies and a' is chosen by double Q.

The learner is pymarl's (oxwhirl/pymarl: QMixer, QLearner, BasicMAC, EpisodeBatch, and its
runners), so the two can be read side by side: K envs play one episode each in lockstep, whole
episodes are stored, a batch of episodes is sampled, the agent network runs over every time
step, and the TD loss is masked to the steps that happened. The
agent is pymarl's RNNAgent, fc1 -> ReLU -> GRUCell -> fc2, trained by backpropagation through
time; with use_rnn=False, EPyMARL's feed-forward variant fc1 -> ReLU -> Linear -> ReLU -> fc2.
The README lists where this file departs from the paper and pymarl.

Sections follow the data: config -> primitives -> agent network -> mixers -> TD loss over
episodes -> optimisers -> episode replay buffer -> reward standardisation -> learner -> train /
evaluate. Then, under one banner, input validation and the checkpoint format, which the
algorithm calls but never needs to be read for. Every forward returns (out, cache) and every
backward takes (dout, cache) and returns (d_input, {param name: grad}) (the GRU cell also
returns dL/dh); no function keeps state between calls, so online and target networks can both
run forward before any backward.

Shapes: B episodes in a batch, T time steps with an action (an episode stores T + 1 states),
N agents, O observation, A actions, I agent input (O, + A with the last action, + N with the
agent id), S state, H hidden_dim, E mixing_embed_dim. M stands for "any number of rows".
"""
from __future__ import annotations

__version__ = "0.4.0"

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import tokenize
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Every setting of a run. Field names and defaults are pymarl's or EPyMARL's where they have one."""

    # --- the method
    mixer: str = "qmix"  # "qmix", "vdn" (sum of Qs) or "none" (independent learners)
    mixing_embed_dim: int = 32  # E: width of the mixing network's hidden layer
    hypernet_layers: int = 2  # 1 or 2 Linear layers in hyper_w_1 / hyper_w_final (pymarl qmix.yaml: 2)
    hypernet_embed: int = 64  # hidden width of the 2-layer hypernetworks
    use_rnn: bool = True  # agent = fc1 -> GRUCell -> fc2 (pymarl's RNNAgent), else its middle is a Linear (EPyMARL)
    hidden_dim: int = 64  # H: the agent network's width (EPyMARL's hidden_dim, pymarl's rnn_hidden_dim)
    shared_agent: bool = True  # one agent network shared by all agents (pymarl), else one per agent
    obs_last_action: bool = True  # agent input includes the one-hot of its previous action (pymarl)
    obs_agent_id: bool = True  # agent input includes its one-hot agent id (pymarl)
    # --- the learner
    gamma: float = 0.99  # discount
    standardise_rewards: bool = False  # EPyMARL's: rewards scaled by a running mean and std at each train step
    optimizer: str = "adam"  # "adam" (pymarl2, EPyMARL) or "rmsprop" (pymarl)
    lr: float = 5e-4  # step size of either optimiser
    adam_betas: tuple = (0.9, 0.999)  # Adam's moment decay rates (PyTorch defaults)
    adam_eps: float = 1e-8  # Adam's denominator guard (PyTorch default)
    optim_alpha: float = 0.99  # RMSprop's decay of the squared-gradient average (pymarl)
    optim_eps: float = 1e-5  # RMSprop's denominator guard (pymarl)
    batch_size: int = 32  # EPISODES per train step (pymarl)
    buffer_size: int = 5000  # EPISODES held by the replay buffer (pymarl)
    double_q: bool = True  # online net picks a', target net values it
    grad_norm_clip: float = 10.0  # max global L2 norm over all gradients
    target_update_interval: int = 200  # EPISODES between hard target copies (pymarl's unit)
    # --- exploration
    epsilon_start: float = 1.0  # epsilon at env step 0
    epsilon_finish: float = 0.05  # epsilon after epsilon_anneal_time env steps
    epsilon_anneal_time: int = 50000  # ENV STEPS of linear annealing
    # --- the run
    batch_size_run: int = 1  # K: environments played in lockstep, one train step per K episodes (pymarl)
    t_max: int = 50000  # env steps of training (whole collections: the last one may run past it)
    seed: int = 0  # seeds the one Generator behind everything random
    dtype: str = "float32"  # training dtype, "float32" (as PyTorch) or "float64" (gradient checks)
    on_nonfinite: str = "raise"  # a NaN/inf loss or gradient norm: "raise" FloatingPointError, or "skip" the step

    def __post_init__(self):
        check_config(self)  # see "Input validation" at the end of this file

    def __setattr__(self, name, value):
        """Fields are set once, by __init__, then checked: a Config never changes after that."""
        if name in self.__dict__:
            raise TypeError(f"a Config does not change once checked: make another with "
                            f"dataclasses.replace(config, {name}=...)")
        object.__setattr__(self, name, value)


# ------------------------------------------------------------------------------------------
# Primitives: forward(x, ...) -> (out, cache); backward(dout, cache) -> (dx, {param: grad})
# ------------------------------------------------------------------------------------------


def linear_forward(x, weight, bias):
    """y = x W^T + b, with PyTorch's layout W (out, in).

    Shared layer:  x (M, I), W (O, I), b (O,)       -> y (M, O)
    One per group: x (G, M, I), W (G, O, I), b (G, O) -> y (G, M, O)   (G = agents)
    """
    out = x @ weight.swapaxes(-1, -2)
    out += bias[..., None, :]  # in place: a second large temporary cost as much as the product (measured)
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


def relu_forward(x):
    """y = max(x, 0)."""
    out = np.maximum(x, 0)
    return out, out  # y > 0 exactly where x > 0, so y is all backward needs


def relu_backward(dout, cache):
    return dout * (cache > 0), {}  # ReLU'(x) = 1 if x > 0 else 0


def elu_forward(x):
    """y = x if x > 0 else exp(x) - 1  (alpha = 1, as torch.nn.functional.elu)."""
    out = np.where(x > 0, x, np.expm1(np.minimum(x, 0)))  # min() keeps exp from overflowing
    return out, out


def elu_backward(dout, cache):
    return dout * np.where(cache > 0, 1, cache + 1), {}  # ELU'(x) = 1 if x > 0 else ELU(x) + 1


def abs_forward(x):
    """y = |x|: how QMIX keeps its mixing weights non-negative."""
    return np.abs(x), x


def abs_backward(dout, cache):
    return dout * np.sign(cache), {}  # d|x|/dx = sign(x)


def sigmoid(x):
    """1 / (1 + exp(-x)), written with tanh so that no exp overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def gru_cell_forward(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """One step of PyTorch's nn.GRUCell, gates stacked r, z, n in its layout:

        r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)        (reset gate)
        z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)        (update gate)
        n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))     (candidate)
        h' = (1 - z) * n + z * h

    x (..., M, In), h (..., M, H); weight_ih (3H, In), weight_hh (3H, H), bias_ih, bias_hh (3H,),
    each with a leading group axis for one cell per agent, as linear_forward -> h' (..., M, H).
    The cell is two products, x W_ih^T + b_ih and h W_hh^T + b_hh, then the gates.
    """
    input_part, input_cache = linear_forward(x, weight_ih, bias_ih)  # (..., M, 3H)
    hidden_part, hidden_cache = linear_forward(h, weight_hh, bias_hh)  # (..., M, 3H)
    h_new, gates_cache = gru_gates_forward(input_part, hidden_part, h)
    return h_new, (input_cache, hidden_cache, gates_cache)


def gru_gates_forward(input_part, hidden_part, h):
    """The cell's equations after its two products: input_part = x W_ih^T + b_ih and
    hidden_part = h W_hh^T + b_hh, both (..., M, 3H) with r, z, n side by side -> h' (..., M, H)."""
    H = h.shape[-1]
    r_z = sigmoid(input_part[..., :2 * H] + hidden_part[..., :2 * H])  # r and z: the same formula, side by side
    r, z = r_z[..., :H], r_z[..., H:]
    h_n = hidden_part[..., 2 * H:]  # W_hn h + b_hn
    n = np.tanh(input_part[..., 2 * H:] + r * h_n)
    h_new = (1 - z) * n + z * h
    return h_new, (h, h_n, r, z, n)


def gru_gates_backward(dh_new, cache, d_input_part, d_hidden_part):
    """From dL/dh' to the gradients of the two products' outputs, written into d_input_part and
    d_hidden_part (..., M, 3H); returns the gradient that reaches h directly, dL/dh' * z."""
    h, h_n, r, z, n = cache
    dn = dh_new * (1 - z)  # dh'/dn = 1 - z
    dz = dh_new * (h - n)  # dh'/dz = h - n
    dn_pre = dn * (1 - n * n)  # tanh'(a) = 1 - tanh(a)^2
    dr = dn_pre * h_n  # d(i_n + r h_n)/dr = h_n
    dr_pre = dr * r * (1 - r)  # sigmoid'(a) = sigmoid(a) (1 - sigmoid(a))
    dz_pre = dz * z * (1 - z)
    np.concatenate([dr_pre, dz_pre, dn_pre], axis=-1, out=d_input_part)  # d(i_r, i_z, i_n): slope 1 each
    np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=-1, out=d_hidden_part)  # d(h_r, h_z, h_n): h_n is scaled by r
    return dh_new * z  # dh'/dh = z


def gru_cell_backward(dh_new, cache):
    """Returns dL/dx, dL/dh and the gradients of weight_ih, weight_hh, bias_ih, bias_hh."""
    input_cache, hidden_cache, gates_cache = cache
    d_input_part = np.empty(dh_new.shape[:-1] + (3 * dh_new.shape[-1],), dh_new.dtype)  # (..., M, 3H)
    d_hidden_part = np.empty_like(d_input_part)
    dh_direct = gru_gates_backward(dh_new, gates_cache, d_input_part, d_hidden_part)
    dx, input_grads = linear_backward(d_input_part, input_cache)
    dh, hidden_grads = linear_backward(d_hidden_part, hidden_cache)
    return dx, dh + dh_direct, {"weight_ih": input_grads["weight"], "weight_hh": hidden_grads["weight"],
                                "bias_ih": input_grads["bias"], "bias_hh": hidden_grads["bias"]}


def split_steps(rows, steps):
    """Rows ordered time first -> one block of rows per step, time on axis -3 (a view):
    (T M, F) -> (T, M, F); with a group axis (G, T M, F) -> (G, T, M, F)."""
    return rows.reshape(*rows.shape[:-2], steps, -1, rows.shape[-1])


def join_steps(per_step):
    """split_steps' inverse (a view): (..., T, M, F) -> (..., T M, F)."""
    return per_step.reshape(*per_step.shape[:-3], -1, per_step.shape[-1])


def gru_forward(x, h, weights):
    """The GRU cell unrolled over a whole sequence, laid out as cuDNN lays out its GRU.

    x (..., T, M, In): T steps of M rows (time on axis -3, after any group axis); h (..., M, H):
    the state before step 0; weights: gru_cell_forward's -> hs (..., T, M, H), the state after
    every step. Only h_{t-1} -> h_t must wait for the step before, so the input products
    x_t W_ih^T + b_ih of ALL steps are one product before the loop, and the loop does only
    h_{t-1} W_hh^T + b_hh and the gates: the same arithmetic as stepping the cell.
    """
    steps = x.shape[-3]
    input_parts, input_cache = linear_forward(join_steps(x), weights["weight_ih"], weights["bias_ih"])  # all steps
    input_parts = split_steps(input_parts, steps)  # (..., T, M, 3H)
    h0, hs, gates_caches = h, np.empty(input_parts.shape[:-1] + h.shape[-1:], h.dtype), []  # (..., T, M, H)
    for t in range(steps):
        hidden_part, _ = linear_forward(h, weights["weight_hh"], weights["bias_hh"])  # (..., M, 3H)
        h, gates_cache = gru_gates_forward(input_parts[..., t, :, :], hidden_part, h)
        hs[..., t, :, :] = h
        gates_caches.append(gates_cache)
    h_prev = np.concatenate([h0[..., None, :, :], hs[..., :-1, :, :]], axis=-3)  # (..., T, M, H): h_{t-1}
    return hs, (input_cache, h_prev, weights["weight_hh"], gates_caches)


def gru_backward(dhs, cache):
    """Backpropagation through time. dhs (..., T, M, H): the loss's gradient with respect to each
    step's output through the layers above it. Step t's state also feeds step t + 1, so its total
    gradient is dhs[t] plus what flows back from t + 1: that sum is the only thing the loop carries,
    dL/dh_{t-1} = d(hidden_part_t) W_hh + dL/dh_t * z_t. Each step's gradients of the two products'
    outputs are kept, and every weight's gradient and dL/dx are then one product over all steps
    (a sum over steps of per-step products is one product over the steps stacked as rows).
    Returns dL/dx (..., T, M, In) and the weights' gradients."""
    input_cache, h_prev, weight_hh, gates_caches = cache
    steps = dhs.shape[-3]
    d_input_parts = np.empty(dhs.shape[:-1] + (3 * dhs.shape[-1],), dhs.dtype)  # (..., T, M, 3H): d(x_t W_ih^T + b_ih)
    d_hidden_parts = np.empty_like(d_input_parts)  # d(h_{t-1} W_hh^T + b_hh)
    dh_next = 0.0
    for t in reversed(range(steps)):
        dh_direct = gru_gates_backward(dhs[..., t, :, :] + dh_next, gates_caches[t],
                                       d_input_parts[..., t, :, :], d_hidden_parts[..., t, :, :])
        dh_next = d_hidden_parts[..., t, :, :] @ weight_hh + dh_direct
    dx, input_grads = linear_backward(join_steps(d_input_parts), input_cache)
    _, hidden_grads = linear_backward(join_steps(d_hidden_parts), (join_steps(h_prev), weight_hh), input_grad=False)
    return split_steps(dx, steps), {"weight_ih": input_grads["weight"], "weight_hh": hidden_grads["weight"],
                                    "bias_ih": input_grads["bias"], "bias_hh": hidden_grads["bias"]}


def mlp_forward(params, layers, x):
    """Linear layers named `layers` (keys `{name}.weight`, `{name}.bias`), ReLU between them:
    pymarl's nn.Sequential hypernetworks (e.g. V.0 -> ReLU -> V.2). The last layer has no activation.
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
    for i, (name, relu_cache, linear_cache) in reversed(list(enumerate(cache))):
        dout, layer_grads = linear_backward(dout, linear_cache, input_grad or i > 0)
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


# ------------------------------------------------------------------------------------------
# Agent network: Q_i(tau_i, .) for every agent at every step of every episode, tau_i its history
# ------------------------------------------------------------------------------------------

def init_gru_cell(rng, name, in_dim, hidden_dim, groups=None, dtype=np.float64):
    """PyTorch's nn.GRUCell initialisation: every weight and bias uniform in +-1/sqrt(hidden_dim)."""
    lead = () if groups is None else (groups,)
    bound = 1.0 / math.sqrt(hidden_dim)
    shapes = {"weight_ih": (3 * hidden_dim, in_dim), "weight_hh": (3 * hidden_dim, hidden_dim),
              "bias_ih": (3 * hidden_dim,), "bias_hh": (3 * hidden_dim,)}
    return {f"{name}.{key}": rng.uniform(-bound, bound, lead + shape).astype(dtype) for key, shape in shapes.items()}


def init_agent_params(rng, input_dim, hidden_dim, n_actions, use_rnn=True, n_agents=None, dtype=np.float64):
    """The parameters of pymarl's RNNAgent (use_rnn) or EPyMARL's with use_rnn=False, by their keys:

        fc1 (H, I) -> ReLU -> rnn -> fc2 (A, H)
        use_rnn:  rnn is a GRUCell: rnn.weight_ih (3H, H), rnn.weight_hh (3H, H), rnn.bias_ih, rnn.bias_hh (3H,)
        else:     rnn is a Linear (H, H), followed by a ReLU

    n_agents None: one network shared by all agents, as in pymarl.
    n_agents N: one network per agent, stacked on a leading axis (fc1.weight (N, H, I)).
    """
    rnn = init_gru_cell if use_rnn else init_linear
    return {**init_linear(rng, "fc1", input_dim, hidden_dim, n_agents, dtype),
            **rnn(rng, "rnn", hidden_dim, hidden_dim, n_agents, dtype),
            **init_linear(rng, "fc2", hidden_dim, n_actions, n_agents, dtype)}


def one_hot(actions, n_actions, dtype):
    """actions (...) -> (..., A), row a = e_a."""
    return np.eye(n_actions, dtype=dtype)[actions]


def build_agent_inputs(obs, last_actions_onehot, config):
    """pymarl's BasicMAC._build_inputs: [o_i, onehot(a_i at t - 1), onehot(i)] for each agent.

    obs (..., N, O), last_actions_onehot (..., N, A) (zeros at t = 0) -> (..., N, I) of config.dtype.
    Each part is included as config.obs_last_action and config.obs_agent_id say.
    """
    parts = [obs]
    if config.obs_last_action:
        parts.append(last_actions_onehot)
    if config.obs_agent_id:
        n_agents = obs.shape[-2]
        parts.append(np.broadcast_to(np.eye(n_agents, dtype=config.dtype), obs.shape[:-1] + (n_agents,)))  # (..., N, N)
    return np.concatenate(parts, axis=-1).astype(config.dtype, copy=False)


def episode_agent_inputs(batch, config):
    """Agent inputs at every step t = 0..T of a batch of episodes: (B, T + 1, N, I)."""
    n_actions = batch["avail_actions"].shape[-1]
    taken = one_hot(batch["actions"], n_actions, config.dtype)  # (B, T, N, A)
    before_t0 = np.zeros((taken.shape[0], 1, *taken.shape[2:]), taken.dtype)  # (B, 1, N, A): no action yet
    last = np.concatenate([before_t0, taken], axis=1)  # (B, T + 1, N, A)
    return build_agent_inputs(batch["obs"], last, config)


def to_rows(x, shared):
    """(T, B, N, F) -> the rows a layer multiplies: shared (T B N, F); one network per agent (N, T B, F).
    A shared network sees every agent, step and episode as one batch of rows, so its gradient
    sums over all of them; per-agent networks run as one batched matmul over the agent axis."""
    steps, batch, n_agents, features = x.shape
    return x.reshape(-1, features) if shared else x.reshape(-1, n_agents, features).swapaxes(0, 1)


def from_rows(rows, shared, steps, batch):
    """to_rows' inverse: -> (T, B, N, F)."""
    if not shared:
        rows = rows.swapaxes(0, 1)  # (T B, N, F)
    return rows.reshape(steps, batch, -1, rows.shape[-1])


def agent_forward(params, inputs, hidden=None):
    """Q-values of every agent at every step of B episodes, as pymarl's BasicMAC runs its agent
    over t = 0, 1, ...: inputs (B, T, N, I) -> q (B, T, N, A), and the hidden state after the
    last step (B, N, H) (None for the feed-forward agent).

    fc1 and fc2 see all steps at once. With a GRU (params has rnn.weight_ih) the middle is
    gru_forward from `hidden` (None: zeros, the start of an episode), where only the recurrence
    runs step by step; without, rnn is a Linear + ReLU.
    """
    batch, steps, n_agents, _ = inputs.shape
    shared, use_rnn = params["fc1.weight"].ndim == 2, "rnn.weight_ih" in params
    x = to_rows(inputs.swapaxes(0, 1), shared)  # time first: (T B N, I) or (N, T B, I)
    x, fc1_cache = linear_forward(x, params["fc1.weight"], params["fc1.bias"])
    x, relu1_cache = relu_forward(x)  # (T B N, H) or (N, T B, H)
    if use_rnn:
        h0 = np.zeros((batch, n_agents, x.shape[-1]), x.dtype) if hidden is None else hidden
        gru = {k: params[f"rnn.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        hs, rnn_cache = gru_forward(split_steps(x, steps), to_rows(h0[None], shared), gru)  # (..., T, M, H)
        h = join_steps(hs)
        hidden = from_rows(hs[..., -1, :, :], shared, 1, batch)[0]  # (B, N, H)
    else:
        h, linear_cache = linear_forward(x, params["rnn.weight"], params["rnn.bias"])
        h, relu2_cache = relu_forward(h)
        rnn_cache, hidden = (linear_cache, relu2_cache), None
    q, fc2_cache = linear_forward(h, params["fc2.weight"], params["fc2.bias"])
    q = from_rows(q, shared, steps, batch).swapaxes(0, 1)  # (B, T, N, A)
    return q, hidden, (shared, use_rnn, steps, fc1_cache, relu1_cache, rnn_cache, fc2_cache)


def agent_backward(dq, cache):
    """Gradients of fc1, rnn and fc2 from dL/dq (B, T, N, A); through time for the GRU. The
    inputs are data: no dL/d inputs."""
    shared, use_rnn, steps, fc1_cache, relu1_cache, rnn_cache, fc2_cache = cache
    dq = to_rows(dq.swapaxes(0, 1), shared)
    dh, fc2_grads = linear_backward(dq, fc2_cache)
    if use_rnn:
        dx, rnn_grads = gru_backward(split_steps(dh, steps), rnn_cache)
        dx = join_steps(dx)
    else:
        linear_cache, relu2_cache = rnn_cache
        dh, _ = relu_backward(dh, relu2_cache)
        dx, rnn_grads = linear_backward(dh, linear_cache)
    dx, _ = relu_backward(dx, relu1_cache)
    _, fc1_grads = linear_backward(dx, fc1_cache, input_grad=False)
    return {**{f"fc1.{k}": g for k, g in fc1_grads.items()}, **{f"rnn.{k}": g for k, g in rnn_grads.items()},
            **{f"fc2.{k}": g for k, g in fc2_grads.items()}}


# ------------------------------------------------------------------------------------------
# Mixers: (agent_qs (M, N), states (M, S)) -> Q_tot (M,)
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


def hypernet_forward(params, name, states):
    """pymarl's hypernetwork `name`: one Linear, or name.0 -> ReLU -> name.2 (hypernet_layers 2)."""
    layers = (name,) if f"{name}.weight" in params else (f"{name}.0", f"{name}.2")
    return mlp_forward(params, layers, states)


def qmix_mixer_forward(params, agent_qs, states):
    """pymarl's QMixer.forward: agent_qs (M, N), states (M, S) -> Q_tot (M,).

    Q_tot = ELU(q |W1(s)| + b1(s)) . |Wf(s)| + V(s).
    """
    rows, n_agents = agent_qs.shape
    # First layer
    w1, w1_net = hypernet_forward(params, "hyper_w_1", states)  # (M, N E)
    w1, w1_abs = abs_forward(w1)
    b1, b1_linear = linear_forward(states, params["hyper_b_1.weight"], params["hyper_b_1.bias"])  # (M, E)
    w1 = w1.reshape(rows, n_agents, -1)  # (M, N, E)
    hidden, elu_cache = elu_forward((agent_qs[:, None, :] @ w1)[:, 0, :] + b1)  # (M, E)
    # Second layer
    w_final, w_final_net = hypernet_forward(params, "hyper_w_final", states)  # (M, E)
    w_final, w_final_abs = abs_forward(w_final)
    # State-dependent bias
    v, v_net = mlp_forward(params, ("V.0", "V.2"), states)  # (M, 1)
    q_tot = (hidden * w_final).sum(axis=-1) + v[:, 0]  # (M,)
    cache = dict(agent_qs=agent_qs, w1=w1, hidden=hidden, w_final=w_final, w1_net=w1_net,
                 w1_abs=w1_abs, b1_linear=b1_linear, elu=elu_cache, w_final_net=w_final_net,
                 w_final_abs=w_final_abs, v_net=v_net)
    return q_tot, cache


def qmix_mixer_backward(dq_tot, cache):
    """Returns dL/d agent_qs (M, N) and the gradient of every mixer parameter."""
    c = cache
    dq_tot = dq_tot[:, None]  # (M, 1)
    # State-dependent bias: dQ_tot/dV = 1
    _, v_grads = mlp_backward(dq_tot, c["v_net"], input_grad=False)
    # Second layer: dQ_tot/dh = Wf, dQ_tot/dWf = h
    dhidden = dq_tot * c["w_final"]  # (M, E)
    dw_final, _ = abs_backward(dq_tot * c["hidden"], c["w_final_abs"])
    _, w_final_grads = mlp_backward(dw_final, c["w_final_net"], input_grad=False)
    # First layer: pre = q W1 + b1, h = ELU(pre)
    dpre, _ = elu_backward(dhidden, c["elu"])  # (M, E)
    dagent_qs = (c["w1"] @ dpre[:, :, None])[:, :, 0]  # d pre/dq = W1: (M, N)
    dw1 = c["agent_qs"][:, :, None] * dpre[:, None, :]  # d pre/dW1 = q outer 1: (M, N, E)
    dw1, _ = abs_backward(dw1.reshape(len(dw1), -1), c["w1_abs"])  # (M, N E)
    _, w1_grads = mlp_backward(dw1, c["w1_net"], input_grad=False)
    _, b1_grads = linear_backward(dpre, c["b1_linear"], input_grad=False)  # d pre/db1 = 1
    grads = {**w1_grads, "hyper_b_1.weight": b1_grads["weight"], "hyper_b_1.bias": b1_grads["bias"],
             **w_final_grads, **v_grads}
    return dagent_qs, grads


def vdn_mixer_forward(params, agent_qs, states):
    """VDN: Q_tot = sum_i Q_i. No parameters; the state is not used."""
    return agent_qs.sum(axis=-1), agent_qs.shape


def vdn_mixer_backward(dq_tot, cache):
    return np.broadcast_to(dq_tot[:, None], cache).copy(), {}  # dQ_tot/dQ_i = 1


def independent_mixer_forward(params, agent_qs, states):
    """Independent learners: no mixing; each agent's Q (M, N) gets its own TD error."""
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


def mix_episodes(mixer_forward, params, agent_qs, states):
    """A mixer applied at every (episode, step): agent_qs (B, T, N), states (B, T, S) -> (B, T)
    ((B, T, N) for independent learners)."""
    batch, steps, n_agents = agent_qs.shape
    q_tot, cache = mixer_forward(params, agent_qs.reshape(batch * steps, n_agents),
                                 states.reshape(batch * steps, -1))
    return q_tot.reshape(batch, steps, *q_tot.shape[1:]), cache


# ------------------------------------------------------------------------------------------
# TD loss over a batch of episodes (pymarl's QLearner.train)
# ------------------------------------------------------------------------------------------


def masked_argmax(q, avail):
    """argmax over the last axis among available actions only."""
    return np.where(avail, q, -np.inf).argmax(axis=-1)


def take(q, actions):
    """The Qs of the given actions: q (..., A), actions (...) -> (...)."""
    return np.take_along_axis(q, actions[..., None], axis=-1)[..., 0]


def td_targets(target_params, batch, inputs, online_q, config):
    """y_t = r_t + gamma (1 - terminated_t) Q_tot^-(s_{t+1}, a'_{t+1}) for t < T: (B, T), or
    (B, T, N) for independent learners. A constant for the loss: the stop-gradient is here.

    The target agent net runs over t = 0..T (inputs (B, T + 1, N, I)), from a zero hidden state
    at t = 0 as the online one, and its Qs at t + 1 are kept. Double Q: a'_i = argmax over
    available actions of the ONLINE Qs (online_q, the learner's own forward) at t + 1; without
    it, of the target Qs (their max). The target mixer sees state[:, 1:]. At padded steps every
    action is unavailable and a' is 0: a finite value that the mask removes.
    """
    target_q, _, _ = agent_forward(target_params["agent"], inputs)  # (B, T + 1, N, A)
    target_q = target_q[:, 1:]  # (B, T, N, A): the Qs at t + 1
    chooser = online_q[:, 1:] if config.double_q else target_q
    best = masked_argmax(chooser, batch["avail_actions"][:, 1:])  # (B, T, N)
    mixer_forward, _ = get_mixer(config.mixer)
    target_q_tot, _ = mix_episodes(mixer_forward, target_params["mixer"], take(target_q, best),
                                   batch["state"][:, 1:])
    reward, terminated = batch["reward"], batch["terminated"]  # (B, T)
    if target_q_tot.ndim == 3:  # independent learners: the team reward for every agent
        reward, terminated = reward[..., None], terminated[..., None]
    return reward + config.gamma * (1 - terminated) * target_q_tot


def loss_mask(batch):
    """pymarl's mask (B, T): 1 on the steps that happened, 0 after a terminal step and on padding."""
    mask = batch["filled"].copy()  # (B, T)
    mask[:, 1:] *= 1 - batch["terminated"][:, :-1]
    return mask


def masked_td_loss_forward(q_tot, targets, mask):
    """L = sum((mask (Q_tot - y))^2) / sum(mask).

    q_tot, targets (B, T), or (B, T, N) for independent learners, where the mask (B, T) is
    expanded over the agents (so the loss also averages over agents, as pymarl's).
    """
    mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (q_tot.ndim - mask.ndim)), q_tot.shape)
    masked_td_error = (q_tot - targets) * mask
    return float(np.vdot(masked_td_error, masked_td_error)) / float(mask.sum()), (masked_td_error, mask)


def masked_td_loss_backward(cache):
    masked_td_error, mask = cache
    return 2.0 * masked_td_error / float(mask.sum())  # dL/dQ_tot = 2 mask^2 (Q_tot - y) / sum(mask); mask^2 = mask


def loss_and_grads(params, target_params, batch, config):
    """pymarl's QLearner.train, forward and backward, on a batch of episodes.

    batch: obs (B, T + 1, N, O), state (B, T + 1, S), avail_actions (B, T + 1, N, A) at every
    step including the one after the last action; actions (B, T, N), reward, terminated and
    filled (B, T) for the steps with an action. Returns (loss, grads keyed like params, diagnostics).
    """
    mixer_forward, mixer_backward = get_mixer(config.mixer)
    mask = loss_mask(batch)  # (B, T)
    # Estimated Qs at every step (one forward), and those of the actions taken
    inputs = episode_agent_inputs(batch, config)  # (B, T + 1, N, I)
    q, _, agent_cache = agent_forward(params["agent"], inputs)  # (B, T + 1, N, A), from h = 0 at t = 0
    chosen = take(q[:, :-1], batch["actions"])  # (B, T, N)
    # Targets from the target networks: constants
    targets = td_targets(target_params, batch, inputs, q, config)
    # Mix, then the masked TD error
    q_tot, mixer_cache = mix_episodes(mixer_forward, params["mixer"], chosen, batch["state"][:, :-1])
    loss, loss_cache = masked_td_loss_forward(q_tot, targets, mask)

    dq_tot = masked_td_loss_backward(loss_cache)  # like q_tot
    dchosen, mixer_grads = mixer_backward(dq_tot.reshape(-1, *dq_tot.shape[2:]), mixer_cache)
    dq = np.zeros_like(q)  # (B, T + 1, N, A): no loss reads the Qs at t = T
    np.put_along_axis(dq[:, :-1], batch["actions"][..., None], dchosen.reshape(chosen.shape + (1,)),
                      axis=-1)  # the gather's transpose: a scatter
    agent_grads = agent_backward(dq, agent_cache)

    masked_td_error, mask = loss_cache  # pymarl's logged statistics, over the steps that happened
    # (pymarl divides q_taken_mean and target_mean by n_agents too; these are the mean Q_tot and y)
    n_valid = float(mask.sum())
    diagnostics = {"td_error_abs": float(np.abs(masked_td_error).sum()) / n_valid,
                   "q_taken_mean": float((q_tot * mask).sum()) / n_valid,
                   "target_mean": float((targets * mask).sum()) / n_valid}
    return loss, {"agent": agent_grads, "mixer": mixer_grads}, diagnostics


def joint_q_tot(params, config, obs, state, actions=None):
    """Q_tot of EVERY joint action after a history: (A,) * N.

    obs (t + 1, N, O): what the agents saw at steps 0..t; actions (t, N): what they did at steps
    0..t - 1 (None when t = 0); state (S,): the global state at step t. The agents run over the
    history (their GRU state and last actions follow it) and the table is at step t. For
    independent learners ("none") there is no Q_tot; this returns sum_i Q_i, the joint utility
    their greedy actions maximise. Used to print tables and to check IGM by brute force.
    """
    obs = np.asarray(obs, dtype=config.dtype)[None]  # (1, t + 1, N, O): one episode
    n_agents, n_actions = obs.shape[-2], params["agent"]["fc2.bias"].shape[-1]
    actions = np.zeros((1, 0, n_agents), np.int64) if actions is None else np.asarray(actions)[None]
    batch = {"obs": obs, "actions": actions, "avail_actions": np.ones(obs.shape[:-1] + (n_actions,), bool)}
    q, _, _ = agent_forward(params["agent"], episode_agent_inputs(batch, config))
    q = q[0, -1]  # (N, A): at step t
    joint = np.indices((n_actions,) * n_agents).reshape(n_agents, -1).T  # (A^N, N)
    agent_qs = q[np.arange(n_agents), joint]  # (A^N, N)
    states = np.broadcast_to(np.asarray(state, dtype=q.dtype), (len(joint), len(state)))
    mixer_forward, _ = get_mixer(config.mixer)
    q_tot, _ = mixer_forward(params["mixer"], agent_qs, states)
    if q_tot.ndim == 2:
        q_tot = q_tot.sum(axis=-1)
    return q_tot.reshape((n_actions,) * n_agents)


# ------------------------------------------------------------------------------------------
# Optimisers and gradient clipping, over ONE flat parameter vector
# ------------------------------------------------------------------------------------------


def pack(tree):
    """Lay every tensor of {group: {name: array}} end to end in ONE vector.

    Returns (vector, tree of views into it): code reads and writes the named views (the keys
    stay pymarl's), while the optimiser, clipping and target copies each touch one vector.
    """
    arrays = [a for inner in tree.values() for a in inner.values()]
    vector = np.concatenate([a.ravel() for a in arrays]).astype(np.result_type(*arrays))
    return vector, views_of(vector, tree)


def views_of(vector, like):
    """{group: {name: view}}: `vector` cut into the tensors of the tree `like`, in pack()'s order."""
    views, offset = {}, 0
    for group, inner in like.items():
        views[group] = {}
        for name, a in inner.items():
            views[group][name] = vector[offset: offset + a.size].reshape(a.shape)
            offset += a.size
    return views


def flat_grad(grads, like):
    """The gradient tree as one vector, in the order pack() laid out the tree `like`."""
    return np.concatenate([grads[g][k] for g, inner in like.items() for k in inner], axis=None)


def clip_grad_norm(grad, max_norm):
    """torch.nn.utils.clip_grad_norm_ on the gradient vector, in place: with the global L2 norm
    ||g||, g <- g * max_norm / (||g|| + 1e-6) when that factor is below 1.

    Returns ||g|| before clipping (NaN or inf if an element is, or if the sum of squares overflows).
    """
    norm = math.sqrt(float(np.dot(grad, grad)))
    clip_coef = max_norm / (norm + 1e-6)
    if clip_coef < 1:
        grad *= clip_coef
    return norm


class Optimiser:
    """What Adam and RMSprop share: step() proposes, commit() stores.

    step(params, grad) returns the new parameters and the new state as NEW arrays and changes
    nothing, so that the learner can refuse a step that would leave a non-finite number anywhere;
    commit(state) then stores the state and counts the step.
    """

    state_names = ()  # the per-parameter statistics a subclass keeps, by PyTorch's names

    def __init__(self, params):
        self.state = {name: np.zeros_like(params) for name in self.state_names}
        self.t = 0  # steps taken

    def commit(self, state):
        for key, value in state.items():
            self.state[key][...] = value
        self.t += 1


class Adam(Optimiser):
    """torch.optim.Adam (no weight decay). At step t:

        m <- b1 m + (1 - b1) g        v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    state_names = ("exp_avg", "exp_avg_sq")  # m and v, by PyTorch's names

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params)
        self.lr, self.betas, self.eps = lr, betas, eps

    def step(self, params, grad):
        t = self.t + 1
        b1, b2 = self.betas
        m = b1 * self.state["exp_avg"] + (1 - b1) * grad
        v = b2 * self.state["exp_avg_sq"] + (1 - b2) * np.square(grad)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps), {"exp_avg": m, "exp_avg_sq": v}


class RMSprop(Optimiser):
    """torch.optim.RMSprop as pymarl uses it (no momentum, not centred):

        v <- alpha v + (1 - alpha) g^2        p <- p - lr g / (sqrt(v) + eps)
    """

    state_names = ("square_avg",)  # v, by PyTorch's name

    def __init__(self, params, lr, alpha=0.99, eps=1e-8):
        super().__init__(params)
        self.lr, self.alpha, self.eps = lr, alpha, eps

    def step(self, params, grad):
        v = self.alpha * self.state["square_avg"] + (1 - self.alpha) * np.square(grad)
        return params - self.lr * grad / (np.sqrt(v) + self.eps), {"square_avg": v}


def make_optimiser(config, params):
    if config.optimizer == "rmsprop":
        return RMSprop(params, config.lr, config.optim_alpha, config.optim_eps)
    return Adam(params, config.lr, config.adam_betas, config.adam_eps)


# ------------------------------------------------------------------------------------------
# Episode replay buffer (pymarl's EpisodeBatch layout)
# ------------------------------------------------------------------------------------------


def episode_fields(episode_limit, n_agents, obs_dim, state_dim, n_actions, dtype):
    """What the buffer stores of one episode, padded to T = episode_limit: name -> (shape, dtype).

    obs (T + 1, N, O), state (T + 1, S), avail_actions (T + 1, N, A): what the env showed before
        each action, and after the last one;
    actions (T, N), reward (T,), terminated (T,), filled (T,): per action; filled is 1 on the
        steps that happened. Everything after an episode's end is 0 (padding).
    """
    t, n, o, s, a = episode_limit, n_agents, obs_dim, state_dim, n_actions
    return {"obs": ((t + 1, n, o), dtype), "state": ((t + 1, s), dtype),
            "avail_actions": ((t + 1, n, a), np.dtype(bool)), "actions": ((t, n), np.dtype(np.int64)),
            "reward": ((t,), dtype), "terminated": ((t,), dtype), "filled": ((t,), dtype)}


class EpisodeBuffer:
    """A ring of the last `capacity` episodes, every one padded to episode_limit + 1 steps, with
    the fields of episode_fields. `insert` checks the episode before writing anything and copies
    it in. When full, the oldest episode is overwritten.
    """

    def __init__(self, capacity, episode_limit, n_agents, obs_dim, state_dim, n_actions, dtype):
        self.capacity, self.episode_limit = capacity, episode_limit
        self.fields = episode_fields(episode_limit, n_agents, obs_dim, state_dim, n_actions, np.dtype(dtype))
        self.data = {k: np.zeros((capacity,) + shape, dt) for k, (shape, dt) in self.fields.items()}
        self.size = 0  # episodes held
        self.next_index = 0  # where the next episode goes

    def __len__(self):
        return self.size

    def insert(self, episode):
        """Store one episode: a dict of obs, state, avail_actions (its T_ep + 1 steps) and actions,
        reward, terminated (its T_ep steps). Checked first: a refused episode stores nothing."""
        episode = check_episode(episode, self)  # see "Input validation"
        length = len(episode["actions"])
        for name, array in self.data.items():
            array[self.next_index] = 0  # padding
            if name in episode:
                array[self.next_index, :len(episode[name])] = episode[name]
        self.data["filled"][self.next_index, :length] = 1
        self.next_index = (self.next_index + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, rng):
        """batch_size distinct episodes drawn uniformly, cut to the longest episode among them
        (pymarl's max_t_filled): fresh arrays, T = that length."""
        index = rng.choice(self.size, size=batch_size, replace=False)  # (B,)
        length = int(self.data["filled"][index].sum(axis=1).max())  # the longest episode
        return {name: array[index, :length + 1] if name in ("obs", "state", "avail_actions")
                else array[index, :length] for name, array in self.data.items()}


# ------------------------------------------------------------------------------------------
# Reward standardisation (EPyMARL's standardise_rewards, off by default as in pymarl)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningMeanStd:
    """The mean and variance of every reward seen by train steps so far (EPyMARL's RunningMeanStd),
    merged batch by batch with Chan et al.'s parallel formula: each batch's moments in the batch's
    dtype (float32 in training, as EPyMARL's torch code), the running ones in float64. Immutable:
    updated() returns the next statistics, which the learner keeps only if its train step is
    taken (a train step whose statistics are not finite is refused, as a non-finite loss is)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-4  # EPyMARL's epsilon: the prior (0, 1) weighs as almost nothing

    def updated(self, x):
        """With the batch x merged in: n = x.size, delta = mean(x) - mean,

            mean' = mean + delta n / (count + n)
            var'  = (var count + var(x) n + delta^2 count n / (count + n)) / (count + n)

        var(x) is unbiased, as torch.var (a single reward has no spread: 0, where torch gives NaN).
        """
        n, batch_mean = x.size, float(x.mean())
        batch_var = float(x.var(ddof=1)) if n > 1 else 0.0
        total, delta = self.count + n, batch_mean - self.mean
        return RunningMeanStd(self.mean + delta * n / total,
                              (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total,
                              total)

    def standardise(self, x):
        return (x - self.mean) / math.sqrt(self.var)


# ------------------------------------------------------------------------------------------
# Learner
# ------------------------------------------------------------------------------------------

COUNTERS = ("t_env", "episode", "train_steps", "last_target_update_episode", "skipped_steps")
HISTORY_KEYS = ("t_env", "return", "length", "success",  # Learner.history, per training episode,
                "loss", "q_taken_mean", "target_mean", "grad_norm")  # and the latest train step's diagnostics
HISTORY_DTYPES = (np.int64, np.float64, np.int64, np.bool_, *[np.float64] * 4)  # as saved in a checkpoint
TRAIN_STEP_LOG = HISTORY_KEYS[4:]  # NaN before the first train step


class Learner:
    """Agent nets, mixer, their targets, the optimiser, the episode buffer and the run's counters.

    Everything random (initialisation, exploration, sampling, episode seeds) draws from
    `self.rng`, one Generator seeded from config.seed.
    """

    def __init__(self, config, env_info):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a Config, got {type(config).__name__}")
        self.config = config
        self.env_info = check_env_info(env_info)  # n_agents, n_actions, obs_shape, state_shape, episode_limit
        self.n_agents, self.n_actions = self.env_info["n_agents"], self.env_info["n_actions"]
        self.obs_dim, self.state_dim = self.env_info["obs_shape"], self.env_info["state_shape"]
        self.dtype = np.dtype(config.dtype)
        self.rng = np.random.default_rng(config.seed)

        input_dim = (self.obs_dim + (self.n_actions if config.obs_last_action else 0)
                     + (self.n_agents if config.obs_agent_id else 0))
        groups = None if config.shared_agent else self.n_agents
        self.theta, self.params = pack({  # all parameters in one vector; params: named views of it
            "agent": init_agent_params(self.rng, input_dim, config.hidden_dim, self.n_actions,
                                       config.use_rnn, groups, self.dtype),
            "mixer": init_mixer(self.rng, config, self.n_agents, self.state_dim),
        })
        self.target_theta, self.target_params = pack(self.params)
        self.optimiser = make_optimiser(config, self.theta)
        try:
            self.buffer = EpisodeBuffer(config.buffer_size, self.env_info["episode_limit"], self.n_agents,
                                        self.obs_dim, self.state_dim, self.n_actions, self.dtype)
        except MemoryError:
            raise ValueError(buffer_memory_message(config, self.env_info)) from None
        self.t_env = 0  # env steps taken in training
        self.episode = 0  # training episodes finished
        self.train_steps = 0  # gradient steps taken
        self.last_target_update_episode = 0
        self.skipped_steps = 0  # train steps skipped for a non-finite loss or gradient norm
        self.last_diagnostics = None  # what the latest train_step returned
        self.warned_q_tot = False  # warn_if_q_tot_exceeds_returns warns once per learner
        self.reward_stats = RunningMeanStd()  # of the rewards train steps have seen (standardise_rewards)
        self.history = {key: [] for key in HISTORY_KEYS}  # per training episode (saved in checkpoints)
        self.init_hidden()

    def init_hidden(self):
        """Start of an episode: every agent's GRU state to zero (pymarl's BasicMAC.init_hidden).
        self.hidden (1, N, H) is the state select_actions carries; None means zeros."""
        self.hidden = None

    def epsilon(self):
        """Linear from epsilon_start to epsilon_finish over epsilon_anneal_time env steps."""
        c = self.config
        fraction = min(self.t_env / c.epsilon_anneal_time, 1.0)
        return c.epsilon_start + fraction * (c.epsilon_finish - c.epsilon_start)

    def select_actions(self, obs, avail_actions, last_actions=None, epsilon=0.0):
        """Epsilon-greedy actions (N,) at one env step; random ones are uniform over AVAILABLE actions.

        obs (N, O); avail_actions (N, A); last_actions (N,), each agent's previous action (None
        at the first step of an episode); epsilon in [0, 1]. With a GRU agent, each agent's hidden
        state is carried from call to call in self.hidden: call init_hidden() when an episode
        starts. Each agent's action depends only on its own inputs and hidden state: execution is
        decentralised. epsilon 0 draws nothing from the Generator.
        """
        obs, avail, last_actions = check_select_actions(self, obs, avail_actions, last_actions, epsilon)
        actions, self.hidden = self.act(obs[None], avail[None], None if last_actions is None else last_actions[None],
                                        epsilon, self.hidden)
        return actions[0]

    def act(self, obs, avail, last_actions, epsilon, hidden):
        """select_actions for K environments at once, on inputs already checked: ONE agent forward
        for all K x N agents. obs (K, N, O), avail (K, N, A), last_actions (K, N) or None (the first
        step), hidden (K, N, H) or None (zeros) -> actions (K, N) and the next hidden state."""
        if last_actions is None:
            last = np.zeros(avail.shape, self.dtype)  # (K, N, A)
        else:
            last = one_hot(last_actions, self.n_actions, self.dtype)
        inputs = build_agent_inputs(obs, last, self.config)[:, None]  # (K, 1, N, I): one step of K episodes
        q, hidden, _ = agent_forward(self.params["agent"], inputs, hidden)
        check_finite_q(q)  # see "Input validation": a NaN would pick action 0 without a word
        greedy = masked_argmax(q[:, 0], avail)  # (K, N)
        if epsilon == 0:
            return greedy, hidden
        explore = self.rng.random(greedy.shape) < epsilon  # (K, N): these agents act at random
        random_actions = masked_argmax(self.rng.random(avail.shape), avail)
        return np.where(explore, random_actions, greedy), hidden

    def train_step(self):
        """One gradient step on a batch of episodes (pymarl's QLearner.train). Returns its diagnostics.

        A non-finite loss, gradient norm or update changes nothing: it raises FloatingPointError,
        or with config.on_nonfinite "skip" the step is skipped, counted and warned of.
        """
        c = self.config
        check_can_sample(self.buffer, c.batch_size)  # see "Input validation"
        batch = self.buffer.sample(c.batch_size, self.rng)
        reward_stats = self.reward_stats
        if c.standardise_rewards:  # as EPyMARL: over the batch's (B, T) rewards, padding included
            reward_stats = reward_stats.updated(batch["reward"])
            batch["reward"] = reward_stats.standardise(batch["reward"])
        loss, grads, diagnostics = loss_and_grads(self.params, self.target_params, batch, c)
        grad = flat_grad(grads, self.params)  # a fresh vector: clipping it changes nothing stored
        grad_norm = clip_grad_norm(grad, c.grad_norm_clip)
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(reward_stats.var)
        if finite:
            new_theta, new_state = self.optimiser.step(self.theta, grad)  # proposed: nothing changed yet
            finite = all(np.isfinite(a).all() for a in (new_theta, *new_state.values()))
        if not finite:
            if c.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"train step {self.train_steps + 1}: the loss ({loss}), the gradient's norm "
                    f"({grad_norm}), the reward statistics (variance {reward_stats.var}) or the updated "
                    "parameters or optimiser state are not finite; "
                    "nothing has changed (Config.on_nonfinite='skip' skips such steps instead)")
            self.skipped_steps += 1
            warnings.warn("a train step was skipped: its loss, gradient norm or update is not finite "
                          "(Config.on_nonfinite='skip'; learner.skipped_steps counts them)",
                          RuntimeWarning, stacklevel=2)
            return {"loss": loss, "grad_norm": grad_norm, "skipped": True, **diagnostics}
        self.theta[...] = new_theta
        self.optimiser.commit(new_state)
        self.reward_stats = reward_stats
        self.train_steps += 1
        warn_if_q_tot_exceeds_returns(self, diagnostics)  # see "Input validation"
        if (self.episode - self.last_target_update_episode) / c.target_update_interval >= 1.0:
            self.update_targets()
            self.last_target_update_episode = self.episode
        return {"loss": loss, "grad_norm": grad_norm, "skipped": False, **diagnostics}

    def update_targets(self):
        """Hard copy: target agent nets and target mixer <- online."""
        np.copyto(self.target_theta, self.theta)

    def save(self, path, include_buffer=True):
        """Write a checkpoint (see "Checkpoint format" below): one .npz, no pickles, replaced atomically."""
        write_checkpoint(self, path, include_buffer)

    @classmethod
    def load(cls, path, env_info=None, config=None, max_buffer_bytes=2**30):
        """A Learner restored from a checkpoint written by save(), checked as untrusted input
        (see read_checkpoint; max_buffer_bytes bounds the empty buffer of a checkpoint saved
        without its buffer)."""
        return read_checkpoint(cls, path, env_info, config, max_buffer_bytes)


# ------------------------------------------------------------------------------------------
# Train and evaluate, for any environment with pymarl's interface
# ------------------------------------------------------------------------------------------

def _reset(env, seed):
    """env.reset(seed=seed) where the env takes a seed (pymarl's interface has none)."""
    if seed is not None and "seed" in inspect.signature(env.reset).parameters:
        env.reset(seed=seed)
    else:
        env.reset()


def run_episodes(envs, learner, learn=False):
    """One episode in each of K freshly reset envs, played in lockstep as pymarl's
    ParallelRunner.run plays them (with K = 1, its EpisodeRunner.run): at every step ONE agent
    forward acts for every env still running; an env whose episode has ended waits for the rest.

    learn=False: greedy, nothing stored, nothing drawn from the learner's Generator.
    learn=True: epsilon-greedy at the epsilon of the collection's start, then learn_from().
    A time limit (info["episode_limit"]) is not terminal: it is stored with terminated 0 so that
    the target bootstraps. Returns (return, length, success) per env; success = ended before the
    time limit.
    """
    limit = learner.env_info["episode_limit"]
    epsilon = learner.epsilon() if learn else 0.0
    episodes = []
    for env in envs:
        obs, state, avail = check_observation(env, learner)  # see "Input validation"
        episodes.append({"obs": [obs], "state": [state], "avail_actions": [avail], "actions": [], "reward": [],
                         "terminated": []})
    returns, ended, timed_out = [0.0] * len(envs), [False] * len(envs), [False] * len(envs)
    hidden = np.zeros((len(envs), learner.n_agents, learner.config.hidden_dim), learner.dtype)  # (K, N, H): GRU states
    last_actions = np.zeros((len(envs), learner.n_agents), np.int64)  # (K, N)
    running, step = list(range(len(envs))), 0  # the envs whose episode goes on; they are all at this step
    while running:
        if step == limit:
            raise ValueError(f"the env ran past its episode_limit ({limit} steps, from get_env_info()) "
                             "without terminating: step() must return terminated True at the limit, "
                             "with info['episode_limit'] True")
        obs = np.stack([episodes[k]["obs"][-1] for k in running])  # (K', N, O): the envs still running
        avail = np.stack([episodes[k]["avail_actions"][-1] for k in running])  # (K', N, A)
        actions, next_hidden = learner.act(obs, avail, last_actions[running] if step else None, epsilon,
                                           hidden[running])
        if next_hidden is not None:  # the GRU's state (the feed-forward agent has none)
            hidden[running] = next_hidden
        step += 1
        for k, env_actions in zip(running, actions):
            reward, terminated, info = check_step(envs[k].step(env_actions), step, limit, learner.dtype)
            obs, state, avail = check_observation(envs[k], learner)
            returns[k], ended[k], timed_out[k] = returns[k] + reward, terminated, info.get("episode_limit", False)
            for name, value in (("actions", env_actions), ("reward", reward), ("obs", obs), ("state", state),
                                ("terminated", terminated and not timed_out[k]), ("avail_actions", avail)):
                episodes[k][name].append(value)
            last_actions[k] = env_actions
        running = [k for k in running if not ended[k]]
    results = [(returns[k], len(episode["actions"]), not timed_out[k]) for k, episode in enumerate(episodes)]
    if learn:
        learn_from(learner, episodes, results)
    return results


def learn_from(learner, episodes, results):
    """What pymarl's run loop does after each collection: store the K episodes (in env order),
    add their steps to t_env, take ONE train step once the buffer holds batch_size episodes, add
    K to the episode count (which target updates read), and log each episode in learner.history."""
    for episode in episodes:
        learner.buffer.insert({name: np.array(values) for name, values in episode.items()})
    learner.t_env += sum(length for _, length, _ in results)
    if len(learner.buffer) >= learner.config.batch_size:
        learner.last_diagnostics = learner.train_step()
    learner.episode += len(episodes)
    logged = [learner.last_diagnostics[key] if learner.last_diagnostics else float("nan") for key in TRAIN_STEP_LOG]
    for result in results:
        for key, value in zip(HISTORY_KEYS, (learner.t_env, *result, *logged)):
            learner.history[key].append(value)


class Progress:
    """train(progress=True): a line to stderr every `seconds` with env steps, episodes, epsilon,
    the latest train step's loss, mean Q_tot of the actions taken and gradient norm (before
    clipping), the return and success over the last 100 episodes, and env steps per second."""

    def __init__(self, learner, seconds=5.0, stream=None):
        self.seconds, self.stream = seconds, stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.start_t_env = learner.t_env

    def __call__(self, learner, episode_return, length, success):
        now = time.perf_counter()
        if now - self.last < self.seconds:
            return
        self.last = now
        h = learner.history
        rate = (learner.t_env - self.start_t_env) / (now - self.start)
        print(f"{learner.t_env:>9,} env steps {learner.episode:>7,} episodes  epsilon {learner.epsilon():.2f}  "
              f"loss {h['loss'][-1]:.4f}  Q_tot {h['q_taken_mean'][-1]:.3g}  grad norm {h['grad_norm'][-1]:.3g}  "
              f"last 100 episodes: return {np.mean(h['return'][-100:]):.2f}, "
              f"success {np.mean(h['success'][-100:]):.0%}  {rate:,.0f} env steps/s"
              + (f"  SKIPPED {learner.skipped_steps:,} train steps (not finite)" if learner.skipped_steps else ""),
              file=self.stream, flush=True)


def train(envs, config, learner=None, callback=None, progress=False):
    """Train until config.t_max env steps (whole collections); returns the Learner.

    envs: the config.batch_size_run environments played in lockstep, as a list (one env may be
    passed alone when batch_size_run is 1). Before every collection each env is reset with its
    own seed, drawn from the learner's Generator (when env.reset takes one): a run is
    reproducible for a given batch_size_run. learner: continue this one (its config may differ
    from `config` only in t_max). callback(learner, episode_return, length, success) runs after
    every episode; progress=True prints a progress line every 5 s (a number: every that many
    seconds). learner.history holds, per training episode: t_env (after its collection), return,
    length, success, and the latest train step's loss, q_taken_mean, target_mean and grad_norm.
    """
    envs = check_train_arguments(envs, config, callback, progress)
    if learner is None:
        learner = Learner(config, envs[0].get_env_info())
    else:
        check_learner_fits(learner, envs[0], config)
    learner.config = config
    callbacks = [callback] if callback is not None else []
    if progress:
        callbacks.append(Progress(learner, 5.0 if progress is True else progress))
    with one_blas_thread():  # these small matrices run fastest on one thread (see "Input validation")
        while learner.t_env < config.t_max:
            for env in envs:
                _reset(env, int(learner.rng.integers(2**31)))
            for result in run_episodes(envs, learner, learn=True):
                for f in callbacks:
                    f(learner, *result)
    return learner


def evaluate(env, learner, n_episodes, seed):
    """Greedy play on n_episodes fresh episodes with reset seeds seed, seed + 1, ...

    Returns mean_return, success_rate (terminated before the time limit: for an env whose
    episodes only ever end at the limit it is 0 and says nothing), mean_length, and,
    if the env defines optimal_length() (the shortest possible length of the current episode),
    optimality_ratio: the mean of length / optimal_length over successful episodes.
    """
    check_env(env)
    check_evaluate_arguments(n_episodes, seed)
    check_learner_fits(learner, env)
    returns, lengths, successes, ratios = [], [], [], []
    with one_blas_thread():
        for i in range(n_episodes):
            _reset(env, seed + i)
            optimal = env.optimal_length() if hasattr(env, "optimal_length") else None
            [(episode_return, length, success)] = run_episodes([env], learner)
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


# ==========================================================================================
# Input validation and the checkpoint format. The algorithm above calls these; it does not
# need them to be read.
# ==========================================================================================

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread():
    """A context for train and evaluate in which NumPy's BLAS runs on one thread, unless the user
    chose a thread count (one of BLAS_THREAD_VARIABLES is set): on matrices this small, more
    threads only wait for each other (5-6 times slower on two cores, docs/performance.md). It
    uses threadpoolctl when installed (optional: pip install threadpoolctl); without it, it warns
    once and says how."""
    if any(name in os.environ for name in BLAS_THREAD_VARIABLES) or (os.cpu_count() or 1) == 1:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        warnings.warn("NumPy's BLAS may use every core here, which makes qmix_np several times slower "
                      "on its small matrices: pip install threadpoolctl (then train and evaluate use one "
                      "thread), or set OPENBLAS_NUM_THREADS=1 before NumPy is imported", stacklevel=3)
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")



def _is_int(x, low):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= low


def _is_bool(x):
    return isinstance(x, (bool, np.bool_))


def _is_real(x, low, high):
    return (isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)
            and math.isfinite(x) and low <= x <= high)


def _as_tuple(name, value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"Config.{name} must be a sequence, got {value!r}")
    return tuple(value)


_CONFIG_RULES = (  # (field, test, what it must be)
    ("mixer", lambda v: v in MIXERS, "one of 'qmix', 'vdn', 'none'"),
    ("mixing_embed_dim", lambda v: _is_int(v, 1), "an int >= 1"),
    ("hypernet_layers", lambda v: _is_int(v, 1) and v <= 2, "1 or 2"),
    ("hypernet_embed", lambda v: _is_int(v, 1), "an int >= 1"),
    ("use_rnn", _is_bool, "True or False"),
    ("hidden_dim", lambda v: _is_int(v, 1), "an int >= 1"),
    ("shared_agent", _is_bool, "True or False"),
    ("obs_last_action", _is_bool, "True or False"),
    ("obs_agent_id", _is_bool, "True or False"),
    ("gamma", lambda v: _is_real(v, 0.0, 1.0), "a number in [0, 1]"),
    ("optimizer", lambda v: v in ("adam", "rmsprop"), "'adam' or 'rmsprop'"),
    ("lr", lambda v: _is_real(v, 0.0, math.inf) and v > 0, "a number > 0"),
    ("adam_betas", lambda v: len(v) == 2 and all(_is_real(b, 0.0, 1.0) and b < 1 for b in v),
     "two numbers in [0, 1)"),
    ("adam_eps", lambda v: _is_real(v, 0.0, math.inf) and v > 0, "a number > 0"),
    ("optim_alpha", lambda v: _is_real(v, 0.0, 1.0) and v < 1, "a number in [0, 1)"),
    ("optim_eps", lambda v: _is_real(v, 0.0, math.inf) and v > 0, "a number > 0"),
    ("batch_size", lambda v: _is_int(v, 1), "an int >= 1 (episodes)"),
    ("buffer_size", lambda v: _is_int(v, 1), "an int >= 1 (episodes)"),
    ("double_q", _is_bool, "True or False"),
    ("standardise_rewards", _is_bool, "True or False"),
    ("grad_norm_clip", lambda v: _is_real(v, 0.0, math.inf) and v > 0, "a number > 0"),
    ("target_update_interval", lambda v: _is_int(v, 1), "an int >= 1 (episodes)"),
    ("epsilon_start", lambda v: _is_real(v, 0.0, 1.0), "a number in [0, 1]"),
    ("epsilon_finish", lambda v: _is_real(v, 0.0, 1.0), "a number in [0, 1]"),
    ("epsilon_anneal_time", lambda v: _is_int(v, 1), "an int >= 1 (env steps)"),
    ("batch_size_run", lambda v: _is_int(v, 1), "an int >= 1 (environments)"),
    ("t_max", lambda v: _is_int(v, 0), "an int >= 0 (env steps)"),
    ("seed", lambda v: _is_int(v, 0), "an int >= 0"),
    ("dtype", lambda v: v in ("float64", "float32"), "'float64' or 'float32'"),
    ("on_nonfinite", lambda v: v in ("raise", "skip"), "'raise' or 'skip'"),
)


def _python_value(value):
    """A NumPy scalar as the Python number it holds (so that a Config saves as JSON)."""
    return value.item() if isinstance(value, np.generic) else value


def check_config(config):
    """Every Config field against its rule; a ValueError names the first field that breaks one.
    NumPy scalars are stored as Python values."""
    betas = tuple(_python_value(b) for b in _as_tuple("adam_betas", config.adam_betas))
    object.__setattr__(config, "adam_betas", betas)
    for name, ok, expected in _CONFIG_RULES:
        value = getattr(config, name)
        try:
            good = ok(value)
        except (TypeError, OverflowError):  # OverflowError: an int too large for a float (10**400)
            good = False
        if not good:
            raise ValueError(f"Config.{name} must be {expected}, got {value!r}")
        object.__setattr__(config, name, _python_value(value))  # a NumPy scalar as the number it holds
    limits = np.finfo(config.dtype)
    for name in ("lr", "adam_eps", "optim_eps"):  # they enter the update in the training dtype
        value = getattr(config, name)
        if not float(limits.tiny) <= value <= float(limits.max):
            raise ValueError(f"Config.{name} ({value!r}) would vanish or overflow in {config.dtype}: "
                             f"it must lie in [{limits.tiny:.3g}, {limits.max:.3g}]")
    if config.batch_size > config.buffer_size:
        raise ValueError(f"Config.batch_size ({config.batch_size}) must be at most Config.buffer_size "
                         f"({config.buffer_size}): a batch is that many distinct episodes")


ENV_INFO_KEYS = ("n_agents", "n_actions", "obs_shape", "state_shape", "episode_limit")


def check_env_info(env_info):
    """pymarl's get_env_info() as {key: int}; shapes are flattened (obs_shape (3, 4) -> 12)."""
    if not isinstance(env_info, dict):
        raise TypeError(f"env_info must be a dict (pymarl's get_env_info()), got {type(env_info).__name__}")
    missing = [k for k in ENV_INFO_KEYS if k not in env_info]
    if missing:
        raise ValueError(f"env_info lacks {missing} (pymarl's get_env_info() has all of {ENV_INFO_KEYS})")
    checked = {}
    for key in ENV_INFO_KEYS:
        value = env_info[key]
        size = int(np.prod(value)) if isinstance(value, (tuple, list)) else value
        if not _is_int(size, 1) or (isinstance(value, (tuple, list)) and not all(_is_int(v, 1) for v in value)):
            raise ValueError(f"env_info[{key!r}] must be a positive integer (or a shape of them), got {value!r}")
        checked[key] = int(size)
    return checked


def _check_array(name, value, shape, kind, dtype=np.float64):
    """`value` as an array of `shape`, or an error naming `name`.

    kind "float": numbers finite in `dtype` (the training dtype: 1e39 is not a float32);
    "int": integers; "bool": 0/1 or booleans.
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
    elif kind == "float" and not (np.abs(array) <= np.finfo(dtype).max).all():  # False for NaN too
        bad = array[~(np.abs(array) <= np.finfo(dtype).max)]
        raise ValueError(f"{name} must be finite in {np.dtype(dtype).name}, got {bad[:3]} in it")
    elif kind == "bool" and dtype_kind != "b" and not ((array == 0) | (array == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or booleans)")
    return array


def check_avail_actions(name, avail, n_agents, n_actions):
    """A (N, A) 0/1 mask with at least one available action per agent."""
    avail = _check_array(name, avail, (n_agents, n_actions), "bool").astype(bool, copy=False)
    if not avail.any(axis=-1).all():
        empty = np.flatnonzero(~avail.any(axis=-1))
        raise ValueError(f"{name}: agent(s) {empty.tolist()} have no available action")
    return avail


def check_actions(name, actions, avail):
    """(..., N) integer actions, each in range and available under `avail` (..., N, A)."""
    n_actions = avail.shape[-1]
    actions = _check_array(name, actions, avail.shape[:-1], "int")
    out_of_range = (actions < 0) | (actions >= n_actions)
    if out_of_range.any():
        raise ValueError(f"{name} must lie in [0, {n_actions}), got {actions[out_of_range].tolist()}")
    chosen_available = take(avail, actions)
    if not chosen_available.all():
        where = np.argwhere(~chosen_available)
        raise ValueError(f"{name}: unavailable action(s) {actions[~chosen_available].tolist()} chosen "
                         f"(at index {where[:, -1].tolist()} of the agent axis)")
    return actions


def check_select_actions(learner, obs, avail_actions, last_actions, epsilon):
    """select_actions' arguments, checked: (obs, avail as bool, last_actions or None)."""
    if not _is_real(epsilon, 0.0, 1.0):
        raise ValueError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
    obs = _check_array("obs", obs, (learner.n_agents, learner.obs_dim), "float", learner.dtype)
    avail = check_avail_actions("avail_actions", avail_actions, learner.n_agents, learner.n_actions)
    if last_actions is not None:
        last_actions = _check_array("last_actions", last_actions, (learner.n_agents,), "int")
        if last_actions.min() < 0 or last_actions.max() >= learner.n_actions:
            raise ValueError(f"last_actions must lie in [0, {learner.n_actions}), got {last_actions.tolist()}")
    return obs, avail, last_actions


ENV_METHODS = ("reset", "step", "get_obs", "get_state", "get_avail_actions", "get_env_info")


def check_env(env):
    """Refuse an object without pymarl's MultiAgentEnv methods, saying what the interface is."""
    missing = [name for name in ENV_METHODS if not callable(getattr(env, name, None))]
    if missing:
        hint = ""
        if hasattr(env, "possible_agents"):
            hint = (" It looks like a PettingZoo AEC env: make it parallel (its parallel_env(), or "
                    "pettingzoo.utils.aec_to_parallel), then wrap it as envs.PettingZooEnv(env)."
                    if hasattr(env, "agent_iter") else
                    " It looks like a PettingZoo ParallelEnv: wrap it as envs.PettingZooEnv(env).")
        raise TypeError(f"env lacks {missing}: qmix_np drives environments with pymarl's interface, "
                        f"{', '.join(ENV_METHODS)} (see MultiAgentEnv in envs.py, installed as "
                        f"qmix_np_envs).{hint}")


def check_can_sample(buffer, batch_size):
    """train_step needs batch_size distinct stored episodes."""
    if len(buffer) < batch_size:
        raise ValueError(f"a train step samples batch_size = {batch_size} distinct episodes, but the buffer "
                         f"holds {len(buffer)}: store more first (train does, before its first train step)")


def check_finite_q(q):
    """Acting on a NaN or infinite Q-value would choose an arbitrary action: refuse it."""
    if not np.isfinite(q).all():
        raise FloatingPointError("the agent network gives non-finite Q-values for these inputs (its "
                                 "parameters overflow, or diverged): no action can be chosen from them")


def warn_if_q_tot_exceeds_returns(learner, diagnostics):
    """Warn, once, when a train step's mean Q_tot is above what any discounted return allows:

        Q_tot <= r_max / (1 - gamma),   r_max the largest reward in the buffer as trained on
                                        (standardised with standardise_rewards)

    Past it Q_tot is not an estimate of any return: the learner is diverging, as a max-based
    target drives it, upward (docs/experiments.md, MPE with a bootstrapped time limit). Checked
    once a positive reward is stored: before, the bound is 0 and a fresh network's Q_tot, of
    size 1, would cross it; for the same reason the lower side (step costs of -0.01 at gamma
    0.95 bound it at -0.2) is not checked.
    """
    gamma = learner.config.gamma
    if learner.warned_q_tot or gamma == 1.0:
        return
    r_max = float(learner.buffer.data["reward"][:len(learner.buffer)].max())
    if learner.config.standardise_rewards:
        r_max = learner.reward_stats.standardise(r_max)
    bound, q_tot = r_max / (1.0 - gamma), diagnostics["q_taken_mean"]
    if r_max > 0 and q_tot > bound:
        learner.warned_q_tot = True
        warnings.warn(f"train step {learner.train_steps}: the mean Q_tot ({q_tot:.4g}) is above what any "
                      f"discounted return allows (largest reward / (1 - gamma) = {bound:.4g}): the learner is "
                      "diverging. learner.history['q_taken_mean'] and ['grad_norm'] show how; warned once",
                      RuntimeWarning, stacklevel=3)


def config_differences(config, other):
    """The fields, t_max aside, in which two configs differ: a run continues only where they are none."""
    return [f.name for f in dataclasses.fields(Config)
            if f.name != "t_max" and getattr(config, f.name) != getattr(other, f.name)]


def check_learner_fits(learner, env, config=None):
    """The learner was built for this env's get_env_info(), and `config` (to continue it) differs
    from its config in t_max only; a ValueError names what differs."""
    if not isinstance(learner, Learner):
        raise TypeError(f"learner must be a Learner, got {type(learner).__name__}")
    info = check_env_info(env.get_env_info())
    differ = {key: (learner.env_info[key], info[key]) for key in ENV_INFO_KEYS if learner.env_info[key] != info[key]}
    if differ:
        raise ValueError("the learner was built for another environment: " + ", ".join(
            f"{key} {mine} in learner.env_info, {theirs} in env.get_env_info()"
            for key, (mine, theirs) in differ.items()))
    if config is not None:
        fields = config_differences(config, learner.config)
        if fields:
            raise ValueError(f"config must equal learner.config except for t_max; it differs in {fields}")


def check_train_arguments(envs, config, callback, progress):
    """train()'s envs (config.batch_size_run distinct envs with one env_info: a list, or one env
    alone when that is 1), config, callback (None or callable) and progress (a bool, or seconds
    > 0). Returns the envs as a list."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a Config, got {type(config).__name__}")
    envs = list(envs) if isinstance(envs, (list, tuple)) else [envs]
    if len(envs) != config.batch_size_run:
        raise ValueError(f"train needs a list of config.batch_size_run = {config.batch_size_run} environments "
                         f"to play in lockstep, got {len(envs)}")
    if len({id(env) for env in envs}) != len(envs):
        raise ValueError("the environments passed to train must be distinct objects: each plays its own episode")
    for env in envs:
        check_env(env)
    infos = [check_env_info(env.get_env_info()) for env in envs]
    if any(info != infos[0] for info in infos):
        raise ValueError(f"the environments passed to train must describe one task; their get_env_info() "
                         f"differ: {infos[0]} and {next(info for info in infos if info != infos[0])}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable as callback(learner, episode_return, "
                        f"length, success), got {callback!r}")
    if not (isinstance(progress, bool) or _is_real(progress, 0.0, math.inf) and progress > 0):
        raise ValueError(f"progress must be True, False or a number of seconds > 0, got {progress!r}")
    return envs


def check_evaluate_arguments(n_episodes, seed):
    """evaluate()'s n_episodes (an int >= 1) and seed (an int >= 0)."""
    if not _is_int(n_episodes, 1):
        raise ValueError(f"n_episodes must be an int >= 1, got {n_episodes!r}")
    if not _is_int(seed, 0):
        raise ValueError(f"seed must be an int >= 0 (episode i resets with seed + i), got {seed!r}")


def check_observation(env, learner):
    """The env's (obs (N, O), state (S,), avail_actions (N, A) as bool), each checked."""
    n, o, s, a = learner.n_agents, learner.obs_dim, learner.state_dim, learner.n_actions
    return (_check_array("env.get_obs() (shaped by get_env_info()'s n_agents, obs_shape)", env.get_obs(),
                         (n, o), "float", learner.dtype),
            _check_array("env.get_state() (shaped by get_env_info()'s state_shape)", env.get_state(),
                         (s,), "float", learner.dtype),
            check_avail_actions("env.get_avail_actions() (shaped by get_env_info()'s n_agents, n_actions)",
                                env.get_avail_actions(), n, a))


def check_step(result, length, episode_limit, dtype):
    """env.step()'s (reward, terminated, info), checked; warns (once) if an episode that stops
    at the limit does not say whether it was the limit."""
    if not isinstance(result, tuple) or len(result) != 3:
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise ValueError(f"env.step(actions) must return (reward, terminated, info) as pymarl's "
                         f"MultiAgentEnv does, got {got}" + (" (a Gymnasium-style step? wrap it so "
                         "that a truncation becomes info['episode_limit'] = True)" if got == "a tuple of 5" else ""))
    reward, terminated, info = result
    if np.ndim(reward) != 0:
        raise ValueError(f"the reward from env.step() must be one number, the team's, got shape "
                         f"{np.shape(reward)}: pymarl's interface has one reward per step (sum the agents')")
    reward = float(_check_array("the reward from env.step()", reward, (), "float", dtype))
    if not isinstance(terminated, (bool, np.bool_)):
        raise TypeError(f"terminated from env.step() must be a bool (True or False), got "
                        f"{type(terminated).__name__} {terminated!r}")
    if not isinstance(info, dict):
        raise TypeError(f"info from env.step() must be a dict, got {type(info).__name__}")
    if not isinstance(info.get("episode_limit", False), (bool, np.bool_)):
        raise TypeError(f"info['episode_limit'] from env.step() must be a bool, got {info['episode_limit']!r}")
    if terminated and length == episode_limit and "episode_limit" not in info:
        warnings.warn(f"an episode ended at episode_limit ({episode_limit} steps) with terminated True "
                      "and no info['episode_limit']: it is treated as terminal (no bootstrap) and as a "
                      "success. Set info['episode_limit'] = True when the time limit ends an episode.",
                      stacklevel=4)
    return reward, bool(terminated), info


def check_episode(episode, buffer):
    """An episode for EpisodeBuffer.insert: every field's shape and values, before anything is
    written. Returns the checked arrays."""
    if not isinstance(episode, dict) or set(episode) != {"obs", "state", "avail_actions", "actions",
                                                          "reward", "terminated"}:
        raise ValueError("an episode is a dict of obs, state, avail_actions, actions, reward, terminated")
    length = len(episode["actions"]) if np.ndim(episode["actions"]) else 0
    if not 1 <= length <= buffer.episode_limit:
        raise ValueError(f"an episode must have 1 to episode_limit ({buffer.episode_limit}) steps, got {length}")
    checked = {}
    for name, kind in (("obs", "float"), ("state", "float"), ("avail_actions", "bool"),
                       ("reward", "float"), ("terminated", "bool")):
        shape = buffer.fields[name][0]
        steps = length + 1 if name in ("obs", "state", "avail_actions") else length
        checked[name] = _check_array(f"episode[{name!r}]", episode[name], (steps,) + shape[1:], kind,
                                     buffer.fields["obs"][1])
    avail = checked["avail_actions"].astype(bool)
    if not avail.any(axis=-1).all():
        raise ValueError("episode['avail_actions']: a step where an agent has no available action")
    checked["actions"] = check_actions("episode['actions']", episode["actions"], avail[:-1])
    if checked["terminated"][:-1].any():
        raise ValueError("episode['terminated']: only the last step of an episode can be terminal")
    return checked


# --- Checkpoint format: named arrays in one .npz, no pickles, a SHA-256 digest over all of them

CHECKPOINT_FORMAT = "qmix-np checkpoint"
CHECKPOINT_VERSION = 5  # 5: Q and gradient norms in the history; 4 and before are refused


def _digest(arrays):
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def state_arrays(learner, include_buffer=True):
    """Everything a run needs to continue bit for bit, as named arrays (no Python objects)."""
    arrays = {
        "format": np.array(CHECKPOINT_FORMAT), "version": np.array(CHECKPOINT_VERSION),
        "config": np.array(json.dumps(dataclasses.asdict(learner.config))),
        "env_info": np.array(json.dumps(learner.env_info)),
        "theta": learner.theta, "target_theta": learner.target_theta,
        **{f"optim/{k}": v for k, v in learner.optimiser.state.items()},
        "optim_t": np.array(learner.optimiser.t),
        "counters": np.array([getattr(learner, name) for name in COUNTERS], dtype=np.int64),
        "reward_stats": np.array(dataclasses.astuple(learner.reward_stats)),  # mean, var, count
        "rng_state": np.array(json.dumps(learner.rng.bit_generator.state)),
        **{f"history/{k}": np.array(learner.history[k], dtype=dt) for k, dt in zip(HISTORY_KEYS, HISTORY_DTYPES)},
    }
    if include_buffer:
        arrays["buffer_position"] = np.array([learner.buffer.size, learner.buffer.next_index], dtype=np.int64)
        arrays.update({f"buffer/{k}": v for k, v in learner.buffer.data.items()})
    return arrays


def _as_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return pathlib.Path(path)


def _file_mode(path):
    """The mode `path` has if it exists (a replaced checkpoint keeps it), else what the umask
    gives a new file."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_checkpoint(learner, path, include_buffer=True):
    """One .npz (allow_pickle=False) holding the config, parameters and targets, the optimiser's
    state, the counters, the Generator's state, optionally the episode buffer, and a SHA-256
    digest of all of it. Written to a temporary file in the same folder and renamed over `path`,
    so a crash mid-save leaves any previous checkpoint at `path` intact. A new file gets the
    usual mode (0666 less the umask); a replaced one keeps its mode."""
    given, path = path, _as_path(path)
    if path.name in ("", ".", "..") or path.is_dir():  # is_dir follows a link to a folder too
        raise ValueError(f"cannot save to {os.fspath(given)!r}: it names a folder, not a file")
    if not path.parent.is_dir():
        raise ValueError(f"cannot save to {path}: the folder {path.parent} does not exist")
    arrays = state_arrays(learner, include_buffer)
    arrays["sha256"] = np.array(_digest(arrays))
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".qmix-np-", suffix=".tmp")  # mode 0600; a short name
    try:
        with os.fdopen(handle, "wb") as f:
            with zipfile.ZipFile(f, "w") as archive:
                for key, value in arrays.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


# --- Reading a checkpoint: a file from a stranger. Everything is checked before it is trusted,
# and nothing is allocated from a size the file declares before that size is checked.

TEXT_ENTRIES = ("format", "config", "env_info", "rng_state", "sha256")  # JSON or plain text, one string each
MAX_TEXT_CHARS = 2**20
ENTRY_NAMES = {*TEXT_ENTRIES, "version", "theta", "target_theta", "optim_t", "counters", "reward_stats",
               "buffer_position", *(f"history/{k}" for k in HISTORY_KEYS),
               *(f"optim/{n}" for n in Adam.state_names + RMSprop.state_names),
               *(f"buffer/{n}" for n in episode_fields(1, 1, 1, 1, 1, np.float32))}


def parameter_count(config, env_info):
    """The length of theta for this config and env, computed without building anything: the
    shapes of init_agent_params and init_mixer, counted. A test holds it to Learner.theta.size."""
    n, a, s = env_info["n_agents"], env_info["n_actions"], env_info["state_shape"]
    h, e, k = config.hidden_dim, config.mixing_embed_dim, config.hypernet_embed
    i = env_info["obs_shape"] + a * config.obs_last_action + n * config.obs_agent_id
    middle = 3 * h * (2 * h + 2) if config.use_rnn else h * (h + 1)  # GRUCell, or a Linear
    agent = (h * (i + 1) + middle + a * (h + 1)) * (1 if config.shared_agent else n)
    if config.mixer != "qmix":
        return agent

    def hypernet(out):
        return (s + 1) * out if config.hypernet_layers == 1 else (s + 1) * k + (k + 1) * out

    return agent + hypernet(e * n) + hypernet(e) + 2 * (s + 1) * e + (e + 1)  # + hyper_b_1, V


def checkpoint_layout(config, env_info, include_buffer, episodes):
    """name -> (shape, dtype) of every non-text entry a checkpoint of this config and env holds,
    with a history of `episodes` training episodes."""
    dtype, theta = np.dtype(config.dtype), (parameter_count(config, env_info),)
    names = RMSprop.state_names if config.optimizer == "rmsprop" else Adam.state_names
    layout = {"version": ((), np.dtype(np.int64)), "theta": (theta, dtype), "target_theta": (theta, dtype),
              **{f"optim/{name}": (theta, dtype) for name in names},
              "optim_t": ((), np.dtype(np.int64)), "counters": ((len(COUNTERS),), np.dtype(np.int64)),
              "reward_stats": ((3,), np.dtype(np.float64)),
              **{f"history/{k}": ((episodes,), np.dtype(dt)) for k, dt in zip(HISTORY_KEYS, HISTORY_DTYPES)}}
    if include_buffer:
        fields = episode_fields(env_info["episode_limit"], env_info["n_agents"], env_info["obs_shape"],
                                env_info["state_shape"], env_info["n_actions"], dtype)
        layout["buffer_position"] = ((2,), np.dtype(np.int64))
        layout.update({f"buffer/{k}": ((config.buffer_size,) + shape, dt) for k, (shape, dt) in fields.items()})
    return layout


def _nbytes(shape, dtype):
    return math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow


def _read_headers(path, archive):
    """name -> (shape, dtype) that each member declares in its .npy header, reading nothing else.
    Refuses unknown names, compressed members (save() never compresses), object dtypes, and a
    header whose declared size is not exactly the bytes the member holds."""
    declared, total = {}, 0
    for info in archive.infolist():
        name = info.filename[:-len(".npy")]
        if not info.filename.endswith(".npy") or name not in ENTRY_NAMES or name in declared:
            raise ValueError(f"{path}: unexpected entry {info.filename!r} (not one save() writes)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: entry {name!r} is compressed; save() never compresses")
        try:
            with archive.open(info) as member:
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(member)]
                shape, fortran_order, dtype = read_header(member)  # a header of at most 10,000 bytes
                header_bytes = member.tell()
        except (ValueError, KeyError, EOFError, tokenize.TokenError) as err:  # TokenError: an unbalanced header
            raise ValueError(f"{path}: entry {name!r} has no .npy header as save() writes ({err!r})") from None
        if dtype.hasobject or fortran_order:
            what = "Python objects" if dtype.hasobject else "a Fortran-order array"
            raise ValueError(f"{path}: entry {name!r} holds {what}")
        if header_bytes + _nbytes(shape, dtype) != info.file_size:
            raise ValueError(f"{path}: entry {name!r} declares {shape} {dtype}, which is not the "
                             f"{info.file_size - header_bytes} bytes it holds")
        declared[name] = (shape, dtype)
        total += info.file_size
    if total > os.path.getsize(path):
        raise ValueError(f"{path}: its entries declare {total} bytes, more than the file's {os.path.getsize(path)}")
    return declared


def _read_entry(archive, name):
    with archive.open(f"{name}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _read_text(path, archive, declared, name):
    """A text entry (one string of at most MAX_TEXT_CHARS characters), as str."""
    shape, dtype = declared[name]
    if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * MAX_TEXT_CHARS:
        raise ValueError(f"{path}: entry {name!r} must be one string of at most {MAX_TEXT_CHARS} "
                         f"characters, got {shape} {dtype}")
    return str(_read_entry(archive, name))


def _read_json(path, text, name):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: entry {name!r} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: entry {name!r} must be a JSON object, got {type(value).__name__}")
    return value


def _declared_episodes(declared):
    """The history's length as the file declares it (checked against the counters once read;
    each history entry's bytes are already held to the file's size)."""
    shape = declared.get("history/t_env", ((0,), None))[0]
    return shape[0] if len(shape) == 1 else 0


def _check_layout(path, declared, expected):
    """The declared entries are exactly the expected ones, each with the expected shape and dtype."""
    names = set(declared) - set(TEXT_ENTRIES)
    if names != set(expected):
        raise ValueError(f"{path}: for its config the checkpoint should hold {sorted(set(expected) - names)} "
                         f"and not {sorted(names - set(expected))}")
    for name, (shape, dtype) in expected.items():
        if declared[name] != (shape, dtype):
            raise ValueError(f"{path}: entry {name!r} declares {declared[name][0]} {declared[name][1]}, but "
                             f"its config needs {shape} {dtype}")


def read_checkpoint(learner_class, path, env_info=None, config=None, max_buffer_bytes=2**30):
    """A Learner restored from `path`, a file treated as untrusted input. Never unpickles.

    In order, before anything is allocated from what the file declares: the archive's member
    names and .npy headers (no data); the format marker and version; the stored config and
    env_info (types and ranges) and, if given, `env_info` and `config` against them (config may
    differ in t_max); every entry's shape and dtype against what that config implies; the
    memory the learner would take (a checkpoint without its buffer still gets an empty buffer of
    config.buffer_size episodes: at most max_buffer_bytes). Then the data and its SHA-256 digest,
    and every value against what training relies on (see _check_values). Any refusal is a
    ValueError naming the file and the entry.
    """
    path = _as_path(path)
    if not _is_int(max_buffer_bytes, 0):
        raise ValueError(f"max_buffer_bytes must be an int >= 0, got {max_buffer_bytes!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            declared = _read_headers(path, archive)
            missing = {"version", *TEXT_ENTRIES} - set(declared)
            if missing:
                raise ValueError(f"{path}: the checkpoint lacks {sorted(missing)}")
            if _read_text(path, archive, declared, "format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path}: not a qmix-np checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
            _check_version(path, declared, archive)
            text = {name: _read_text(path, archive, declared, name) for name in TEXT_ENTRIES}
            saved_config, saved_env_info = _checked_settings(path, text, env_info, config)
            expected = checkpoint_layout(saved_config, saved_env_info, "buffer_position" in declared,
                                         _declared_episodes(declared))
            _check_layout(path, declared, expected)
            if "buffer_position" not in declared:
                _check_empty_buffer_size(path, saved_config, saved_env_info, max_buffer_bytes)
            arrays = {name: _read_entry(archive, name) for name in expected}
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as err:
        raise ValueError(f"{path}: not a readable checkpoint (truncated, corrupt or not .npz): {err}") from None
    if _digest({**arrays, **{k: np.array(v) for k, v in text.items() if k != "sha256"}}) != text["sha256"]:
        raise ValueError(f"{path}: the contents do not match the stored SHA-256 digest (corrupt)")
    try:
        learner = learner_class(saved_config if config is None else config, saved_env_info)
    except MemoryError:
        raise ValueError(f"{path}: this machine has not the memory for the learner it describes") from None
    _check_values(path, learner, arrays, text["rng_state"])
    _restore(learner, arrays, json.loads(text["rng_state"]))
    return learner


def buffer_bytes(config, env_info):
    """The bytes of the replay buffer a Learner reserves: buffer_size episodes of episode_limit + 1 steps."""
    fields = episode_fields(env_info["episode_limit"], env_info["n_agents"], env_info["obs_shape"],
                            env_info["state_shape"], env_info["n_actions"], config.dtype)
    return sum(_nbytes((config.buffer_size,) + shape, dtype) for shape, dtype in fields.values())


def buffer_memory_message(config, env_info):
    return (f"the replay buffer needs {buffer_bytes(config, env_info):,} bytes (Config.buffer_size "
            f"{config.buffer_size} episodes, each padded to episode_limit + 1 = {env_info['episode_limit'] + 1} "
            "steps), more than this machine can give: lower Config.buffer_size")


def _check_empty_buffer_size(path, config, env_info, max_buffer_bytes):
    """A checkpoint saved without its buffer: the empty buffer the learner allocates is bounded."""
    needed = buffer_bytes(config, env_info)
    if needed > max_buffer_bytes:
        raise ValueError(f"{path}: the learner would allocate an empty buffer of {needed:,} bytes "
                         f"(config buffer_size {config.buffer_size}), more than max_buffer_bytes "
                         f"({max_buffer_bytes:,})")


def _check_version(path, declared, archive):
    shape, dtype = declared["version"]
    if shape != () or dtype.kind not in "iu":
        raise ValueError(f"{path}: entry 'version' must be an integer, got {shape} {dtype}")
    version = int(_read_entry(archive, "version"))
    if version != CHECKPOINT_VERSION:
        older = {1: " (version 1 held single transitions, before the episode learner)",
                 2: " (version 2 came before the GRU agent and Config.use_rnn)",
                 3: " (version 3 came before Config.batch_size_run)",
                 4: " (version 4 came before the history's Q and gradient norms)"}.get(version, "")
        raise ValueError(f"{path}: checkpoint format version {version}{older}; this code reads "
                         f"version {CHECKPOINT_VERSION} only")


def _checked_settings(path, text, env_info, config):
    """The stored Config and env_info, validated, and the caller's against them."""
    stored = _read_json(path, text["config"], "config")
    fields = {f.name for f in dataclasses.fields(Config)}
    if set(stored) != fields:
        raise ValueError(f"{path}: entry 'config' lacks {sorted(fields - set(stored))} and has unknown "
                         f"{sorted(set(stored) - fields)}")
    try:
        saved_config = Config(**stored)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: entry 'config' is invalid: {err}") from None
    try:
        saved_env_info = check_env_info(_read_json(path, text["env_info"], "env_info"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: entry 'env_info' is invalid: {err}") from None
    if env_info is not None and check_env_info(env_info) != saved_env_info:
        raise ValueError(f"{path}: the checkpoint is for an environment with {saved_env_info}, "
                         f"not {check_env_info(env_info)}")
    if config is not None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a Config, got {type(config).__name__}")
        differ = config_differences(config, saved_config)
        if differ:
            raise ValueError(f"{path}: the checkpoint's config differs in {differ}")
    return saved_config, saved_env_info


def _check_values(path, learner, arrays, rng_state):
    """Every loaded value against what the running code relies on."""
    for name in ("theta", "target_theta", *(f"optim/{k}" for k in learner.optimiser.state)):
        if not np.isfinite(arrays[name]).all():
            raise ValueError(f"{path}: entry {name!r} holds non-finite values")
    mean, var, count = arrays["reward_stats"].tolist()
    if not (math.isfinite(mean) and 0 < var < math.inf and 0 < count < math.inf):
        raise ValueError(f"{path}: entry 'reward_stats' must be a finite mean, a variance > 0 and a count > 0, "
                         f"got {[mean, var, count]}")
    for name in ("optim/exp_avg_sq", "optim/square_avg"):  # averages of squared gradients
        if name in arrays and arrays[name].min() < 0:
            raise ValueError(f"{path}: entry {name!r} holds negative values (it averages squares)")
    counters = dict(zip(COUNTERS, arrays["counters"].tolist()))
    limit = learner.env_info["episode_limit"]
    seen = counters["train_steps"] * learner.config.batch_size * limit  # at most B x T rewards per train step
    if count > RunningMeanStd.count + seen:
        raise ValueError(f"{path}: entry 'reward_stats' counts {count:g} rewards, but {counters['train_steps']} "
                         f"train steps of batch_size {learner.config.batch_size} x episode_limit {limit} see at "
                         f"most {seen}")
    if not (min(counters.values()) >= 0 and counters["train_steps"] == int(arrays["optim_t"])
            and counters["train_steps"] + counters["skipped_steps"] <= counters["episode"]
            and counters["last_target_update_episode"] <= counters["episode"]
            and counters["episode"] <= counters["t_env"] <= counters["episode"] * limit):
        raise ValueError(f"{path}: entry 'counters' {counters} is inconsistent with itself or with entry "
                         f"'optim_t' ({int(arrays['optim_t'])}): counters are >= 0, train steps = optimiser "
                         "steps, at most one train step per episode, 1 to episode_limit env steps per episode")
    try:
        state = json.loads(rng_state)
        if state.get("bit_generator") != type(learner.rng.bit_generator).__name__:
            raise ValueError(f"not a {type(learner.rng.bit_generator).__name__} state")
        type(learner.rng.bit_generator)().state = state  # set on a throwaway generator: it checks the rest
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as err:
        raise ValueError(f"{path}: entry 'rng_state' is not a Generator state for this code: {err}") from None
    _check_history(path, arrays, counters, limit)
    if "buffer_position" in arrays:
        _check_buffer(path, learner.buffer, arrays)


def _check_history(path, arrays, counters, limit):
    """One row per training episode: t_env never decreasing and within the counter, lengths of 1
    to episode_limit steps, finite returns. The train steps' logs (loss, Q_tot, gradient norm) may
    hold any float: NaN before the first train step, inf from a skipped one."""
    t_env, returns, lengths = (arrays[f"history/{k}"] for k in ("t_env", "return", "length"))
    problems = [(len(t_env) != counters["episode"], f"one row per training episode ({counters['episode']})"),
                (len(t_env) and (t_env.min() < 0 or t_env.max() > counters["t_env"] or (np.diff(t_env) < 0).any()),
                 f"t_env never decreasing, in [0, {counters['t_env']}]"),
                (len(t_env) and (lengths.min() < 1 or lengths.max() > limit), f"lengths of 1 to {limit} steps"),
                (not np.isfinite(returns).all(), "finite returns")]
    for broken, expected in problems:
        if broken:
            raise ValueError(f"{path}: entries 'history/...' must hold {expected}")


def _check_buffer(path, buffer, arrays):
    """The stored episodes: a consistent ring position, each episode as insert() would accept it,
    and zeros everywhere else (padding and unused slots)."""
    size, next_index = (int(v) for v in arrays["buffer_position"])
    if not (0 <= size <= buffer.capacity and 0 <= next_index < buffer.capacity
            and (size == buffer.capacity or next_index == size)):
        raise ValueError(f"{path}: entry 'buffer_position' (size {size}, next index {next_index}) is "
                         f"inconsistent with capacity {buffer.capacity}")
    data = {name: arrays[f"buffer/{name}"] for name in buffer.fields}
    in_use = np.arange(buffer.capacity) < size
    lengths = np.where(in_use, data["filled"].sum(axis=1), 0).astype(np.int64)  # (C,)
    steps = np.arange(buffer.episode_limit + 1)
    if not (np.array_equal(data["filled"], steps[None, :-1] < lengths[:, None]) and (lengths[in_use] >= 1).all()):
        raise ValueError(f"{path}: entry 'buffer/filled' must mark 1 to episode_limit leading steps of "
                         f"each of the {size} stored episodes, and nothing else")
    for name, array in data.items():
        held = lengths + (in_use if array.shape[1] == buffer.episode_limit + 1 else 0)  # steps each slot holds
        if array[steps[None, :array.shape[1]] >= held[:, None]].any():
            raise ValueError(f"{path}: entry 'buffer/{name}' must be 0 after each episode's end and in unused slots")
    for i in np.flatnonzero(in_use):
        episode = {name: data[name][i, :lengths[i] + (1 if data[name].shape[1] > buffer.episode_limit else 0)]
                   for name in ("obs", "state", "avail_actions", "actions", "reward", "terminated")}
        try:
            check_episode(episode, buffer)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: stored episode {i} (entries 'buffer/...'): {err}") from None


def _restore(learner, arrays, rng_state):
    """Copy checked values into a freshly built learner."""
    learner.rng.bit_generator.state = rng_state
    learner.theta[...], learner.target_theta[...] = arrays["theta"], arrays["target_theta"]
    for key, value in learner.optimiser.state.items():
        value[...] = arrays[f"optim/{key}"]
    learner.optimiser.t = int(arrays["optim_t"])
    for name, value in zip(COUNTERS, arrays["counters"].tolist()):
        setattr(learner, name, value)
    learner.reward_stats = RunningMeanStd(*arrays["reward_stats"].tolist())
    if "buffer_position" in arrays:
        for key in learner.buffer.data:
            learner.buffer.data[key][...] = arrays[f"buffer/{key}"]
        learner.buffer.size, learner.buffer.next_index = (int(v) for v in arrays["buffer_position"])
    learner.history = {k: arrays[f"history/{k}"].tolist() for k in HISTORY_KEYS}


# --- EPyMARL's and pymarl's model files (agent.th, mixer.th, opt.th), through torch (optional).
# The parameters already carry their names, so the files are their state_dicts as they stand.


def _optimiser_moments(learner):
    """Per parameter, in torch's order (the agent's, then the mixer's): {state name: view into
    the learner's optimiser state}."""
    views = {key: views_of(vector, learner.params) for key, vector in learner.optimiser.state.items()}
    return [{key: views[key][group][name] for key in views}
            for group, inner in learner.params.items() for name in inner]


def _torch_optimiser(torch, learner, parameters):
    c = learner.config
    if c.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=c.lr, alpha=c.optim_alpha, eps=c.optim_eps)
    return torch.optim.Adam(parameters, lr=c.lr, betas=c.adam_betas, eps=c.adam_eps)


def save_epymarl(learner, folder):
    """Write the learner as EPyMARL's (and pymarl's) save_models writes a run: folder/<t_env>/
    with agent.th (the agent's state_dict), mixer.th (the mixer's; empty for VDN, none for
    independent learners) and opt.th (the optimiser's, over the agent's then the mixer's
    parameters, as their learners list them). Their checkpoint_path=folder then continues the
    run there. Needs torch; one agent network shared by all agents (their BasicMAC). Returns the
    step folder."""
    import torch  # optional: only this bridge needs it

    if not learner.config.shared_agent:
        raise ValueError("EPyMARL's and pymarl's BasicMAC share one agent network: save_epymarl needs "
                         "Config.shared_agent True")
    step_folder = _as_path(folder) / str(learner.t_env)
    step_folder.mkdir(parents=True, exist_ok=True)
    tensors = {group: {name: torch.from_numpy(array.copy()) for name, array in inner.items()}
               for group, inner in learner.params.items()}
    torch.save(tensors["agent"], step_folder / "agent.th")
    if learner.config.mixer != "none":
        torch.save(tensors["mixer"], step_folder / "mixer.th")
    parameters = [torch.nn.Parameter(t) for inner in tensors.values() for t in inner.values()]
    optimiser = _torch_optimiser(torch, learner, parameters)
    for parameter, moments in zip(parameters, _optimiser_moments(learner)):
        optimiser.state[parameter] = {"step": torch.tensor(float(learner.optimiser.t)),
                                      **{key: torch.from_numpy(view.copy()) for key, view in moments.items()}}
    torch.save(optimiser.state_dict(), step_folder / "opt.th")
    return step_folder


def load_epymarl(folder, config, env_info):
    """A Learner with the parameters (and, if opt.th is there, the optimiser's state) of model
    files written by EPyMARL's or pymarl's save_models, or by save_epymarl: `folder` holds
    agent.th, or numbered step folders (the largest is read, as their load_step=0 does). Read
    with torch.load(weights_only=True), no pickled code; every tensor's name, shape and value is
    checked against what `config` and `env_info` build. Targets start equal to the parameters, as
    their load_models makes them."""
    import torch  # optional: only this bridge needs it

    folder = _as_path(folder)
    if not (folder / "agent.th").exists():
        steps = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
        if not steps:
            raise ValueError(f"{folder} holds neither agent.th nor numbered step folders of model files")
        folder = max(steps, key=lambda p: int(p.name))
    learner = Learner(config, env_info)
    files = {"agent": folder / "agent.th", "mixer": folder / "mixer.th"}
    for group, path in files.items():
        if group == "mixer" and config.mixer == "none":
            continue
        state = torch.load(path, weights_only=True)
        expected = learner.params[group]
        if set(state) != set(expected):
            raise ValueError(f"{path}: its keys {sorted(state)} are not this config's {sorted(expected)}")
        for name, array in expected.items():
            value = state[name].detach().cpu().numpy()
            if value.shape != array.shape or not np.isfinite(value).all():
                raise ValueError(f"{path}: {name!r} must be finite of shape {array.shape}, got {value.shape}")
            array[...] = value
    if (folder / "opt.th").exists():
        _load_optimiser(torch, learner, folder / "opt.th")
    learner.update_targets()
    return learner


def _load_optimiser(torch, learner, path):
    """opt.th's per-parameter moments and step count into the learner's optimiser, checked."""
    state = torch.load(path, weights_only=True)["state"]
    per_parameter = _optimiser_moments(learner)
    if sorted(state) != list(range(len(per_parameter))):
        raise ValueError(f"{path}: state for {len(state)} parameters, this config has {len(per_parameter)}")
    steps = set()
    for index, moments in enumerate(per_parameter):
        for key, view in moments.items():
            value = state[index][key].detach().cpu().numpy()
            if value.shape != view.shape or not np.isfinite(value).all():
                raise ValueError(f"{path}: {key} of parameter {index} must be finite of shape {view.shape}")
            view[...] = value
        steps.add(int(state[index]["step"]))
    if len(steps) != 1:
        raise ValueError(f"{path}: the parameters' step counts differ: {sorted(steps)}")
    learner.optimiser.t = steps.pop()
