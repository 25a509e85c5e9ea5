"""The environments in envs.py, and what train/evaluate accept from an environment of your own."""
import dataclasses
import warnings

import numpy as np
import pytest

import envs
import qmix_np as q

# ------------------------------------------------------------------------------------------
# The two-step game
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
    learner = q.train(envs.MeetingGridworld(max_steps=3), q.Config(t_max=30, batch_size=64, buffer_size=64))
    stored = learner.buffer.data
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



# ------------------------------------------------------------------------------------------
# The memory task
# ------------------------------------------------------------------------------------------


def test_cue_recall_rules():
    """The cue is seen at t = 0 only; only 'wait' is available until the answer step, where only
    the answers are; the team scores 1 when every agent names its own cue."""
    env = envs.CueRecall(n_agents=2, n_cues=3, delay=2)
    assert env.get_env_info() == {"state_shape": 7, "obs_shape": 4, "n_actions": 4, "n_agents": 2,
                                  "episode_limit": 4}
    for answers_right in (True, False):
        env.reset(seed=1)
        cues = env.cues.copy()
        np.testing.assert_array_equal(env.get_obs()[:, :3], np.eye(3)[cues])
        for t in range(3):
            if t > 0:
                np.testing.assert_array_equal(env.get_obs(), 0)  # blank during the delay
            np.testing.assert_array_equal(env.get_avail_actions(), [[1, 0, 0, 0]] * 2)
            assert env.step([0, 0]) == (0.0, False, {"episode_limit": False})
        np.testing.assert_array_equal(env.get_obs(), [[0, 0, 0, 1]] * 2)  # answer now, no cue
        np.testing.assert_array_equal(env.get_avail_actions(), [[0, 1, 1, 1]] * 2)
        np.testing.assert_array_equal(env.get_state()[:6], np.eye(3)[cues].ravel())
        answers = cues + 1 if answers_right else np.array([cues[0] + 1, (cues[1] + 1) % 3 + 1])
        assert env.step(answers) == (float(answers_right), True, {"episode_limit": False})
    with pytest.raises(ValueError):
        envs.CueRecall(delay=1).step([1, 1])  # answering before the answer step: not available


def test_cue_recall_memoryless_bound_by_enumeration():
    """A memoryless agent sees the same thing at the answer step whatever its cue, so its answer
    is fixed; over every cue combination and every fixed answer, the team's success rate is at
    most (1 / n_cues) ** n_agents, and remembering the cue gets 1."""
    env = envs.CueRecall(n_agents=2, n_cues=3)
    combinations = list(np.ndindex(3, 3))
    best = max(np.mean([cues == answers for cues in combinations]) for answers in combinations)
    assert best == pytest.approx(env.memoryless_bound()) == pytest.approx(1 / 9)


@pytest.mark.parametrize("kwargs,message", [({"n_cues": 1}, "n_cues must be an int >= 2"),
                                            ({"delay": -1}, "delay must be an int >= 0"),
                                            ({"n_agents": 1.5}, "n_agents must be an int >= 1")])
def test_cue_recall_says_clearly_when_it_cannot_be_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        envs.CueRecall(**kwargs)


def test_the_gru_agent_learns_to_remember_and_the_feed_forward_one_cannot():
    """One agent, two cues, one blank step: the MLP stays at the memoryless bound (50%)."""
    env = envs.CueRecall(n_agents=1, n_cues=2, delay=1)
    rates = {}
    for use_rnn in (True, False):
        config = q.Config(use_rnn=use_rnn, t_max=6000, epsilon_anneal_time=3000, buffer_size=200,
                          target_update_interval=20, lr=1e-3, hidden_dim=32, seed=0)
        rates[use_rnn] = q.evaluate(env, q.train(env, config), 200, seed=10**6)["mean_return"]
    assert rates[True] == 1.0 and rates[False] <= 0.6, rates


# ------------------------------------------------------------------------------------------
# Your own environment: the time limit, and what is refused
# ------------------------------------------------------------------------------------------


class Corridor(envs.MultiAgentEnv):
    """One agent that never terminates by itself: the episode stops at the time limit, flagged
    as pymarl's envs flag it (`info`: what step() returns in its third place at the limit)."""
    n_agents, n_actions, episode_limit = 1, 2, 3

    def __init__(self, info_at_limit=None, terminate_at_limit=True):
        self.info_at_limit = {"episode_limit": True} if info_at_limit is None else info_at_limit
        self.terminate_at_limit = terminate_at_limit
        self.reset()

    def reset(self, seed=None):
        self.t = 0

    def step(self, actions):
        self.t += 1
        at_limit = self.t >= 3
        return 1.0, at_limit and self.terminate_at_limit, self.info_at_limit if at_limit else {}

    def get_obs(self):
        return np.full((1, 1), self.t, dtype=float)

    def get_state(self):
        return np.full(1, self.t, dtype=float)

    def get_avail_actions(self):
        return np.ones((1, 2))


