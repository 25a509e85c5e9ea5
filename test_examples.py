"""The example scripts run to their last line at tiny budgets, from another folder, writing only
there; the benchmark's JSON report has every part (its timings are not asserted: this is a
shared machine); the README's own-environment example trains."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent


def run(cwd, *args):
    """A Python script in `cwd`, finding qmix_np as an installed copy would be found."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_the_examples_run_from_another_folder_and_write_only_there(tmp_path):
    before = sorted(p.stat().st_mtime_ns for p in (HERE / "examples" / "results").iterdir())
    two_step = run(tmp_path, HERE / "examples" / "vdn_vs_qmix.py", "--seeds", "1", "--episodes", "50")
    assert two_step.returncode == 0, two_step.stderr
    assert "QMIX: greedy return per seed" in two_step.stdout and "IQL: greedy return" in two_step.stdout

    gridworld = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", "--seeds", "1", "--t-max", "300",
                    "--eval-episodes", "10", "--curve-every", "150", "--curve-episodes", "5", "--save", "saved")
    assert gridworld.returncode == 0, gridworld.stderr
    assert (tmp_path / "runs" / "meeting_gridworld_5x5_2agents.csv").exists()
    assert (tmp_path / "saved" / "qmix-seed0.npz").exists()
    resumed = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", "--load", "saved/qmix-seed0.npz",
                  "--t-max", "0", "--eval-episodes", "5", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["QMIX"]["success_rate"][0] >= 0
    memory = run(tmp_path, HERE / "examples" / "memory_task.py", "--seeds", "1", "--t-max", "200",
                 "--eval-episodes", "5", "--json")
    assert memory.returncode == 0, memory.stderr
    report = json.loads(memory.stdout)
    assert report["memoryless_bound"] == 1 / 9 and 1 / 9 <= report["memoryless_best_on_evaluation"] <= 1
    assert set(report) == {"memoryless_bound", "memoryless_best_on_evaluation", "GRU (use_rnn=True)", "MLP (use_rnn=False)"}
    soak = run(tmp_path, HERE / "examples" / "soak.py", "--t-max", "2000", "--every", "1000", "--eval-episodes", "5")
    assert soak.returncode == 0, soak.stderr
    assert "all losses and gradient norms finite: True; skipped steps: 0" in soak.stdout
    assert sorted(p.stat().st_mtime_ns for p in (HERE / "examples" / "results").iterdir()) == before


