"""qmix_np against a PyTorch restatement of pymarl's learner (skipped without torch).

The torch code below restates, from oxwhirl/pymarl c971afd, QLearner.train, QMixer, VDNMixer and
BasicMAC (its inputs and its hidden state, zero at t = 0 and carried through the batch's steps),
and EPyMARL's RNNAgent, which is pymarl's (fc1 -> ReLU -> GRUCell -> fc2) with use_rnn=True and
fc1 -> ReLU -> rnn Linear -> ReLU -> fc2 with use_rnn=False, in float64. Both sides start from the same weights (ours, loaded into torch with
load_state_dict under their own names) and take three steps on the same batch of episodes; the
loss, every gradient and every parameter after the steps must agree to 1e-10.
torch is never a dependency: `pip install torch==2.13.0` gives a CPU build on these machines.
"""
import numpy as np
import pytest

import qmix_np as q
from test_qmix_np import episode_batch, small_learner

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
PARITY = 1e-10


class RNNAgent(nn.Module):
    """EPyMARL's RNNAgent; with use_rnn, pymarl's."""

    def __init__(self, input_shape, hidden_dim, n_actions, use_rnn):
        super().__init__()
        self.hidden_dim, self.use_rnn = hidden_dim, use_rnn
        self.fc1 = nn.Linear(input_shape, hidden_dim)
        self.rnn = nn.GRUCell(hidden_dim, hidden_dim) if use_rnn else nn.Linear(hidden_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, n_actions)

    def init_hidden(self):
        return self.fc1.weight.new(1, self.hidden_dim).zero_()

    def forward(self, inputs, hidden_state):
        x = F.relu(self.fc1(inputs))
        h_in = hidden_state.reshape(-1, self.hidden_dim)
        h = self.rnn(x, h_in) if self.use_rnn else F.relu(self.rnn(x))
        return self.fc2(h), h


class QMixer(nn.Module):
    """pymarl's QMixer."""

    def __init__(self, n_agents, state_dim, embed_dim, hypernet_layers, hypernet_embed):
        super().__init__()
        self.n_agents, self.state_dim, self.embed_dim = n_agents, state_dim, embed_dim
        if hypernet_layers == 1:
            self.hyper_w_1 = nn.Linear(state_dim, embed_dim * n_agents)
            self.hyper_w_final = nn.Linear(state_dim, embed_dim)
        else:
            self.hyper_w_1 = nn.Sequential(nn.Linear(state_dim, hypernet_embed), nn.ReLU(),
                                           nn.Linear(hypernet_embed, embed_dim * n_agents))
            self.hyper_w_final = nn.Sequential(nn.Linear(state_dim, hypernet_embed), nn.ReLU(),
                                               nn.Linear(hypernet_embed, embed_dim))
        self.hyper_b_1 = nn.Linear(state_dim, embed_dim)
        self.V = nn.Sequential(nn.Linear(state_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))

    def forward(self, agent_qs, states):
        bs = agent_qs.size(0)
        states = states.reshape(-1, self.state_dim)
        agent_qs = agent_qs.view(-1, 1, self.n_agents)
        w1 = torch.abs(self.hyper_w_1(states))
        b1 = self.hyper_b_1(states)
        w1 = w1.view(-1, self.n_agents, self.embed_dim)
        b1 = b1.view(-1, 1, self.embed_dim)
        hidden = F.elu(torch.bmm(agent_qs, w1) + b1)
        w_final = torch.abs(self.hyper_w_final(states)).view(-1, self.embed_dim, 1)
        v = self.V(states).view(-1, 1, 1)
        return (torch.bmm(hidden, w_final) + v).view(bs, -1, 1)


class VDNMixer(nn.Module):
    def forward(self, agent_qs, batch):
        return torch.sum(agent_qs, dim=2, keepdim=True)


