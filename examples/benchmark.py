"""What qmix_np's parts cost, on this machine.

Times (median and spread after warm-up) of one full train step (sample a batch of episodes,
forward and backward of the masked TD loss, clip, Adam) at several sizes, with the GRU agent
(use_rnn=True, backpropagation through time) and the feed-forward one (use_rnn=False), of
greedy action selection, and end-to-end training on Meeting Gridworld 5x5 with
examples/meeting_gridworld.py's settings, with each agent, at several batch_size_run K (envs
played in lockstep, one train step per K episodes). `--torch` also times, in the same run, the same train step in PyTorch: the restatement
of pymarl's QLearner.train in test_pymarl_parity.py (shown there to compute the same numbers),
on the same weights and batch. PyTorch is never a dependency (pip install torch==2.13.0 gives
the CPU build on these machines).

BLAS runs on one thread unless --threads says otherwise (set before NumPy is imported).

    python examples/benchmark.py                  # table
    python examples/benchmark.py --json           # one JSON object
    python examples/benchmark.py --torch
    python examples/benchmark.py --sizes 2,6,5,4,32,50 8,30,10,60,32,50 --dtype float64
"""
import argparse
import os
import sys

SIZES = ["2,6,5,4,32,10", "2,6,5,4,32,50", "8,30,10,60,32,50"]  # N, O, A, S, B episodes, T steps


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default in --help."""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES, metavar="N,O,A,S,B,T",
                        help="train-step sizes: agents, obs dim, actions, state dim, episodes, steps")
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=10, help="untimed repetitions first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="training dtype")
    parser.add_argument("--threads", type=int, default=1, help="BLAS (and torch) threads")
    parser.add_argument("--e2e-steps", type=int, default=20000, help="env steps of each end-to-end run")
    parser.add_argument("--e2e-k", type=int, nargs="+", default=[1, 4, 8, 16], metavar="K",
                        help="batch_size_run values (envs in lockstep) of the end-to-end runs")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch (if installed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        args.sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    except ValueError:
        parser.error("--sizes takes N,O,A,S,B,T groups of six integers")
    if any(len(s) != 6 or min(s) < 1 for s in args.sizes):
        parser.error("--sizes takes N,O,A,S,B,T groups of six integers >= 1")
    if args.reps < 1 or args.warmup < 0 or args.threads < 1 or args.e2e_steps < 100 or min(args.e2e_k) < 1:
        parser.error("--reps, --threads and --e2e-k must be >= 1, --warmup >= 0, --e2e-steps >= 100")
    return args


ARGS = parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before NumPy loads its BLAS

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a clone, installed or not
sys.path.insert(0, str(HERE))
import envs  # noqa: E402
import meeting_gridworld  # noqa: E402
import qmix_np as q  # noqa: E402


def timings(fn, reps, warmup):
    """Median, 10th and 90th percentile of fn()'s wall time, in microseconds."""
    for _ in range(warmup):
        fn()
    times = np.empty(reps)
    for i in range(reps):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    p10, median, p90 = np.percentile(times * 1e6, [10, 50, 90])
    return {"median_us": round(median, 1), "p10_us": round(p10, 1), "p90_us": round(p90, 1)}


AGENTS = {"gru": True, "mlp": False}  # name -> use_rnn


def filled_learner(size, dtype, use_rnn):
    """pymarl's QMIX (hypernet_layers 2, embed 32, agent width 64, obs_last_action, agent ids),
    with a buffer of B full-length random episodes of T steps: every batch is B x T."""
    n, o, a, s, b, t = size
    config = q.Config(batch_size=b, buffer_size=b, dtype=dtype, use_rnn=use_rnn)
    learner = q.Learner(config, {"n_agents": n, "obs_shape": o, "state_shape": s, "n_actions": a,
                                 "episode_limit": t})
    rng = np.random.default_rng(1)
    for _ in range(b):
        learner.buffer.insert({"obs": rng.normal(size=(t + 1, n, o)), "state": rng.normal(size=(t + 1, s)),
                               "avail_actions": np.ones((t + 1, n, a), bool), "actions": rng.integers(0, a, (t, n)),
                               "reward": rng.normal(size=t), "terminated": np.arange(t) == t - 1})
    return learner


