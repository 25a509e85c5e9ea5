"""Meeting Gridworld: QMIX, VDN and independent learners, same budget, same hyperparameters.

Every agent must stand on the goal at the same time (envs.MeetingGridworld). Each method is
trained on several seeds; each seed is then evaluated greedily on 1000 fresh episodes (reset
seeds 2**31, 2**31 + 1, ...: the same episodes for every method and seed, never a training
episode), reporting success rate, mean return, mean length and the optimality ratio (mean over
successful episodes of length / shortest possible length). While training it prints a progress
line every few seconds (to stderr); every --curve-every env steps it evaluates greedily on
--curve-episodes episodes for the learning curves, written as CSV (and as a PNG if matplotlib
is installed) under --out. Curve evaluations are not counted in the training seconds.

    python examples/meeting_gridworld.py                      # 5x5, 2 agents, 5 seeds, 3 methods
    python examples/meeting_gridworld.py --methods qmix --seeds 1 --t-max 20000
    python examples/meeting_gridworld.py --methods qmix --seeds 1 --grid-size 7 --n-agents 3 --t-max 3000000 --epsilon-anneal-time 750000 --buffer-size 2000 --adam-eps 1e-5 --lr 1e-3  # 7x7: ~10 min
    python examples/meeting_gridworld.py --json               # summary as one JSON object
    python examples/meeting_gridworld.py --methods qmix --seeds 1 --t-max 40000 --save runs
    python examples/meeting_gridworld.py --load runs/qmix-seed0.npz --t-max 80000  # resume to 80k
    python examples/meeting_gridworld.py --load runs/qmix-seed0.npz --t-max 0      # evaluate only

--save DIR writes each trained learner to DIR/<method>-seed<seed>.npz (with its replay buffer),
and beside it a .json of the grid flags it was trained with, which --load compares.
--load FILE... continues each saved learner up to --t-max env steps (nothing more if it already
has them: then no curve is written) and evaluates it; the grid flags must describe the
environment it was trained on, and --methods, if given, must include its method. Files of an
earlier run (curves, checkpoints) are replaced only with --overwrite.
--plot CSV... trains nothing: it merges the curves of runs made separately (say, one process per
seed with --first-seed) into one CSV and one figure, named after --grid-size and --n-agents.
Everything is written under the current directory (--out, default runs/); the repository's
committed curves in examples/results/ change only if you name that folder.
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread unless set: these matrices are too small to share

import argparse  # noqa: E402
import collections  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a clone, installed or not
import envs  # noqa: E402
import qmix_np as q  # noqa: E402

NAMES = {"qmix": "QMIX", "vdn": "VDN", "none": "IQL"}
EVAL_SEED = 2**31  # final evaluation seeds start here; training seeds are drawn below 2**31
CURVE_SEED = 2**32  # learning-curve evaluation seeds


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in --help."""


