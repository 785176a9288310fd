"""A world model on an engine base (``world_model.base=engine``): ``s' = E(s, a) + D(s, a)``, D learns the engine's error."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from simulators import Reality, WorldModel, WorldModelConfig
from simulators.world_model import one_step_error

GAP = {"gain_scale": 0.7}   # the engine's actuator is 30% weaker than reality's
SMALL = dict(ensemble_size=2, hidden_size=64, num_layers=2, max_epochs=30, seed=3)


@pytest.fixture(scope="module")
def cartpole_data():
    reality = Reality("cartpole", engine="mujoco")
    return reality.collect(None, 1000, n_envs=16, seed=1), reality.collect(None, 1000, n_envs=16, seed=2)


def _model(base: str, **kw) -> WorldModel:
    return WorldModel("cartpole", 4, 1, WorldModelConfig(base=base, **SMALL), base_params=GAP, **kw)


def test_engine_base_learns_the_gap_from_few_transitions(cartpole_data):
    train, test = cartpole_data
    engine_alone = _model("engine")
    engine_err = float(np.mean(((engine_alone.base_step(test.states, test.actions) - test.next_states)
                                / engine_alone.state_scale) ** 2))
    on_engine, plain = _model("engine"), _model("none")
    on_engine.fit(train)
    plain.fit(train)
    err_on_engine, err_plain = one_step_error(on_engine, test), one_step_error(plain, test)
    # the engine alone is off by the 30% gain; the learned correction removes most of that, and a model of the
    # whole dynamics fitted on the same 1,000 transitions is far worse than either
    assert engine_err > 1e-4
    assert err_on_engine < 0.1 * engine_err
    assert err_on_engine < 0.1 * err_plain


def test_base_none_is_the_state_and_base_engine_the_engine_step(cartpole_data):
    train, _ = cartpole_data
    s, a = train.states[:8].astype(np.float64), train.actions[:8]
    assert np.array_equal(_model("none").base_step(s, a), s)
    from simulators.physics import make_engine

    weak = make_engine("mujoco", "cartpole", GAP)
    assert np.allclose(_model("engine").base_step(s, a), weak.step(s, a), atol=0, rtol=0)
    assert not np.allclose(weak.step(s, a), make_engine("mujoco", "cartpole").step(s, a))


def test_non_finite_state_stays_non_finite():
    wm = _model("engine")
    s = np.zeros((3, 4))
    s[1, 0] = np.nan
    out = wm.step(s, np.zeros((3, 1)))
    assert np.isfinite(out[[0, 2]]).all() and np.isnan(out[1]).all()


def test_checkpoint_and_pickle_keep_the_base(tmp_path, cartpole_data):
    train, test = cartpole_data
    wm = _model("engine")
    wm.fit(train)
    wm.save(tmp_path / "wm.pt")
    loaded = WorldModel.load(tmp_path / "wm.pt")
    assert loaded.config.base == "engine" and loaded.base_params == GAP
    assert np.array_equal(loaded.step(test.states[:32], test.actions[:32]), wm.step(test.states[:32], test.actions[:32]))
    copy = pickle.loads(pickle.dumps(wm))
    assert np.array_equal(copy.step(test.states[:5], test.actions[:5]), wm.step(test.states[:5], test.actions[:5]))
    with pytest.raises(ValueError, match="world_model.base 'engine' in the checkpoint vs 'none'"):
        WorldModel.load(tmp_path / "wm.pt", config=WorldModelConfig(**SMALL))


def test_unknown_base_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="base must be one of none, engine, got 'physics'"):
        WorldModelConfig(base="physics")


def test_a_lap_fits_on_the_simulator_engine_parameters(cartpole_data):
    from flywheel.parts import _fit

    wm, metrics = _fit("cartpole", cartpole_data[0], WorldModelConfig(base="engine", **SMALL), None, GAP)
    assert wm.base_params == GAP and metrics["n_train"] > 0
    plain, _ = _fit("cartpole", cartpole_data[0], WorldModelConfig(**SMALL), None, GAP)
    assert plain.base_params == {}    # a model of the whole dynamics has no engine under it


def test_torch_and_numpy_predictions_agree_on_an_engine_base(cartpole_data):
    import torch

    train, _ = cartpole_data
    wm = _model("engine")
    s, a = train.states[:16].astype(np.float64), train.actions[:16].astype(np.float64)
    mean_np, std_np = wm.predict(s, a)
    mean_t, std_t = wm.predict(torch.as_tensor(s), torch.as_tensor(a))     # the planner's path
    assert isinstance(mean_t, torch.Tensor) and mean_t.dtype == torch.float64
    assert np.allclose(mean_t.numpy(), mean_np, atol=1e-12) and np.allclose(std_t.numpy(), std_np)
    assert np.allclose(mean_np, wm.step(s, a), atol=1e-12)
