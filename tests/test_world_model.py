"""World model: learning on pendulum reality data, predictions, save/load and its errors."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from simulators import Reality, WorldModel, WorldModelConfig
from simulators.world_model import normalised_mse, one_step_error, open_loop_error

SMALL = {"hidden_size": 64, "num_layers": 2, "batch_size": 512, "num_threads": 1}


@pytest.fixture(scope="module")
def reality():
    return Reality("pendulum", engine="mujoco")


@pytest.fixture(scope="module")
def pendulum_data(reality):
    train = reality.collect(None, 50_000, n_envs=100, seed=0)        # 500 episodes of random actions
    test = reality.collect(None, 5_000, n_envs=50, seed=99, lap=1)   # independent held-out episodes
    return train, test


@pytest.fixture(scope="module")
def trained(pendulum_data):
    train, _ = pendulum_data
    wm = WorldModel("pendulum", 2, 1, WorldModelConfig(max_epochs=6, **SMALL))
    metrics = wm.fit(train)
    return wm, metrics


def test_beats_still_and_constant_velocity_baselines_by_10x(trained, pendulum_data, reality):
    wm, metrics = trained
    _, test = pendulum_data
    err = one_step_error(wm, test)
    still = normalised_mse(test.states, test.next_states, wm.state_scale)
    const_vel = test.states.astype(np.float64).copy()
    const_vel[:, 0] += const_vel[:, 1] * reality.spec.control_dt
    cv = normalised_mse(const_vel, test.next_states, wm.state_scale)
    open_loop = open_loop_error(wm, test, horizon=10)
    print(f"\none-step normalised MSE: wm {err:.3g}, still {still:.3g} ({still / err:.0f}x), "
          f"constant velocity {cv:.3g} ({cv / err:.0f}x); 10-step open loop {open_loop['open_loop_mse']:.3g} "
          f"(final step {open_loop['final_mse']:.3g}); fit {metrics}")
    assert still / err >= 10 and cv / err >= 10
    assert np.isfinite(open_loop["open_loop_mse"]) and open_loop["windows"] > 0
    assert open_loop["per_step"][-1] > open_loop["per_step"][0]   # open-loop error compounds
    assert metrics["n_train"] + metrics["n_holdout"] == len(pendulum_data[0])
    assert metrics["transitions_per_second"] > 0 and metrics["version"] == wm.version


def test_more_data_gives_lower_held_out_error(trained, pendulum_data):
    """Same number of gradient updates; 1/25 of the data generalises worse."""
    wm, _ = trained
    train, test = pendulum_data
    few = train.select(train.episode_ids < 20)
    small = WorldModel("pendulum", 2, 1, WorldModelConfig(max_epochs=6 * 25, patience=1000, **SMALL))
    small.fit(few)
    small.state_scale = wm.state_scale  # compare in the same units
    print(f"\nheld-out one-step MSE: {len(few)} transitions {one_step_error(small, test):.3g}, "
          f"{len(train)} transitions {one_step_error(wm, test):.3g}")
    assert one_step_error(wm, test) < one_step_error(small, test)


def test_predict_step_imagine_disagreement(trained, pendulum_data):
    wm, _ = trained
    s, a = pendulum_data[1].states[:32].astype(np.float64), pendulum_data[1].actions[:32]
    mean, std = wm.predict(s, a)
    assert mean.shape == std.shape == (32, 2) and (std > 0).all()
    np.testing.assert_allclose(wm.step(s, a), mean)
    tmean, _ = wm.predict(torch.as_tensor(s), torch.as_tensor(a))
    assert isinstance(tmean, torch.Tensor) and np.allclose(tmean.numpy(), mean, atol=1e-6)
    dis = wm.disagreement(s, a)
    assert dis.shape == (32, 2) and (dis > 0).all() and (dis <= std + 1e-9).all()
    acts = np.random.default_rng(0).uniform(-1, 1, (32, 4, 1))
    traj = wm.imagine(s, acts)
    expected = s
    for h in range(4):
        expected = wm.step(expected, acts[:, h])
        np.testing.assert_allclose(traj[:, h], expected)
    assert wm.state_scale.shape == (2,) and (wm.state_scale > 0).all()


def test_bfloat16_inference_stays_near_float32_row_by_row_and_through_a_checkpoint(tmp_path, trained, pendulum_data):
    wm, _ = trained
    test = pendulum_data[1]
    low = copy.copy(wm)
    low.config = dataclasses.replace(wm.config, inference_dtype="bfloat16")
    s, a = test.states[:256].astype(np.float64), test.actions[:256]
    exact, approx = wm.step(s, a), low.step(s, a)
    assert not np.array_equal(exact, approx)                        # the hidden products did run in bfloat16
    err32, err16 = one_step_error(wm, test), one_step_error(low, test)
    print(f"\nheld-out one-step MSE: float32 {err32:.3g}, bfloat16 {err16:.3g}")
    assert err16 < 1.5 * err32
    for n in (1, 7, 100):                                           # a row's value does not depend on its batch
        np.testing.assert_array_equal(low.step(s[:n], a[:n]), approx[:n])
    mean, std = low.predict(s, a)
    np.testing.assert_array_equal(mean, approx)
    assert np.isfinite(std).all() and (std > 0).all()
    low.save(tmp_path / "wm.pt")
    back = WorldModel.load(tmp_path / "wm.pt")
    assert back.config.inference_dtype == "bfloat16"
    np.testing.assert_array_equal(back.step(s, a), approx)
    run = WorldModel.load(tmp_path / "wm.pt", config=dataclasses.replace(back.config, inference_dtype="float32"))
    np.testing.assert_array_equal(run.step(s, a), exact)           # where to run comes from the run's config
    with pytest.raises(ValueError, match="inference_dtype must be one of float32, bfloat16, got 'float16'"):
        WorldModelConfig(inference_dtype="float16")
    low.config.inference_dtype = "float16"                          # a checkpoint whose config no longer validates
    low.save(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt holds a config this version cannot use: .*inference_dtype"):
        WorldModel.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("flags, warned", [({"avx2", "fma"}, True), ({"avx2", "avx512_bf16"}, False),
                                           ({"avx2", "amx_bf16"}, False), (set(), False)])
def test_bfloat16_on_a_cpu_that_emulates_it_is_said_once(monkeypatch, caplog, flags, warned):
    from simulators.world_model import model

    monkeypatch.setattr(model, "cpu_flags", lambda: flags)
    model.warn_emulated_bfloat16.cache_clear()
    low = WorldModel("pendulum", 2, 1, WorldModelConfig(hidden_size=8, inference_dtype="bfloat16"))
    with caplog.at_level("WARNING", logger=model.__name__):
        for _ in range(3):
            low.step(np.zeros((2, 2)), np.zeros((2, 1)))
        WorldModel("pendulum", 2, 1, WorldModelConfig(hidden_size=8)).step(np.zeros((2, 2)), np.zeros((2, 1)))
    said = [r.getMessage() for r in caplog.records if "bfloat16 on a CPU without" in r.getMessage()]
    assert len(said) == int(warned)
    if warned:
        assert "amx_bf16, avx512_bf16" in said[0] and "world_model.inference_dtype=float32" in said[0]
    model.warn_emulated_bfloat16.cache_clear()


def test_read_only_inputs_from_the_wire_predict_like_writable_ones(trained, pendulum_data):
    wm, _ = trained
    s = pendulum_data[1].states[:16].astype(np.float32)
    a = pendulum_data[1].actions[:16].astype(np.float32)
    ro_s, ro_a = (np.frombuffer(x.tobytes(), np.float32).reshape(x.shape) for x in (s, a))   # as services.codec decodes
    assert not ro_s.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # torch warns on sharing a read-only buffer
        np.testing.assert_array_equal(wm.step(ro_s, ro_a), wm.step(s, a))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_large_batch_goes_in_chunks_and_each_row_gets_what_it_gets_alone(trained, pendulum_data, dtype):
    from simulators.world_model.ensemble import CHUNK_ROWS

    wm = copy.copy(trained[0])
    wm.config = dataclasses.replace(wm.config, inference_dtype=dtype)
    test = pendulum_data[1]
    for n in (3 * CHUNK_ROWS - 36, 2 * CHUNK_ROWS + 1):              # the second ends in what would be a one-row chunk
        s, a = test.states[:n].astype(np.float64), test.actions[:n]
        whole = wm.step(s, a)
        for lo, hi in ((0, 7), (CHUNK_ROWS - 3, CHUNK_ROWS + 20), (n - 2, n), (n - 1, n)):
            np.testing.assert_array_equal(wm.step(s[lo:hi], a[lo:hi]), whole[lo:hi])


def test_rows_independent_catches_a_prediction_that_depends_on_its_batch(trained, monkeypatch):
    wm = copy.copy(trained[0])
    wm._independent = {}
    step = wm.step
    calls = []
    monkeypatch.setattr(wm, "step", lambda s, a: calls.append(len(s)) or step(s, a))
    assert wm.rows_independent() in (True, False) and calls                  # computed ...
    n = len(calls)
    wm.rows_independent()
    assert len(calls) == n                                                   # ... once per version
    monkeypatch.setattr(wm, "step", lambda s, a: step(s, a) + 1e-12 * len(s))  # a batch-size-dependent rounding
    wm.version = "wm-other"
    assert wm.rows_independent() is False


def test_bad_inputs_raise():
    wm = WorldModel("pendulum", 2, 1, WorldModelConfig(**SMALL))
    with pytest.raises(ValueError, match="states have shape"):
        wm.step(np.zeros((3, 3)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="actions have shape"):
        wm.step(np.zeros((3, 2)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="imagine"):
        wm.imagine(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="ensemble_size"):
        WorldModelConfig(ensemble_size=0)
    with pytest.raises(ValueError, match="holdout"):
        WorldModelConfig(holdout=1.5)
    with pytest.raises(ValueError, match="unknown WorldModelConfig"):
        WorldModelConfig.from_dict({"hidden": 3})


def test_save_load_round_trip(tmp_path, trained, pendulum_data):
    wm, _ = trained
    path = tmp_path / "wm.pt"
    wm.save(path)
    back = WorldModel.load(path)
    s, a = pendulum_data[1].states[:64], pendulum_data[1].actions[:64]
    for x, y in zip(wm.predict(s, a), back.predict(s, a), strict=True):
        np.testing.assert_array_equal(x, y)
    assert back.version == wm.version and back.config == wm.config and back.fitted
    np.testing.assert_array_equal(back.state_scale, wm.state_scale)
    assert WorldModel.load(path, task="pendulum", state_size=2, action_size=1).version == wm.version


def test_mismatched_checkpoint_says_what_differs(tmp_path):
    path = tmp_path / "wm.pt"
    WorldModel("pendulum", 2, 1, WorldModelConfig(**SMALL)).save(path)
    with pytest.raises(ValueError, match=r"task 'pendulum' in the checkpoint vs 'cartpole' requested"):
        WorldModel.load(path, task="cartpole")
    with pytest.raises(ValueError, match=r"state_size 2 in the checkpoint vs 4 requested"):
        WorldModel.load(path, state_size=4)
    with pytest.raises(ValueError, match=r"action_size 1 in the checkpoint vs 2 requested"):
        WorldModel.load(path, task="pendulum", action_size=2)


def test_load_with_config_checks_architecture_and_takes_fitting_settings(tmp_path, pendulum_data):
    path = tmp_path / "wm.pt"
    saved = WorldModelConfig(max_epochs=7, learning_rate=1e-3, **SMALL)
    WorldModel("pendulum", 2, 1, saved).save(path)
    run = WorldModelConfig(**{**SMALL, "max_epochs": 1, "learning_rate": 5e-4, "patience": 0, "batch_size": 128})
    wm = WorldModel.load(path, task="pendulum", config=run)
    assert wm.config == run
    assert WorldModel.load(path).config == saved                    # without a config: the saved one
    assert wm.fit(pendulum_data[1])["epochs"] == 1                  # the run's max_epochs, not the checkpoint's 7
    with pytest.raises(ValueError, match=r"world_model.hidden_size 64 in the checkpoint vs 32 in the config"):
        WorldModel.load(path, task="pendulum", config=WorldModelConfig(**{**SMALL, "hidden_size": 32}))
    with pytest.raises(ValueError) as err:
        WorldModel.load(path, config=WorldModelConfig(**{**SMALL, "ensemble_size": 2, "num_layers": 3}))
    assert "world_model.ensemble_size 5 in the checkpoint vs 2" in str(err.value)
    assert "world_model.num_layers 2 in the checkpoint vs 3" in str(err.value)


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "wm.pt"
    WorldModel("pendulum", 2, 1, WorldModelConfig(**SMALL)).save(path)
    raw = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        WorldModel.load(tmp_path / "truncated.pt")
    flipped = bytearray(raw)
    flipped[len(raw) - 100] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        WorldModel.load(tmp_path / "flipped.pt")
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a world-model checkpoint"):
        WorldModel.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="cannot read"):
        WorldModel.load(tmp_path / "missing.pt")


def test_fit_on_cartpole_and_reacher_runs():
    for task in ("cartpole", "reacher"):
        r = Reality(task, engine="mujoco")
        data = r.collect(None, 2 * r.task.episode_length * 5, n_envs=10, seed=1)
        wm = WorldModel(task, r.spec.state_size, r.spec.action_size, WorldModelConfig(max_epochs=2, **SMALL))
        m = wm.fit(data)
        assert np.isfinite(m["holdout_mse"]) and m["n_holdout"] > 0
        assert wm.step(data.states[:5], data.actions[:5]).shape == (5, r.spec.state_size)