class MAC:
    """BasicMAC's forward over a batch at step t, carrying the hidden states: one shared agent,
    or (non-shared) one per agent, each with its own slice of the hidden states."""

    def __init__(self, agents, n_agents, args):
        self.agents, self.n_agents, self.args = agents, n_agents, args

    def parameters(self):
        return [p for agent in self.agents for p in agent.parameters()]

    def _build_inputs(self, batch, t):
        bs = batch["obs"].shape[0]
        inputs = [batch["obs"][:, t]]
        if self.args["obs_last_action"]:
            inputs.append(torch.zeros_like(batch["actions_onehot"][:, t]) if t == 0
                          else batch["actions_onehot"][:, t - 1])
        if self.args["obs_agent_id"]:
            inputs.append(torch.eye(self.n_agents, dtype=batch["obs"].dtype).unsqueeze(0).expand(bs, -1, -1))
        return torch.cat([x.reshape(bs * self.n_agents, -1) for x in inputs], dim=1)

    def init_hidden(self, batch_size):
        self.hidden_states = self.agents[0].init_hidden().unsqueeze(0).expand(batch_size, self.n_agents, -1)

    def forward(self, batch, t):
        inputs = self._build_inputs(batch, t)
        bs = batch["obs"].shape[0]
        if len(self.agents) == 1:
            agent_outs, self.hidden_states = self.agents[0](inputs, self.hidden_states)
            return agent_outs.view(bs, self.n_agents, -1)
        per_agent = inputs.view(bs, self.n_agents, -1)
        outs = [agent(per_agent[:, i], self.hidden_states[:, i]) for i, agent in enumerate(self.agents)]
        self.hidden_states = torch.stack([h for _, h in outs], dim=1)
        return torch.stack([q for q, _ in outs], dim=1)


class RunningMeanStd:
    """EPyMARL's (src/components/standarize_stream.py), in float64."""

    def __init__(self):
        self.mean, self.var, self.count = torch.zeros((1,), dtype=torch.float64), torch.ones((1,), dtype=torch.float64), 1e-4

    def update(self, arr):
        arr = arr.reshape(-1, arr.size(-1))
        batch_mean, batch_var, batch_count = torch.mean(arr, dim=0), torch.var(arr, dim=0), arr.shape[0]
        delta = batch_mean - self.mean
        tot_count = self.count + batch_count
        new_mean = self.mean + delta * batch_count / tot_count
        m_2 = self.var * self.count + batch_var * batch_count + torch.square(delta) * self.count * batch_count / tot_count
        self.mean, self.var, self.count = new_mean, m_2 / tot_count, tot_count


def pymarl_train_loss(mac, target_mac, mixer, target_mixer, batch, args):
    """QLearner.train up to the loss, line for line (with EPyMARL's standardise_rewards)."""
    rewards = batch["reward"][:, :-1]
    if args.get("rew_ms") is not None:
        args["rew_ms"].update(rewards)
        rewards = (rewards - args["rew_ms"].mean) / torch.sqrt(args["rew_ms"].var)
    actions = batch["actions"][:, :-1]
    terminated = batch["terminated"][:, :-1].to(rewards.dtype)  # pymarl: .float()
    mask = batch["filled"][:, :-1].to(rewards.dtype)
    mask[:, 1:] = mask[:, 1:] * (1 - terminated[:, :-1])
    avail_actions = batch["avail_actions"]
    max_seq_length = batch["obs"].shape[1]

    mac.init_hidden(batch["obs"].shape[0])
    mac_out = torch.stack([mac.forward(batch, t=t) for t in range(max_seq_length)], dim=1)
    chosen_action_qvals = torch.gather(mac_out[:, :-1], dim=3, index=actions).squeeze(3)
    target_mac.init_hidden(batch["obs"].shape[0])
    target_mac_out = [target_mac.forward(batch, t=t) for t in range(max_seq_length)]
    target_mac_out = torch.stack(target_mac_out[1:], dim=1)
    target_mac_out[avail_actions[:, 1:] == 0] = -9999999
    if args["double_q"]:
        mac_out_detach = mac_out.clone().detach()
        mac_out_detach[avail_actions == 0] = -9999999
        cur_max_actions = mac_out_detach[:, 1:].max(dim=3, keepdim=True)[1]
        target_max_qvals = torch.gather(target_mac_out, 3, cur_max_actions).squeeze(3)
    else:
        target_max_qvals = target_mac_out.max(dim=3)[0]
    if mixer is not None:
        chosen_action_qvals = mixer(chosen_action_qvals, batch["state"][:, :-1])
        target_max_qvals = target_mixer(target_max_qvals, batch["state"][:, 1:])
    targets = rewards + args["gamma"] * (1 - terminated) * target_max_qvals
    td_error = chosen_action_qvals - targets.detach()
    mask = mask.expand_as(td_error)
    masked_td_error = td_error * mask
    return (masked_td_error ** 2).sum() / mask.sum()


