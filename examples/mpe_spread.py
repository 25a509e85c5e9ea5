"""QMIX, VDN and independent learners on a task nobody here wrote: MPE simple_spread (PettingZoo's
mpe2), 3 agents that must cover 3 landmarks without colliding, 25 steps, discrete actions.

The env comes in through envs.PettingZooEnv, one line. The settings are EPyMARL's QMIX config
(src/config/algs/qmix.yaml: feed-forward agent, agent ids without last actions, standardised
rewards, a 5000-episode buffer, targets every 200 episodes, epsilon over 50,000 steps) and its
MPE protocol: episodes of 25 steps, the team reward the sum of the agents' rewards, and the
25-step cut stored as a TERMINAL step, as EPyMARL's runner stores it (`terminated or truncated`;
its gym wrapper flags no episode_limit). --time-limit episode_limit bootstraps the cut instead
(pymarl's rule for SMAC's time limit): on this task QMIX's Q_tot then grows without bound
(docs/experiments.md). Two differences remain: targets are counted in episodes (pymarl; EPyMARL
counts train steps, so its first update comes 31 episodes later, then every 200 in both), and
the budget is ours (--t-max; EPyMARL's is 2,050,000). Each seed is evaluated greedily on fresh
episodes during and after training; random play on the same episodes is the floor. Curves go
to --out as CSV (with the training's mean Q_tot, target and gradient norm between evaluations)
and PNG if matplotlib is installed.

Beside the return it trains on, it reports, on the same episodes, the return in the units of
EPyMARL's benchmark paper (Papoudakis et al., 2021), whose MPE was a gym fork with another
reward (see paper_reward): compare that column with the paper's tables.

Needs `pip install pettingzoo mpe2` (optional extras, never dependencies of qmix-np).

    python examples/mpe_spread.py --t-max 100000 --seeds 3
    python examples/mpe_spread.py --methods qmix --seeds 1 --t-max 20000 --json
    python examples/mpe_spread.py --methods vdn --first-seed 2 --seeds 1 --out runs/vdn2   # one process per seed
    python examples/mpe_spread.py --summarise runs/*/mpe_spread.csv --out runs/all            # their table and plot
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread unless set: these matrices are too small to share

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a clone, installed or not
import envs  # noqa: E402
import qmix_np as q  # noqa: E402

NAMES = {"qmix": "QMIX", "vdn": "VDN", "none": "IQL", "epymarl": "EPyMARL's QMIX"}  # the last: --summarise only
CSV_COLUMNS = ["method", "seed", "time_limit", "env_steps", "greedy_return", "greedy_return_paper_units",
               "q_tot_mean", "target_mean", "grad_norm"]  # the last three: training's, since the last evaluation
T_975 = {2: 12.71, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}  # Student's t, n seeds
EVAL_SEED = 2**31  # evaluation episodes' reset seeds start here


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in --help."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--methods", nargs="+", default=list(NAMES)[:3], choices=list(NAMES)[:3],
                        help="qmix, vdn, none (IQL)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds run are first-seed, first-seed + 1, ...")
    parser.add_argument("--time-limit", choices=("terminal", "episode_limit"), default="terminal",
                        help="the 25-step cut stored as terminal (EPyMARL) or bootstrapped (pymarl's episode_limit)")
    parser.add_argument("--t-max", type=int, default=100000, help="training env steps per seed (EPyMARL: 2,050,000)")
    parser.add_argument("--eval-episodes", type=int, default=100, help="greedy episodes per evaluation (EPyMARL: 100)")
    parser.add_argument("--curve-every", type=int, default=20000, help="env steps between evaluations")
    parser.add_argument("--batch-size-run", type=int, default=1,
                        help="envs played in lockstep (EPyMARL's default runner: 1 env, one train step per episode)")
    parser.add_argument("--out", default="runs", help="folder for the curves (CSV, PNG)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's curves in --out")
    parser.add_argument("--summarise", nargs="+", metavar="FILE",
                        help="no training: the table and plots of earlier runs' CSVs (say, one process per seed), "
                             "and of EPyMARL's own runs (their results/sacred/.../info.json)")
    parser.add_argument("--until", type=int, help="with --summarise: leave out evaluations after this many env steps")
    args = parser.parse_args(argv)
    if min(args.seeds, args.t_max, args.eval_episodes, args.curve_every, args.batch_size_run) < 1:
        parser.error("--seeds, --t-max, --eval-episodes, --curve-every and --batch-size-run must be at least 1")
    if args.first_seed < 0:
        parser.error("--first-seed must be at least 0")
    return args


def make_env(time_limit="terminal"):
    try:
        from mpe2 import simple_spread_v3
    except ImportError:
        sys.exit("examples/mpe_spread.py needs PettingZoo's MPE: pip install pettingzoo mpe2 "
                 "(optional extras; qmix-np itself needs only numpy)")
    return Spread(simple_spread_v3.parallel_env(N=3, max_cycles=25, continuous_actions=False), truncation=time_limit)


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
    return in the paper's units, then the mean Q_tot, target and gradient norm of the train steps
    logged since the previous evaluation)] and seconds."""
    env, curve, start = make_env(), [], time.perf_counter()
    train_envs, learner = [make_env(args.time_limit) for _ in range(args.batch_size_run)], None
    for t_max in [*range(args.curve_every, args.t_max, args.curve_every), args.t_max]:
        logged = len(learner.history["t_env"]) if learner else 0
        learner = q.train(train_envs, make_config(method, seed, t_max, args.batch_size_run), learner=learner,
                          progress=True)  # a line to stderr every 5 s
        training = [np.nanmean(learner.history[key][logged:]) if np.isfinite(learner.history[key][-1]) else np.nan
                    for key in ("q_taken_mean", "target_mean", "grad_norm")]
        curve.append((learner.t_env, *greedy_returns(env, learner, args.eval_episodes), *training))
    return curve, time.perf_counter() - start


