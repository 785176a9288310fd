"""World models by version and the physics checker the server shares between calls.

``LoadWorldModel`` reads only ``<world_model_dir>/<version>.pt``, with ``version`` a plain name
(letters, digits, ``.``, ``_``, ``-``; no path separators, no wildcards, no ``..``); its errors never
say whether some other path exists. At most ``MAX_MODELS`` versions stay loaded (the current one
always); sessions keep the model they were created with.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from services.config import ServerConfig
from services.session import ServiceError

log = logging.getLogger(__name__)
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUFFIX = ".pt"
MAX_MODELS = 8


def check_version(version: str) -> str:
    """A world-model version name, or INVALID_ARGUMENT saying what a name may hold."""
    if not VERSION.fullmatch(version) or ".." in version:
        raise ServiceError("INVALID_ARGUMENT", f"world-model version {version[:64]!r} is not a version name: "
                           "1 to 128 letters, digits, '.', '_' or '-' starting with a letter or digit (no path "
                           "separators, wildcards or '..')")
    return version


class ModelStore:
    """The server's world models keyed by version; each task's current model is what its new sessions get by
    default (loading a model of another task leaves the server's own task served as it was)."""

    def __init__(self, config: ServerConfig, world_model=None):
        self.config = config
        self._models: OrderedDict = OrderedDict()
        self._current: dict[str, str] = {}          # task -> version
        self._names: dict[str, str] = {}            # a name loaded from the model directory -> its version
        self._lock = threading.Lock()
        self._verifiers: dict[str, tuple] = {}
        if world_model is None and config.world_model_path:
            world_model = self._read(config.world_model_path)
        if world_model is None:
            world_model = self._untrained(config.task)
        self._add(world_model)

    def _untrained(self, task_name: str):
        from simulators.physics import build_model
        from simulators.tasks import make_task
        from simulators.world_model import WorldModel, WorldModelConfig

        task = make_task(task_name)
        model = build_model(task)
        log.warning("no world model given: serving an untrained one for %s", task.name)
        return WorldModel(task, model.nq + model.nv, model.nu, WorldModelConfig(seed=self.config.seed))

    @staticmethod
    def _read(path: str | Path):
        from simulators.world_model import WorldModel

        if not Path(path).is_file():
            raise ServiceError("NOT_FOUND", f"no world-model file at {path}")
        return WorldModel.load(path)

    @property
    def current(self) -> str:
        """The version new sessions of the server's task get."""
        with self._lock:
            return self._current.get(self.config.task) or next(reversed(self._models))

    def current_for(self, task: str):
        """The current model of ``task``, or None."""
        with self._lock:
            version = self._current.get(task)
            return None if version is None else self._models.get(version)

    def _add(self, wm, name: str = "") -> None:
        with self._lock:
            self._models[wm.version] = wm
            self._models.move_to_end(wm.version)
            self._current[wm.task.name] = wm.version
            if name:
                self._names[name] = wm.version
            kept = set(self._current.values())
            for old in [v for v in self._models if v not in kept][:max(0, len(self._models) - MAX_MODELS)]:
                del self._models[old]
            self._names = {k: v for k, v in self._names.items() if v in self._models}

    def get(self, version: str = "", task: str | None = None):
        """The model of ``version`` (empty = current), checked against ``task`` when given."""
        with self._lock:
            if version:
                wm = self._models.get(self._names.get(version, version))
            else:
                wm = self._models.get(self._current.get(task or self.config.task, ""))
                if wm is None:
                    raise ServiceError("FAILED_PRECONDITION", f"no world model of task {task!r} is loaded (loaded: "
                                       f"{self._loaded()}); load a {task} model with LoadWorldModel")
        if wm is None:
            raise ServiceError("NOT_FOUND", f"unknown world-model version {version[:64]!r}; loaded: {self._loaded()}")
        if task is not None and wm.task.name != task:
            raise ServiceError("FAILED_PRECONDITION", f"world model {wm.version} is for task {wm.task.name!r}, "
                               f"not {task!r}; load a {task} model with LoadWorldModel")
        return wm

    def _loaded(self) -> str:
        return ", ".join(f"{v} ({wm.task.name})" for v, wm in self._models.items()) or "none"

    def load(self, version: str = "", path: str = ""):
        """Make a version (already loaded, or ``<world_model_dir>/<version>.pt``) the current model."""
        if path:
            raise ServiceError("INVALID_ARGUMENT", "LoadWorldModel loads by version name from the server's model "
                               "directory only; a path is not accepted")
        if not version:
            raise ServiceError("INVALID_ARGUMENT", "LoadWorldModel needs a version")
        check_version(version)
        with self._lock:
            wm = self._models.get(self._names.get(version, version))
        named = ""
        if wm is None:
            wm, named = self._from_directory(version), version
        self._add(wm, named)
        log.info("serving world model %s for new sessions", wm.version)
        return wm

    def _from_directory(self, version: str):
        missing = ServiceError("NOT_FOUND", f"world-model version {version!r} is neither loaded ({sorted(self._models)}) "
                               "nor in the server's model directory")
        if not self.config.world_model_dir:
            raise missing
        directory = Path(self.config.world_model_dir).resolve()
        path = directory / f"{version}{SUFFIX}"
        if path.parent != directory or not path.is_file():
            raise missing
        try:
            from simulators.world_model import WorldModel

            return WorldModel.load(path)
        except Exception as exc:  # noqa: BLE001 - a damaged or mismatched checkpoint in the server's own directory
            raise ServiceError("FAILED_PRECONDITION", f"world-model version {version!r} in the server's model "
                               f"directory cannot be loaded: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None

    def close(self) -> None:
        """Close the RLPF checkers' engines."""
        from services.engines import close_engine

        with self._lock:
            verifiers, self._verifiers = list(self._verifiers.values()), {}
        for engine, _ in verifiers:
            close_engine(engine)

    def verifier(self, task_name: str):
        """An engine for RLPF checks of ``task_name`` and the lock that serialises its use."""
        from simulators import make_engine

        with self._lock:
            if task_name not in self._verifiers:
                engine = make_engine(self.config.engine, task_name, self.config.engine_params or None)
                self._verifiers[task_name] = (engine, threading.Lock())
            return self._verifiers[task_name]


def verify_report(engine, start: np.ndarray, actions: np.ndarray, next_states: np.ndarray,
                  reward_config, scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``rewards.physics_violation`` flattened to named arrays (dict fields become ``<field>/<key>``)."""
    from rewards import physics_violation

    report = physics_violation(engine, start, actions, next_states, reward_config, scale=scale)
    items = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(vars(report))
    out: dict[str, np.ndarray] = {}
    for name, value in items.items():
        if isinstance(value, dict):
            out.update({f"{name}/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, (np.ndarray, float, int, bool, np.generic)):
            out[name] = np.asarray(value)
    return out
