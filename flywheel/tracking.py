"""MLflow tracking: one MLflow run per flywheel run, every per-lap metric with ``step=lap``.

The default store is SQLite in the runs folder (``sqlite:///<runs_root>/mlflow.db``, shared by all
local runs, so one ``mlflow ui --backend-store-uri ...`` shows them all) with artifacts under
``<runs_root>/mlartifacts``; any tracking URI works. The run id is persisted in the run directory
(``tracking.json``) so a resume reopens the same MLflow run. A run that ends by an exception is
marked FAILED, one stopped by a signal KILLED; a run killed outright (SIGKILL) stays RUNNING until it
is resumed (and is then reopened). An HTTP tracking server is probed (``check_reachable``) before a
run directory is made.
A sweep is a parent run whose children carry the ``mlflow.parentRunId`` tag.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from pathlib import Path

from flywheel.config import ConfigError, FlywheelConfig, to_container, to_yaml
from simulators.dataset import atomic_write

RUN_FILE = "tracking.json"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """``ConfigError`` within ``timeout_s`` if an HTTP tracking server does not answer (other stores: no check)."""
    import urllib.error
    import urllib.request

    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///") or len(uri) == len("sqlite:///"):
            raise ConfigError(f"tracking.uri {uri!r} is not a SQLite URI of a file: sqlite:///<path> "
                              "(e.g. sqlite:////abs/path/mlflow.db, sqlite:///runs/mlflow.db)")
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tracking.uri {uri}: its directory {db.parent} cannot be made "
                              f"({exc.strerror or exc})") from None
        if db.is_dir():
            raise ConfigError(f"tracking.uri {uri}: {db} is a directory; name the SQLite file in it") from None
        check_sqlite(db)
        return
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            if reply.status >= 400:
                raise ConfigError(f"tracking server {uri} answered {reply.status} at {url}")
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"tracking server {uri} answered {exc.code} at {url}; is it an MLflow server?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        raise ConfigError(f"tracking server {uri} is unreachable ({reason}); start it or set tracking.uri "
                          f"(null = the local SQLite store)") from None


def check_sqlite(db: Path) -> None:
    """``ConfigError`` naming ``db`` if that MLflow store exists but SQLite finds it damaged (``PRAGMA quick_check``)."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        verdict = str(exc)
    if verdict != "ok":
        raise ConfigError(f"the MLflow tracking store {db} is damaged (SQLite: {verdict.splitlines()[0]}); restore it "
                          f"from a backup, or give another tracking.uri (the run directory was not changed)")


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def recorded_run(run_dir: str | Path) -> dict:
    """The MLflow run a run directory is tracked in (its ``tracking.json``: uri, experiment, run_id)."""
    from flywheel.lap import read_json

    path = Path(run_dir) / RUN_FILE
    info = read_json(path, "the run's MLflow record", ConfigError)
    missing = [k for k in ("uri", "experiment", "run_id") if not isinstance(info.get(k), str)]
    if missing:
        raise ConfigError(f"the run's MLflow record {path} cannot be read (no {', '.join(missing)})")
    return info


def check_tracked_at(run_dir: str | Path, uri: str) -> dict:
    """``ConfigError`` unless the run in ``run_dir`` (when it has an MLflow run yet) is tracked at ``uri``."""
    if not (Path(run_dir) / RUN_FILE).exists():
        return {}
    info = recorded_run(run_dir)
    if info["uri"] != uri:
        raise ConfigError(f"run {run_dir} is tracked at {info['uri']}, not {uri}; resume with the same "
                          f"tracking.uri (or leave tracking.uri out)")
    return info


