"""What every part of qmix_np costs, on this machine.

Times (median and spread after warm-up) of one full train step (sample + forward + backward +
clip + Adam) at several sizes, of action selection, of Meeting Gridworld's step, and the
end-to-end training throughput on Meeting Gridworld. `--torch` also times an equivalent PyTorch
train step in the same run, if PyTorch is installed (it is never a dependency).

BLAS runs with one thread unless --threads says otherwise: at these sizes two threads were
slower here. The thread count is set before NumPy is imported.

Each train-step row also gives the minor page faults per step (Unix): memory the process had to
map afresh. glibc's malloc may hand a step's temporaries back to the OS and fault them in again
on the next step; where this column is not 0, the README's allocator settings remove that cost.

    python examples/benchmark.py                  # table
    python examples/benchmark.py --json           # one JSON object
    python examples/benchmark.py --torch --reps 500
    python examples/benchmark.py --sizes 2,6,5,4,32 4,10,6,20,64 --dtype float64
    MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=134217728 python examples/benchmark.py
"""
import argparse
import os
import sys

SIZES = ["2,6,5,4,32", "2,6,5,4,256", "8,30,10,60,32", "8,30,10,60,256"]  # N, O, A, S, B
BUFFER_FILL = 2000  # transitions in the buffer the timed train steps sample from


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES, metavar="N,O,A,S,B",
                        help="train-step sizes: agents, obs dim, actions, state dim, batch")
    parser.add_argument("--reps", type=int, default=300, help="timed repetitions (>= 200 recommended)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed repetitions first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="BLAS (and torch) threads")
    parser.add_argument("--e2e-steps", type=int, default=5000, help="env steps of the end-to-end run")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch (if installed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        args.sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    except ValueError:
        parser.error("--sizes takes N,O,A,S,B groups of five integers")
    if any(len(s) != 5 or min(s) < 1 for s in args.sizes):
        parser.error("--sizes takes N,O,A,S,B groups of five integers >= 1")
    if args.reps < 1 or args.warmup < 0 or args.threads < 1 or args.e2e_steps < 100:
        parser.error("--reps and --threads must be >= 1, --warmup >= 0, --e2e-steps >= 100")
    return args


ARGS = parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before NumPy loads its BLAS

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

try:
    import resource  # noqa: E402  (Unix only)
except ImportError:
    resource = None

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import envs  # noqa: E402
import qmix_np as q  # noqa: E402


def page_faults():
    """Minor page faults of this process so far, or None where the OS does not count them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else None


def timings(fn, reps, warmup):
    """Median, 10th and 90th percentile of fn()'s wall time, in microseconds, and the minor page
    faults per call (memory the OS had to map afresh: see the README's note on malloc)."""
    for _ in range(warmup):
        fn()
    times = np.empty(reps)
    faults_before = page_faults()
    for i in range(reps):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    faults = None if faults_before is None else round((page_faults() - faults_before) / reps, 1)
    p10, median, p90 = np.percentile(times * 1e6, [10, 50, 90])
    return {"median_us": round(median, 1), "p10_us": round(p10, 1), "p90_us": round(p90, 1),
            "page_faults_per_call": faults}


def bench_config(batch_size, dtype, seed=0):
    """The architecture the benchmark times: shared 64-64 MLP agent with agent id, QMIX mixer
    with hypernet_layers 1 and mixing_embed_dim 32, double Q, clip 10, Adam."""
    return q.Config(mixer="qmix", hypernet_layers=1, mixing_embed_dim=32, agent_hidden_dims=(64, 64),
                    double_q=True, grad_norm_clip=10.0, batch_size=batch_size, buffer_size=5000,
                    dtype=dtype, seed=seed)


def random_transition(rng, n, o, a, s):
    """One random transition, drawn alone as an env would give it (no large temporaries, which
    would change how the process's malloc behaves later: see the README)."""
    return {"obs": rng.normal(size=(n, o)), "state": rng.normal(size=s), "actions": rng.integers(0, a, n),
            "avail_actions": np.ones((n, a), bool), "reward": rng.normal(), "terminated": rng.random() < 0.05,
            "next_obs": rng.normal(size=(n, o)), "next_state": rng.normal(size=s),
            "next_avail_actions": np.ones((n, a), bool)}


def numpy_train_step(size, dtype):
    n, o, a, s, b = size
    learner = q.Learner(bench_config(b, dtype), {"n_agents": n, "obs_shape": o, "state_shape": s,
                                                 "n_actions": a, "episode_limit": 100})
    rng = np.random.default_rng(1)
    for _ in range(BUFFER_FILL):
        learner.buffer.add(**random_transition(rng, n, o, a, s))
    return learner.train_step


def torch_train_step(size, dtype, threads):
    """The same train step in PyTorch: shared MLP agent, pymarl's QMixer (hypernet_layers 1),
    double Q, clip_grad_norm_ 10, Adam, a batch sampled from a replay buffer of tensors."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, o, a, s, b = size
    tdtype = getattr(torch, dtype)
    e = 32

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.hyper_w_1, self.hyper_w_final = nn.Linear(s, e * n), nn.Linear(s, e)
            self.hyper_b_1 = nn.Linear(s, e)
            self.V = nn.Sequential(nn.Linear(s, e), nn.ReLU(), nn.Linear(e, 1))

        def forward(self, qs, st):
            w1 = torch.abs(self.hyper_w_1(st)).view(-1, n, e)
            hidden = nn.functional.elu(torch.bmm(qs.view(-1, 1, n), w1) + self.hyper_b_1(st).view(-1, 1, e))
            wf = torch.abs(self.hyper_w_final(st)).view(-1, e, 1)
            return (torch.bmm(hidden, wf) + self.V(st).view(-1, 1, 1)).view(-1)

    def agent_net():
        return nn.Sequential(nn.Linear(o + n, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, a))

    agent, mixer, target_agent, target_mixer = agent_net(), Mixer(), agent_net(), Mixer()
    for net in (agent, mixer, target_agent, target_mixer):
        net.to(tdtype)
    target_agent.load_state_dict(agent.state_dict())
    target_mixer.load_state_dict(mixer.state_dict())
    params = list(agent.parameters()) + list(mixer.parameters())
    optimiser = torch.optim.Adam(params, lr=5e-4)
    gen = torch.Generator().manual_seed(1)
    buffer = {"obs": torch.randn(BUFFER_FILL, n, o, generator=gen, dtype=tdtype),
              "state": torch.randn(BUFFER_FILL, s, generator=gen, dtype=tdtype),
              "actions": torch.randint(0, a, (BUFFER_FILL, n), generator=gen),
              "reward": torch.randn(BUFFER_FILL, generator=gen, dtype=tdtype),
              "terminated": torch.rand(BUFFER_FILL, generator=gen) < 0.05,
              "next_obs": torch.randn(BUFFER_FILL, n, o, generator=gen, dtype=tdtype),
              "next_state": torch.randn(BUFFER_FILL, s, generator=gen, dtype=tdtype),
              "next_avail_actions": torch.ones(BUFFER_FILL, n, a, dtype=torch.bool)}
    ids = torch.eye(n, dtype=tdtype).expand(b, n, n)

    def step():
        idx = torch.randint(0, BUFFER_FILL, (b,))
        batch = {k: v[idx] for k, v in buffer.items()}
        inputs = torch.cat([batch["obs"], ids], -1)
        next_inputs = torch.cat([batch["next_obs"], ids], -1)
        chosen = agent(inputs).gather(-1, batch["actions"].unsqueeze(-1)).squeeze(-1)
        q_tot = mixer(chosen, batch["state"])
        with torch.no_grad():
            online_next = agent(next_inputs).masked_fill(~batch["next_avail_actions"], -1e10)
            best = online_next.argmax(-1, keepdim=True)
            next_qs = target_agent(next_inputs).gather(-1, best).squeeze(-1)
            y = batch["reward"] + 0.99 * (1 - batch["terminated"].to(tdtype)) * target_mixer(next_qs, batch["next_state"])
        loss = ((q_tot - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimiser.step()

    return step, torch.__version__


def action_selection(dtype, epsilon):
    env = envs.MeetingGridworld()
    learner = q.Learner(bench_config(32, dtype), env.get_env_info())
    obs, avail = env.get_obs(), env.get_avail_actions()
    return lambda: learner.select_actions(obs, avail, epsilon)


def gridworld_steps_per_second(reps):
    env, rng = envs.MeetingGridworld(), np.random.default_rng(0)
    actions = rng.integers(0, 5, (reps, 2))
    start = time.perf_counter()
    for a in actions:
        if env.step(a)[1]:
            env.reset()
    return reps / (time.perf_counter() - start)


def training_throughput(steps, dtype):
    """Env steps per second of train() on Meeting Gridworld, one train step per env step,
    exploration and buffer writes included (timed after the buffer first holds a batch), and
    how each env step's time splits: the train step (each one timed as the loop runs it) and
    the rest of the loop (action selection, the env, checks, the buffer write). Also epsilon at
    the start and end of the timed run: while it is near 1, most steps need no Q-values."""
    config = bench_config(32, dtype)
    env = envs.MeetingGridworld()
    learner = q.train(env, dataclasses.replace(config, t_max=200))
    train_times, train_step = [], learner.train_step

    def timed_train_step():
        start = time.perf_counter()
        result = train_step()
        train_times.append(time.perf_counter() - start)
        return result

    learner.train_step = timed_train_step  # this learner only; the train() loop calls it as usual
    start_steps, epsilon_from, start = learner.t_env, learner.epsilon(), time.perf_counter()
    q.train(env, dataclasses.replace(config, t_max=200 + steps), learner=learner)
    elapsed, env_steps = time.perf_counter() - start, learner.t_env - start_steps
    train_us = np.array(train_times) * 1e6
    return {"env_steps_per_s": round(env_steps / elapsed),
            "train_step_mean_us": round(float(train_us.mean()), 1),
            "train_step_median_us": round(float(np.median(train_us)), 1),
            "rest_per_env_step_us": round((elapsed * 1e6 - train_us.sum()) / env_steps, 1),
            "epsilon_from": round(epsilon_from, 3), "epsilon_to": round(learner.epsilon(), 3)}


def blas_threads():
    try:
        from threadpoolctl import threadpool_info
        counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        return f"{counts[0]} (threadpoolctl)" if counts else f"{ARGS.threads} (requested)"
    except ImportError:
        return f"{ARGS.threads} (requested via OPENBLAS_NUM_THREADS/OMP_NUM_THREADS/MKL_NUM_THREADS)"


def main():
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "numpy": np.__version__, "blas_threads": blas_threads(), "dtype": ARGS.dtype,
              "reps": ARGS.reps, "train_step": []}
    torch_version = None
    for size in ARGS.sizes:
        row = {"size": dict(zip("NOASB", size)), **timings(numpy_train_step(size, ARGS.dtype), ARGS.reps, ARGS.warmup)}
        if ARGS.torch:
            try:
                step, torch_version = torch_train_step(size, ARGS.dtype, ARGS.threads)
            except ImportError:
                sys.exit("--torch: PyTorch is not installed (pip install torch==2.13.0 for the CPU build here)")
            row["torch"] = timings(step, ARGS.reps, ARGS.warmup)
            row["ratio_numpy_over_torch"] = round(row["median_us"] / row["torch"]["median_us"], 3)
        result["train_step"].append(row)
    if torch_version:
        result["torch_version"] = torch_version
    result["greedy_actions_2_agents"] = timings(action_selection(ARGS.dtype, 0.0), ARGS.reps, ARGS.warmup)
    result["epsilon_greedy_actions_2_agents"] = timings(action_selection(ARGS.dtype, 0.5), ARGS.reps, ARGS.warmup)
    result["gridworld_random_steps_per_s"] = round(gridworld_steps_per_second(20000))
    result["training"] = training_throughput(ARGS.e2e_steps, ARGS.dtype)
    if ARGS.json:
        print(json.dumps(result))
    else:
        print_table(result)


def print_table(r):
    print(f"qmix-np benchmark: {r['machine']}, NumPy {r['numpy']}, BLAS threads {r['blas_threads']}, "
          f"dtype {r['dtype']}, {r['reps']} reps (median [p10, p90])")
    torch_column = "torch_version" in r
    header = f"{'train step (N, O, A, S, B)':<30}{'numpy':>24}{'page faults':>13}"
    print(header + (f"{'torch ' + r['torch_version']:>28}{'ratio':>8}" if torch_column else ""))
    for row in r["train_step"]:
        size = tuple(row["size"].values())
        faults = row["page_faults_per_call"]
        line = f"{str(size):<30}{fmt(row):>24}{'n/a' if faults is None else faults:>13}"
        if torch_column:
            line += f"{fmt(row['torch']):>28}{row['ratio_numpy_over_torch']:>8.2f}"
        print(line)
    print(f"{'greedy actions, 2 agents':<30}{fmt(r['greedy_actions_2_agents']):>24}")
    print(f"{'eps-greedy actions, 2 agents':<30}{fmt(r['epsilon_greedy_actions_2_agents']):>24}")
    print(f"{'gridworld random steps/s':<30}{r['gridworld_random_steps_per_s']:>24,}")
    t = r["training"]
    print(f"{'training env steps/s':<30}{t['env_steps_per_s']:>24,}   "
          "(Meeting Gridworld, one train step per env step)")
    print(f"{'  per env step':<30}   train step {t['train_step_mean_us']:.0f} us mean "
          f"({t['train_step_median_us']:.0f} median), the rest of the loop {t['rest_per_env_step_us']:.0f} us; "
          f"epsilon {t['epsilon_from']:.2f} to {t['epsilon_to']:.2f}")


def fmt(t):
    return f"{t['median_us']:.0f} us [{t['p10_us']:.0f}, {t['p90_us']:.0f}]"


if __name__ == "__main__":
    main()
