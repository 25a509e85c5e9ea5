"""Environments behind pymarl's MultiAgentEnv interface.

Anything written for that interface (pymarl's runners, SMAC-style code, `qmix_np.train`) drives
these, and `qmix_np.train` drives anything that implements it:

    reset() -> (obs, state)           step(actions) -> (reward, terminated, info)
    get_obs() (N, O)                  get_state() (S,)
    get_avail_actions() (N, A) 0/1    get_env_info() -> state_shape, obs_shape, n_actions,
                                                          n_agents, episode_limit
info["episode_limit"] is True when the episode stopped at the time limit (not a terminal state).
Our environments give the availability mask as a bool array (pymarl's give lists of 0/1 ints;
qmix_np takes either). They also take reset(seed=...), so an episode can be replayed exactly.

- TwoStepGame: the coordination game of the QMIX paper (Rashid et al. 2018, section 6.1).
- MeetingGridworld: agents on a grid must all stand on one goal cell at the same time.
- CueRecall: each agent must name, at the end, a cue it saw only at the start (needs memory).
- PettingZooEnv: this interface over any PettingZoo ParallelEnv with discrete actions (MPE, ...).
"""
from __future__ import annotations

import numpy as np

from qmix_np import check_actions


class MultiAgentEnv:
    """pymarl's interface; subclasses define reset, step, get_obs, get_state, get_avail_actions
    and the attributes n_agents, n_actions, episode_limit."""

    n_agents: int
    n_actions: int
    episode_limit: int

    def get_obs_agent(self, agent_id):
        return self.get_obs()[agent_id]

    def get_obs_size(self):
        return self.get_obs().shape[-1]

    def get_state_size(self):
        return self.get_state().shape[-1]

    def get_avail_agent_actions(self, agent_id):
        return self.get_avail_actions()[agent_id]

    def get_total_actions(self):
        return self.n_actions

    def get_env_info(self):
        return {"state_shape": self.get_state_size(), "obs_shape": self.get_obs_size(),
                "n_actions": self.n_actions, "n_agents": self.n_agents,
                "episode_limit": self.episode_limit}

    def render(self):
        raise NotImplementedError

    def close(self):
        pass

    def save_replay(self):
        pass

    def _check_actions(self, actions):
        """The actions (N,) as integers, each in range and available, or a ValueError."""
        return check_actions("actions", actions, self.get_avail_actions().astype(bool, copy=False))

    def _begin_step(self, actions):
        """step()'s actions, checked; a step after the episode has ended is refused."""
        if self.done:
            raise RuntimeError("the episode is over: call reset() first")
        return self._check_actions(actions)

    @staticmethod
    def _check_sizes(*rules):
        """Each rule (name, value, low): value must be an int >= low."""
        for name, value, low in rules:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class TwoStepGame(MultiAgentEnv):
    """Two agents, two actions (A = 0, B = 1), two steps, reward only at the second step.

    State 1: agent 1's action picks the next state (A -> 2A, B -> 2B); agent 2's does nothing.
    State 2A pays `payoff_2a` (7) whatever the agents do; state 2B pays payoff_2b[a1][a2],
    by default the paper's [[0, 1], [1, 8]]. The optimum is 8 (B, then B, B).
    Each agent observes a one-hot of the current state (1, 2A, 2B), which is also the global
    state; after the episode ends both are all-zero. Both actions are always available.
    """

    n_agents, n_actions, episode_limit = 2, 2, 2
    STATE_NAMES = ("1", "2A", "2B")

    def __init__(self, payoff_2b=((0.0, 1.0), (1.0, 8.0)), payoff_2a=7.0):
        self.payoff_2b = np.asarray(payoff_2b, dtype=np.float64)
        if self.payoff_2b.shape != (2, 2) or not np.all(np.isfinite(self.payoff_2b)):
            raise ValueError(f"payoff_2b must be a finite 2x2 table, got {payoff_2b!r}")
        if not np.isfinite(payoff_2a):
            raise ValueError(f"payoff_2a must be finite, got {payoff_2a!r}")
        self.payoff_2a = float(payoff_2a)
        self.reset()

    def reset(self, seed=None):
        """Start in state 1. The game is deterministic: `seed` is accepted and unused."""
        self.current = 0  # index into STATE_NAMES, None once the episode is over
        return self.get_obs(), self.get_state()

    def step(self, actions):
        if self.current is None:
            raise RuntimeError("the episode is over: call reset() first")
        a1, a2 = self._check_actions(actions)
        if self.current == 0:
            self.current = 1 if a1 == 0 else 2
            return 0.0, False, {"episode_limit": False}
        reward = self.payoff_2a if self.current == 1 else float(self.payoff_2b[a1, a2])
        self.current = None
        return reward, True, {"episode_limit": False}

    def get_state(self):
        state = np.zeros(len(self.STATE_NAMES))
        if self.current is not None:
            state[self.current] = 1.0
        return state

    def get_obs(self):
        return np.tile(self.get_state(), (self.n_agents, 1))  # (2, 3)

    def get_avail_actions(self):
        return np.ones((self.n_agents, self.n_actions), dtype=bool)

    def situation(self, name):
        """How an episode reaches state `name` ("1", "2A" or "2B"): the observations so far
        (t + 1, N, O), the state now (S,) and the actions taken (t, N), None at t = 0; as
        qmix_np.joint_q_tot takes them, to print a Q_tot table."""
        one_hots = np.eye(len(self.STATE_NAMES))
        state = one_hots[self.STATE_NAMES.index(name)]
        obs = np.tile(state, (self.n_agents, 1))  # (N, O)
        if name == "1":
            return obs[None], state, None
        first = np.tile(one_hots[0], (self.n_agents, 1))
        action = self.STATE_NAMES.index(name) - 1  # agent 1's action picks the state; agent 2's does not matter
        return np.stack([first, obs]), state, np.full((1, self.n_agents), action)