def parse_args(argv=None):
    """The command line (argv, default sys.argv[1:]) as checked settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(NAMES),
                        help="mixers to train (none = independent learners; None: all three, or with --load "
                             "the loaded learners' own)")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds per method")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--t-max", type=int, default=200000, help="training env steps per seed")
    parser.add_argument("--epsilon-anneal-time", type=int, default=None,
                        help="env steps of epsilon annealing (None: a fifth of --t-max)")
    parser.add_argument("--epsilon-finish", type=float, default=0.05, help="epsilon after annealing")
    parser.add_argument("--buffer-size", type=int, default=500, help="replay capacity (episodes)")
    parser.add_argument("--batch-size-run", type=int, default=4,
                        help="envs played in lockstep (pymarl's batch_size_run): one train step per that many episodes")
    parser.add_argument("--batch-size", type=int, default=32, help="episodes per train step")
    parser.add_argument("--target-update-interval", type=int, default=40, help="episodes between target copies")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's step size")
    parser.add_argument("--adam-eps", type=float, default=q.Config.adam_eps, help="Adam's denominator guard")
    parser.add_argument("--grid-size", type=int, default=5, help="the grid is this many cells square")
    parser.add_argument("--n-agents", type=int, default=2, help="agents that must meet")
    parser.add_argument("--max-steps", type=int, default=50, help="time limit per episode")
    parser.add_argument("--hidden-dim", type=int, default=64, help="width of the agent network")
    parser.add_argument("--agent", choices=["gru", "mlp"], default="gru",
                        help="pymarl's GRU agent (use_rnn=True) or EPyMARL's feed-forward one (use_rnn=False)")
    parser.add_argument("--observe-others", action="store_true",
                        help="each agent also observes the other agents' positions")
    parser.add_argument("--eval-episodes", type=int, default=1000, help="greedy episodes per seed after training")
    parser.add_argument("--curve-every", type=int, default=5000, help="env steps between curve points")
    parser.add_argument("--curve-episodes", type=int, default=100, help="greedy episodes per curve point")
    parser.add_argument("--progress-seconds", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument("--out", default="runs", help="folder for the curves (CSV, PNG)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--save", metavar="DIR", help="save each trained learner in DIR")
    parser.add_argument("--load", nargs="+", metavar="FILE", help="resume / evaluate saved learners")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the curves and checkpoints of an earlier run in --out / --save")
    parser.add_argument("--plot", nargs="+", metavar="CSV",
                        help="train nothing: merge the curve CSVs of earlier runs (e.g. seeds run as "
                             "separate processes) into one CSV and figure in --out")
    args = parser.parse_args(argv)
    if args.t_max < 0 or (args.t_max == 0 and not args.load):
        parser.error("--t-max must be at least 1 (0 only with --load: evaluate without training)")
    if args.first_seed < 0:
        parser.error("--first-seed must be at least 0")
    for name in ("seeds", "eval_episodes", "curve_every", "curve_episodes", "buffer_size", "batch_size_run",
                 "batch_size", "target_update_interval", "hidden_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.buffer_size < args.batch_size:
        parser.error(f"--buffer-size must be at least --batch-size ({args.batch_size})")
    if not (0 < args.lr < float("inf") and 0 < args.adam_eps < float("inf")):
        parser.error("--lr and --adam-eps must be finite numbers > 0")
    try:
        make_env(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def make_env(args):
    return envs.MeetingGridworld(args.grid_size, args.n_agents, args.max_steps, args.observe_others)


def make_config(args, mixer, seed):
    """The same hyperparameters for every method; only the mixer differs. The agent is pymarl's
    GRU (use_rnn=True) or, with --agent mlp, EPyMARL's feed-forward one, with pymarl's inputs
    (obs, last action, agent id).

    gamma 0.95, not pymarl's 0.99: with one team reward, an agent that is ahead of its partner
    gains only ~10 gamma^d (1 - gamma) by moving on rather than waiting, a gap too small at
    0.99 to be learned reliably everywhere, and a greedy agent that waits waits forever.

    Four envs in lockstep (batch_size_run 4): a quarter of the train steps per env step, made up
    by a larger step size (lr 3e-3) and more env steps (200,000), with the targets copied every
    40 episodes (10 train steps, as 20 were before with one env). docs/experiments.md has the runs.
    """
    anneal = args.epsilon_anneal_time or max(1, args.t_max // 5)
    return q.Config(mixer=mixer, seed=seed, t_max=max(args.t_max, 0), epsilon_anneal_time=anneal,
                    epsilon_finish=args.epsilon_finish, hidden_dim=args.hidden_dim, lr=args.lr,
                    adam_eps=args.adam_eps, use_rnn=args.agent == "gru", gamma=0.95,
                    buffer_size=args.buffer_size, batch_size=args.batch_size, batch_size_run=args.batch_size_run,
                    target_update_interval=args.target_update_interval, hypernet_layers=1)


class Monitor:
    """The training callback: progress lines and learning-curve points."""

    def __init__(self, args, method, seed):
        self.args, self.label = args, f"{NAMES[method]} seed {seed}"
        self.recent = collections.deque(maxlen=100)  # successes of the last 100 training episodes
        self.last_print = time.perf_counter()
        self.next_curve = 0
        self.curve = []  # (env steps, greedy success, greedy mean return)
        self.eval_seconds = 0.0

    def __call__(self, learner, episode_return, length, success):
        self.recent.append(success)
        if learner.t_env >= self.next_curve:
            self.add_curve_point(learner)
        if time.perf_counter() - self.last_print >= self.args.progress_seconds:
            self.last_print = time.perf_counter()
            print(f"[{self.label}] {learner.t_env:>8,} env steps {learner.episode:>7,} episodes  "
                  f"epsilon {learner.epsilon():.2f}  loss {learner.history['loss'][-1]:.4f}  "
                  f"success (last 100 episodes) {np.mean(self.recent):.0%}", file=sys.stderr, flush=True)

    def add_curve_point(self, learner):
        start = time.perf_counter()
        result = q.evaluate(make_env(self.args), learner, self.args.curve_episodes, CURVE_SEED)
        self.curve.append((learner.t_env, result["success_rate"], result["mean_return"]))
        self.next_curve = learner.t_env + self.args.curve_every  # also right for a resumed run
        self.eval_seconds += time.perf_counter() - start


def run_seed(args, method, seed, learner=None):
    """Train (or continue `learner`) and evaluate one seed: its results and learning curve."""
    monitor = Monitor(args, method, seed)
    config = make_config(args, method, seed)
    if learner is not None:
        config = dataclasses.replace(learner.config, t_max=args.t_max)
    start = time.perf_counter()
    envs_ = [make_env(args) for _ in range(config.batch_size_run)]  # played in lockstep
    learner = q.train(envs_, config, learner=learner, callback=monitor)
    monitor.add_curve_point(learner)
    if args.save:
        path = pathlib.Path(args.save) / f"{method}-seed{seed}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        learner.save(path)
        path.with_suffix(".json").write_text(json.dumps(env_settings(args)))  # what --load will compare
    train_seconds = time.perf_counter() - start - monitor.eval_seconds
    result = q.evaluate(make_env(args), learner, args.eval_episodes, EVAL_SEED)
    recent = float(np.mean(monitor.recent)) if monitor.recent else float("nan")
    return {**result, "train_seconds": train_seconds, "env_steps": learner.t_env,
            "train_episodes": learner.episode, "train_success_last_100": recent,
            "agent": f"{'GRU' if learner.config.use_rnn else 'MLP'} of width {learner.config.hidden_dim}"}, monitor.curve


def curve_paths(args):
    """The CSV and PNG the curves go to."""
    stem = pathlib.Path(args.out) / f"meeting_gridworld_{args.grid_size}x{args.grid_size}_{args.n_agents}agents"
    return stem.with_suffix(".csv"), stem.with_suffix(".png")


def refuse_to_overwrite(args, paths):
    """Before anything runs: an earlier run's files are replaced only with --overwrite."""
    taken = [str(path) for path in paths if path.exists()]
    if taken and not args.overwrite:
        sys.exit(f"{', '.join(taken)} already exist(s), from an earlier run: choose another --out (or --save), "
                 "or pass --overwrite to replace them")


