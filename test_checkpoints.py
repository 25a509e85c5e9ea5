"""Checkpoints, bad input and numerical failure: what is refused, and that nothing stored changes."""
import copy
import dataclasses
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import envs
import qmix_np as q
from test_qmix_np import episode_batch, random_episode, small_learner

HERE = pathlib.Path(__file__).resolve().parent


def resume_config(t_max, batch_size_run=1):
    return q.Config(t_max=t_max, hidden_dim=16, mixing_embed_dim=8, hypernet_embed=8, batch_size=8,
                    buffer_size=30, target_update_interval=3, epsilon_anneal_time=500, seed=5,
                    batch_size_run=batch_size_run)


def resume_envs(k):
    return [envs.MeetingGridworld(grid_size=4, max_steps=20) for _ in range(k)]


@pytest.mark.parametrize("k", [1, 3])
def test_resume_in_a_new_process_is_bit_identical(tmp_path, k):
    """Train N steps with k envs in lockstep, save with the buffer, load in a NEW process, train
    to N + M: the same parameters, optimiser state, counters and buffer as N + M steps without
    stopping (a run stops and resumes at a collection's end)."""
    straight = q.train(resume_envs(k), resume_config(900, k))
    first = q.train(resume_envs(k), resume_config(400, k))
    first.save(tmp_path / "half.npz")
    script = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import qmix_np as q
