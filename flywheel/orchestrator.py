"""The orchestrator: runs the laps of one run directory, resumable after the last finished stage.

    orch = Orchestrator.create(cfg)                 # or Orchestrator.resume(run_dir, overrides, force)
    result = orch.run()                             # laps 0 .. cfg.laps - 1, MLflow run FINISHED at the end

The lap itself is ``flywheel.lap.run_lap``; the parts it uses (``LapParts``) are handed to the
orchestrator (``flywheel.parts.real_parts()`` unless given), so the same loop runs real or fake parts.

A run directory holds ``config.yaml`` (the resolved config), ``state.json`` (its hash),
``tracking.json`` (the MLflow run id), ``store/`` (trajectory store), ``checkpoints/``, ``report/``
and ``laps/lap_NNN/metrics.json`` (the stages a lap finished and their metrics, written atomically
after every stage). Resuming skips finished stages, reopens the same MLflow run and refuses a
config whose hash differs unless forced.

How a run ends is told truthfully: FINISHED; FAILED with the error's one-line summary as the
``flywheel.error`` tag and its traceback as the ``error/traceback.txt`` artifact (and
``<run_dir>/error.txt``); KILLED when stopped by SIGTERM or Ctrl-C (``RunStopped``). An unreachable
tracking server is refused before the run directory is made.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flywheel import dir_lock
from flywheel.config import (
    ConfigError,
    FlywheelConfig,
    config_diff,
    config_hash,
    config_warnings,
    keys_added_since,
    load_config,
    save_config,
)
from flywheel.lap import LapContext, LapParts, LapRecord, StageError, describe, read_json, run_lap, write_json
from flywheel.report import format_table, load_history
from flywheel.store import TrajectoryStore
from flywheel.tracking import Tracker, check_not_a_copy, check_reachable, check_tracked_at, tracking_uri


class RunStopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, SIGINT); it is marked KILLED."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def default_run_dir(cfg: FlywheelConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.runs_root) / f"{stamp}-{cfg.task}-f{cfg.simulator.fidelity:g}-s{cfg.seed}"


class Orchestrator:
    """Runs laps for one run directory; create a fresh one or resume an existing one."""

    def __init__(self, cfg: FlywheelConfig, run_dir: Path, say: Callable[[str], None] = print,
                 parent_run_id: str | None = None, run_name: str | None = None, parts: LapParts | None = None):
        if parts is None:
            from flywheel.parts import real_parts

            parts = real_parts()
        self.cfg, self.run_dir, self.say, self.parts = cfg, Path(run_dir).resolve(), say, parts
        self.parent_run_id, self.run_name = parent_run_id, run_name
        self.store = TrajectoryStore(self.run_dir / "store")
        self.tracker: Tracker | None = None
        self.failure_recorded = False   # the MLflow tag (and error.txt where it could be written) hold the failure
        self.error_file: Path | None = None
        self.signals = stop_on_signals()
        self.verified = False           # resume checked the store against the lap records already

    # -- creating and resuming -----------------------------------------------------------------
    @classmethod
    def create(cls, cfg: FlywheelConfig, run_dir: str | Path | None = None, **kw) -> Orchestrator:
        """A new run directory (refused if it already holds a run: use ``resume``)."""
        run_dir = Path(run_dir or cfg.run_dir or default_run_dir(cfg)).resolve()
        if (run_dir / "state.json").exists():
            raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}")
        check_reachable(tracking_uri(cfg))              # before anything is written
        cfg.run_dir = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dir_lock.hold(run_dir)
        if (run_dir / "state.json").exists():           # made meanwhile by another process
            dir_lock.release(run_dir)
            raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}")
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "state.json", {"config_hash": config_hash(cfg), "created": time.time()})
        return cls(cfg, run_dir, **kw)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, force: bool = False,
               **kw) -> Orchestrator:
        """Continue a run; a config that differs (beyond laps, location, tracking, Ray) needs ``force``."""
        run_dir = Path(run_dir).resolve()
        state_path = run_dir / "state.json"
        if not state_path.exists():
            if (run_dir / "sweep.json").exists():
                raise ConfigError(f"{run_dir} is a sweep directory; continue a sweep with "
                                  f"`flywheel sweep --run-dir {run_dir} ...` (its runs are its sub-directories)")
            what = "does not exist" if not run_dir.exists() else "is not a flywheel run directory (no state.json)"
            raise ConfigError(f"{run_dir} {what}")
        saved = load_config(base=run_dir / "config.yaml")
        cfg = load_config(overrides or [], base=run_dir / "config.yaml")
        state = read_json(state_path, "the run's state", ConfigError)
        if not isinstance(state.get("config_hash"), str):
            raise ConfigError(f"the run's state {state_path} cannot be read (no config_hash)")
        added, hash_without = keys_added_since(cfg, run_dir / "config.yaml") \
            if config_hash(cfg) != state["config_hash"] else ([], state["config_hash"])
        if added and not config_diff(saved, cfg) and hash_without == state["config_hash"]:
            # keys Flywheel gained since the run started, at their defaults: the run's settings are unchanged
            kw.get("say", print)(f"resume: config keys added since the run started take their defaults: "
                                 f"{', '.join(added)}")
            state["config_hash"] = config_hash(cfg)
            state.setdefault("keys_added", []).append({"time": time.time(), "keys": added})
        if config_hash(cfg) != state["config_hash"]:
            diff = config_diff(saved, cfg) or ["(the saved config.yaml was edited after the run started)"]
            if not force:
                raise ConfigError(f"refusing to resume {run_dir} with a changed config:\n  " + "\n  ".join(diff)
                                  + "\nrerun with --force to resume anyway")
            state["config_hash"] = config_hash(cfg)
            state.setdefault("forced", []).append({"time": time.time(), "diff": diff})
        started = [p.parent.name for p in run_dir.glob("laps/lap_*/metrics.json")]
        if started and cfg.laps < len(started):
            raise ConfigError(f"laps={cfg.laps} is fewer than the {len(started)} laps {run_dir} has run "
                              f"({min(started)} to {max(started)}); allowed: laps >= {len(started)} (more laps "
                              "continue the run; its laps cannot be undone)")
        check_writable(run_dir)
        dir_lock.hold(run_dir)                           # one driver per run, from here until ``run`` ends
        try:
            check_history(run_dir)
            check_reachable(tracking_uri(cfg))
            check_tracked_at(run_dir, tracking_uri(cfg))   # every check before the run directory is changed
            check_not_a_copy(run_dir)
            TrajectoryStore(run_dir / "store").verify(expected_shards(run_dir, cfg.laps))
        except BaseException:
            dir_lock.release(run_dir)
            raise
        cfg.run_dir = str(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        write_json(state_path, state)
        earlier = run_dir / "error.txt"
        if earlier.exists():                             # the last attempt's failure: history, not this run's state
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(earlier.stat().st_mtime))
            earlier.rename(run_dir / f"error.{stamp}.txt")
            kw.get("say", print)(f"resume: the last attempt's error.txt is kept as error.{stamp}.txt")
        kw.get("say", print)(f"resume: {where_it_continues(run_dir, cfg.laps)}")
        run = cls(cfg, run_dir, **kw)
        run.verified = True
        return run


    # -- running -------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run (or finish) every lap; returns the per-lap metric rows. The MLflow run ends as it really ended."""
        dir_lock.hold(self.run_dir)
        try:
            return self._run()
        finally:
            dir_lock.release(self.run_dir)

    def _run(self) -> list[dict]:
        self.tracker = Tracker.open(self.cfg, self.run_dir, run_name=self.run_name, parent_run_id=self.parent_run_id)
        self.banner("start")
        warnings = config_warnings(self.cfg)
        for line in warnings:
            self.say(f"WARNING {line}")
        if warnings:
            self.tracker.set_tag("flywheel.warnings", " | ".join(warnings)[:5000])
        signals = self.signals = stop_on_signals()
        try:
            if not self.verified:                          # a resumed run's shards, before any stage relies on them
                self.store.verify(self.expected_shards())
            self.parts.start(self.cfg)
            with signals:                                 # installed after Ray's own handler, replacing it
                for lap in range(self.cfg.laps):
                    self.run_lap(lap)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Ray's blocking calls turn a handler's exception into a plain KeyboardInterrupt: the signal is kept aside
            signum = getattr(exc, "signum", None) or signals.received or (signal.SIGTERM if isinstance(exc, SystemExit)
                                                                         else None)
            with signals.noting():                        # a second Ctrl-C does not cut the marking short
                self.tracker.set_tag("flywheel.stopped", f"stopped by {signal.Signals(signum).name}" if signum
                                     else str(exc) or type(exc).__name__)
                self.tracker.finish("KILLED")
            if signum and not isinstance(exc, RunStopped):
                raise RunStopped(signum) from exc
            raise
        except BaseException as exc:
            with signals.noting():
                self.record_failure(exc)
            raise
        rows = load_history(self.run_dir)
        self.tracker.finish("FINISHED")
        self.say("\n" + format_table(rows))
        self.banner("end")
        return rows

    def expected_shards(self) -> dict[tuple[int, str], str]:
        return expected_shards(self.run_dir, self.cfg.laps)

    def record_failure(self, exc: BaseException) -> None:
        """FAILED on MLflow, with the one-line cause as a tag and the traceback as an artifact and a file."""
        text = "".join(traceback.format_exception(exc))
        logs = ray_logs_dir()
        if logs:
            text += f"\nRay's worker logs (simulator servers, EnvRunners, fit tasks): {logs}\n"
        try:
            (self.run_dir / "error.txt").write_text(text)
            self.error_file = self.run_dir / "error.txt"
        except OSError as write_error:              # a full or read-only disk: MLflow still gets the failure
            self.say(f"cannot write {self.run_dir / 'error.txt'}: {write_error}")
        try:
            self.tracker.set_tag("flywheel.error", one_line(exc)[:5000])
            self.tracker.client.log_text(self.tracker.run_id, text, "error/traceback.txt")
            self.failure_recorded = True
        finally:
            self.tracker.finish("FAILED")

    def banner(self, when: str) -> None:
        self.say(f"[{when}] run dir: {self.run_dir}  tracking: {tracking_uri(self.cfg)}  "
                 f"mlflow run: {self.tracker.run_id}")

    def context(self, lap: int) -> LapContext:
        return LapContext(self.cfg, self.run_dir, self.store, lap, say=lambda m: self.say(f"  lap {lap} | {m}"),
                          tracker=self.tracker, check_stop=self.signals.check)

    def run_lap(self, lap: int) -> LapRecord:
        return run_lap(self.context(lap), self.parts, progress=self.say)


