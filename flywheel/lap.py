"""One lap of the flywheel: the one place where the sequence of stages is written down.

    seed       (lap 0 only) random-policy data from reality; the first world model
    self_play  simulator servers serve the latest world model; PPO trains there from the last lap's policy;
               the servers record every graded transition into the store
    reality    (when ``reality.steps_per_lap`` > 0) the lap's policy spends a reality budget; the
               transitions are stored and train the world model beside the selected ones
    select     successful, accurate, physically plausible episodes go to the trajectory store
    retrain    a new world-model version, fitted on the seed data plus every selected trajectory so far
    evaluate   the policy and the new world model are measured in reality
    log        every metric to MLflow with ``step=lap``; report PNGs and checkpoints as artifacts

``run_lap(ctx, parts)`` runs them top to bottom. The parts a lap uses (servers, trainer, world-model
fit, evaluation) come in a ``LapParts`` (``flywheel.parts.real_parts()`` by default), so tests hand in
real or fake parts alike. After every stage the lap's record (``laps/lap_NNN/metrics.json``: stages
finished and their metrics) is written atomically, so a resumed lap continues after its last finished
stage. A stage that fails raises ``StageError`` naming the lap, the stage and the cause.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.store import TrajectoryStore, strict_json
from simulators.dataset import atomic_write

STAGES = ("seed", "self_play", "reality", "select", "retrain", "evaluate", "log")
EPISODE_STRIDE = 100_000_000    # self-play episode ids of lap L start at (L + 1) * stride


class StageError(RuntimeError):
    """A lap stage failed; the message names the lap, the stage and the cause in one line."""

    def __init__(self, lap: int, stage: str, cause: BaseException):
        self.lap, self.stage, self.cause = lap, stage, cause
        super().__init__(f"lap {lap} {stage} failed: {describe(cause)}")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b.*")


def describe(exc: BaseException) -> str:
    """``Type: first line of the message (notes added to it)``; for a Ray error, the remote exception it carries (not Ray's wrapper,
    whose first line names only the actor or task), without terminal colour codes."""
    ray_errors = sys.modules.get("ray.exceptions")
    text = _ANSI.sub("", str(exc)).strip()
    if ray_errors is not None and isinstance(exc, ray_errors.RayError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and cause is not exc:
            return describe(cause)
        if re.search(r'^\s*File "', text, re.M):         # a remote traceback: its exception line says why
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1])
    first = text.splitlines()[0] if text else ""
    notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()) if isinstance(note, str))
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__) + notes


class LapFailed(RuntimeError):
    """A stage finished but what it produced cannot be trusted (no samples, lost data, a bad checkpoint)."""


@dataclass
class Served:
    """Running simulator servers: their addresses, and what they recorded once stopped."""

    addresses: list[str]
    report: dict = field(default_factory=dict)      # filled on stop: transitions served / stored, shards
    lost: Callable[[], str | None] = lambda: None   # why self-play cannot go on (every server gone for good), or None


@dataclass
class LapParts:
    """What a lap uses, handed in. Each is a factory or a function of the ``LapContext``.

    start(cfg)                    once per run before the first lap (e.g. ``ray.init``)
    serve(ctx)                    context manager -> ``Served``; raises on exit if recordings were lost
    trainer(ctx, addresses)       a policy trainer on those servers (``policies.PolicyTrainer``'s interface)
    fit_world_model(ctx, data, init)  -> (world model, fit metrics); ``init`` is the checkpoint to warm-start from
    evaluate(ctx)                 capability metrics of the lap's policy and world model in reality
    """

    start: Callable[[FlywheelConfig], None]
    serve: Callable[[LapContext], AbstractContextManager[Served]]
    trainer: Callable[[LapContext, list[str]], Any]
    fit_world_model: Callable[[LapContext, Any, Path | None], tuple[Any, dict]]
    evaluate: Callable[[LapContext], dict]


@dataclass
class LapContext:
    """What every stage needs: the config, where things live, the tracker, and how to report progress."""

    cfg: FlywheelConfig
    run_dir: Path
    store: TrajectoryStore
    lap: int
    say: Callable[[str], None] = print
    tracker: Any = None
    check_stop: Callable[[], None] = lambda: None   # raises when a stop signal came (between stages)

    def wm_path(self, lap: int | None) -> Path:
        """World model after lap ``lap``'s retrain (``None`` or < 0: the seed model of lap 0)."""
        return self.run_dir / "checkpoints" / ("wm_seed.pt" if lap is None or lap < 0 else f"wm_lap{lap:03d}.pt")

    def policy_path(self, lap: int, trainer: bool = False) -> Path:
        """Lap ``lap``'s torch policy (``.pt``) or its trainer checkpoint directory (``trainer=True``)."""
        name = f"policy_lap{lap:03d}" + ("" if trainer else ".pt")
        return self.run_dir / "checkpoints" / name

    @property
    def lap_dir(self) -> Path:
        return self.run_dir / "laps" / f"lap_{self.lap:03d}"

    @property
    def record_path(self) -> Path:
        return self.lap_dir / "metrics.json"

    def reality(self):
        from simulators.reality import Reality

        return Reality(self.cfg.task, engine=self.cfg.reality.engine, params=vars(self.cfg.reality.params))

    def reality_task(self):
        from simulators.tasks import make_task

        return make_task(self.cfg.task)


@dataclass
class LapRecord:
    """What a lap has finished so far: stage names in order and their metrics."""

    lap: int
    stages: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    logged: bool = False            # every metric is in (the log stage has started)

    @classmethod
    def load(cls, path: Path, lap: int) -> LapRecord:
        if not path.exists():
            return cls(lap)
        data = read_json(path, f"lap {lap}'s record")
        if isinstance(data.get("metrics"), dict):
            data["metrics"] = finite_or_nan(data["metrics"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"lap {lap}'s record {path} has another layout ({exc})") from None

    def save(self, path: Path) -> None:
        write_json(path, {"lap": self.lap, "stages": self.stages, "metrics": self.metrics, "logged": self.logged})


def read_json(path: Path, what: str, error: type[Exception] = ValueError) -> dict:
    """A JSON object from ``path``; ``error`` naming ``what`` and the file when it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise error(f"{what} {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} cannot be read (a JSON {type(data).__name__}, not an object)")
    return data


def write_json(path: Path, data: dict) -> None:
    """``data`` as strict JSON (any JSON parser reads it): NaN and infinities are written as ``null``."""
    text = json.dumps(strict_json(data), indent=1, default=float, allow_nan=False).encode()
    atomic_write(path, lambda f: f.write(text))


def finite_or_nan(metrics: dict) -> dict:
    """A record's metrics as written by ``write_json``, a metric without a value (``null``) read back as NaN."""
    return {k: math.nan if v is None else v for k, v in metrics.items()}


def run_lap(ctx: LapContext, parts: LapParts, progress: Callable[[str], None] = print) -> LapRecord:
    """Run lap ``ctx.lap`` top to bottom, skipping the stages its record says are finished."""
    from flywheel import stages

    rec = LapRecord.load(ctx.record_path, ctx.lap)

    def stage(name: str, body: Callable[[], dict]) -> None:
        if name in rec.stages:
            return
        ctx.check_stop()
        progress(f"lap {ctx.lap} ({ctx.lap + 1} of {ctx.cfg.laps}) | {name}")
        t0 = time.time()
        try:
            metrics = body()
        except Exception as exc:
            raise StageError(ctx.lap, name, exc) from exc
        metrics.setdefault(f"time/{name}", time.time() - t0)
        rec.metrics.update(metrics)
        rec.stages.append(name)
        rec.save(ctx.record_path)
        ctx.check_stop()              # a signal whose exception was lost (raised inside a GC callback) stops here

    if ctx.lap == 0:
        stage("seed", lambda: stages.seed(ctx, parts))
    stage("self_play", lambda: stages.self_play(ctx, parts))
    if ctx.cfg.reality.steps_per_lap > 0:
        stage("reality", lambda: stages.reality(ctx))
    stage("select", lambda: stages.select(ctx))
    stage("retrain", lambda: stages.retrain(ctx, parts))
    stage("evaluate", lambda: parts.evaluate(ctx))
    stage("log", lambda: stages.log(ctx, rec))
    return rec