from test_checkpoints import resume_config, resume_envs
config = resume_config(900, {k})
learner = q.Learner.load({str(tmp_path / 'half.npz')!r}, env_info=resume_envs(1)[0].get_env_info(), config=config)
q.train(resume_envs({k}), config, learner=learner).save({str(tmp_path / 'resumed.npz')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=HERE)
    resumed = q.Learner.load(tmp_path / "resumed.npz")
    assert resumed.t_env == straight.t_env and resumed.t_env >= 900 > first.t_env
    assert straight.train_steps > 10
    for key, value in q.state_arrays(straight).items():
        if key != "config":  # t_max is the only difference
            np.testing.assert_array_equal(q.state_arrays(resumed)[key], value, err_msg=key)


def saved(tmp_path, **overrides):
    config = q.Config(t_max=80, hidden_dim=8, batch_size=4, buffer_size=50, obs_last_action=False, **overrides)
    learner = q.train(envs.TwoStepGame(), config)
    path = tmp_path / "run.npz"
    learner.save(path)
    return learner, path


def rewrite(path, change):
    """Rewrite a checkpoint's arrays through change(dict) -> dict, with np.savez (no digest fix-up)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(path, **change(arrays))


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_checkpoint_round_trip_with_and_without_the_buffer(tmp_path, optimizer):
    learner, path = saved(tmp_path, optimizer=optimizer, standardise_rewards=True)
    assert learner.reward_stats.count > 1
    restored = q.Learner.load(path)
    for key, value in q.state_arrays(learner).items():
        np.testing.assert_array_equal(q.state_arrays(restored)[key], value, err_msg=key)
    learner.save(tmp_path / "small.npz", include_buffer=False)
    small = q.Learner.load(tmp_path / "small.npz")
    np.testing.assert_array_equal(small.theta, learner.theta)
    assert len(small.buffer) == 0 and small.t_env == learner.t_env
    assert small.rng.integers(1 << 30) == learner.rng.integers(1 << 30)


def test_a_pickled_object_array_is_refused_without_being_unpickled(tmp_path):
    _, path = saved(tmp_path)
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    rewrite(path, lambda a: {**a, "theta": np.array([Trap()], dtype=object)})
    with pytest.raises(ValueError, match="entry .theta. holds Python objects"):
        q.Learner.load(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_refused(tmp_path):
    _, path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt or not .npz"):
        q.Learner.load(path)


def test_a_checkpoint_from_another_configuration_is_refused(tmp_path):
    _, path = saved(tmp_path)
    with pytest.raises(ValueError, match="differs in \\['hidden_dim'\\]"):
        q.Learner.load(path, config=q.Config(hidden_dim=9, batch_size=4, buffer_size=50, obs_last_action=False))
    with pytest.raises(ValueError, match="environment"):
        q.Learner.load(path, env_info=envs.MeetingGridworld().get_env_info())


@pytest.mark.parametrize("use_rnn", [True, False], ids=["gru", "mlp"])
def test_a_gru_checkpoint_and_a_feed_forward_one_are_not_interchangeable(tmp_path, use_rnn):
    """Each loads back with its recurrent or feed-forward parameters, and is refused, by name,
    by a config with the other agent."""
    learner, path = saved(tmp_path, use_rnn=use_rnn)
    loaded = q.Learner.load(path)
    assert loaded.config.use_rnn is use_rnn and ("rnn.weight_hh" in loaded.params["agent"]) is use_rnn
    np.testing.assert_array_equal(loaded.theta, learner.theta)
    other = q.Config(t_max=80, hidden_dim=8, batch_size=4, buffer_size=50, obs_last_action=False, use_rnn=not use_rnn)
    with pytest.raises(ValueError, match="differs in \\['use_rnn'\\]"):
        q.Learner.load(path, config=other)


def resigned(arrays):
    """What anyone who edits a checkpoint can do: recompute its digest."""
    arrays = {k: v for k, v in arrays.items() if k != "sha256"}
    return {**arrays, "sha256": np.array(q._digest(arrays))}


def edit_json(arrays, entry, **changes):
    return {**arrays, entry: np.array(json.dumps({**json.loads(str(arrays[entry])), **changes}))}


def edited(entry, edit):
    """arrays -> arrays with arrays[entry] replaced by edit(a copy of it)."""
    def change(arrays):
        value = arrays[entry].copy()
        return {**arrays, entry: edit(value)}
    return change


def setitem(index, value):
    def edit(array):
        array[index] = value
        return array
    return edit


CRAFTED = [  # (id, change to the saved arrays, re-sign?, what the refusal must say)
    ("theta cut short", lambda a: {**a, "theta": a["theta"][:-1]}, False, "entry 'theta' declares \\(\\d+,\\) float32"),
    ("theta edited, digest not", edited("theta", setitem(0, 1.0)), False, "SHA-256 digest"),
    ("no optim_t", lambda a: {k: v for k, v in a.items() if k != "optim_t"}, True, "should hold \\['optim_t'\\]"),
    ("an extra entry", lambda a: {**a, "extra": np.zeros(3)}, True, "unexpected entry 'extra.npy'"),
    ("version 1", lambda a: {**a, "version": np.array(1)}, True, "version 1 \\(version 1 held single transitions"),
    ("version 2", lambda a: {**a, "version": np.array(2)}, True, "version 2 \\(version 2 came before the GRU agent"),
    ("version 3", lambda a: {**a, "version": np.array(3)}, True, "version 3 \\(version 3 came before Config.batch_size_run"),
    ("version 4", lambda a: {**a, "version": np.array(4)}, True, "version 4 \\(version 4 came before the history's Q"),
    ("version 6", lambda a: {**a, "version": np.array(6)}, True, "version 6; this code reads version 5"),
    ("version as text", lambda a: {**a, "version": np.array("4")}, True, "entry 'version' must be an integer"),
    ("version as float", lambda a: {**a, "version": np.array(4.0)}, True, "entry 'version' must be an integer"),
    ("no format", lambda a: {k: v for k, v in a.items() if k != "format"}, True, "lacks \\['format'\\]"),
    ("another format", lambda a: {**a, "format": np.array("npz")}, True, "not a qmix-np checkpoint"),
    ("digest not text", lambda a: {**a, "sha256": np.array(7)}, False, "entry 'sha256' must be one string"),
    ("config too long", lambda a: {**a, "config": np.array(" " * (2**20 + 1))}, True, "entry 'config' must be one string of at most"),
    ("config not JSON", lambda a: {**a, "config": np.array("{hidden_dim: 8")}, True, "entry 'config' is not valid JSON"),
    ("config nested too deep", lambda a: {**a, "config": np.array("[" * 100000)}, True, "entry 'config' is not valid JSON"),
    ("config a list", lambda a: {**a, "config": np.array("[1, 2]")}, True, "entry 'config' must be a JSON object"),
    ("config lacks a field", lambda a: {**a, "config": np.array(json.dumps(
        {k: v for k, v in json.loads(str(a["config"])).items() if k != "use_rnn"}))}, True, "entry 'config' lacks \\['use_rnn'\\]"),
    ("hidden_dim -1", lambda a: edit_json(a, "config", hidden_dim=-1), True, "entry 'config' is invalid: Config.hidden_dim"),
    ("adam_eps 1e-50", lambda a: edit_json(a, "config", adam_eps=1e-50), True, "Config.adam_eps .* would vanish"),
    ("hidden_dim 10**6", lambda a: edit_json(a, "config", hidden_dim=10**6), True, "entry 'theta' declares .* its config needs"),
    ("state_shape 10**9", lambda a: edit_json(a, "env_info", state_shape=10**9), True, "entry 'theta' declares .* its config needs"),
    ("buffer_size 10**9", lambda a: edit_json(a, "config", buffer_size=10**9), True, "entry 'buffer/\\w+' declares .* its config needs"),
    ("n_agents 2.7", lambda a: edit_json(a, "env_info", n_agents=2.7), True, "entry 'env_info' is invalid"),
    ("env_info a number", lambda a: {**a, "env_info": np.array("3")}, True, "entry 'env_info' must be a JSON object"),
    ("theta in float64", lambda a: {**a, "theta": a["theta"].astype(np.float64)}, True, "entry 'theta' declares \\(\\d+,\\) float64"),
    ("a NaN parameter", edited("theta", setitem(3, np.nan)), True, "entry 'theta' holds non-finite values"),
    ("an inf target", edited("target_theta", setitem(0, np.inf)), True, "entry 'target_theta' holds non-finite"),
    ("a negative second moment", edited("optim/exp_avg_sq", setitem(0, -1.0)), True, "entry 'optim/exp_avg_sq' holds negative"),
    ("a NaN first moment", edited("optim/exp_avg", setitem(0, np.nan)), True, "entry 'optim/exp_avg' holds non-finite"),
    ("a negative reward variance", edited("reward_stats", setitem(1, -1.0)), True, "entry 'reward_stats' must be"),
    ("a NaN reward mean", edited("reward_stats", setitem(0, np.nan)), True, "entry 'reward_stats' must be"),
    ("more rewards counted than train steps see", edited("reward_stats", setitem(2, 1e300)), True,
     "entry 'reward_stats' counts 1e\\+300 rewards, but \\d+ train steps of batch_size 4 x episode_limit 2 see at most"),
    ("a negative counter", edited("counters", setitem(0, -5)), True, "entry 'counters' .* inconsistent"),
    ("more train steps than optimiser steps", edited("counters", setitem(2, 10**6)), True, "entry 'counters' .* inconsistent"),
    ("more env steps than episodes allow", edited("counters", setitem(0, 10**6)), True, "entry 'counters' .* inconsistent"),
    ("rng_state of another generator", lambda a: {**a, "rng_state": np.array(json.dumps(
        {"bit_generator": "MT19937", "state": {"key": [1, 2], "pos": 0}}))}, True, "entry 'rng_state' is not a Generator state"),
    ("rng_state not JSON", lambda a: {**a, "rng_state": np.array("{")}, True, "entry 'rng_state' is not a Generator state"),
    ("rng_state with a bad key", lambda a: {**a, "rng_state": np.array(json.dumps(
        {**json.loads(str(a["rng_state"])), "state": {"x": 1}}))}, True, "entry 'rng_state' is not a Generator state"),
    ("buffer position past capacity", lambda a: {**a, "buffer_position": np.array([60, 0])}, True, "entry 'buffer_position'"),
    ("a stored action -1", edited("buffer/actions", setitem((0, 0, 0), -1)), True, "stored episode 0 .* must lie in \\[0, 2\\)"),
    ("a stored action out of range", edited("buffer/actions", setitem((0, 0, 0), 7)), True, "stored episode 0 .* must lie in \\[0, 2\\)"),
    ("an unavailable stored action", lambda a: edited("buffer/avail_actions", setitem(
        (0, 0, 0, a["buffer/actions"][0, 0, 0]), False))(a), True, "stored episode 0 .* unavailable action"),
    ("an agent with no action", edited("buffer/avail_actions", setitem((0, 0, 0), False)), True, "stored episode 0 .* no available action"),
    ("a NaN observation", edited("buffer/obs", setitem((0, 0, 0, 0), np.nan)), True, "stored episode 0 .* finite"),
    ("an inf reward", edited("buffer/reward", setitem((0, 0), np.inf)), True, "stored episode 0 .* finite"),
    ("a terminal step mid-episode", edited("buffer/terminated", setitem((0, 0), 1)), True, "stored episode 0 .* only the last step"),
    ("filled with a hole", edited("buffer/filled", setitem((0, 0), 0)), True, "entry 'buffer/filled'"),
    ("a value in an unused slot", edited("buffer/reward", setitem((45, 0), 5.0)), True, "entry 'buffer/reward' must be 0"),
    ("a history row short", lambda a: {**a, **{k: v[:-1] for k, v in a.items() if k.startswith("history/")}}, True,
     "entries 'history/...' must hold one row per training episode"),
    ("a history of two lengths", lambda a: {**a, "history/loss": a["history/loss"][:-1]}, True, "entry 'history/loss' declares"),
    ("no history", lambda a: {k: v for k, v in a.items() if not k.startswith("history/")}, True, "should hold \\['history/grad_norm', 'history/length'"),
    ("t_env going back", edited("history/t_env", setitem(-1, 0)), True, "t_env never decreasing"),
    ("an episode of 0 steps", edited("history/length", setitem(0, 0)), True, "lengths of 1 to 2 steps"),
]


@pytest.mark.parametrize("change,sign,message", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_a_crafted_checkpoint_is_refused_naming_the_entry_and_the_file_is_left_alone(tmp_path, change, sign, message):
    _, path = saved(tmp_path)
    rewrite(path, lambda a: resigned(change(a)) if sign else change(a))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message) as refusal:
        q.Learner.load(path)
    assert str(path) in str(refusal.value)
    assert path.read_bytes() == before


def test_the_crafted_cases_start_from_a_checkpoint_that_loads(tmp_path):
    """The same file, re-signed with nothing changed, loads: each case above fails for its change."""
    _, path = saved(tmp_path)
    rewrite(path, resigned)
    q.Learner.load(path)


def test_a_value_in_an_episodes_padding_is_refused(tmp_path):
    learner = small_learner("qmix")
    episode_batch(learner)  # episodes of 3, 6, 2 and 5 steps, padded to 6
    path = tmp_path / "run.npz"
    learner.save(path)
    rewrite(path, lambda a: resigned(edited("buffer/obs", setitem((0, 5, 0, 0), 1.0))(a)))
    with pytest.raises(ValueError, match="entry 'buffer/obs' must be 0 after each episode's end"):
        q.Learner.load(path)


def write_huge_checkpoints(folder):
    """Small files that declare learners, buffers or members far beyond 1 GB."""
    _, path = saved(folder)
    with np.load(path, allow_pickle=False) as data:
        base = {k: data[k] for k in data.files}
    files = {"hidden layers": resigned(edit_json(base, "config", hidden_dim=10**6)),
             "state size": resigned(edit_json(base, "env_info", state_shape=10**9)),
             "buffer, stored": resigned(edit_json(base, "config", buffer_size=10**9)),
             "buffer, not stored": resigned(edit_json({k: v for k, v in base.items() if not k.startswith("buffer")},
                                                      "config", buffer_size=10**7))}
    for name, arrays in files.items():
        np.savez(folder / f"{name}.npz", **arrays)
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**30,)}  # 4 GB declared, 1 KB held
    with zipfile.ZipFile(folder / "lying header.npz", "w") as archive:
        for key, value in base.items():
            if key != "theta":
                with archive.open(f"{key}.npy", "w") as member:
                    np.lib.format.write_array(member, value)
        with archive.open("theta.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)
            member.write(bytes(1024))
    with zipfile.ZipFile(folder / "compressed member.npz", "w") as archive:  # 1.2 GB of zeros in 1 MB
        for key, value in base.items():
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, value)
        info = zipfile.ZipInfo("zeros.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as member:
            for _ in range(72):
                member.write(bytes(2**24))
    return [p.name for p in folder.iterdir() if p.name != "run.npz"]


def test_huge_declared_sizes_are_refused_within_a_second_under_a_1_gb_address_space(tmp_path):
    names = write_huge_checkpoints(tmp_path)
    assert len(names) == 6
    script = f"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
sys.path.insert(0, {str(HERE)!r})
import qmix_np as q
results = {{}}
for name in {names!r}:
    start = time.perf_counter()
    try:
        q.Learner.load({str(tmp_path)!r} + "/" + name)
        results[name] = ("loaded", "", 0.0)
    except Exception as err:
        results[name] = (type(err).__name__, str(err), time.perf_counter() - start)
print(json.dumps(results))
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name, (kind, message, seconds) in results.items():
        assert kind == "ValueError" and seconds < 1.0, (name, kind, message, seconds)
    assert "max_buffer_bytes" in results["buffer, not stored.npz"][1]
    assert "declares (1073741824,) float32, which is not the 1024 bytes" in results["lying header.npz"][1]
    assert "compressed" in results["compressed member.npz"][1] or "unexpected entry" in results["compressed member.npz"][1]


def test_a_buffer_larger_than_the_memory_is_refused_in_bytes_naming_the_setting(tmp_path):
    """pymarl's 5000 episodes of a 10,000-step env reserve 5.1 GB: under a 2 GB address space
    the Learner refuses with the bytes and the setting, not NumPy's MemoryError."""
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
sys.path.insert(0, {str(HERE)!r})
import qmix_np as q
try:
    q.Learner(q.Config(), {{"n_agents": 2, "n_actions": 5, "obs_shape": 6, "state_shape": 4, "episode_limit": 10000}})
except ValueError as err:
    print(err)
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "the replay buffer needs 5,100,370,000 bytes (Config.buffer_size 5000 episodes" in done.stdout, done.stdout


def test_a_header_with_unbalanced_brackets_is_a_value_error(tmp_path):
    """NumPy's header reader tokenizes the header, and an unclosed bracket raised tokenize.TokenError
    (found by random byte edits); it is a ValueError naming the entry like any other broken header."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(12)
    with zipfile.ZipFile(tmp_path / "run.npz", "w") as archive:
        archive.writestr("theta.npy", member)
    with pytest.raises(ValueError, match="entry 'theta' has no .npy header as save\\(\\) writes"):
        q.Learner.load(tmp_path / "run.npz")


def test_a_compressed_checkpoint_is_refused_before_anything_is_decompressed(tmp_path):
    _, path = saved(tmp_path)
    with np.load(path, allow_pickle=False) as data:
        np.savez_compressed(path, **{k: data[k] for k in data.files})
    with pytest.raises(ValueError, match="is compressed; save\\(\\) never compresses"):
        q.Learner.load(path)


@pytest.mark.parametrize("mixer,layers,use_rnn,shared,last,ids", [
    ("qmix", 1, True, True, True, True), ("qmix", 2, False, False, False, True), ("vdn", 2, True, False, True, False),
    ("none", 1, False, True, False, False), ("qmix", 2, True, False, True, False)])
def test_the_parameter_count_is_the_learners(mixer, layers, use_rnn, shared, last, ids):
    config = q.Config(mixer=mixer, hypernet_layers=layers, use_rnn=use_rnn, shared_agent=shared,
                      obs_last_action=last, obs_agent_id=ids, hidden_dim=7, mixing_embed_dim=5, hypernet_embed=6)
    env_info = {"n_agents": 3, "n_actions": 4, "obs_shape": 5, "state_shape": 6, "episode_limit": 2}
    assert q.parameter_count(config, env_info) == q.Learner(config, env_info).theta.size


def test_a_consistent_but_wrong_shaped_checkpoint_is_refused(tmp_path):
    """Even with a recomputed digest, arrays must fit the stored config."""
    _, path = saved(tmp_path)

    def shrink(a):
        a = {k: v for k, v in a.items() if k != "sha256"}
        a["optim/exp_avg"] = a["optim/exp_avg"][:10]
        return {**a, "sha256": np.array(q._digest(a))}

    rewrite(path, shrink)
    with pytest.raises(ValueError, match="entry 'optim/exp_avg' declares \\(10,\\)"):
        q.Learner.load(path)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    learner, path = saved(tmp_path)
    before = path.read_bytes()
    learner.train_step()
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    real_write = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        learner.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.npz"]  # no temporary left behind


def snapshot(learner):
    """Parameters, targets, optimiser state and step, counters: what a refused step must not change."""
    return ({k: v.copy() for k, v in q.state_arrays(learner, include_buffer=False).items()
             if k not in ("config", "rng_state")})


def assert_unchanged(learner, before):
    for key, value in snapshot(learner).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
@pytest.mark.parametrize("q_bias,what,finite_elements", [
    (1e30, "loss \\(inf\\)", False),  # Q ~ 1e30: the squared TD error overflows float32
    (3e9, "norm \\(inf\\)", True),  # loss ~ 1e19, every gradient element finite, their sum of squares not
])
def test_a_non_finite_step_raises_and_changes_nothing(q_bias, what, finite_elements):
    learner = small_learner("qmix", dtype="float32")
    episode_batch(learner)
    learner.params["agent"]["fc2.bias"][:] = q_bias
    batch = learner.buffer.sample(learner.config.batch_size, copy.deepcopy(learner.rng))  # train_step's batch
    loss, grads, _ = q.loss_and_grads(learner.params, learner.target_params, batch, learner.config)
    assert np.isfinite(q.flat_grad(grads, learner.params)).all() == math.isfinite(loss) == finite_elements
    before = snapshot(learner)
    with pytest.raises(FloatingPointError, match=f"{what}.* are not finite"):
        learner.train_step()
    assert_unchanged(learner, before)
    assert learner.optimiser.t == 0 and learner.train_steps == 0

    learner.config = dataclasses.replace(learner.config, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="a train step was skipped"):
        assert learner.train_step()["skipped"] is True
    assert learner.skipped_steps == 1 and learner.train_steps == 0
    before["counters"][q.COUNTERS.index("skipped_steps")] = 1
    assert_unchanged(learner, before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_rewards_whose_statistics_overflow_are_refused_not_standardised_to_zero():
    """Rewards near 1e20 are finite in float32, but their variance is not: the step is refused
    (it used to standardise every reward to 0 and train on), and nothing changes."""
    learner = small_learner("qmix", dtype="float32", standardise_rewards=True)
    episode_batch(learner)  # stores episodes
    learner.buffer.data["reward"][:len(learner.buffer)] *= 1e20
    assert np.isfinite(learner.buffer.data["reward"]).all()
    before, stats = snapshot(learner), learner.reward_stats
    with pytest.raises(FloatingPointError, match="the reward statistics \\(variance inf\\)"):
        learner.train_step()
    assert_unchanged(learner, before)
    assert learner.reward_stats == stats


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_an_update_that_would_overflow_raises_and_changes_nothing():
    """The loss and the gradient are finite, but RMSprop's first step moves each parameter by
    lr g / (sqrt(0.01 g^2) + eps), about 10 lr = 1e39: beyond float32. Nothing may change."""
    learner = small_learner("qmix", dtype="float32", optimizer="rmsprop", lr=1e38)
    episode_batch(learner)
    before = snapshot(learner)
    with pytest.raises(FloatingPointError, match="updated parameters or optimiser state are not finite"):
        learner.train_step()
    assert_unchanged(learner, before)
    learner.config = dataclasses.replace(learner.config, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="a train step was skipped"):
        assert learner.train_step()["skipped"] is True and learner.skipped_steps == 1
    learner.history = {key: [math.nan] for key in ("loss", "return", "success", "q_taken_mean", "grad_norm")}
    line = io.StringIO()
    progress = q.Progress(learner, seconds=1e-9, stream=line)
    progress.last -= 1.0
    progress(learner, 0.0, 1, False)
    assert "SKIPPED 1 train steps (not finite)" in line.getvalue()


def test_a_run_with_skipped_steps_saves_a_checkpoint_that_loads(tmp_path):
    """A skipped step's infinite loss and gradient norm are logged in the history, and kept."""
    class HugeRewards(envs.MeetingGridworld):
        def step(self, actions):
            return 1e30, *super().step(actions)[1:]  # finite in float32; its squared TD error is not

    config = q.Config(t_max=200, hidden_dim=8, batch_size=4, buffer_size=20, dtype="float32", on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="a train step was skipped"), np.errstate(over="ignore"):
        learner = q.train(HugeRewards(grid_size=3, max_steps=10), config)
    assert learner.skipped_steps > 0 and np.isinf(learner.history["loss"][-1])
    learner.save(tmp_path / "run.npz")
    loaded = q.Learner.load(tmp_path / "run.npz")
    np.testing.assert_array_equal(loaded.history["loss"], learner.history["loss"])


# ------------------------------------------------------------------------------------------
# Bad input: refused where it enters, naming it; nothing stored changes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("mixer", "qmax"), ("hypernet_layers", 3), ("gamma", 1.5),
                                         ("lr", 0), ("batch_size", 0), ("dtype", "float16"),
                                         ("hidden_dim", 0), ("double_q", "yes"), ("optimizer", "sgd"),
                                         ("grad_norm_clip", float("nan")), ("t_max", -1),
                                         ("adam_betas", (0.9,)), ("epsilon_finish", 2.0),
                                         ("obs_last_action", 1), ("optim_alpha", 1.0), ("use_rnn", "no")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"Config.{field}"):
        q.Config(**{field: value})