def write_curves(args, curves, random_return):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "mpe_spread.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for (method, seed, time_limit), curve in curves.items():
            writer.writerows([NAMES[method], seed, time_limit, *point] for point in curve)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the PNGs were skipped (pip install matplotlib)", file=sys.stderr)
        return [out / "mpe_spread.csv"]
    return [out / "mpe_spread.csv", plot_returns(plt, curves, out, random_return), plot_diagnostics(plt, curves, out)]


def label(method, time_limit):
    return NAMES[method] + ("" if time_limit == "terminal" else ", time limit bootstrapped")


def style(method, time_limit):
    """One colour per method, dashed for the bootstrapped time limit."""
    colour = {"qmix": "C0", "vdn": "C1", "none": "C2", "epymarl": "black"}[method]
    return {"color": colour, "linestyle": "-" if time_limit == "terminal" else "--", "alpha": 0.7}


def draw_runs(ax, curves, column):
    """Column `column` of every run's curve against env steps, one legend label per method and rule."""
    labelled = set()
    for (method, _, time_limit), curve in curves.items():
        key = (method, time_limit)
        ax.plot([p[0] / 1e6 for p in curve], [p[column] for p in curve], **style(*key),
                label=None if key in labelled else label(*key))
        labelled.add(key)


def plot_returns(plt, curves, out, random_return):
    """Greedy return against env steps, one line per run, and random play's."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(random_return, color="grey", linewidth=1, label="random play")
    draw_runs(ax, curves, 1)
    ax.set(xlabel="env steps (millions)", ylabel="greedy return (sum over agents)", title="MPE simple_spread, 3 agents")
    ax.legend(fontsize=8)
    fig.savefig(out / "mpe_spread.png", dpi=120, bbox_inches="tight")
    return out / "mpe_spread.png"


def plot_diagnostics(plt, curves, out):
    """The training's mean Q_tot and gradient norm (before clipping) against env steps."""
    fig, (q_ax, g_ax) = plt.subplots(1, 2, figsize=(11, 4))
    draw_runs(q_ax, curves, 3)
    draw_runs(g_ax, curves, 5)
    q_ax.set(xlabel="env steps (millions)", ylabel="mean Q_tot of the actions taken (standardised rewards)", yscale="symlog")
    g_ax.set(xlabel="env steps (millions)", ylabel="gradient norm before clipping at 10", yscale="log")
    q_ax.legend(fontsize=8)
    fig.savefig(out / "mpe_spread_diagnostics.png", dpi=120, bbox_inches="tight")
    return out / "mpe_spread_diagnostics.png"


def read_curves(paths, until=None):
    """{(method, seed, time_limit): curve} from CSVs this script wrote and EPyMARL's info.json,
    up to `until` env steps."""
    curves, method_of = {}, {name: method for method, name in NAMES.items()}
    for path in paths:
        if path.endswith(".json"):
            curves.update(read_epymarl(path))
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                point = (int(row["env_steps"]), *(float(row[c]) for c in CSV_COLUMNS[4:]))
                curves.setdefault((method_of[row["method"]], int(row["seed"]), row["time_limit"]), []).append(point)
    kept = {key: [p for p in curve if until is None or p[0] <= until] for key, curve in curves.items()}
    return {key: curve for key, curve in kept.items() if curve}