def test_the_gridworld_example_keeps_earlier_files_and_refuses_contradicting_flags(tmp_path):
    """A second run into the same folder is refused before it trains (--overwrite allows it); an
    evaluate-only --load writes no curve; --methods must include a loaded learner's method."""
    tiny = ["--seeds", "1", "--t-max", "200", "--eval-episodes", "5", "--curve-every", "100",
            "--curve-episodes", "5"]
    first = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", *tiny, "--save", "saved")
    assert first.returncode == 0, first.stderr
    curve = tmp_path / "runs" / "meeting_gridworld_5x5_2agents.csv"
    before = curve.read_bytes()
    again = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", *tiny, "--save", "saved")
    assert again.returncode != 0 and "already exist(s), from an earlier run" in again.stderr
    assert "--overwrite" in again.stderr and curve.read_bytes() == before
    evaluated = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", "--load", "saved/qmix-seed0.npz",
                    "--t-max", "0", "--eval-episodes", "5")
    assert evaluated.returncode == 0, evaluated.stderr
    assert curve.read_bytes() == before and "length/shortest" in evaluated.stdout
    other = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", "--load", "saved/qmix-seed0.npz",
                "--methods", "vdn", "--t-max", "0")
    assert other.returncode != 0 and "holds a QMIX learner, not one of --methods vdn" in other.stderr
    bigger = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", "--load", "saved/qmix-seed0.npz",
                 "--grid-size", "7", "--t-max", "0")
    assert bigger.returncode != 0 and "was trained with --grid-size 5 (not 7)" in bigger.stderr
    replaced = run(tmp_path, HERE / "examples" / "meeting_gridworld.py", *tiny, "--save", "saved", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "1 seed;" in replaced.stdout and "+-" not in replaced.stdout.split("per seed (")[0].split("method")[-1]


def test_the_help_shows_every_default():
    for script in ("vdn_vs_qmix.py", "meeting_gridworld.py", "memory_task.py", "mpe_spread.py", "soak.py",
                   "benchmark.py"):
        shown = run(HERE, HERE / "examples" / script, "--help").stdout
        options = re.findall(r"^  (--[a-z-]+)", shown, flags=re.M)
        assert options and shown.count("(default:") >= len(options) - 1, script  # all but --help


def test_the_mpe_example_says_what_it_needs_or_runs(tmp_path):
    """Without pettingzoo and mpe2 it says how to install them; with them, a tiny run works."""
    result = run(tmp_path, HERE / "examples" / "mpe_spread.py", "--methods", "qmix", "--seeds", "1", "--t-max", "60",
                 "--curve-every", "30", "--eval-episodes", "2", "--json")
    if importlib.util.find_spec("mpe2") is None:
        assert result.returncode == 1 and "pip install pettingzoo mpe2" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert set(report) == {"random", "QMIX"} and set(report["QMIX"][0]) == {"return", "paper_units"}


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, HERE / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_paper_units_count_each_agents_own_collision():
    """EPyMARL's fork: every agent gets sum_i (G - c_i), c_i counting agent i itself. Needs mpe2."""
    pytest.importorskip("mpe2")
    mpe_spread = load_example("mpe_spread")
    raw = mpe_spread.make_env().env.unwrapped
    for entity, position in zip(raw.world.agents + raw.world.landmarks,
                                [(0, 0), (0.1, 0), (2, 0), (0, 0), (1, 0), (2, 0.5)]):
        entity.state.p_pos = np.array(position, dtype=float)
    # G = -(0 + 0.9 + 0.5); agents 0 and 1 overlap (0.1 < 2 x 0.15): c = 2, 2, 1
    assert abs(mpe_spread.paper_reward(raw.world, raw.scenario) - (3 * -1.4 - 5)) < 1e-12


def test_the_mpe_summary_reads_its_own_csvs_and_epymarls_sacred_logs(tmp_path):
    """Runs made in separate processes, and EPyMARL's own (its Q_tot logged divided by n_agents)."""
    mpe_spread = load_example("mpe_spread")
    curves = {("qmix", 1, "terminal"): [(50, -70.0, -220.0, 1.5, 1.6, 9.0)],
              ("vdn", 0, "episode_limit"): [(50, -60.0, -200.0, 2.0, 2.1, 3.0), (100, -55.0, -190.0, 3.0, 3.1, 4.0)]}
    mpe_spread.write_curves(types.SimpleNamespace(out=tmp_path / "ours"), curves, -80.0)
    run = tmp_path / "sacred" / "3"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seed": 7}))
    value = lambda v: {"dtype": "float64", "py/object": "numpy.float64", "value": v}  # noqa: E731  (sacred's way)
    (run / "info.json").write_text(json.dumps({
        "test_return_mean_T": [25, 50025], "test_return_mean": [value(-108.5), value(-59.3)],
        "q_taken_mean_T": [10025], "q_taken_mean": [0.5], "target_mean_T": [10025], "target_mean": [0.75],
        "grad_norm_T": [10025], "grad_norm": [value(12.0)]}))
    read = mpe_spread.read_curves([str(tmp_path / "ours" / "mpe_spread.csv"), str(run / "info.json")])
    assert {k: v for k, v in read.items() if k[0] != "epymarl"} == curves
    [(first, second)] = [read[("epymarl", 7, "terminal")]]
    assert first[:2] == (25, -108.5) and np.isnan(first[2:]).all()  # no train step logged yet
    assert second[:2] == (50025, -59.3) and np.isnan(second[2]) and second[3:] == (1.5, 2.25, 12.0)


def test_the_mpe_example_stores_the_time_limit_as_epymarl_by_default():
    """EPyMARL's runner stores the 25-step cut as terminal; --time-limit episode_limit bootstraps it."""
    pytest.importorskip("mpe2")
    mpe_spread = load_example("mpe_spread")
    assert mpe_spread.parse_args([]).time_limit == "terminal"
    for rule, flagged in (("terminal", False), ("episode_limit", True)):
        env = mpe_spread.make_env(rule)
        env.reset(seed=0)
        steps = [env.step(np.zeros(3, int)) for _ in range(25)]
        assert [done for _, done, _ in steps] == [False] * 24 + [True]
        assert steps[-1][2] == {"episode_limit": flagged}


def test_benchmark_runs_and_reports_every_part_as_json():
    result = run(HERE, HERE / "examples" / "benchmark.py", "--json", "--reps", "3", "--warmup", "1",
                 "--sizes", "2,3,2,2,4,5", "3,2,4,5,6,3", "--e2e-steps", "300", "--e2e-k", "1", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["blas_threads"] == 1 and report["dtype"] == "float32"
    assert [(row["size"], row["agent"]) for row in report["train_step"]] == [
        (dict(N=2, O=3, A=2, S=2, B=4, T=5), "gru"), (dict(N=2, O=3, A=2, S=2, B=4, T=5), "mlp"),
        (dict(N=3, O=2, A=4, S=5, B=6, T=3), "gru"), (dict(N=3, O=2, A=4, S=5, B=6, T=3), "mlp")]
    timed = [*report["train_step"], report["greedy_actions_2_agents"]]
    assert all(0 < t["p10_us"] <= t["median_us"] <= t["p90_us"] for t in timed)
    assert [(t["agent"], t["batch_size_run"]) for t in report["training"]] == [
        ("gru", 1), ("gru", 2), ("mlp", 1), ("mlp", 2)]
    for training in report["training"]:
        assert training["env_steps"] >= 300 and training["env_steps_per_s"] > 0 and training["train_steps"] >= 0
        assert training["episodes"] % training["batch_size_run"] == 0


def readme_example():
    """The README's complete own-environment example: the python block under its heading."""
    text = (HERE / "README.md").read_text()
    section = text[text.index("## Using it on your own environment"):]
    return section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]


def test_the_readmes_own_environment_example_trains_and_prints_its_result(tmp_path):
    script = tmp_path / "my_env.py"
    script.write_text(readme_example())
    result = run(tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert "greedy success 100%, mean length 3.20" in result.stdout  # what the README says it prints


def test_an_editable_install_exposes_qmix_np_and_qmix_np_envs_only(tmp_path):
    """pip install -e puts only the two modules on sys.path (hatchling's dev-mode-exact), not the
    repository root, whose envs.py, conftest.py and tests would shadow other packages' names."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "editables", "-e", str(HERE)],
                             capture_output=True, text=True)  # editables: the install's import hook; numpy skipped
    if install.returncode != 0 and "Could not" in install.stderr + install.stdout:
        pytest.skip(f"the build requirements could not be fetched: {install.stderr.strip()[-200:]}")
    assert install.returncode == 0, install.stderr
    found = subprocess.run([str(python), "-c", "import importlib.util as u; print([u.find_spec(m) is not None "
                            "for m in ('qmix_np', 'qmix_np_envs', 'envs', 'conftest', 'test_qmix_np')])"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert found.stdout.strip() == "[True, True, False, False, False]", found.stderr


def test_the_gridworld_summary_words_one_seed_and_no_success():
    gridworld = load_example("meeting_gridworld")
    assert gridworld.mean_std([0.5]) == "0.50" and gridworld.mean_std([0.5, 1.5]) == "1.00 +- 0.50"
    assert gridworld.mean_std([float("nan")]) == "n/a" and gridworld.ratio_text(float("nan")) == "n/a"
    assert gridworld.plural(1, "seed") == "1 seed" and gridworld.plural(5, "seed") == "5 seeds"