def test_config_rejects_a_batch_larger_than_the_buffer():
    with pytest.raises(ValueError, match="Config.batch_size \\(64\\) must be at most Config.buffer_size \\(32\\)"):
        q.Config(batch_size=64, buffer_size=32)


def test_config_takes_numpy_scalars_and_stores_python_values(tmp_path):
    """A run configured from NumPy values trains and then saves (JSON cannot hold np.int64)."""
    config = q.Config(batch_size=np.int64(4), buffer_size=np.int32(20), lr=np.float32(1e-3), t_max=np.int64(40),
                      adam_betas=np.array([0.9, 0.99]), hidden_dim=np.uint8(8), double_q=np.bool_(True))
    assert type(config.batch_size) is int and type(config.lr) is float and type(config.double_q) is bool
    assert config.adam_betas == (0.9, 0.99) and all(type(b) is float for b in config.adam_betas)
    learner = q.train(envs.TwoStepGame(), config)
    learner.save(tmp_path / "run.npz")
    assert q.Learner.load(tmp_path / "run.npz").config == config


@pytest.mark.parametrize("field,value", [("adam_eps", 1e-50), ("optim_eps", 1e-46), ("lr", 1e-40), ("lr", 1e39)])
def test_config_refuses_what_the_training_dtype_cannot_hold(field, value):
    with pytest.raises(ValueError, match=f"Config.{field} .* would vanish or overflow in float32"):
        q.Config(**{field: value})
    q.Config(**{field: value}, dtype="float64")  # float64 holds it