def write_curves(args, curves):
    """curves: {(method, seed): [(env steps, success, return), ...]} -> CSV, and PNG if possible."""
    csv_path, png_path = curve_paths(args)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "env_steps", "greedy_success", "greedy_mean_return"])
        for (method, seed), points in curves.items():
            writer.writerows([NAMES[method], seed, *point] for point in points)
    written = [csv_path]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: the PNG was skipped (pip install matplotlib)", file=sys.stderr)
        return written
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, method in enumerate(dict.fromkeys(m for m, _ in curves)):
        runs = [np.array(p) for (m, _), p in curves.items() if m == method]
        for column, ax in ((1, axes[0]), (2, axes[1])):
            for run in runs:
                ax.plot(run[:, 0], run[:, column], color=f"C{i}", alpha=0.25, linewidth=0.8)
            n = min(len(r) for r in runs)
            mean = np.mean([r[:n, column] for r in runs], axis=0)
            ax.plot(runs[0][:n, 0], mean, color=f"C{i}", linewidth=2, label=f"{NAMES[method]} (mean of {len(runs)})")
    axes[0].set_ylabel("greedy success rate")
    axes[1].set_ylabel("greedy mean return")
    for ax in axes:
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"Meeting Gridworld {args.grid_size}x{args.grid_size}, {args.n_agents} agents")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return written + [png_path]


def mean_std(values, scale=1.0, digits=2):
    """'mean +- std' over seeds (the value alone for one seed), ignoring undefined values (NaN)."""
    values = np.asarray(values, dtype=float) * scale
    values = values[~np.isnan(values)]
    if values.size < 2:
        return f"{values[0]:.{digits}f}" if values.size else "n/a"
    return f"{values.mean():.{digits}f} +- {values.std():.{digits}f}"


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def ratio_text(ratio):
    """length / shortest, or n/a when no episode succeeded."""
    return "n/a" if np.isnan(ratio) else f"{ratio:.3f}"


def json_number(value):
    """NaN (no successful episode, so no optimality ratio) is not JSON: write null."""
    return None if isinstance(value, float) and np.isnan(value) else value


def print_summary(args, results, written):
    agents = dict.fromkeys(r["agent"] for runs in results.values() for r in runs)
    print(f"\nMeeting Gridworld {args.grid_size}x{args.grid_size}, {args.n_agents} agents, "
          f"{args.max_steps}-step limit, observations: own position and goal"
          f"{' and the other agents' if args.observe_others else ''}, agent "
          f"{' / '.join(agents)}. {args.t_max:,} training env steps "
          f"per seed, {plural(max(len(r) for r in results.values()), 'seed')}; greedy evaluation on "
          f"{args.eval_episodes} fresh episodes per seed.")
    print(f"\n{'method':<8}{'success %':>18}{'return':>16}{'length':>16}{'length/shortest':>20}"
          f"{'train s/seed':>14}{'train episodes':>16}{'last 100 train %':>20}")
    for method, runs in results.items():
        print(f"{NAMES[method]:<8}{mean_std([r['success_rate'] for r in runs], 100, 1):>18}"
              f"{mean_std([r['mean_return'] for r in runs]):>16}{mean_std([r['mean_length'] for r in runs]):>16}"
              f"{mean_std([r['optimality_ratio'] for r in runs], digits=3):>20}"
              f"{np.mean([r['train_seconds'] for r in runs]):>14.1f}"
              f"{np.mean([r['train_episodes'] for r in runs]):>16,.0f}"
              f"{mean_std([r['train_success_last_100'] for r in runs], 100, 1):>20}")
    print("\nper seed (success %, length/shortest, train s):")
    for method, runs in results.items():
        cells = [f"{r['success_rate']:.1%} {ratio_text(r['optimality_ratio'])} {r['train_seconds']:.0f}s" for r in runs]
        print(f"  {NAMES[method]:<6}" + " | ".join(cells))
    print("\nwrote " + ", ".join(str(p) for p in written))