def test_time_limit_is_not_stored_as_terminal():
    learner = q.train(Corridor(), q.Config(mixer="vdn", t_max=3, batch_size=1, buffer_size=2))
    np.testing.assert_array_equal(learner.buffer.data["terminated"][0], [0, 0, 0])
    np.testing.assert_array_equal(learner.buffer.data["filled"][0], [1, 1, 1])
    assert q.evaluate(Corridor(), learner, 2, seed=0)["success_rate"] == 0.0


def test_an_unflagged_time_limit_warns_once_and_is_treated_as_terminal():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter: a warning once per place
        learner = q.train(Corridor(info_at_limit={}), q.Config(mixer="vdn", t_max=9, batch_size=1, buffer_size=5))
    assert learner.episode == 3 and len(caught) == 1
    assert "treated as terminal" in str(caught[0].message) and caught[0].category is UserWarning
    np.testing.assert_array_equal(learner.buffer.data["terminated"][0], [0, 0, 1])


def test_an_episode_limit_flag_that_is_not_a_bool_is_refused():
    with pytest.raises(TypeError, match="info\\['episode_limit'\\] from env.step\\(\\) must be a bool, got 'yes'"):
        q.train(Corridor(info_at_limit={"episode_limit": "yes"}), q.Config(mixer="vdn", t_max=3, batch_size=1, buffer_size=2))


def test_a_flagged_time_limit_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.train(Corridor(), q.Config(mixer="vdn", t_max=9, batch_size=1, buffer_size=5))


def test_an_episode_past_its_limit_is_refused_and_nothing_is_stored():
    learner = q.Learner(q.Config(mixer="vdn", batch_size=1, buffer_size=5), Corridor().get_env_info())
    with pytest.raises(ValueError, match="ran past its episode_limit \\(3 steps"):
        q.train(Corridor(terminate_at_limit=False), q.Config(mixer="vdn", t_max=9, batch_size=1, buffer_size=5),
                learner=learner)
    assert len(learner.buffer) == 0 and learner.t_env == 0 and learner.episode == 0


class NotAnEnv:
    """Has step and reset, as a Gymnasium or PettingZoo env does, but not pymarl's other methods."""
    possible_agents = ["a", "b"]

    def reset(self, seed=None):
        return {}, {}

    def step(self, actions):
        return {}, {}, {}, {}, {}


class GymnasiumStyle(Corridor):
    def step(self, actions):
        reward, terminated, info = super().step(actions)
        return np.zeros((1, 1)), reward, terminated, False, info


class BadStep(Corridor):
    def __init__(self, result):
        self.result = result
        super().__init__()

    def step(self, actions):
        return self.result


class WrongObsShape(Corridor):
    """get_obs is right; get_env_info claims two observation features."""

    def get_env_info(self):
        return {**super().get_env_info(), "obs_shape": 2}


@pytest.mark.parametrize("env,error,words", [
    (NotAnEnv(), TypeError, "env lacks ['get_obs', 'get_state', 'get_avail_actions', 'get_env_info']"),
    (GymnasiumStyle(), ValueError, "must return (reward, terminated, info)"),
    (BadStep((1.0, False)), ValueError, "got a tuple of 2"),
    (BadStep((1.0, False, None)), TypeError, "info from env.step() must be a dict"),
    (BadStep((1.0, "False", {})), TypeError, "terminated from env.step() must be a bool"),
    (BadStep((float("nan"), False, {})), ValueError, "the reward from env.step() must be finite"),
    (BadStep((1.0, 0, {})), TypeError, "terminated from env.step() must be a bool (True or False), got int 0"),
    (BadStep(([0.5, 0.5], False, {})), ValueError, "must be one number, the team's, got shape (2,): pymarl's "
                                                   "interface has one reward per step (sum the agents')"),
    (WrongObsShape(), ValueError, "env.get_obs() (shaped by get_env_info()'s n_agents, obs_shape) must have "
                                  "shape (1, 2), got (1, 1)"),
])
def test_an_env_that_breaks_the_interface_gets_a_clear_message(env, error, words):
    with pytest.raises(error) as caught:
        q.train(env, q.Config(mixer="vdn", t_max=9, batch_size=1, buffer_size=5))
    assert words in str(caught.value)
    if isinstance(env, NotAnEnv):
        assert "envs.PettingZooEnv(env)" in str(caught.value) and "reset, step, get_obs" in str(caught.value)
    if isinstance(env, GymnasiumStyle):
        assert "Gymnasium-style" in str(caught.value)