def test_values_beyond_float32_are_refused_where_they_enter_and_nothing_changes():
    """1e39 is finite in float64 but inf in float32: refused in a stored episode, in acting, and
    from an env's step, when the training dtype is float32."""
    learner = small_learner("qmix", dtype="float32")
    rng = np.random.default_rng(3)
    good = random_episode(rng, learner, 3, True)
    with pytest.raises(ValueError, match="episode\\['reward'\\] must be finite in float32"):
        learner.buffer.insert({**good, "reward": np.full(3, 1e39)})
    with pytest.raises(ValueError, match="obs must be finite in float32"):
        learner.select_actions(np.full((3, 4), 1e39), np.ones((3, 4)))
    assert len(learner.buffer) == 0 and learner.hidden is None

    class HugeReward(envs.TwoStepGame):
        def step(self, actions):
            reward, terminated, info = super().step(actions)
            return reward * 1e39, terminated, info

    with pytest.raises(ValueError, match="the reward from env.step\\(\\) must be finite in float32"):
        q.train(HugeReward(payoff_2a=1.0, payoff_2b=np.ones((2, 2))), q.Config(t_max=10, batch_size=4, buffer_size=8))


def test_save_takes_the_longest_file_name_the_system_allows(tmp_path):
    """The temporary file has a short name of its own, so a 250-byte name is saved (and loaded)."""
    learner, _ = saved(tmp_path)
    path = tmp_path / ("r" * 246 + ".npz")
    learner.save(path)
    assert q.Learner.load(path).t_env == learner.t_env and [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    with pytest.raises(ValueError, match="it names a folder, not a file"):  # it would have replaced the link
        learner.save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()


def test_save_gives_a_new_file_the_usual_mode_and_keeps_a_replaced_files(tmp_path):
    learner, path = saved(tmp_path)
    umask = os.umask(0o022)
    try:
        learner.save(tmp_path / "new.npz")
        assert (tmp_path / "new.npz").stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        learner.save(path)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def bad_input_cases():
    """(name, call(learner, env, good), expected error, words the message must contain)."""
    def insert(**change):
        return lambda learner, env, good: learner.buffer.insert({**good, **change})

    def changed(name, make):
        return lambda learner, env, good: learner.buffer.insert({**good, name: make(good[name].copy())})

    def nan_at(x):
        x[1, 0, 2] = np.nan
        return x

    def no_action_for_agent_1(x):
        x[2, 1] = False
        return x

    def terminal_in_the_middle(x):
        x[0] = True
        return x

    return [
        ("env: too few actions", lambda l, e, g: e.step([0]), ValueError, "actions must have shape (2,)"),
        ("env: too many actions", lambda l, e, g: e.step([0, 0, 0]), ValueError, "actions must have shape"),
        ("env: action out of range", lambda l, e, g: e.step([0, 5]), ValueError, "[0, 5)"),
        ("env: negative action", lambda l, e, g: e.step([-1, 0]), ValueError, "[0, 5)"),
        ("env: float actions", lambda l, e, g: e.step([0.0, 1.0]), TypeError, "integers"),
        ("env: unavailable action", lambda l, e, g: e.step([4, 4]), ValueError, "unavailable"),
        ("buffer: obs shape", insert(obs=np.zeros((5, 3, 5))), ValueError, "episode['obs'] must have shape (5, 3, 4)"),
        ("buffer: state steps", insert(state=np.zeros((4, 5))), ValueError, "episode['state'] must have shape (5, 5)"),
        ("buffer: actions shape", insert(actions=np.zeros((4, 2), int)), ValueError, "episode['actions'] must have shape (4, 3)"),
        ("buffer: action out of range", changed("actions", lambda x: x + 4), ValueError, "[0, 4)"),
        ("buffer: float actions", changed("actions", lambda x: x * 1.0), TypeError, "must hold integers"),
        ("buffer: nan reward", changed("reward", lambda x: x * np.nan), ValueError, "episode['reward'] must be finite"),
        ("buffer: nan obs", changed("obs", nan_at), ValueError, "episode['obs'] must be finite"),
        ("buffer: text obs", insert(obs=np.full((5, 3, 4), "a")), TypeError, "episode['obs'] must hold numbers"),
        ("buffer: avail not 0/1", insert(avail_actions=np.full((5, 3, 4), 2)), ValueError, "0/1"),
        ("buffer: no available action", changed("avail_actions", no_action_for_agent_1), ValueError, "no available action"),
        ("buffer: unavailable action chosen", changed("avail_actions", lambda x: x * [1, 1, 1, 0]), ValueError, "unavailable action"),
        ("buffer: terminal before the end", changed("terminated", terminal_in_the_middle), ValueError, "only the last step"),
        ("buffer: too long", insert(**{k: np.concatenate([v, v]) for k, v in random_episode(np.random.default_rng(1), small_learner(), 4, False).items()}), ValueError, "1 to episode_limit (6) steps"),
        ("buffer: missing field", lambda l, e, g: l.buffer.insert({k: v for k, v in g.items() if k != "reward"}), ValueError, "an episode is a dict"),
        ("select: obs shape", lambda l, e, g: l.select_actions(np.zeros((2, 4)), np.ones((3, 4))), ValueError, "obs must have shape (3, 4)"),
        ("select: avail shape", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.ones((3, 5))), ValueError, "avail_actions must have shape (3, 4)"),
        ("select: nan obs", lambda l, e, g: l.select_actions(np.full((3, 4), np.nan), np.ones((3, 4))), ValueError, "obs must be finite"),
        ("select: an agent with no action", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.eye(3, 4) * np.array([[1], [0], [1]])), ValueError, "agent(s) [1] have no available action"),
        ("select: last action out of range", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.ones((3, 4)), [0, 4, 1]), ValueError, "last_actions must lie in [0, 4)"),
        ("select: epsilon above 1", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.ones((3, 4)), epsilon=1.5), ValueError, "epsilon must be a number in [0, 1], got 1.5"),
        ("select: nan epsilon", lambda l, e, g: l.select_actions(np.zeros((3, 4)), np.ones((3, 4)), epsilon=float("nan")), ValueError, "epsilon must be a number in [0, 1], got nan"),
        ("config: unknown mixer", lambda l, e, g: q.Config(mixer="qtran"), ValueError, "Config.mixer"),
        ("config: float batch", lambda l, e, g: q.Config(batch_size=32.0), ValueError, "Config.batch_size"),
        ("learner: not a Config", lambda l, e, g: q.Learner({"mixer": "qmix"}, e.get_env_info()), TypeError, "config must be a Config"),
        ("learner: env_info without n_actions", lambda l, e, g: q.Learner(q.Config(), {"n_agents": 2}), ValueError, "lacks ['n_actions'"),
        ("learner: env_info with 2.7 agents", lambda l, e, g: q.Learner(q.Config(), {**e.get_env_info(), "n_agents": 2.7}), ValueError, "env_info['n_agents'] must be a positive integer"),
        ("buffer: scalar actions", insert(actions=3), ValueError, "1 to episode_limit (6) steps, got 0"),
        ("evaluate: no episodes", lambda l, e, g: q.evaluate(e, l, 0, 0), ValueError, "n_episodes must be an int >= 1, got 0"),
        ("evaluate: float episodes", lambda l, e, g: q.evaluate(e, l, 2.5, 0), ValueError, "n_episodes must be an int >= 1, got 2.5"),
        ("evaluate: text seed", lambda l, e, g: q.evaluate(e, l, 2, "a"), ValueError, "seed must be an int >= 0"),
        ("train: progress text", lambda l, e, g: q.train(e, l.config, learner=l, progress="yes"), ValueError, "progress must be True, False or a number of seconds > 0"),
        ("train: negative progress", lambda l, e, g: q.train(e, l.config, learner=l, progress=-1), ValueError, "progress must be"),
        ("train: callback not callable", lambda l, e, g: q.train(e, l.config, learner=l, callback=5), TypeError, "callback must be None or callable"),
        ("train: fewer envs than batch_size_run", lambda l, e, g: q.train([e], dataclasses.replace(l.config, batch_size_run=2), learner=l), ValueError, "a list of config.batch_size_run = 2 environments"),
        ("train: one env twice", lambda l, e, g: q.train([e, e], dataclasses.replace(l.config, batch_size_run=2), learner=l), ValueError, "must be distinct objects"),
        ("train: envs of two tasks", lambda l, e, g: q.train([e, envs.MeetingGridworld(max_steps=10)], dataclasses.replace(l.config, batch_size_run=2), learner=l), ValueError, "must describe one task"),
        ("config: batch_size_run 0", lambda l, e, g: q.Config(batch_size_run=0), ValueError, "Config.batch_size_run must be an int >= 1"),
        ("config: changed after it was checked", lambda l, e, g: setattr(l.config, "batch_size", 16), TypeError, "a Config does not change once checked: make another with dataclasses.replace(config, batch_size=...)"),
        ("config: an int too large for a float", lambda l, e, g: q.Config(lr=10**400), ValueError, "Config.lr must be a number > 0"),
        ("train_step: fewer episodes than a batch", lambda l, e, g: q.Learner(l.config, l.env_info).train_step(), ValueError, "samples batch_size = 4 distinct episodes, but the buffer holds 0"),
        ("train: a config that is not a Config", lambda l, e, g: q.train(e, {"t_max": 5}, learner=l), TypeError, "config must be a Config, got dict"),
        ("mixer: unknown name", lambda l, e, g: q.get_mixer("sum"), ValueError, "mixer must be one of"),
        ("save: a folder that does not exist", lambda l, e, g: l.save(HERE / "no-such-folder" / "run.npz"), ValueError, "no-such-folder"),
        ("save: a path that is not one", lambda l, e, g: l.save(7), TypeError, "path must be a str or os.PathLike, got int"),
        ("save: an empty path", lambda l, e, g: l.save(""), ValueError, "cannot save to '': it names a folder, not a file"),
        ("save: a folder", lambda l, e, g: l.save(HERE / "examples"), ValueError, "it names a folder, not a file"),
        ("load: a path that is not one", lambda l, e, g: q.Learner.load(None), TypeError, "path must be a str or os.PathLike, got NoneType"),
        ("load: max_buffer_bytes not an int", lambda l, e, g: q.Learner.load(HERE / "x.npz", max_buffer_bytes=True), ValueError, "max_buffer_bytes must be an int >= 0"),
    ]


