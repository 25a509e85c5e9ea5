"""QMIX, VDN and independent learners on a task nobody here wrote: MPE simple_spread (PettingZoo's
mpe2), 3 agents that must cover 3 landmarks without colliding, 25 steps, discrete actions.

The env comes in through envs.PettingZooEnv, one line. The settings are EPyMARL's QMIX config
(src/config/algs/qmix.yaml: feed-forward agent, agent ids without last actions, standardised
rewards, a 5000-episode buffer, targets every 200 episodes, epsilon over 50,000 steps) and its
MPE protocol (episodes of 25 steps, the team reward the sum of the agents' rewards); only the
budget is ours (--t-max). Each seed is evaluated greedily on fresh episodes during and after
training; random play on the same episodes is the floor. Curves go to --out as CSV (and PNG if
matplotlib is installed).

Beside the return it trains on, it reports, on the same episodes, the return in the units of
EPyMARL's benchmark paper (Papoudakis et al., 2021), whose MPE was a gym fork with another
reward (see paper_reward): compare that column with the paper's tables.

Needs `pip install pettingzoo mpe2` (optional extras, never dependencies of qmix-np).

    python examples/mpe_spread.py --t-max 100000 --seeds 3
    python examples/mpe_spread.py --methods qmix --seeds 1 --t-max 20000 --json
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread unless set: these matrices are too small to share

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a clone, installed or not
import envs  # noqa: E402
import qmix_np as q  # noqa: E402

NAMES = {"qmix": "QMIX", "vdn": "VDN", "none": "IQL"}
EVAL_SEED = 2**31  # evaluation episodes' reset seeds start here


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in --help."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--methods", nargs="+", default=list(NAMES), choices=list(NAMES), help="qmix, vdn, none (IQL)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument("--t-max", type=int, default=100000, help="training env steps per seed (EPyMARL: 2,050,000)")
    parser.add_argument("--eval-episodes", type=int, default=100, help="greedy episodes per evaluation (EPyMARL: 100)")
    parser.add_argument("--curve-every", type=int, default=20000, help="env steps between evaluations")
    parser.add_argument("--batch-size-run", type=int, default=1,
                        help="envs played in lockstep (EPyMARL's default runner: 1 env, one train step per episode)")
    parser.add_argument("--out", default="runs", help="folder for the curves (CSV, PNG)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's curves in --out")
    args = parser.parse_args(argv)
    if min(args.seeds, args.t_max, args.eval_episodes, args.curve_every, args.batch_size_run) < 1:
        parser.error("--seeds, --t-max, --eval-episodes, --curve-every and --batch-size-run must be at least 1")
    return args


def make_env():
    try:
        from mpe2 import simple_spread_v3
    except ImportError:
        sys.exit("examples/mpe_spread.py needs PettingZoo's MPE: pip install pettingzoo mpe2 "
                 "(optional extras; qmix-np itself needs only numpy)")
    return Spread(simple_spread_v3.parallel_env(N=3, max_cycles=25, continuous_actions=False))


def paper_reward(world, scenario):
    """One step's reward in the units of EPyMARL's paper, from the agents' positions after the step.

    The paper ran MPE from EPyMARL's gym fork (semitable/multiagent-particle-envs), where simple
    spread gives agent i the reward G - c_i, G = -(sum over landmarks of the nearest agent's
    distance) and c_i the number of agents it overlaps, ITSELF INCLUDED (so c_i >= 1); the world
    is "collaborative", so every agent receives the team's sum, sum_i (G - c_i). The paper shows
    the return summed over agents divided by their number (uoe-agents/epymarl issue #29), which
    is that team sum: per step, sum_i (G - c_i). mpe2's simple_spread_v3 gives agent i 0.5 G - 0.5 (c_i - 1) instead.
    """
    landmark_term = scenario.global_reward(world)  # G
    return sum(landmark_term - sum(scenario.is_collision(other, agent) for other in world.agents)
               for agent in world.agents)


class Spread(envs.PettingZooEnv):
    """simple_spread through envs.PettingZooEnv, also adding up paper_reward in paper_total."""

    paper_total = 0.0

    def step(self, actions):
        result = super().step(actions)
        self.paper_total += paper_reward(self.env.unwrapped.world, self.env.unwrapped.scenario)
        return result


def greedy_returns(env, learner, episodes):
    """(mean return, mean return in the paper's units) of greedy play on the evaluation episodes."""
    env.paper_total = 0.0
    result = q.evaluate(env, learner, episodes, EVAL_SEED)
    return result["mean_return"], env.paper_total / episodes


def make_config(method, seed, t_max, batch_size_run=1):
    """EPyMARL's qmix.yaml and default.yaml; only the mixer differs between methods."""
    return q.Config(mixer=method, seed=seed, t_max=t_max, use_rnn=False, obs_last_action=False,
                    obs_agent_id=True, standardise_rewards=True, buffer_size=5000, batch_size=32,
                    target_update_interval=200, epsilon_anneal_time=50000, lr=5e-4, hidden_dim=64,
                    batch_size_run=batch_size_run)


def random_returns(env, episodes):
    """(mean return, mean return in the paper's units) of uniformly random play on the evaluation episodes."""
    rng, total = np.random.default_rng(0), 0.0
    env.paper_total = 0.0
    for i in range(episodes):
        env.reset(seed=EVAL_SEED + i)
        done = False
        while not done:
            avail = env.get_avail_actions()
            reward, done, _ = env.step(q.masked_argmax(rng.random(avail.shape), avail))
            total += reward
    return total / episodes, env.paper_total / episodes


def run(method, seed, args):
    """Train one seed, evaluating greedily every --curve-every steps: curve [(env steps, return,
    return in the paper's units)] and seconds."""
    env, curve, start = make_env(), [], time.perf_counter()
    train_envs, learner = [make_env() for _ in range(args.batch_size_run)], None
    for t_max in [*range(args.curve_every, args.t_max, args.curve_every), args.t_max]:
        learner = q.train(train_envs, make_config(method, seed, t_max, args.batch_size_run), learner=learner,
                          progress=True)  # a line to stderr every 5 s
        curve.append((learner.t_env, *greedy_returns(env, learner, args.eval_episodes)))
    return curve, time.perf_counter() - start


def write_curves(args, curves):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "mpe_spread.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "env_steps", "greedy_return", "greedy_return_paper_units"])
        for (method, seed), curve in curves.items():
            writer.writerows([NAMES[method], seed, *point] for point in curve)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the PNG was skipped (pip install matplotlib)", file=sys.stderr)
        return [out / "mpe_spread.csv"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, seed), curve in curves.items():
        steps, returns, _ = zip(*curve)
        ax.plot(steps, returns, color={"qmix": "C0", "vdn": "C1", "none": "C2"}[method], alpha=0.7,
                label=NAMES[method] if seed == 0 else None)
    ax.set(xlabel="env steps", ylabel="greedy return (sum over agents)", title="MPE simple_spread, 3 agents")
    ax.legend()
    fig.savefig(out / "mpe_spread.png", dpi=120, bbox_inches="tight")
    return [out / "mpe_spread.csv", out / "mpe_spread.png"]


def main():
    args = parse_args()
    taken = [str(p) for p in (pathlib.Path(args.out) / "mpe_spread.csv", pathlib.Path(args.out) / "mpe_spread.png")
             if p.exists() and not args.json]
    if taken and not args.overwrite:
        sys.exit(f"{', '.join(taken)} already exist(s), from an earlier run: choose another --out, or pass --overwrite")
    floor = random_returns(make_env(), args.eval_episodes)
    results, curves = {}, {}
    for method in args.methods:
        for seed in range(args.seeds):
            curves[method, seed], seconds = run(method, seed, args)
            results.setdefault(NAMES[method], []).append((*curves[method, seed][-1][1:], seconds))
    if args.json:
        print(json.dumps({"random": {"return": floor[0], "paper_units": floor[1]},
                          **{m: [{"return": r, "paper_units": p} for r, p, _ in rs] for m, rs in results.items()}}))
        return
    written = write_curves(args, curves)
    print(f"MPE simple_spread, 3 agents, 25 steps: {args.t_max:,} env steps per seed, greedy return on "
          f"{args.eval_episodes} fresh episodes: the team's (sum over agents) and [in EPyMARL's paper's units]")
    print(f"  random   {floor[0]:8.2f}           [{floor[1]:8.2f}]")
    for method, rs in results.items():
        finals, paper = np.array([r for r, _, _ in rs]), np.array([p for _, p, _ in rs])
        spread = (lambda x: f" +- {x.std():5.2f}") if len(finals) > 1 else (lambda x: "")  # no spread of one seed
        print(f"  {method:<5} {finals.mean():8.2f}{spread(finals)}  [{paper.mean():8.2f}{spread(paper)}]"
              f"   per seed: {', '.join(f'{r:.2f}' for r in finals)}   ({np.mean([s for _, _, s in rs]):.0f} s per seed)")
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