def torch_train_step(learner, threads):
    """pymarl's train step in PyTorch on the learner's weights and a batch of its episodes."""
    import torch
    import test_pymarl_parity as pymarl

    torch.set_num_threads(threads)
    c = learner.config
    dtype = getattr(torch, c.dtype)
    args = {"gamma": c.gamma, "double_q": c.double_q, "obs_last_action": c.obs_last_action,
            "obs_agent_id": c.obs_agent_id}
    mac, target_mac = (pymarl.MAC([a.to(dtype) for a in pymarl.torch_agents(learner, p["agent"])],
                                  learner.n_agents, args) for p in (learner.params, learner.target_params))
    mixer, target_mixer = (pymarl.torch_mixer(learner, p["mixer"]).to(dtype)
                           for p in (learner.params, learner.target_params))
    params = mac.parameters() + list(mixer.parameters())
    optimiser = torch.optim.Adam(params, lr=c.lr)
    batch = pymarl.pymarl_batch(learner.buffer.sample(c.batch_size, np.random.default_rng(0)))
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}

    def step():
        optimiser.zero_grad()
        pymarl.pymarl_train_loss(mac, target_mac, mixer, target_mixer, batch, args).backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_norm_clip)
        optimiser.step()

    return step, torch.__version__


def matmul_flops(size, use_rnn, config):
    """Floating-point operations in the matrix products of one train step at full length: online
    and target agents over R = B (T + 1) N rows and mixers over B T rows, forward, then backward
    (for each Linear: dL/dW, and dL/dx where the input is not data; for the GRU also the product
    that carries dL/dh back one step). 2 m k n per (m, k) @ (k, n)."""
    n, o, a, s, b, t = size
    h, e, he = config.hidden_dim, config.mixing_embed_dim, config.hypernet_embed
    i = o + a * config.obs_last_action + n * config.obs_agent_id
    rows, mixer_rows = b * (t + 1) * n, b * t
    middle = 2 * (3 * h * h) if use_rnn else h * h  # GRU: x W_ih^T and h W_hh^T, 3H wide; else one Linear
    agent_forward = 2 * rows * (i * h + middle + h * a)
    agent_backward = 2 * rows * (i * h + 2 * middle + 2 * h * a) + (2 * rows * 3 * h * h if use_rnn else 0)
    first = s * he + s * he + s * e + s * e  # the layers that read the state: no dL/d(state)
    second = he * e * n + he * e + e * 1  # hyper_w_1.2, hyper_w_final.2, V.2
    mixing = n * e  # q (1, N) @ |W1| (N, E) per row
    mixer_forward = 2 * mixer_rows * (first + second + mixing)
    mixer_backward = 2 * mixer_rows * (first + 2 * second + mixing)
    return 2 * agent_forward + agent_backward + 2 * mixer_forward + mixer_backward