class MeetingGridworld(MultiAgentEnv):
    """n_agents on a grid_size x grid_size grid must all stand on the goal cell at once.

    Actions: 0 up (x - 1), 1 down (x + 1), 2 left (y - 1), 3 right (y + 1), 4 stay, all always
    available. Agents move simultaneously, are clipped at the walls and may share a cell.
    Reset puts the agents and the goal on n_agents + 1 distinct random cells. Reward: +10 and
    termination when every agent stands on the goal; otherwise -0.01 per step. After max_steps
    steps the episode stops with info["episode_limit"] True (a time limit, not a terminal state).

    Observation of agent i: [x_i, y_i, goal_x, goal_y], then (observe_others=True) the other
    agents' [x, y] in agent order; global state: every agent's [x, y], then the goal's. All
    coordinates are divided by grid_size, so they lie in [0, 1).

    reset(seed) replays an episode exactly; reset() draws from a Generator seeded at construction.
    """

    MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]])  # (5, 2): up, down, left, right, stay
    n_actions = 5

    def __init__(self, grid_size=5, n_agents=2, max_steps=50, observe_others=False, seed=0):
        self._check_sizes(("grid_size", grid_size, 2), ("n_agents", n_agents, 1), ("max_steps", max_steps, 1))
        if grid_size**2 < n_agents + 1:
            raise ValueError(f"a {grid_size}x{grid_size} grid has {grid_size**2} cells, too few for "
                             f"{n_agents} agents and a goal on distinct cells (needs {n_agents + 1})")
        self.grid_size, self.n_agents, self.episode_limit = grid_size, n_agents, max_steps
        self.observe_others = bool(observe_others)
        # others[i] = the other agents in agent order: (N, N - 1), made once, used every step
        self.others = np.array([[j for j in range(n_agents) if j != i] for i in range(n_agents)],
                               dtype=np.int64).reshape(n_agents, n_agents - 1)
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self, seed=None):
        rng = self.rng if seed is None else np.random.default_rng(seed)
        cells = rng.choice(self.grid_size**2, size=self.n_agents + 1, replace=False)
        xy = np.stack(np.divmod(cells, self.grid_size), axis=1)  # (N + 1, 2)
        self.positions, self.goal = xy[:-1].copy(), xy[-1].copy()  # (N, 2), (2,)
        self.steps, self.done = 0, False
        return self.get_obs(), self.get_state()

    def step(self, actions):
        actions = self._begin_step(actions)
        moved = self.positions + self.MOVES[actions]
        self.positions = np.minimum(np.maximum(moved, 0), self.grid_size - 1)  # clipped at the walls
        self.steps += 1
        if (self.positions == self.goal).all():
            self.done = True
            return 10.0, True, {"episode_limit": False}
        self.done = self.steps >= self.episode_limit
        return -0.01, self.done, {"episode_limit": self.done}

    def optimal_length(self):
        """Fewest steps from the current positions: the farthest agent's Manhattan distance to
        the goal (an agent that arrives early can stay)."""
        return int(np.abs(self.positions - self.goal).sum(axis=1).max())

    def get_obs(self):
        n = self.n_agents
        own_and_goal = np.concatenate([self.positions, self.goal[None].repeat(n, axis=0)], axis=1)  # (N, 4)
        if self.observe_others:
            others = self.positions[self.others].reshape(n, -1)  # (N, 2 (N - 1))
            own_and_goal = np.concatenate([own_and_goal, others], axis=1)
        return own_and_goal / self.grid_size

    def get_state(self):
        return np.concatenate([self.positions.ravel(), self.goal]) / self.grid_size

    def get_avail_actions(self):
        return np.ones((self.n_agents, self.n_actions), dtype=bool)


