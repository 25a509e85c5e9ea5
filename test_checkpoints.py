"""Checkpoints, bad input and numerical failure: what is refused, and that nothing stored changes."""
import copy
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import envs
import qmix_np as q
from test_qmix_np import episode_batch, random_episode, small_learner

HERE = pathlib.Path(__file__).resolve().parent


def resume_config(t_max):
    return q.Config(t_max=t_max, hidden_dim=16, mixing_embed_dim=8, hypernet_embed=8, batch_size=8,
                    buffer_size=30, target_update_interval=3, epsilon_anneal_time=500, seed=5)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    """Train N steps, save with the buffer, load in a NEW process, train to N + M: the same
    parameters, optimiser state, counters and buffer as N + M steps without stopping."""
    straight = q.train(envs.MeetingGridworld(grid_size=4, max_steps=20), resume_config(900))
    first = q.train(envs.MeetingGridworld(grid_size=4, max_steps=20), resume_config(400))
    first.save(tmp_path / "half.npz")
    script = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import envs, qmix_np as q
from test_checkpoints import resume_config
env = envs.MeetingGridworld(grid_size=4, max_steps=20)
learner = q.Learner.load({str(tmp_path / 'half.npz')!r}, env_info=env.get_env_info(), config=resume_config(900))
q.train(env, resume_config(900), learner=learner).save({str(tmp_path / 'resumed.npz')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=HERE)
    resumed = q.Learner.load(tmp_path / "resumed.npz")
    assert resumed.t_env == straight.t_env and resumed.t_env >= 900 > first.t_env
    assert straight.train_steps > 20
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
    learner, path = saved(tmp_path, optimizer=optimizer)
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
    with pytest.raises(ValueError, match="allow_pickle|Object arrays"):
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


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "theta": a["theta"][:-1]}, "digest"),
    (lambda a: {k: v for k, v in a.items() if k != "optim_t"}, "lacks \\['optim_t'\\]"),
    (lambda a: {**a, "version": np.array(1)}, "version 1 \\(version 1 held single transitions"),
    (lambda a: {**a, "version": np.array(2)}, "version 2 \\(version 2 came before the GRU agent"),
    (lambda a: {**a, "version": np.array(4)}, "version 4; this code reads version 3"),
    (lambda a: {**a, "version": np.array("2")}, "no integer format version"),
    (lambda a: {k: v for k, v in a.items() if k != "format"}, "not a qmix-np checkpoint"),
])
def test_a_tampered_checkpoint_is_refused(tmp_path, change, message):
    _, path = saved(tmp_path)
    rewrite(path, change)
    with pytest.raises(ValueError, match=message):
        q.Learner.load(path)


def test_a_consistent_but_wrong_shaped_checkpoint_is_refused(tmp_path):
    """Even with a recomputed digest, arrays must fit the stored config."""
    _, path = saved(tmp_path)

    def shrink(a):
        a = {k: v for k, v in a.items() if k != "sha256"}
        a["optim/exp_avg"] = a["optim/exp_avg"][:10]
        return {**a, "sha256": np.array(q._digest(a))}

    rewrite(path, shrink)
    with pytest.raises(ValueError, match="optim/exp_avg has shape \\(10,\\)"):
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
    theta, state = learner.theta.copy(), {k: v.copy() for k, v in learner.optimiser.state.items()}
    with pytest.raises(FloatingPointError, match=f"{what}.* is not finite"):
        learner.train_step()
    np.testing.assert_array_equal(learner.theta, theta)
    for key, value in state.items():
        np.testing.assert_array_equal(learner.optimiser.state[key], value)
    assert learner.optimiser.t == 0 and learner.train_steps == 0

    learner.config.on_nonfinite = "skip"
    assert learner.train_step()["skipped"] is True
    assert learner.skipped_steps == 1 and learner.train_steps == 0
    np.testing.assert_array_equal(learner.theta, theta)


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
        ("mixer: unknown name", lambda l, e, g: q.get_mixer("sum"), ValueError, "mixer must be one of"),
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