def test_a_learner_for_another_env_or_config_is_refused_naming_what_differs():
    config = q.Config(mixer="vdn", t_max=3, batch_size=1, buffer_size=2)
    learner = q.train(Corridor(), config)
    longer = type("LongerCorridor", (Corridor,), {"episode_limit": 10})()
    for call in (lambda: q.train(longer, config, learner=learner), lambda: q.evaluate(longer, learner, 1, 0)):
        with pytest.raises(ValueError, match="built for another environment: episode_limit 3 in learner.env_info, "
                                             "10 in env.get_env_info()"):
            call()
    with pytest.raises(ValueError, match="except for t_max; it differs in \\['gamma', 'lr'\\]"):
        q.train(Corridor(), dataclasses.replace(config, lr=1e-3, gamma=0.9), learner=learner)
    with pytest.raises(TypeError, match="learner must be a Learner, got str"):
        q.train(Corridor(), config, learner="learner")


# ------------------------------------------------------------------------------------------
# PettingZoo: the adapter, against a fake ParallelEnv (PettingZoo itself is optional)
# ------------------------------------------------------------------------------------------


class Discrete:
    def __init__(self, n):
        self.n = n


class Box:
    def __init__(self, shape):
        self.shape = shape


class FakeParallelEnv:
    """The ParallelEnv API, small: agents "b" (3 actions) and "a" (2), listed b first; each
    observes [its index, t, the seed]; the team moves on a counter that ends the episode
    (every agent terminated) when it reaches 3, or truncates at max_cycles. Rewards: b gets 1,
    a gets 3 per step. Action masks come in the infos: b may never take action 2."""

    possible_agents = ["b", "a"]

    def __init__(self, max_cycles=5, obs_sizes=(3, 3), leave_at=None, state=True):
        self.max_cycles, self.sizes, self.leave_at = max_cycles, dict(zip(self.possible_agents, obs_sizes)), leave_at
        if not state:
            self.state = None

    def action_space(self, agent):
        return Discrete({"b": 3, "a": 2}[agent])

    def observation_space(self, agent):
        return Box((self.sizes[agent],))

    def _observe(self):
        return ({agent: np.array([i, self.t, self.seed, 0.0][:self.sizes[agent]]) for i, agent in enumerate(self.agents)},
                {agent: {"action_mask": np.array([1, 1, 0]) if agent == "b" else np.array([1, 1])} for agent in self.agents})

    def reset(self, seed=None):
        self.agents, self.t, self.counter, self.seed = list(self.possible_agents), 0, 0, -1 if seed is None else seed
        return self._observe()

    def step(self, actions):
        self.t += 1
        self.counter += actions["a"]  # agent a's action 1 moves the team on
        done = self.counter >= 3
        truncated = self.t >= self.max_cycles and not done
        if self.leave_at == self.t:
            self.agents = ["b"]
        observations, infos = self._observe()
        rewards = {agent: {"b": 1.0, "a": 3.0}[agent] for agent in self.agents}
        terminations = {agent: done for agent in self.agents}
        truncations = {agent: truncated for agent in self.agents}
        return observations, rewards, terminations, truncations, infos

    def state(self):
        return np.array([self.t, self.counter, 7.0])


def test_pettingzoo_adapter_gives_pymarls_interface():
    env = envs.PettingZooEnv(FakeParallelEnv())
    assert env.get_env_info() == {"state_shape": 3, "obs_shape": 3, "n_actions": 3, "n_agents": 2,
                                  "episode_limit": 5, "state_source": "env.state()"}
    obs, state = env.reset(seed=11)
    np.testing.assert_array_equal(obs, [[0, 0, 11], [1, 0, 11]])  # possible_agents' order: b, then a
    np.testing.assert_array_equal(state, [0, 0, 7])
    np.testing.assert_array_equal(env.get_avail_actions(), [[1, 1, 0], [1, 1, 0]])  # b's mask; a has 2 actions
    assert env.step([0, 1]) == (4.0, False, {"episode_limit": False})  # the sum of the rewards
    assert env.step([1, 1]) == (4.0, False, {"episode_limit": False})
    assert env.step([0, 1]) == (4.0, True, {"episode_limit": False})  # every agent terminated
    with pytest.raises(ValueError, match="unavailable"):
        envs.PettingZooEnv(FakeParallelEnv()).step([2, 0])  # b's mask forbids action 2
    with pytest.raises(ValueError, match="unavailable"):
        envs.PettingZooEnv(FakeParallelEnv()).step([0, 2])  # a has only 2 actions