def pymarl_batch(batch):
    """Our batch in pymarl's EpisodeBatch layout: every field over T + 1 steps, actions (..., 1),
    filled also on the step that holds the final observation."""
    b, t, n = batch["actions"].shape
    n_actions = batch["avail_actions"].shape[-1]

    def one_more_step(x):
        return np.concatenate([x, np.zeros_like(x[:, :1])], axis=1)

    lengths = batch["filled"].sum(axis=1).astype(int)
    filled = (np.arange(t + 1)[None, :] <= lengths[:, None]).astype(np.int64)[..., None]
    actions = one_more_step(batch["actions"])
    return {"obs": torch.tensor(batch["obs"]), "state": torch.tensor(batch["state"]),
            "avail_actions": torch.tensor(batch["avail_actions"].astype(np.int64)),
            "actions": torch.tensor(actions[..., None]),
            "actions_onehot": torch.tensor(np.eye(n_actions)[actions]),
            "reward": torch.tensor(one_more_step(batch["reward"])[..., None]),
            "terminated": torch.tensor(one_more_step(batch["terminated"]).astype(np.int64)[..., None]),
            "filled": torch.tensor(filled)}


def torch_agents(learner, params):
    """Our agent parameters in RNNAgent modules: shared, one module; per-agent, one per agent."""
    c = learner.config
    fc1 = params["fc1.weight"]
    shared = fc1.ndim == 2
    agents = []
    for i in range(1 if shared else learner.n_agents):
        agent = RNNAgent(fc1.shape[-1], c.hidden_dim, learner.n_actions, c.use_rnn).double()
        agent.load_state_dict({k: torch.tensor(v if shared else v[i]) for k, v in params.items()})
        agents.append(agent)
    return agents


def torch_mixer(learner, params):
    c = learner.config
    if c.mixer == "none":
        return None
    if c.mixer == "vdn":
        return VDNMixer()
    mixer = QMixer(learner.n_agents, learner.state_dim, c.mixing_embed_dim, c.hypernet_layers,
                   c.hypernet_embed).double()
    mixer.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    return mixer


def our_grads_as_torch_order(learner, grads, agents, mixer):
    """Our gradients (before clipping) in the order of torch's parameter list."""
    ours = []
    for i, agent in enumerate(agents):
        for name, _ in agent.named_parameters():
            g = grads["agent"][name]
            ours.append(g if len(agents) == 1 else g[i])
    if mixer is not None:
        ours += [grads["mixer"][name] for name, _ in mixer.named_parameters()]
    return ours


@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
def test_gru_cell_is_torchs(grouped):
    """Our GRU cell's output and every gradient against torch.nn.GRUCell's autograd, per cell."""
    rng = np.random.default_rng(0)
    groups = 3 if grouped else 1
    x, h, upstream = rng.normal(size=(groups, 5, 4)), rng.normal(size=(groups, 5, 6)), rng.normal(size=(groups, 5, 6))
    params = q.init_gru_cell(rng, "rnn", 4, 6, groups if grouped else None)
    weights = {k.split(".")[1]: v for k, v in params.items()}
    out, cache = q.gru_cell_forward(x if grouped else x[0], h if grouped else h[0], **weights)
    dx, dh, grads = q.gru_cell_backward(upstream if grouped else upstream[0], cache)
    out, dx, dh = (a.reshape(groups, 5, -1) for a in (out, dx, dh))
    for g in range(groups):
        cell = nn.GRUCell(4, 6).double()
        cell.load_state_dict({k: torch.tensor(v[g] if grouped else v) for k, v in weights.items()})
        x_t, h_t = torch.tensor(x[g], requires_grad=True), torch.tensor(h[g], requires_grad=True)
        out_t = cell(x_t, h_t)
        (out_t * torch.tensor(upstream[g])).sum().backward()
        np.testing.assert_allclose(out[g], out_t.detach().numpy(), rtol=PARITY, atol=PARITY * 1e-2)
        np.testing.assert_allclose(dx[g], x_t.grad.numpy(), rtol=PARITY, atol=PARITY * 1e-2)
        np.testing.assert_allclose(dh[g], h_t.grad.numpy(), rtol=PARITY, atol=PARITY * 1e-2)
        for name, param in cell.named_parameters():
            ours = grads[name][g] if grouped else grads[name]
            np.testing.assert_allclose(ours, param.grad.numpy(), rtol=PARITY, atol=PARITY * 1e-2, err_msg=name)