def blas_rate(m, k, n, dtype, reps):
    """GFLOP/s of NumPy's (m, k) @ (k, n) product alone: the rate the step's products could reach."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(m, k)).astype(dtype), rng.normal(size=(k, n)).astype(dtype)
    median_us = timings(lambda: x @ w, reps * 20, reps)["median_us"]
    return 2 * m * k * n / median_us / 1e3


def greedy_selection(dtype):
    env = envs.MeetingGridworld()
    learner = q.Learner(q.Config(dtype=dtype), env.get_env_info())
    obs, avail = env.get_obs(), env.get_avail_actions()
    return lambda: learner.select_actions(obs, avail, [4, 4])


def training_throughput(steps, dtype, agent, k):
    """Env steps per second of train() on Meeting Gridworld 5x5 from scratch, with
    examples/meeting_gridworld.py's settings but k envs in lockstep (one train step per k
    episodes once 32 are stored), and how the time splits between train steps and the rest."""
    settings = meeting_gridworld.parse_args(["--t-max", str(steps), "--agent", agent])
    config = dataclasses.replace(meeting_gridworld.make_config(settings, "qmix", 0), dtype=dtype, batch_size_run=k)
    envs_ = [envs.MeetingGridworld() for _ in range(k)]
    learner = q.Learner(config, envs_[0].get_env_info())
    train_times, train_step = [], learner.train_step

    def timed_train_step():
        start = time.perf_counter()
        result = train_step()
        train_times.append(time.perf_counter() - start)
        return result

    learner.train_step = timed_train_step  # this learner only; the train() loop calls it as usual
    start = time.perf_counter()
    q.train(envs_, config, learner=learner)
    elapsed = time.perf_counter() - start
    train_us = np.array(train_times or [0.0]) * 1e6  # [0.0]: a run too short to train
    return {"agent": agent, "batch_size_run": k, "env_steps": learner.t_env, "episodes": learner.episode,
            "train_steps": len(train_times), "seconds": round(elapsed, 2),
            "env_steps_per_s": round(learner.t_env / elapsed),
            "train_step_median_us": round(float(np.median(train_us)), 1),
            "train_share": round(float(train_us.sum()) / (elapsed * 1e6), 3),
            "rest_per_env_step_us": round((elapsed * 1e6 - train_us.sum()) / learner.t_env, 1)}


def main():
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "numpy": np.__version__, "blas_threads": ARGS.threads, "dtype": ARGS.dtype,
              "reps": ARGS.reps, "train_step": []}
    for size, agent in ((size, agent) for size in ARGS.sizes for agent in AGENTS):
        learner = filled_learner(size, ARGS.dtype, AGENTS[agent])
        row = {"size": dict(zip(["N", "O", "A", "S", "B", "T"], size)), "agent": agent,
               **timings(learner.train_step, ARGS.reps, ARGS.warmup)}
        n, _, _, _, b, t = size
        h = learner.config.hidden_dim  # the dominant product: the GRU's h W_hh^T per step, or rnn over all rows
        shape = (b * n, h, 3 * h) if AGENTS[agent] else (b * (t + 1) * n, h, h)
        row["mflop"] = round(matmul_flops(size, AGENTS[agent], learner.config) / 1e6, 1)
        row["blas_shape"], row["blas_gflops"] = shape, round(blas_rate(*shape, ARGS.dtype, ARGS.warmup), 1)
        row["matmul_floor_ms"] = round(row["mflop"] / row["blas_gflops"], 2)
        row["step_over_floor"] = round(row["median_us"] / 1e3 / row["matmul_floor_ms"], 2)
        if ARGS.torch:
            try:
                step, result["torch_version"] = torch_train_step(learner, ARGS.threads)
            except ImportError:
                sys.exit("--torch: PyTorch (and pytest, for the restatement) must be installed: "
                         "pip install torch==2.13.0 pytest")
            row["torch"] = timings(step, ARGS.reps, ARGS.warmup)
            row["ratio_numpy_over_torch"] = round(row["median_us"] / row["torch"]["median_us"], 3)
        result["train_step"].append(row)
    result["greedy_actions_2_agents"] = timings(greedy_selection(ARGS.dtype), ARGS.reps * 10, ARGS.warmup)
    result["training"] = [training_throughput(ARGS.e2e_steps, ARGS.dtype, agent, k) for agent in AGENTS for k in ARGS.e2e_k]
    if ARGS.json:
        print(json.dumps(result))
    else:
        print_table(result)


def print_table(r):
    print(f"qmix-np benchmark: {r['machine']}, NumPy {r['numpy']}, BLAS threads {r['blas_threads']}, "
          f"dtype {r['dtype']}, {r['reps']} reps (median [p10, p90])")
    torch_column = "torch_version" in r
    header = f"{'train step (N, O, A, S, B, T), agent':<40}{'numpy':>26}"
    print(header + (f"{'torch ' + r['torch_version']:>30}{'ratio':>8}" if torch_column else ""))
    for row in r["train_step"]:
        line = f"{str(tuple(row['size'].values())) + ', ' + row['agent'].upper():<40}{fmt(row):>26}"
        if torch_column:
            line += f"{fmt(row['torch']):>30}{row['ratio_numpy_over_torch']:>8.2f}"
        print(line)
    print(f"\n{'matrix products of one step':<40}{'MFLOP':>8}{'BLAS rate on (m, k, n)':>34}{'floor':>10}{'step/floor':>12}")
    for row in r["train_step"]:
        print(f"{str(tuple(row['size'].values())) + ', ' + row['agent'].upper():<40}{row['mflop']:>8,.0f}"
              f"{row['blas_gflops']:>14.0f} GFLOP/s on {str(tuple(row['blas_shape'])):<16}"
              f"{row['matmul_floor_ms']:>7.2f} ms{row['step_over_floor']:>12.1f}")
    print()
    print(f"{'greedy actions, 2 agents, GRU':<40}{fmt(r['greedy_actions_2_agents']):>26}")
    print(f"\ntraining Meeting Gridworld 5x5 from scratch, {r['training'][0]['env_steps']:,}+ env steps, "
          "K envs in lockstep (batch_size_run):")
    print(f"{'agent':<7}{'K':>4}{'env steps/s':>13}{'vs K = 1':>10}{'episodes':>10}{'train steps':>13}"
          f"{'in train steps':>16}{'median step':>13}{'rest per env step':>19}")
    base = {t["agent"]: t["env_steps_per_s"] for t in r["training"] if t["batch_size_run"] == 1}
    for t in r["training"]:
        speedup = f"{t['env_steps_per_s'] / base[t['agent']]:.1f}x" if t["agent"] in base else "-"
        print(f"{t['agent'].upper():<7}{t['batch_size_run']:>4}{t['env_steps_per_s']:>13,}{speedup:>10}"
              f"{t['episodes']:>10,}{t['train_steps']:>13,}{t['train_share']:>16.0%}"
              f"{t['train_step_median_us'] / 1000:>10.1f} ms{t['rest_per_env_step_us']:>16.0f} us")


def fmt(t):
    return f"{t['median_us'] / 1000:.2f} ms [{t['p10_us'] / 1000:.2f}, {t['p90_us'] / 1000:.2f}]"


if __name__ == "__main__":
    main()