def check_not_a_copy(run_dir: str | Path) -> None:
    """``ConfigError`` when ``run_dir`` is a copy of a run directory that still exists: its ``tracking.json`` names the
    original's MLflow run, which resuming the copy would continue (a moved directory goes on in its run)."""
    if not (Path(run_dir) / RUN_FILE).exists():
        return
    info = recorded_run(run_dir)
    here = Path(run_dir).resolve()
    quiet_mlflow()
    try:
        origin = mlflow_client(info["uri"]).get_run(info["run_id"]).data.tags.get("flywheel.run_dir")
    except Exception:  # noqa: BLE001 - a run MLflow cannot show is reported when the run is reopened
        return
    if origin and Path(origin) != here and (Path(origin) / "state.json").is_file() and \
            (Path(origin) / RUN_FILE).is_file() and recorded_run(origin)["run_id"] == info["run_id"]:
        raise ConfigError(f"{here} is a copy of the run directory {origin}, whose MLflow run {info['run_id']} it would "
                          f"continue; resume the original, or move (not copy) a run directory to continue it elsewhere")


def default_uri(runs_root: str | Path) -> str:
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: FlywheelConfig) -> str:
    return cfg.tracking.uri or default_uri(cfg.runs_root)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class Tracker:
    """A handle on one MLflow run (created or reopened), through ``MlflowClient`` (no global active run)."""

    def __init__(self, uri: str, experiment: str, run_id: str):
        quiet_mlflow()
        self.uri, self.experiment, self.run_id = uri, experiment, run_id
        self.client = mlflow_client(uri)

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: FlywheelConfig, run_dir: str | Path, run_name: str | None = None,
             parent_run_id: str | None = None, tags: dict | None = None) -> Tracker:
        """Reopen the run recorded in ``run_dir`` or create one (logging params and the resolved config)."""
        try:
            return cls._open(cfg, run_dir, run_name, parent_run_id, tags)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow's and its database's errors, named with the store
            line = (str(exc).splitlines() or [""])[0][:300]
            raise RuntimeError(f"the MLflow tracking store {tracking_uri(cfg)} cannot be used: "
                               f"{type(exc).__name__}: {line}") from exc

    @classmethod
    def _open(cls, cfg: FlywheelConfig, run_dir: str | Path, run_name: str | None, parent_run_id: str | None,
              tags: dict | None) -> Tracker:
        quiet_mlflow()
        run_dir = Path(run_dir)
        uri = tracking_uri(cfg)
        saved = run_dir / RUN_FILE
        if saved.exists():
            check_tracked_at(run_dir, uri)   # before a client makes a store at a mistyped URI
        client = mlflow_client(uri)
        if saved.exists():
            info = check_tracked_at(run_dir, uri)
            before = client.get_run(info["run_id"])
            client.update_run(info["run_id"], status="RUNNING")
            tags = dict(before.data.tags)
            if before.info.status == "RUNNING":        # its driver (the run directory's lock is ours) ended unmarked
                tags["flywheel.stopped"] = "its driver ended without marking the run (killed, or its host lost)"
            here = str(run_dir.resolve())
            if tags.get("flywheel.run_dir", here) != here:   # the run directory was moved: the run follows it
                client.set_tag(info["run_id"], "flywheel.moved_from", tags["flywheel.run_dir"])
                client.set_tag(info["run_id"], "flywheel.run_dir", here)
            ended = [tags[k] for k in ("flywheel.error", "flywheel.stopped") if k in tags]
            if ended:                                  # the run is running again: its last end is history
                client.set_tag(info["run_id"], "flywheel.resumed_after", "; ".join(ended)[:5000])
                for key in ("flywheel.error", "flywheel.stopped"):
                    if key in before.data.tags:
                        client.delete_tag(info["run_id"], key)
            tracker = cls(uri, info["experiment"], info["run_id"])
            tracker.sync_params(cfg)
            return tracker
        exp_id = experiment_id(client, cfg.tracking.experiment, cfg.runs_root)
        all_tags = {"flywheel.run_dir": str(run_dir.resolve()), "flywheel.task": cfg.task, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name or run_dir.name, tags=context_tags(all_tags))
        # recorded at once: a driver killed while the params go in leaves a run its resume reopens (and completes,
        # ``sync_params``), not an orphan RUNNING forever beside a second run
        text = json.dumps({"uri": uri, "experiment": cfg.tracking.experiment, "run_id": run.info.run_id}).encode()
        atomic_write(saved, lambda f: f.write(text))
        tracker = cls(uri, cfg.tracking.experiment, run.info.run_id)
        tracker.log_params(flatten(to_container(cfg)))
        tracker.client.log_text(tracker.run_id, to_yaml(cfg), "config/resolved.yaml")
        return tracker

    replaced = 0   # values the latest ``log_metrics`` logged over different ones at the same step

    @classmethod
    def attach(cls, run_dir: str | Path) -> Tracker:
        """A handle on the run recorded in ``run_dir`` without reopening it (for reading)."""
        info = recorded_run(run_dir)
        return cls(info["uri"], info["experiment"], info["run_id"])

    # -- logging -------------------------------------------------------------------------------
    def sync_params(self, cfg: FlywheelConfig) -> list[str]:
        """Bring a reopened run's MLflow record up to the config it goes on with: keys it did not log yet are
        logged; a logged param cannot change (MLflow's rule), so a changed value (more laps, a forced resume) is
        listed, ``key: logged -> now``, in the ``flywheel.params_changed`` tag, and the resolved config artifact is
        replaced by the one the run goes on with. Returns the changes."""
        run = self.client.get_run(self.run_id)
        logged = run.data.params
        current = {k[:250]: v[:6000] for k, v in flatten(to_container(cfg)).items()}
        self.log_params({k: v for k, v in current.items() if k not in logged})
        changed = [f"{k}: {logged[k]} -> {v}" for k, v in current.items() if k in logged and logged[k] != v]
        if changed:
            self.client.set_tag(self.run_id, "flywheel.params_changed", "; ".join(changed)[:5000])
        elif "flywheel.params_changed" in run.data.tags:
            self.client.delete_tag(self.run_id, "flywheel.params_changed")
        self.client.log_text(self.run_id, to_yaml(cfg), "config/resolved.yaml")
        return changed

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i: i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, replace: bool = False) -> int:
        """Log metrics at ``step``, skipping keys already logged at that step with the same value (a resumed stage
        logs nothing twice); a different value is logged too and becomes MLflow's latest at that step (a lap run
        again, a recomputed summary), and counted in ``self.replaced``. ``replace``: log every value, unchecked."""
        from mlflow.entities import Metric

        logged = {} if replace else self.client.get_run(self.run_id).data.metrics
        now = int(time.time() * 1000)
        items, self.replaced = [], 0
        for key, value in metrics.items():
            if key in logged:
                earlier = sorted((m.timestamp, m.value) for m in self.client.get_metric_history(self.run_id, key)
                                 if m.step == step)
                if earlier and _same(earlier[-1][1], float(value)):     # the latest value at this step
                    continue
                self.replaced += bool(earlier)
            items.append(Metric(key, float(value), now, step))
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i: i + 500])
        return len(items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    @property
    def ui_hint(self) -> str:
        return f"mlflow ui --backend-store-uri {self.uri}" if self.uri.startswith("sqlite") else self.uri


def mlflow_client(uri: str):
    """An ``MlflowClient`` whose store is ready. A SQLite store is created (and its schema migrated) under an
    exclusive lock on ``<db>.lock``: runs started at once on a new store would otherwise race in MLflow's
    migration and fail ("table _alembic_tmp_metrics already exists")."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)      # creates the store, and migrates it, now
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def context_tags(tags: dict) -> dict:
    """``tags`` with the context tags ``mlflow.start_run`` adds and ``MlflowClient.create_run`` does not: the
    user, the source (the command) and its git commit, which the MLflow UI shows as User, Source and Version."""
    from mlflow.tracking.context import registry

    try:
        return registry.resolve_tags(tags)
    except Exception as exc:  # noqa: BLE001 - a context provider's failure must not stop the run
        logging.getLogger(__name__).warning("MLflow context tags not resolved (%s: %s)", type(exc).__name__, exc)
        return dict(tags)


def experiment_id(client, name: str, runs_root: str | Path) -> str:
    """The id of experiment ``name``, creating it (artifacts under ``<runs_root>/mlartifacts``) if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite"):
        location = (Path(runs_root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def quiet_mlflow() -> None:
    """Silence MLflow's database-migration chatter; bound its HTTP retries so a lost server fails in seconds."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)