class OneUnavailable(envs.MeetingGridworld):
    """Meeting Gridworld where 'stay' is never available, so an unavailable action exists."""

    def get_avail_actions(self):
        avail = super().get_avail_actions()
        avail[:, 4] = 0
        return avail


@pytest.mark.parametrize("name,call,error,words", bad_input_cases(), ids=[c[0] for c in bad_input_cases()])
def test_bad_input_is_refused_clearly_and_nothing_stored_changes(name, call, error, words):
    learner = small_learner("qmix")
    rng = np.random.default_rng(16)
    for tag in range(5):
        learner.buffer.insert(random_episode(rng, learner, 3, True, tag=tag))
    env = OneUnavailable(seed=3)
    good = random_episode(rng, learner, 4, False)
    good["avail_actions"][:] = True
    good["actions"][0, 0] = 3
    stored = {k: v.copy() for k, v in learner.buffer.data.items()}
    theta, rng_state = learner.theta.copy(), json.dumps(learner.rng.bit_generator.state)
    positions, steps = env.positions.copy(), env.steps

    with pytest.raises(error) as caught:
        call(learner, env, good)
    assert words in str(caught.value)
    for key, value in stored.items():
        np.testing.assert_array_equal(learner.buffer.data[key], value, err_msg=key)
    assert len(learner.buffer) == 5 and learner.buffer.next_index == 5
    np.testing.assert_array_equal(learner.theta, theta)
    assert json.dumps(learner.rng.bit_generator.state) == rng_state
    np.testing.assert_array_equal(env.positions, positions)
    assert env.steps == steps
