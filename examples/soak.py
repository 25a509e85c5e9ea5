"""A long run, not a test: QMIX on Meeting Gridworld 5x5 with examples/meeting_gridworld.py's
defaults, watching every train step's loss and gradient norm (before clipping), the steps
refused as non-finite, and, every --every env steps, the Q_tot the learner gives the steps of
256 stored episodes. With -0.01 per step and one +10 at the end, every true Q_tot lies in
[-0.01 / (1 - gamma), 10] = [-0.2, 10]. At the end, greedy success on 1000 fresh episodes.

    python examples/soak.py                        # 200,000 env steps, the GRU agent
    python examples/soak.py --t-max 50000 --agent mlp
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread unless set: these matrices are too small to share

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a clone, installed or not
sys.path.insert(0, str(HERE))
import meeting_gridworld  # noqa: E402
import qmix_np as q  # noqa: E402


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in --help."""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--t-max", type=int, default=200000, help="training env steps")
    parser.add_argument("--every", type=int, default=20000, help="env steps between Q_tot checks")
    parser.add_argument("--agent", choices=["gru", "mlp"], default="gru", help="as meeting_gridworld.py's")
    parser.add_argument("--eval-episodes", type=int, default=1000, help="greedy episodes at the end")
    args = parser.parse_args()
    if min(args.t_max, args.every, args.eval_episodes) < 1:
        parser.error("--t-max, --every and --eval-episodes must be at least 1")
    return args


def q_tot_range(learner):
    """Smallest and largest Q_tot of the taken actions over the steps of 256 stored episodes
    (drawn with a Generator of their own: the run's is not touched)."""
    batch = learner.buffer.sample(min(256, len(learner.buffer)), np.random.default_rng(0))
    q_values, _, _ = q.agent_forward(learner.params["agent"], q.episode_agent_inputs(batch, learner.config))
    chosen = q.take(q_values[:, :-1], batch["actions"])  # (B, T, N)
    mixer_forward, _ = q.get_mixer(learner.config.mixer)
    q_tot, _ = q.mix_episodes(mixer_forward, learner.params["mixer"], chosen, batch["state"][:, :-1])
    happened = q.loss_mask(batch).astype(bool)
    return float(q_tot[happened].min()), float(q_tot[happened].max())


def main():
    args = parse_args()
    settings = meeting_gridworld.parse_args(["--t-max", str(args.t_max), "--agent", args.agent])
    config, env = meeting_gridworld.make_config(settings, "qmix", 0), meeting_gridworld.make_env(settings)
    train_envs = [meeting_gridworld.make_env(settings) for _ in range(config.batch_size_run)]  # in lockstep
    low = -0.01 / (1 - config.gamma)
    print(f"soak: qmix ({args.agent}), {args.t_max:,} env steps on Meeting Gridworld 5x5, 2 agents; "
          f"true Q_tot lies in [{low:.2f}, 10.00]")
    seen = {"loss": [], "grad_norm": []}

    def watch(learner, *episode):  # after every episode: the latest train step's numbers
        if learner.last_diagnostics is not None:
            for key in seen:
                seen[key].append(learner.last_diagnostics[key])

    learner, start, ranges = None, time.perf_counter(), []
    for t_max in [*range(args.every, args.t_max, args.every), args.t_max]:
        learner = q.train(train_envs, dataclasses.replace(config, t_max=t_max), learner=learner, callback=watch)
        ranges.append(q_tot_range(learner))
        print(f"{learner.t_env:>9,} env steps {learner.train_steps:>7,} train steps  max loss "
              f"{max(seen['loss'], default=math.nan):.2f}  max grad norm "
              f"{max(seen['grad_norm'], default=math.nan):.2f}  Q_tot in "
              f"[{ranges[-1][0]:.3f}, {ranges[-1][1]:.3f}]  ({time.perf_counter() - start:.0f} s)")
    finite = all(math.isfinite(v) for values in seen.values() for v in values)
    lowest, highest = min(r[0] for r in ranges), max(r[1] for r in ranges)
    result = q.evaluate(env, learner, args.eval_episodes, meeting_gridworld.EVAL_SEED)
    print(f"\nall losses and gradient norms finite: {finite}; skipped steps: {learner.skipped_steps}")
    print(f"largest loss {max(seen['loss'], default=math.nan):.2f}, largest gradient norm before "
          f"clipping {max(seen['grad_norm'], default=math.nan):.2f} (clipped at {config.grad_norm_clip:g})")
    print(f"Q_tot seen in [{lowest:.3f}, {highest:.3f}]; the rewards allow [{low:.2f}, 10.00]")
    print(f"greedy success after the soak: {result['success_rate']:.1%} over {args.eval_episodes} "
          f"episodes, length/shortest {result['optimality_ratio']:.3f}")


if __name__ == "__main__":
    main()