class CueRecall(MultiAgentEnv):
    """A task that needs memory: each agent sees a cue once, at the first step, and must name it
    at the last step; the team scores only if every agent names its own cue.

    At t = 0 each agent i observes its private cue c_i, drawn uniformly from n_cues values. For
    the next `delay` steps it observes nothing and can only wait. At the last step (t = delay + 1)
    it is told to answer and can only answer: action 1 + k names cue k. Reward 1 and the episode
    ends if every agent named its cue, else reward 0 and it ends too; the return is 1 or 0.
    Action 0 (wait) is the only action available before the last step, so the previous action,
    which pymarl feeds back to the agent, carries nothing about the cue.

    Observation of agent i: [one-hot of c_i (zeros after t = 0), 1 at the answer step]. Global
    state: every agent's cue one-hot, then t / episode_limit (the mixer may see the cues; the
    agents act on their own observations only).

    The best memoryless agent: an agent whose action depends only on its current observation
    sees the same thing at the answer step whatever its cue, so its answer is independent of
    the cue and right with probability 1 / n_cues. The agents' cues are independent, so its
    expected return (the team's success rate) is at most (1 / n_cues) ** n_agents: 1/9 with
    the defaults. An agent with memory can reach 1.
    """

    def __init__(self, n_agents=2, n_cues=3, delay=4, seed=0):
        self._check_sizes(("n_agents", n_agents, 1), ("n_cues", n_cues, 2), ("delay", delay, 0))
        self.n_agents, self.n_cues, self.delay = n_agents, n_cues, delay
        self.n_actions, self.episode_limit = n_cues + 1, delay + 2
        self.rng = np.random.default_rng(seed)
        self.reset()

    def memoryless_bound(self):
        """The best expected return of agents that act on their current observation only."""
        return (1 / self.n_cues) ** self.n_agents

    def reset(self, seed=None):
        rng = self.rng if seed is None else np.random.default_rng(seed)
        self.cues = rng.integers(self.n_cues, size=self.n_agents)  # (N,)
        self.steps, self.done = 0, False
        return self.get_obs(), self.get_state()

    def step(self, actions):
        actions = self._begin_step(actions)
        self.steps += 1
        if self.steps < self.episode_limit:
            return 0.0, False, {"episode_limit": False}
        self.done = True
        return float(np.all(actions == self.cues + 1)), True, {"episode_limit": False}

    def answer_step(self):
        return self.steps == self.episode_limit - 1

    def get_obs(self):
        obs = np.zeros((self.n_agents, self.n_cues + 1))
        if self.steps == 0:
            obs[np.arange(self.n_agents), self.cues] = 1.0
        obs[:, -1] = float(self.answer_step())
        return obs

    def get_state(self):
        return np.concatenate([np.eye(self.n_cues)[self.cues].ravel(), [self.steps / self.episode_limit]])

    def get_avail_actions(self):
        avail = np.zeros((self.n_agents, self.n_actions), dtype=bool)
        if self.answer_step():
            avail[:, 1:] = True
        else:
            avail[:, 0] = True
        return avail