def expected_shards(run_dir: Path, laps: int) -> dict[tuple[int, str], str]:
    """The (lap, kind) shards the finished stages of a run wrote, each with the stage that wrote it."""
    expected = {}
    for lap in range(laps):
        path = run_dir / "laps" / f"lap_{lap:03d}" / "metrics.json"
        rec = LapRecord.load(path, lap)
        if "seed" in rec.stages:
            expected[(lap, "seed")] = f"lap {lap}'s seed stage finished ({path})"
        if "reality" in rec.stages:
            expected[(lap, "reality")] = f"lap {lap}'s reality stage finished ({path})"
        if "select" in rec.stages and rec.metrics.get("data/selected_trajectories", 0) > 0:
            expected[(lap, "selected")] = f"lap {lap}'s select stage stored episodes ({path})"
    return expected


def check_history(run_dir: Path) -> None:
    """``ConfigError`` when a lap's record is missing while a later lap's exists: each lap is built on the one before
    it (its policy, world model and data), so the run cannot go on from a hole in its history."""
    laps = sorted(int(p.parent.name.removeprefix("lap_")) for p in run_dir.glob("laps/lap_[0-9][0-9][0-9]/metrics.json"))
    missing = sorted(set(range(laps[-1])) - set(laps)) if laps else []
    if missing:
        raise ConfigError(f"{run_dir}: lap {missing[0]}'s record laps/lap_{missing[0]:03d}/metrics.json is missing while "
                          f"lap {laps[-1]}'s exists; later laps were built on it, so the run cannot go on: restore the "
                          f"lap's directory, or start a new run")


