"""The flywheel: config schema, laps, orchestrator, trajectory store, MLflow tracking, sweeps, reports, CLI.

A run is a sequence of laps; each lap serves the learned simulator, trains the policy in it
(self-play), selects the successful trajectories, retrains the world model, evaluates in reality
and logs to MLflow with ``step=lap``. ``flywheel run`` / ``flywheel sweep`` are the entry points.
"""

from flywheel.config import ConfigError, FlywheelConfig, config_hash, load_config, save_config

__all__ = ["ConfigError", "FlywheelConfig", "config_hash", "load_config", "save_config"]