def test_pettingzoo_truncation_is_a_time_limit_not_a_terminal_state():
    env = envs.PettingZooEnv(FakeParallelEnv(max_cycles=2), reward="mean")
    assert env.step([0, 0]) == (2.0, False, {"episode_limit": False})  # the mean of the rewards
    assert env.step([0, 0]) == (2.0, True, {"episode_limit": True})
    limited = envs.PettingZooEnv(FakeParallelEnv(max_cycles=50), episode_limit=1)  # the argument wins
    assert limited.episode_limit == 1 and limited.step([0, 0])[1:] == (True, {"episode_limit": True})


def test_pettingzoo_truncation_can_be_terminal_as_epymarl_stores_it():
    env = envs.PettingZooEnv(FakeParallelEnv(max_cycles=2), truncation="terminal")
    assert env.step([0, 0])[1:] == (False, {"episode_limit": False})
    assert env.step([0, 0])[1:] == (True, {"episode_limit": False})  # stored with terminated 1: no bootstrap
    with pytest.raises(ValueError, match="truncation must be 'episode_limit' or 'terminal', got 'bootstrap'"):
        envs.PettingZooEnv(FakeParallelEnv(), truncation="bootstrap")


def test_pettingzoo_without_a_state_uses_the_observations():
    env = envs.PettingZooEnv(FakeParallelEnv(state=False))
    assert env.get_env_info()["state_source"] == "the observations, concatenated"
    np.testing.assert_array_equal(env.get_state(), [0, 0, -1, 1, 0, -1])


class OneTerminates(FakeParallelEnv):
    def step(self, actions):
        observations, rewards, terminations, truncations, infos = super().step(actions)
        return observations, rewards, {**terminations, "a": True}, truncations, infos


@pytest.mark.parametrize("make,message", [
    (lambda: envs.PettingZooEnv(FakeParallelEnv(obs_sizes=(3, 4))), "observation sizes differ"),
    (lambda: envs.PettingZooEnv(OneTerminates()).step([0, 0]), "\\['a'\\] terminated while others play on"),
    (lambda: envs.PettingZooEnv(FakeParallelEnv(), reward="max"), "reward must be 'sum' or 'mean'"),
    (lambda: envs.PettingZooEnv(FakeParallelEnv(leave_at=1)).step([0, 0]), "observations lack agent\\(s\\) \\['a'\\]: QMIX needs a fixed team"),
    (lambda: envs.PettingZooEnv(FakeParallelEnv(max_cycles=None)), "pass episode_limit="),
])
def test_pettingzoo_adapter_refuses_what_qmix_cannot_use(make, message):
    with pytest.raises(ValueError, match=message):
        make()


class Changed(FakeParallelEnv):
    """FakeParallelEnv with one thing changed: `change(name, value)` edits what reset or step returns."""

    def __init__(self, change, **kwargs):
        self.change = change
        super().__init__(**kwargs)

    def reset(self, seed=None):
        return self.change("reset", super().reset(seed))

    def step(self, actions):
        return self.change("step", super().step(actions))


def edit(method, index, make):
    """A change to item `index` of what `method` returns, made by make(old value)."""
    def change(name, result):
        if name != method:
            return result
        result = list(result)
        result[index] = make(result[index])
        return tuple(result)
    return change


class AecLike(FakeParallelEnv):
    def agent_iter(self):
        return iter(self.possible_agents)


class BoxActions(FakeParallelEnv):
    def action_space(self, agent):
        return Box((2,))