@pytest.mark.parametrize("mixer,layers,shared,double_q,optimizer,clip,use_rnn", [
    ("qmix", 2, True, True, "adam", 100.0, False), ("qmix", 1, True, False, "rmsprop", 100.0, False),
    ("qmix", 2, False, True, "rmsprop", 0.5, False), ("qmix", 2, True, True, "adam", 0.5, False),
    ("vdn", 1, True, True, "adam", 100.0, False), ("none", 1, True, True, "rmsprop", 100.0, False),
    ("qmix", 2, True, True, "adam", 100.0, True), ("qmix", 1, True, False, "rmsprop", 100.0, True),
    ("qmix", 2, False, True, "rmsprop", 0.5, True), ("qmix", 2, True, True, "adam", 0.5, True),
    ("vdn", 1, False, True, "adam", 100.0, True), ("none", 1, True, True, "rmsprop", 100.0, True),
    ("qmix", 2, True, True, "adam", 100.0, "standardise_rewards"),
])
def test_three_steps_equal_pymarls_qlearner(mixer, layers, shared, double_q, optimizer, clip, use_rnn):
    standardise = use_rnn == "standardise_rewards"  # EPyMARL's, with the GRU agent
    learner = small_learner(mixer, hypernet_layers=layers, shared_agent=shared, double_q=double_q,
                            optimizer=optimizer, grad_norm_clip=clip, gamma=0.9, lr=0.01, use_rnn=bool(use_rnn),
                            standardise_rewards=standardise)
    learner.target_theta += np.random.default_rng(3).normal(scale=0.2, size=learner.theta.shape)
    batch = episode_batch(learner)
    c = learner.config
    args = {"gamma": c.gamma, "double_q": c.double_q, "obs_last_action": c.obs_last_action,
            "obs_agent_id": c.obs_agent_id, "rew_ms": RunningMeanStd() if standardise else None}
    agents, target_agents = torch_agents(learner, learner.params["agent"]), torch_agents(learner, learner.target_params["agent"])
    mixer_t, target_mixer_t = torch_mixer(learner, learner.params["mixer"]), torch_mixer(learner, learner.target_params["mixer"])
    mac, target_mac = MAC(agents, learner.n_agents, args), MAC(target_agents, learner.n_agents, args)
    params_t = mac.parameters() + (list(mixer_t.parameters()) if mixer_t is not None else [])
    if optimizer == "adam":
        opt = torch.optim.Adam(params_t, lr=c.lr, betas=c.adam_betas, eps=c.adam_eps)
    else:
        opt = torch.optim.RMSprop(params_t, lr=c.lr, alpha=c.optim_alpha, eps=c.optim_eps)
    batch_t = pymarl_batch(batch)

    clipped = False
    stats = q.RunningMeanStd()
    for step in range(3):
        if standardise:  # what Learner.train_step does
            stats = stats.updated(batch["reward"])
        ours = {**batch, "reward": stats.standardise(batch["reward"])} if standardise else batch
        loss, grads, _ = q.loss_and_grads(learner.params, learner.target_params, ours, c)
        grad = q.flat_grad(grads, learner.params)
        clipped |= q.clip_grad_norm(grad, c.grad_norm_clip) > c.grad_norm_clip
        learner.theta[...], state = learner.optimiser.step(learner.theta, grad)
        learner.optimiser.commit(state)

        opt.zero_grad()
        loss_t = pymarl_train_loss(mac, target_mac, mixer_t, target_mixer_t, batch_t, args)
        loss_t.backward()
        assert loss == pytest.approx(loss_t.item(), rel=PARITY, abs=0), f"step {step}: loss"
        for ours, param in zip(our_grads_as_torch_order(learner, grads, agents, mixer_t), params_t, strict=True):
            np.testing.assert_allclose(ours, param.grad.numpy(), rtol=PARITY, atol=PARITY * 1e-2)
        torch.nn.utils.clip_grad_norm_(params_t, c.grad_norm_clip)
        opt.step()
    assert clipped == (clip < 1.0), "the cases must cover clipping and no clipping"

    after = torch_agents(learner, learner.params["agent"])
    for ours, theirs in zip(after, agents):
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=PARITY, atol=PARITY * 1e-2,
                                       err_msg=f"agent {name}")
    if mixer_t is not None and mixer == "qmix":
        for name, b in mixer_t.named_parameters():
            np.testing.assert_allclose(learner.params["mixer"][name], b.detach().numpy(), rtol=PARITY,
                                       atol=PARITY * 1e-2, err_msg=f"mixer {name}")