def where_it_continues(run_dir: Path, laps: int) -> str:
    """Where a resumed run picks up, from its lap records: ``lap 1 continues after retrain``, ``lap 2 (3 of 4) starts``."""
    records = sorted(run_dir.glob("laps/lap_*/metrics.json"))
    if not records:
        return "no stage had finished; lap 0 starts"
    last = records[-1]
    lap = int(last.parent.name.split("_")[1])
    stages = read_json(last, "the lap record", ConfigError).get("stages") or []
    if "log" not in stages:
        return f"lap {lap} continues after {stages[-1]}" if stages else f"lap {lap} starts again"
    return f"lap {lap + 1} ({lap + 2} of {laps}) starts" if lap + 1 < laps else f"all {laps} lap(s) had finished"


def check_writable(run_dir: Path) -> None:
    """``ConfigError`` naming the folder when the run directory, or a folder of it a lap writes into, cannot be written:
    found before a lap's work, not at its first checkpoint."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "store", run_dir / "laps"):
        if not folder.is_dir():
            continue
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise ConfigError(f"{folder} cannot be written ({exc.strerror or exc}); the run needs to write its laps "
                              f"there: give this user write access, or free the disk") from None


def ray_logs_dir() -> str | None:
    """Where this process's Ray writes its workers' output (servers' tracebacks among it); None without Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray._private import worker as ray_worker  # no public API names the session's log directory

        return str(ray_worker._global_node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - a pointer for the reader only
        return None


def one_line(exc: BaseException) -> str:
    """An exception as one readable line: its message's first line, or its type (a Ray error: what it carries)."""
    if isinstance(exc, StageError) or not str(exc).strip():
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    described = describe(exc)
    return described.split(": ", 1)[1] if described.startswith(f"{type(exc).__name__}: ") else described


class stop_on_signals:
    """While active, SIGTERM and SIGINT raise ``RunStopped`` in the main thread (replacing Ray's exit handler)."""

    def __init__(self):
        self.saved: dict = {}
        self.received: int | None = None   # the last signal handled (a library may replace the exception raised)

    def __enter__(self) -> stop_on_signals:
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._raise)
        return self

    def _raise(self, signum, frame) -> None:
        self.received = signum
        raise RunStopped(signum)

    @contextlib.contextmanager
    def noting(self):
        """While the run is marked stopped or failed, a signal is noted (``received``), not raised."""
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                saved[sig] = signal.signal(sig, self._note)
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:
        self.received = self.received or signum

    def check(self) -> None:
        """Raise ``RunStopped`` if a signal came: Python drops a handler's exception raised inside a GC callback
        or a ``__del__`` (JAX registers one), so the lap also checks between stages."""
        if self.received is not None:
            raise RunStopped(self.received)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