@pytest.mark.parametrize("make,error,message", [
    (lambda: envs.PettingZooEnv(BoxActions()), ValueError, "agent 'b' has the action space .* QMIX needs discrete actions"),
    (lambda: envs.PettingZooEnv(AecLike()), TypeError, "a PettingZoo AEC env .*aec_to_parallel"),
    (lambda: envs.PettingZooEnv(Changed(lambda name, r: r[0] if name == "reset" else r)), TypeError,
     "must return \\(observations, infos\\)"),
    (lambda: envs.PettingZooEnv(Changed(lambda name, r: r[:4] if name == "step" else r)).step([0, 0]), TypeError,
     "must return \\(observations, rewards, terminations, truncations, infos\\)"),
    (lambda: envs.PettingZooEnv(Changed(edit("reset", 0, lambda o: {"b": o["b"]}))), ValueError,
     "env.reset\\(\\)'s observations lack agent\\(s\\) \\['a'\\]"),
    (lambda: envs.PettingZooEnv(Changed(edit("step", 2, lambda t: {"b": t["b"]}))).step([0, 0]), ValueError,
     "terminations lack agent\\(s\\) \\['a'\\]"),
    (lambda: envs.PettingZooEnv(Changed(edit("step", 1, lambda r: {**r, "c": 1.0}))).step([0, 0]), ValueError,
     "rewards have agent\\(s\\) \\['c'\\] not in possible_agents"),
    (lambda: envs.PettingZooEnv(Changed(edit("step", 4, lambda i: None))).step([0, 0]), TypeError,
     "infos must be a dict of the agents' infos, got NoneType"),
    (lambda: envs.PettingZooEnv(Changed(edit("reset", 0, lambda o: {k: {"obs": v} for k, v in o.items()}))), ValueError,
     "agent 'b'.s observation is a dict without 'observation'"),
    (lambda: envs.PettingZooEnv(Changed(edit("step", 1, lambda r: {**r, "a": None}))).step([0, 0]), TypeError,
     "agent 'a'.s reward must be a number, got NoneType None"),
    (lambda: envs.PettingZooEnv(Changed(edit("step", 1, lambda r: {**r, "a": "1.5"}))).step([0, 0]), TypeError,
     "agent 'a'.s reward must be a number, got str '1.5'"),
    (lambda: envs.PettingZooEnv(Changed(edit("step", 1, lambda r: {**r, "a": np.ones(2)}))).step([0, 0]), TypeError,
     "agent 'a'.s reward must be a number, got ndarray"),
    (lambda: envs.PettingZooEnv(Changed(edit("reset", 1, lambda i: {**i, "b": {"action_mask": np.array([1])}}))),
     ValueError, "agent 'b'.s action_mask has shape \\(1,\\), but its action space has 3 actions"),
    (lambda: envs.PettingZooEnv(Changed(edit("reset", 1, lambda i: {**i, "b": {"action_mask": np.array(1)}}))),
     ValueError, "agent 'b'.s action_mask has shape \\(\\), but its action space has 3 actions"),
])
def test_pettingzoo_adapter_names_what_breaks_the_parallel_api(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_an_aec_env_passed_to_train_is_told_to_become_parallel_first():
    class Aec:
        possible_agents = ["a"]

        def agent_iter(self):
            return iter(self.possible_agents)

    with pytest.raises(TypeError, match="a PettingZoo AEC env: make it parallel .*then wrap it as envs.PettingZooEnv"):
        q.train(Aec(), q.Config())


def test_pettingzoo_env_trains_and_evaluates_and_reset_seeds_pass_through():
    env = envs.PettingZooEnv(FakeParallelEnv(max_cycles=6))
    learner = q.train(env, q.Config(t_max=200, batch_size=4, buffer_size=20, hidden_dim=8))
    assert learner.t_env >= 200 and learner.train_steps > 0
    seeds = {int(s) for s in learner.buffer.data["obs"][:len(learner.buffer), 0, 0, 2]}
    assert len(seeds) > 1 and -1 not in seeds  # train() seeded every reset
    result = q.evaluate(env, learner, 3, seed=100)
    assert result["episodes"] == 3


def test_a_real_simple_spread_episode_trains_and_evaluates():
    """Needs pip install pettingzoo mpe2 (never a dependency); skipped without them."""
    simple_spread_v3 = pytest.importorskip("mpe2.simple_spread_v3")
    env = envs.PettingZooEnv(simple_spread_v3.parallel_env(N=3, local_ratio=0, max_cycles=25,
                                                           continuous_actions=False))
    assert env.get_env_info() == {"state_shape": 54, "obs_shape": 18, "n_actions": 5, "n_agents": 3,
                                  "episode_limit": 25, "state_source": "env.state()"}
    learner = q.train(env, q.Config(t_max=100, batch_size=2, buffer_size=10, hidden_dim=8))
    assert learner.episode == 4 and learner.train_steps == 3  # every episode runs its 25 steps
    result = q.evaluate(env, learner, 2, seed=0)
    assert result["success_rate"] == 0.0 and result["mean_length"] == 25  # spread never terminates
