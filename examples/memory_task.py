"""QMIX with the GRU agent (use_rnn=True) against the feed-forward one (use_rnn=False) on a task
that needs memory: envs.CueRecall, where each agent sees a cue at the first step only and must
name it at the last step, and the team scores only if every agent does.

Trains both agents on several seeds, then prints each seed's greedy success rate (the mean
return over fresh episodes) beside the best any memoryless agents can do: (1 / n_cues) ** n_agents
in expectation, and on the evaluation episodes themselves the share of their most common
combination of cues (memoryless agents answer the same whatever the cues).

    python examples/memory_task.py                 # 2 agents, 3 cues, a delay of 4 steps, 5 seeds
    python examples/memory_task.py --delay 8 --seeds 2
    python examples/memory_task.py --json          # one JSON object instead of the table
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread unless set: these matrices are too small to share

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a clone, installed or not
import envs  # noqa: E402
import qmix_np as q  # noqa: E402

AGENTS = {"GRU (use_rnn=True)": True, "MLP (use_rnn=False)": False}
EVAL_SEED = 10**6  # evaluation episodes' reset seeds start here


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in --help."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    parser.add_argument("--t-max", type=int, default=60000, help="training env steps per seed")
    parser.add_argument("--agents", type=int, default=2, help="agents, each with its own cue")
    parser.add_argument("--cues", type=int, default=3, help="values a cue can take")
    parser.add_argument("--delay", type=int, default=4, help="blank steps between the cue and the answer")
    parser.add_argument("--eval-episodes", type=int, default=500, help="fresh greedy episodes per seed")
    parser.add_argument("--batch-size-run", type=int, default=4,
                        help="envs played in lockstep (pymarl's batch_size_run): one train step per that many episodes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    counts = (args.seeds, args.t_max, args.agents, args.eval_episodes, args.batch_size_run)
    if min(counts) < 1 or args.cues < 2 or args.delay < 0:
        parser.error("--seeds, --t-max, --agents, --eval-episodes and --batch-size-run must be >= 1, --cues >= 2, "
                     "--delay >= 0")
    return args


def make_config(args, use_rnn, seed):
    """QMIX as pymarl configures it, but for the agent, with exploration annealed over the first
    half of the run, a buffer of 1000 episodes, targets every 50 episodes and lr 1e-3. Four envs
    in lockstep: one train step per 4 episodes, so twice the env steps of one env (30,000) and
    0.6 times its seconds for the same success on 5 seeds."""
    return q.Config(mixer="qmix", use_rnn=use_rnn, t_max=args.t_max, epsilon_anneal_time=max(1, args.t_max // 2),
                    buffer_size=1000, target_update_interval=50, lr=1e-3, seed=seed, batch_size_run=args.batch_size_run)


def run(args, use_rnn):
    """Greedy success rate per seed, and seconds per seed."""
    rates, start = [], time.perf_counter()
    for seed in range(args.seeds):
        train_envs = [envs.CueRecall(args.agents, args.cues, args.delay) for _ in range(args.batch_size_run)]
        learner = q.train(train_envs, make_config(args, use_rnn, seed), progress=True)  # a line to stderr every 5 s
        env = envs.CueRecall(args.agents, args.cues, args.delay)
        rates.append(q.evaluate(env, learner, args.eval_episodes, seed=EVAL_SEED)["mean_return"])
    return rates, (time.perf_counter() - start) / args.seeds


def best_memoryless_on_evaluation(env, episodes):
    """Memoryless agents give the same answers whatever the cues, so on the evaluation episodes
    they succeed at most as often as the most common combination of cues occurs."""
    counts = collections.Counter()
    for i in range(episodes):
        env.reset(seed=EVAL_SEED + i)
        counts[tuple(env.cues.tolist())] += 1
    return max(counts.values()) / episodes


def main():
    args = parse_args()
    env = envs.CueRecall(args.agents, args.cues, args.delay)
    bound, on_evaluation = env.memoryless_bound(), best_memoryless_on_evaluation(env, args.eval_episodes)
    results = {name: run(args, use_rnn) for name, use_rnn in AGENTS.items()}
    if args.json:
        print(json.dumps({"memoryless_bound": bound, "memoryless_best_on_evaluation": on_evaluation,
                          **{name: {"success_rate": rates} for name, (rates, _) in results.items()}}))
        return
    print(f"CueRecall: {args.agents} agents, {args.cues} cues, a delay of {args.delay} steps; QMIX, "
          f"{args.t_max:,} env steps per seed, greedy success over {args.eval_episodes} fresh episodes.")
    print(f"The best memoryless agents: (1/{args.cues})^{args.agents} = {bound:.1%} in expectation; "
          f"{on_evaluation:.1%} on these {args.eval_episodes} episodes (their most common cues)")
    for name, (rates, seconds) in results.items():
        print(f"  {name:<22}{'  '.join(f'{r:6.1%}' for r in rates)}   ({seconds:.0f} s per seed)")


if __name__ == "__main__":
    main()
