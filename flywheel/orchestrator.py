"""The orchestrator: runs the laps of one run directory, resumable after the last finished stage.

    orch = Orchestrator.create(cfg)                 # or Orchestrator.resume(run_dir, overrides, force)
    result = orch.run()                             # laps 0 .. cfg.laps - 1, MLflow run FINISHED at the end

A run directory holds ``config.yaml`` (the resolved config), ``state.json`` (its hash),
``tracking.json`` (the MLflow run id), ``store/`` (trajectory store), ``checkpoints/``, ``report/``
and ``laps/lap_NNN/metrics.json`` (the stages a lap finished and their metrics, written atomically
after every stage). Resuming skips finished stages, reopens the same MLflow run and refuses a
config whose hash differs unless forced. Simulator servers run in spawned processes, policy
workers are RLlib EnvRunners on Ray (``ray.init`` on this machine's cores unless ``ray.address``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flywheel import lap as laps
from flywheel.config import ConfigError, FlywheelConfig, config_diff, config_hash, load_config, save_config
from flywheel.report import format_table, load_history, write_run_report
from flywheel.store import TrajectoryStore
from flywheel.tracking import Tracker, tracking_uri
from simulators.dataset import atomic_write


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, default=float).encode()
    atomic_write(path, lambda f: f.write(text))


@dataclass
class LapRecord:
    """What a lap has finished so far: stage names in order and their metrics."""

    lap: int
    stages: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    logged: bool = False            # every metric is in (the log stage has started)

    @classmethod
    def load(cls, path: Path, lap: int) -> LapRecord:
        return cls(**json.loads(path.read_text())) if path.exists() else cls(lap)

    def save(self, path: Path) -> None:
        _write_json(path, {"lap": self.lap, "stages": self.stages, "metrics": self.metrics, "logged": self.logged})


def default_run_dir(cfg: FlywheelConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.runs_root) / f"{stamp}-{cfg.task}-f{cfg.simulator.fidelity:g}-s{cfg.seed}"


class Orchestrator:
    """Runs laps for one run directory; create a fresh one or resume an existing one."""

    def __init__(self, cfg: FlywheelConfig, run_dir: Path, say: Callable[[str], None] = print,
                 parent_run_id: str | None = None, run_name: str | None = None):
        self.cfg, self.run_dir, self.say = cfg, Path(run_dir).resolve(), say
        self.parent_run_id, self.run_name = parent_run_id, run_name
        self.store = TrajectoryStore(self.run_dir / "store")
        self.tracker: Tracker | None = None

    # -- creating and resuming -----------------------------------------------------------------
    @classmethod
    def create(cls, cfg: FlywheelConfig, run_dir: str | Path | None = None, **kw) -> Orchestrator:
        """A new run directory (refused if it already holds a run: use ``resume``)."""
        run_dir = Path(run_dir or cfg.run_dir or default_run_dir(cfg)).resolve()
        if (run_dir / "state.json").exists():
            raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}")
        cfg.run_dir = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _write_json(run_dir / "state.json", {"config_hash": config_hash(cfg), "created": time.time()})
        return cls(cfg, run_dir, **kw)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, force: bool = False,
               **kw) -> Orchestrator:
        """Continue a run; a config that differs (beyond laps, location, tracking, Ray) needs ``force``."""
        run_dir = Path(run_dir).resolve()
        state_path = run_dir / "state.json"
        if not state_path.exists():
            raise ConfigError(f"{run_dir} is not a flywheel run directory (no state.json)")
        saved = load_config(base=run_dir / "config.yaml")
        cfg = load_config(overrides or [], base=run_dir / "config.yaml")
        state = json.loads(state_path.read_text())
        if config_hash(cfg) != state["config_hash"]:
            diff = config_diff(saved, cfg) or ["(the saved config.yaml was edited after the run started)"]
            if not force:
                raise ConfigError(f"refusing to resume {run_dir} with a changed config:\n  " + "\n  ".join(diff)
                                  + "\nrerun with --force to resume anyway")
            state["config_hash"] = config_hash(cfg)
            state.setdefault("forced", []).append({"time": time.time(), "diff": diff})
        cfg.run_dir = str(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        _write_json(state_path, state)
        return cls(cfg, run_dir, **kw)

    # -- running -------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run (or finish) every lap; returns the per-lap metric rows."""
        self.tracker = Tracker.open(self.cfg, self.run_dir, run_name=self.run_name, parent_run_id=self.parent_run_id)
        self.banner("start")
        try:
            init_ray(self.cfg)
            for lap in range(self.cfg.laps):
                self.run_lap(lap)
        except KeyboardInterrupt:
            self.tracker.finish("KILLED")
            raise
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        rows = load_history(self.run_dir)
        self.tracker.finish("FINISHED")
        self.say("\n" + format_table(rows))
        self.banner("end")
        return rows

    def banner(self, when: str) -> None:
        self.say(f"[{when}] run dir: {self.run_dir}  tracking: {tracking_uri(self.cfg)}  "
                 f"mlflow run: {self.tracker.run_id}")

    def run_lap(self, lap: int) -> LapRecord:
        ctx = laps.LapContext(self.cfg, self.run_dir, self.store, lap, say=lambda m: self.say(f"  lap {lap} | {m}"))
        path = ctx.lap_dir / "metrics.json"
        rec = LapRecord.load(path, lap)
        stages = [s for s in laps.STAGES if s != "seed" or lap == 0]
        for stage in stages:
            if stage in rec.stages:
                continue
            self.say(f"lap {lap}/{self.cfg.laps - 1} | {stage}")
            t0 = time.time()
            if stage == "self_play":
                with laps.serve(ctx) as addresses:
                    t1 = time.time()
                    metrics = laps.self_play(ctx, addresses)
                    t2 = time.time()
                metrics["time/serve"] = (t1 - t0) + (time.time() - t2)
                metrics["time/self_play"] = t2 - t1
            elif stage == "log":
                metrics = self.log(ctx, rec, path)
            else:
                metrics = getattr(laps, stage)(ctx)
                metrics[f"time/{stage}"] = time.time() - t0
            rec.metrics.update(metrics)
            rec.stages.append(stage)
            rec.save(path)
        return rec

    def log(self, ctx: laps.LapContext, rec: LapRecord, path: Path) -> dict:
        """Every metric with ``step=lap``, the report PNGs and the lap's checkpoints as MLflow artifacts."""
        t0 = time.time()
        rec.metrics["lap/seconds"] = sum(v for k, v in rec.metrics.items() if k.startswith("time/"))
        rec.logged = True
        rec.save(path)
        files = write_run_report(self.run_dir)
        rec.metrics["time/log"] = time.time() - t0
        n = self.tracker.log_metrics(rec.metrics, step=ctx.lap)
        for f in files:
            self.tracker.log_artifact(f, f"report/lap_{ctx.lap:03d}")
        for f in (ctx.wm_path(ctx.lap), ctx.policy_path(ctx.lap), ctx.wm_path(None) if ctx.lap == 0 else None):
            if f is not None:
                self.tracker.log_artifact(f, f"checkpoints/lap_{ctx.lap:03d}")
        self.tracker.log_artifact(self.run_dir / "config.yaml", "config")
        ctx.say(f"log: {n} metrics at step {ctx.lap}; lap took {rec.metrics['lap/seconds']:.0f} s")
        return {"time/log": rec.metrics["time/log"]}


def init_ray(cfg: FlywheelConfig) -> None:
    """``ray.init`` once per process: the configured cluster, or this machine's cores."""
    from policies.rllib_adapter import init_ray as init

    init(cfg.ray.num_cpus, cfg.ray.address, cfg.ray.include_dashboard)