class PettingZooEnv(MultiAgentEnv):
    """pymarl's interface over a PettingZoo ParallelEnv with discrete actions:

        env = PettingZooEnv(simple_spread_v3.parallel_env(N=3, local_ratio=0, max_cycles=25))

    It works on any object with the ParallelEnv API (possible_agents, reset(seed) -> (obs,
    infos), step(actions) -> (obs, rewards, terminations, truncations, infos), action_space(agent),
    observation_space(agent), optionally state()); PettingZoo itself is never imported here.

    - Agents in the fixed order of possible_agents; observations stacked (N, O), as float.
      Agents' observation sizes must agree (one network, or N of the same shape, reads them).
    - The global state: env.state() where the env has one, else the observations concatenated
      (get_env_info()["state_source"] says which).
    - Available actions: an agent's "action_mask", from its observation (a dict with
      "observation" and "action_mask") or its info, else all. Agents with fewer actions than
      the largest action space get the rest marked unavailable.
    - The team reward: the sum of the agents' rewards, or their mean (reward="mean").
    - terminated when every agent terminated; a truncation, or reaching episode_limit, ends the
      episode with info["episode_limit"] True (a time limit, bootstrapped as pymarl does for SMAC),
      or with truncation="terminal" as a terminal step (EPyMARL's gym and PettingZoo wrappers:
      their runner stores `terminated or truncated` as terminal).
    - episode_limit: the argument, else the env's max_cycles (MPE's name) or episode_limit.
    - QMIX needs a fixed team: an agent that terminates or leaves while others play on is refused.
    """

    def __init__(self, env, episode_limit=None, reward="sum", truncation="episode_limit"):
        if reward not in ("sum", "mean"):
            raise ValueError(f"reward must be 'sum' or 'mean', got {reward!r}")
        if truncation not in ("episode_limit", "terminal"):
            raise ValueError(f"truncation must be 'episode_limit' or 'terminal', got {truncation!r}")
        if callable(getattr(env, "agent_iter", None)):
            raise TypeError("this is a PettingZoo AEC env (agents take turns); make it parallel first, with "
                            "its parallel_env() or pettingzoo.utils.aec_to_parallel(env)")
        self.env, self.reward, self.truncation = env, reward, truncation
        self.agents = list(env.possible_agents)
        self.n_agents = len(self.agents)
        limit = episode_limit if episode_limit is not None else self._declared_limit(env)
        self._check_sizes(("episode_limit", limit, 1))
        self.episode_limit = int(limit)
        self.agent_actions = [self._discrete_actions(env, agent) for agent in self.agents]  # Discrete(n) each
        self.n_actions = max(self.agent_actions)
        sizes = {agent: int(np.prod(self._observation_shape(agent))) for agent in self.agents}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the agents' observation sizes differ ({sizes}); pad them to one size "
                             "first: the agent network reads every agent's observation the same way")
        self.has_state = callable(getattr(env, "state", None))
        self.reset()

    @staticmethod
    def _discrete_actions(env, agent):
        space = env.action_space(agent)
        if not isinstance(getattr(space, "n", None), (int, np.integer)):
            raise ValueError(f"agent {agent!r} has the action space {space}: QMIX needs discrete actions "
                             "(a Discrete space)")
        return int(space.n)

    @staticmethod
    def _declared_limit(env):
        for holder in (env, getattr(env, "unwrapped", None)):
            for name in ("max_cycles", "episode_limit"):
                if isinstance(getattr(holder, name, None), (int, np.integer)):
                    return getattr(holder, name)
        raise ValueError("the env declares no episode length (no max_cycles or episode_limit): "
                         "pass episode_limit=")

    def _observation_shape(self, agent):
        space = self.env.observation_space(agent)
        return space["observation"].shape if hasattr(space, "spaces") and "observation" in space.spaces else space.shape

    def get_env_info(self):
        return {**super().get_env_info(),
                "state_source": "env.state()" if self.has_state else "the observations, concatenated"}

    def reset(self, seed=None):
        result = self.env.reset(seed=seed)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError("env.reset(seed) must return (observations, infos), as PettingZoo's ParallelEnv "
                            "does since 1.22 (an older env returns the observations alone)")
        observations, infos = self._per_agent("reset", "observations", result[0]), result[1]
        self.steps, self.done = 0, False
        self._take(observations, infos)
        return self.get_obs(), self.get_state()

    def _take(self, observations, infos):
        """Keep one step's observations and action masks, in agent order."""
        masks = []
        self.observations = []
        if not isinstance(infos, dict):
            raise TypeError(f"the env's infos must be a dict of the agents' infos, got {type(infos).__name__}")
        for i, agent in enumerate(self.agents):
            observation, mask = observations[agent], (infos.get(agent) or {}).get("action_mask")
            if isinstance(observation, dict):
                if "observation" not in observation:
                    raise ValueError(f"agent {agent!r}'s observation is a dict without 'observation' "
                                     f"(keys {sorted(observation)})")
                observation, mask = observation["observation"], observation.get("action_mask", mask)
            avail = np.zeros(self.n_actions, dtype=bool)
            if mask is not None and np.shape(mask) != (self.agent_actions[i],):
                raise ValueError(f"agent {agent!r}'s action_mask has shape {np.shape(mask)}, but its action "
                                 f"space has {self.agent_actions[i]} actions")
            avail[:self.agent_actions[i]] = True if mask is None else np.asarray(mask, dtype=bool)
            if self.done and not avail.any():  # after the end nobody acts; the learner wants one action
                avail[:self.agent_actions[i]] = True
            self.observations.append(np.asarray(observation, dtype=np.float64).ravel())
            masks.append(avail)
        self.avail = np.stack(masks)

    def step(self, actions):
        actions = self._begin_step(actions)
        result = self.env.step({agent: int(action) for agent, action in zip(self.agents, actions)})
        if not (isinstance(result, tuple) and len(result) == 5):
            raise TypeError("env.step(actions) must return (observations, rewards, terminations, truncations, "
                            "infos), as PettingZoo's ParallelEnv does since 1.22 (an older env returns 4)")
        observations, rewards, terminations, truncations = (
            self._per_agent("step", name, value) for name, value in
            zip(("observations", "rewards", "terminations", "truncations"), result[:4]))
        infos = result[4]
        self.steps += 1
        values = [self._reward(agent, rewards[agent]) for agent in self.agents]
        reward = float(np.sum(values) if self.reward == "sum" else np.mean(values))
        terminated = [bool(terminations[agent]) for agent in self.agents]
        truncated = any(bool(truncations[agent]) for agent in self.agents) or self.steps >= self.episode_limit
        if any(terminated) and not all(terminated) and not truncated:
            done = [a for a, t in zip(self.agents, terminated) if t]
            raise ValueError(f"agent(s) {done} terminated while others play on: QMIX needs a fixed team")
        self.done = all(terminated) or truncated
        self._take(observations, infos)
        time_limit = truncated and not all(terminated) and self.truncation == "episode_limit"
        return reward, self.done, {"episode_limit": time_limit}

    def _per_agent(self, method, name, values):
        """A dict with exactly the team's agents, or an error naming who is missing or extra."""
        if not isinstance(values, dict):
            raise TypeError(f"env.{method}() must give {name} as a dict by agent, got {type(values).__name__}")
        missing = [agent for agent in self.agents if agent not in values]
        extra = [agent for agent in values if agent not in self.agents]
        if missing or extra:
            raise ValueError(f"env.{method}()'s {name} " + (f"lack agent(s) {missing}" if missing else "")
                             + (" and " if missing and extra else "") + (f"have agent(s) {extra} not in "
                             "possible_agents" if extra else "") + ": QMIX needs a fixed team")
        return values

    @staticmethod
    def _reward(agent, value):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"agent {agent!r}'s reward must be a number, got {type(value).__name__} {value!r}")
        return float(value)

    def get_obs(self):
        return np.stack(self.observations)  # (N, O)

    def get_state(self):
        if self.has_state:
            try:
                return np.asarray(self.env.state(), dtype=np.float64).ravel()
            except NotImplementedError:  # PettingZoo's base class defines state() without one
                self.has_state = False
        return np.concatenate(self.observations)

    def get_avail_actions(self):
        return self.avail.copy()
