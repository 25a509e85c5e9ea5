"""A long Meeting Gridworld run that checks the numbers stay sane (a soak run, not a test).

Trains QMIX for --t-max env steps (200,000 by default) with the hyperparameters of
examples/meeting_gridworld.py and watches every train step: the loss and gradient must stay
finite, and Q_tot must stay within what the rewards allow. Rewards are -0.01 per step and one
+10 at the end, so every true Q_tot lies in [-0.01 / (1 - gamma), 10]; every --check-every env
steps it evaluates Q_tot of the taken and of the greedy actions on 2000 stored transitions.

    python examples/soak.py
    python examples/soak.py --t-max 50000 --mixer vdn
"""
import argparse
import dataclasses
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import envs  # noqa: E402
import meeting_gridworld  # noqa: E402
import qmix_np as q  # noqa: E402


class WatchedLearner(q.Learner):
    """A Learner that keeps the extremes of every train step's diagnostics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.worst = {"loss": 0.0, "grad_norm": 0.0}
        self.all_finite = True

    def train_step(self):
        diagnostics = super().train_step()
        for key in self.worst:
            self.all_finite &= math.isfinite(diagnostics[key])
            self.worst[key] = max(self.worst[key], diagnostics[key])
        return diagnostics


def q_tot_range(learner, rng):
    """(min, max) of Q_tot over 2000 stored transitions, for the taken and the greedy actions."""
    batch = learner.buffer.sample(2000, rng)
    c = learner.config
    inputs = q.build_agent_inputs(batch["obs"], c.obs_agent_id, c.dtype)
    agent_q, _ = q.agent_forward(learner.params["agent"], inputs)
    mix_forward, _ = q.get_mixer(c.mixer)
    greedy = q.masked_argmax(agent_q, batch["avail_actions"])
    values = [mix_forward(learner.params["mixer"], q.take_actions(agent_q, a), batch["state"])[0]
              for a in (batch["actions"], greedy)]
    return float(min(v.min() for v in values)), float(max(v.max() for v in values))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t-max", type=int, default=200000)
    parser.add_argument("--mixer", default="qmix", choices=["qmix", "vdn", "none"])
    parser.add_argument("--check-every", type=int, default=20000, help="env steps between Q_tot checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=1000, help="greedy episodes at the end")
    args = parser.parse_args()
    if min(args.t_max, args.check_every, args.eval_episodes) < 1:
        parser.error("--t-max, --check-every and --eval-episodes must be at least 1")

    settings = meeting_gridworld.parse_args(["--t-max", str(args.t_max)])  # its defaults otherwise
    config = meeting_gridworld.make_config(settings, args.mixer, args.seed)
    env = envs.MeetingGridworld()
    low, high = -0.01 / (1 - config.gamma), 10.0
    learner = WatchedLearner(config, env.get_env_info())
    check_rng = np.random.default_rng(12345)  # its own Generator: checking never changes the run
    seen = {"min": math.inf, "max": -math.inf}
    print(f"soak: {args.mixer}, {args.t_max:,} env steps on Meeting Gridworld 5x5, 2 agents; "
          f"true Q_tot lies in [{low:.2f}, {high:.2f}]")
    start = time.perf_counter()
    for t_max in range(args.check_every, args.t_max + args.check_every, args.check_every):
        q.train(env, dataclasses.replace(config, t_max=min(t_max, args.t_max)), learner=learner)
        q_min, q_max = q_tot_range(learner, check_rng)
        seen["min"], seen["max"] = min(seen["min"], q_min), max(seen["max"], q_max)
        print(f"{learner.t_env:>9,} env steps {learner.train_steps:>9,} train steps  "
              f"max loss {learner.worst['loss']:.4g}  max grad norm {learner.worst['grad_norm']:.4g}  "
              f"Q_tot in [{q_min:.3f}, {q_max:.3f}]  ({time.perf_counter() - start:.0f} s)", flush=True)
    result = q.evaluate(env, learner, args.eval_episodes, seed=2**31)
    inside = low - 0.5 <= seen["min"] and seen["max"] <= high + 0.5
    print(f"\nall losses and gradient norms finite: {learner.all_finite}; skipped steps: {learner.skipped_steps}")
    print(f"largest loss {learner.worst['loss']:.4g}, largest gradient norm before clipping "
          f"{learner.worst['grad_norm']:.4g} (clipped at {config.grad_norm_clip:g})")
    print(f"Q_tot seen in [{seen['min']:.3f}, {seen['max']:.3f}]; the rewards allow [{low:.2f}, {high:.2f}]: "
          f"{'within' if inside else 'OUTSIDE'} 0.5 of the bounds")
    print(f"greedy success after the soak: {result['success_rate']:.1%} over {args.eval_episodes} episodes, "
          f"length/shortest {result['optimality_ratio']:.3f}")
    sys.exit(0 if learner.all_finite and inside else 1)


if __name__ == "__main__":
    main()