ENV_FLAGS = ("grid_size", "n_agents", "max_steps", "observe_others")  # what the env is made of


def env_settings(args):
    return {name: getattr(args, name) for name in ENV_FLAGS}


def jobs(args):
    """(method, seed, learner or None) for every run: fresh ones, or the --load files."""
    if not args.load:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        return [(method, seed, None) for method in args.methods or list(NAMES) for seed in seeds]
    env_info = make_env(args).get_env_info()
    try:
        loaded = [q.Learner.load(path, env_info=env_info) for path in args.load]
    except (OSError, ValueError) as err:
        sys.exit(f"--load: {err}")
    for path, learner in zip(args.load, loaded):
        saved = pathlib.Path(path).with_suffix(".json")
        trained_on = json.loads(saved.read_text()) if saved.exists() else env_settings(args)
        differ = [f"--{name.replace('_', '-')} {trained_on[name]} (not {getattr(args, name)})"
                  for name in ENV_FLAGS if trained_on.get(name) != getattr(args, name)]
        if differ:
            sys.exit(f"--load: {path} was trained with {', '.join(differ)}: give the flags it was trained with")
        if args.methods is not None and learner.config.mixer not in args.methods:
            sys.exit(f"--load: {path} holds a {NAMES[learner.config.mixer]} learner, not one of --methods "
                     f"{' '.join(args.methods)}")
    return [(learner.config.mixer, learner.config.seed, learner) for learner in loaded]


def read_curves(paths):
    """The learning curves in CSVs written by write_curves: {(method, seed): [points]}."""
    methods = {name: method for method, name in NAMES.items()}
    curves, source = {}, {}  # source: (method, seed) -> index of the file its curve came from
    for i, path in enumerate(paths):
        with open(path, newline="") as f:
            try:
                rows = [((methods[r["method"]], int(r["seed"])),
                         (int(r["env_steps"]), float(r["greedy_success"]), float(r["greedy_mean_return"])))
                        for r in csv.DictReader(f)]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path} is not a curve CSV written by this script ({err!r})") from None
        for run, point in rows:
            if source.setdefault(run, i) != i:
                raise ValueError(f"{NAMES[run[0]]} seed {run[1]} is in both {paths[source[run]]} and "
                                 f"{path}: give each run's curve once")
            curves.setdefault(run, []).append(point)
    if not curves:
        raise ValueError(f"no curve points in {', '.join(map(str, paths))}")
    return curves


def main():
    args = parse_args()
    if args.plot:
        try:
            curves = read_curves(args.plot)
        except (OSError, ValueError) as err:
            sys.exit(f"--plot: {err}")
        refuse_to_overwrite(args, curve_paths(args))
        print("wrote " + ", ".join(map(str, write_curves(args, curves))))
        return
    todo = jobs(args)
    evaluate_only = args.load and all(learner.t_env >= args.t_max for _, _, learner in todo)
    saves = [pathlib.Path(args.save) / f"{method}-seed{seed}{suffix}" for method, seed, _ in todo
             for suffix in (".npz", ".json")] if args.save else []
    refuse_to_overwrite(args, saves + ([] if evaluate_only else list(curve_paths(args))))
    results, curves = {}, {}
    for method, seed, learner in todo:
        result, curves[method, seed] = run_seed(args, method, seed, learner)
        results.setdefault(method, []).append(result)
    written = [] if evaluate_only else write_curves(args, curves)  # nothing trained: no curve to write
    if args.json:
        keys = ("success_rate", "mean_return", "mean_length", "optimality_ratio", "train_seconds",
                "train_episodes", "train_success_last_100")
        print(json.dumps({NAMES[m]: {k: [json_number(r[k]) for r in runs] for k in keys}
                          for m, runs in results.items()}))
    else:
        print_summary(args, results, written)


if __name__ == "__main__":
    main()