def read_epymarl(path):
    """An EPyMARL run's greedy tests and training logs, from the info.json sacred writes (its seed
    from the config.json beside it) as one curve: its Q_tot is q_taken_mean x n_agents (EPyMARL
    divides by them), its logs are single train steps every 10,000 env steps, not means."""
    folder = pathlib.Path(path).parent
    info, seed = json.loads(pathlib.Path(path).read_text()), json.loads((folder / "config.json").read_text())["seed"]

    def series(key, scale=1.0):  # {t_env: value}; sacred stores numpy floats as {"value": ...}
        return {t: scale * (v["value"] if isinstance(v, dict) else v) for t, v in zip(info[f"{key}_T"], info[key])}

    tests, q_tot, target, grad = (series("test_return_mean"), series("q_taken_mean", 3), series("target_mean", 3),
                                  series("grad_norm"))
    logged = sorted(q_tot)

    def latest(values, t):  # the last log at or before t
        before = [s for s in logged if s <= t]
        return values[before[-1]] if before else math.nan

    return {("epymarl", seed, "terminal"): [(t, ret, math.nan, latest(q_tot, t), latest(target, t), latest(grad, t))
                                            for t, ret in sorted(tests.items())]}


def interval(values):
    """Mean and the half-width of its 95% Student-t interval over seeds ("" for one seed)."""
    values = np.asarray(values)
    if np.isnan(values).all():  # EPyMARL's runs have no return in the paper's units
        return f"{'n/a':>8}         "
    if len(values) < 2:
        return f"{values.mean():8.2f}         "
    half = T_975.get(len(values), 1.96) * values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():8.2f} +- {half:5.2f}"


def print_table(curves, floor, eval_episodes, seconds):
    """Final and best greedy return per method, mean and 95% interval over seeds, both units."""
    ends = {curve[-1][0] for curve in curves.values()}
    print(f"MPE simple_spread, 3 agents, 25 steps: {'' if len(ends) == 1 else 'up to '}{max(ends):,} env steps per "
          f"seed, greedy return on {eval_episodes} "
          "fresh episodes: the team's (sum over agents) and [in EPyMARL's paper's units], mean +- 95% interval")
    print(f"  random   {floor[0]:8.2f}                    [{floor[1]:8.2f}]")
    in_order = sorted(curves, key=lambda k: (list(NAMES).index(k[0]), k[2] != "terminal", k[1]))
    for key in dict.fromkeys((method, time_limit) for method, _, time_limit in in_order):
        runs = [curve for (method, _, time_limit), curve in sorted(curves.items()) if (method, time_limit) == key]
        final, best = [c[-1] for c in runs], [max(c, key=lambda p: p[1]) for c in runs]
        timing = f"   ({np.mean(seconds[key[0]]):.0f} s per seed)" if seconds.get(key[0]) else ""
        print(f"  {label(*key)}\n    final {interval([p[1] for p in final])} [{interval([p[2] for p in final])}]"
              f"   best {interval([p[1] for p in best])} [{interval([p[2] for p in best])}]"
              f"   {len(runs)} seed(s), final per seed: {', '.join(f'{p[1]:.2f}' for p in final)}{timing}")


def main():
    args = parse_args()
    taken = [str(p) for p in (pathlib.Path(args.out) / "mpe_spread.csv", pathlib.Path(args.out) / "mpe_spread.png")
             if p.exists() and not args.json]
    if taken and not args.overwrite:
        sys.exit(f"{', '.join(taken)} already exist(s), from an earlier run: choose another --out, or pass --overwrite")
    floor = random_returns(make_env(), args.eval_episodes)
    curves, seconds = (read_curves(args.summarise, args.until) if args.summarise else {}), {}
    for method in [] if args.summarise else args.methods:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            curves[method, seed, args.time_limit], took = run(method, seed, args)
            seconds.setdefault(method, []).append(took)
    if args.json:
        print(json.dumps({"random": {"return": floor[0], "paper_units": floor[1]},
                          **{NAMES[m]: [{"return": curve[-1][1], "paper_units": curve[-1][2]}
                                        for (method, _, _), curve in curves.items() if method == m]
                             for m in dict.fromkeys(method for method, _, _ in curves)}}))
        return
    written = write_curves(args, curves, floor[0])
    print_table(curves, floor, args.eval_episodes, seconds)
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