# ------------------------------------------------------------------------------------------
# The bridge to EPyMARL's and pymarl's model files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer,use_rnn,optimizer", [("qmix", True, "adam"), ("qmix", False, "rmsprop"),
                                                      ("vdn", True, "adam"), ("none", True, "adam")])
def test_model_files_load_into_pymarls_modules_and_come_back_bit_for_bit(tmp_path, mixer, use_rnn, optimizer):
    """save_epymarl writes agent.th, mixer.th and opt.th in the folder layout of their runs; the
    files load into RNNAgent, QMixer and torch's optimiser with strict=True, and load_epymarl reads
    them back: parameters, targets and the optimiser's state equal to the last bit."""
    env_info = {"n_agents": 3, "n_actions": 4, "obs_shape": 5, "state_shape": 6, "episode_limit": 8}
    config = q.Config(mixer=mixer, use_rnn=use_rnn, optimizer=optimizer, hidden_dim=8, mixing_embed_dim=4,
                      hypernet_embed=5, batch_size=4, buffer_size=10)
    learner = q.Learner(config, env_info)
    rng = np.random.default_rng(3)
    for _ in range(4):
        learner.buffer.insert({"obs": rng.normal(size=(9, 3, 5)), "state": rng.normal(size=(9, 6)),
                               "avail_actions": np.ones((9, 3, 4), bool), "actions": rng.integers(0, 4, (8, 3)),
                               "reward": rng.normal(size=8), "terminated": np.arange(8) == 7})
    for _ in range(3):
        learner.train_step()
    learner.t_env = 1234
    step_folder = q.save_epymarl(learner, tmp_path / "models" / "qmix_np")
    assert step_folder == tmp_path / "models" / "qmix_np" / "1234"
    assert sorted(p.name for p in step_folder.iterdir()) == sorted(
        ["agent.th", "opt.th"] + (["mixer.th"] if mixer != "none" else []))

    agent = RNNAgent(5 + 4 + 3, 8, 4, use_rnn)
    agent.load_state_dict(torch.load(step_folder / "agent.th", weights_only=True), strict=True)
    parameters = list(agent.parameters())
    if mixer == "qmix":
        module = QMixer(3, 6, 4, config.hypernet_layers, 5)
        module.load_state_dict(torch.load(step_folder / "mixer.th", weights_only=True), strict=True)
        parameters += list(module.parameters())
    if mixer == "vdn":
        assert torch.load(step_folder / "mixer.th", weights_only=True) == {}  # VDNMixer has no parameters
    optimiser = (torch.optim.RMSprop if optimizer == "rmsprop" else torch.optim.Adam)(parameters, lr=config.lr)
    optimiser.load_state_dict(torch.load(step_folder / "opt.th", weights_only=True))
    assert all(float(s["step"]) == 3 for s in optimiser.state.values())

    back = q.load_epymarl(tmp_path / "models" / "qmix_np", config, env_info)
    np.testing.assert_array_equal(back.theta, learner.theta)
    np.testing.assert_array_equal(back.target_theta, learner.theta)  # their load_models copies the targets
    for key, value in learner.optimiser.state.items():
        np.testing.assert_array_equal(back.optimiser.state[key], value, err_msg=key)
    assert back.optimiser.t == 3


def test_model_files_of_another_shape_are_refused_naming_the_file(tmp_path):
    env_info = {"n_agents": 2, "n_actions": 3, "obs_shape": 4, "state_shape": 5, "episode_limit": 6}
    learner = q.Learner(q.Config(hidden_dim=8), env_info)
    q.save_epymarl(learner, tmp_path)
    with pytest.raises(ValueError, match="agent.th: 'fc1.weight' must be finite of shape \\(16, 9\\)"):
        q.load_epymarl(tmp_path, q.Config(hidden_dim=16), env_info)
    with pytest.raises(ValueError, match="neither agent.th nor numbered step folders"):
        q.load_epymarl(tmp_path / "0" / "agent.th", q.Config(hidden_dim=8), env_info)
