"""QMIX against VDN and independent learners on the QMIX paper's two-step game.

Trains each method with full exploration (epsilon = 1, as in the paper) on several seeds, then
prints the learned Q_tot tables of the first seed beside theory (each method's fixed point
under uniform exploration; for QMIX the true Q_tot) and the paper's learned values, and each
seed's greedy return.
QMIX should earn 8 (B, then B, B); VDN's additive Q_tot misjudges state 2B and takes the sure 7.

    python examples/vdn_vs_qmix.py                 # the paper's game, 5 seeds
    python examples/vdn_vs_qmix.py --payoff 2 1 1 8   # a non-monotonic 2B: QMIX's limits show
    python examples/vdn_vs_qmix.py --json          # one JSON object instead of the tables
"""
import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread unless set: these matrices are too small to share

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a clone, installed or not
import envs  # noqa: E402
import qmix_np as q  # noqa: E402

METHODS = {"QMIX": "qmix", "VDN": "vdn", "IQL": "none"}
PAPER = {  # the paper's learned tables (arXiv v2), where the paper prints them
    "QMIX": {"1": [[6.93, 6.93], [7.92, 7.92]], "2B": [[0.00, 1.00], [1.00, 8.00]]},
    "VDN": {"2B": [[-1.87, 2.31], [2.33, 6.51]]},
}


def config_for(mixer, seed, episodes):
    """Full exploration as in the paper; small nets, the game has 3 states. The agent is the
    default GRU (use_rnn=True). The observation is the state itself, so the last action is left
    out of the agent's input (obs_last_action): then every path into a state leaves the GRU in
    the same hidden state, and each state has one Q table, the one the paper prints."""
    return q.Config(mixer=mixer, seed=seed, t_max=2 * episodes, epsilon_start=1.0, epsilon_finish=1.0,
                    hidden_dim=32, obs_last_action=False, hypernet_layers=1, target_update_interval=100,
                    lr=1e-3, buffer_size=500)


def fixed_points(method, payoff_2a, payoff_2b, gamma):
    """The tables each method converges to under uniform exploration (REFERENCE section 4).

    QMIX: the true Q_tot (it reaches it when the game is monotonic). VDN: the least-squares
    additive fit. IQL: Q_1 + Q_2, each agent averaging over its partner's uniform actions.
    """
    two_a = np.full((2, 2), payoff_2a)
    if method == "QMIX":
        two_b = payoff_2b
    elif method == "VDN":
        mean = payoff_2b.mean()
        two_b = mean + (payoff_2b.mean(1) - mean)[:, None] + (payoff_2b.mean(0) - mean)[None, :]
    else:
        two_a = two_a * 2
        two_b = payoff_2b.mean(1)[:, None] + payoff_2b.mean(0)[None, :]
    if method == "IQL":  # agent 1 steers; agent 2 averages over where agent 1 sends it
        agent1 = gamma * np.array([payoff_2a, payoff_2b.mean(1).max()])
        agent2 = gamma * np.mean([payoff_2a, payoff_2b.mean(0).max()])
        state_1 = agent1[:, None] + np.full((1, 2), agent2)
    else:  # agent 1's action picks the next state; agent 2's does not matter
        state_1 = gamma * np.array([two_a.max(), two_b.max()])[:, None] * np.ones((1, 2))
    return {"1": state_1, "2A": two_a, "2B": two_b}


def run(method, seeds, episodes, payoff):
    """Train one method on every seed: greedy returns, first seed's tables, seconds per seed."""
    returns, tables, start = [], None, time.perf_counter()
    for seed in seeds:
        env = envs.TwoStepGame(payoff_2b=payoff)
        config = config_for(METHODS[method], seed, episodes)
        learner = q.train(env, config)
        returns.append(q.evaluate(env, learner, 1, seed=0)["mean_return"])
        if tables is None:
            tables = {name: q.joint_q_tot(learner.params, config, *env.situation(name)).tolist()
                      for name in env.STATE_NAMES}
    return returns, tables, (time.perf_counter() - start) / len(seeds)


def format_row(row):
    return "  ".join(f"{v:6.2f}" for v in row) if row is not None else f"{'-':>6}  {'-':>6}"


def print_method(method, returns, tables, seconds, reference, paper):
    what = "Q_1 + Q_2 (independent learners have no Q_tot)" if method == "IQL" else "Q_tot"
    print(f"\n{method}: greedy return per seed {', '.join(f'{r:g}' for r in returns)}"
          f"   ({seconds:.1f} s per seed). Tables of {what}:")
    print(f"  state  {'learned, seed 0':<28}{'theory':<18}paper")
    for name in ("1", "2A", "2B"):
        for i in range(2):
            label = name if i == 0 else ""
            paper_row = paper.get(name, [None, None])[i]
            print(f"  {label:<5}  {format_row(tables[name][i]):<28}{format_row(reference[name][i]):<18}"
                  f"{format_row(paper_row)}")


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in --help."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    parser.add_argument("--episodes", type=int, default=2000, help="training episodes per seed")
    parser.add_argument("--payoff", type=float, nargs=4, default=[0, 1, 1, 8], metavar="P",
                        help="state 2B's payoff row by row (default: the paper's 0 1 1 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.seeds < 1 or args.episodes < 1:
        parser.error("--seeds and --episodes must be at least 1")
    payoff = np.array(args.payoff).reshape(2, 2)
    default_game = np.array_equal(payoff, [[0, 1], [1, 8]])

    results = {m: run(m, range(args.seeds), args.episodes, payoff) for m in METHODS}
    if args.json:
        print(json.dumps({m: {"greedy_return": r, "q_tot": t} for m, (r, t, _) in results.items()}))
        return
    print(f"Two-step game, 2B payoff {payoff.tolist()}: {args.episodes} episodes of full "
          f"exploration per seed, {args.seeds} seeds. Optimal return {max(7, payoff.max()):g}.")
    for method, (returns, tables, seconds) in results.items():
        reference = fixed_points(method, 7.0, payoff, gamma=0.99)
        reference = {k: np.round(v, 2).tolist() for k, v in reference.items()}
        print_method(method, returns, tables, seconds, reference,
                     PAPER.get(method, {}) if default_game else {})


if __name__ == "__main__":
    main()
