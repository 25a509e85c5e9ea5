"""Environments behind pymarl's MultiAgentEnv interface.

Anything written for that interface (pymarl's runners, SMAC-style code, `qmix_np.train`) drives
these, and `qmix_np.train` drives anything that implements it:

    reset() -> (obs, state)           step(actions) -> (reward, terminated, info)
    get_obs() (N, O)                  get_state() (S,)
    get_avail_actions() (N, A) of 0/1 get_env_info() -> state_shape, obs_shape, n_actions,
                                                          n_agents, episode_limit
info["episode_limit"] is True when the episode stopped at the time limit (not a terminal state).
Our environments also take reset(seed=...), so an episode can be replayed exactly.

- TwoStepGame: the coordination game of the QMIX paper (Rashid et al. 2018, section 6.1).
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
        return check_actions("actions", actions, self.get_avail_actions().astype(bool))


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
        return np.ones((self.n_agents, self.n_actions), dtype=np.int64)

    def situation(self, name):
        """(obs, state) of state `name` ("1", "2A" or "2B"), e.g. to print a Q_tot table."""
        state = np.eye(len(self.STATE_NAMES))[self.STATE_NAMES.index(name)]
        return np.tile(state, (self.n_agents, 1)), state
