"""Sweeps: one parent MLflow run, one child run per setting and seed, and the compounding report.

    flywheel sweep laps=5 --grid simulator.fidelity=0,0.25,0.5,0.75,1 --seeds 3
    flywheel sweep laps=5 --grid simulator.fidelity=0,1 --seeds 1000,2000,3000

Settings are the cartesian product of the ``--grid`` axes. Children run one after another in this
process (each a full ``Orchestrator`` run in ``<sweep_dir>/<setting>-seed<k>``; an existing child
directory is resumed, so rerunning a sweep with ``--run-dir`` finishes it). Every setting is
validated before the first child starts. The report is a table of capability per lap per setting
(mean ± std over seeds) and a PNG, written to the sweep directory and logged to the parent run.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from flywheel import dir_lock
from flywheel.config import ConfigError, load_config
from flywheel.lap import LapParts
from flywheel.orchestrator import Orchestrator
from flywheel.sweep_report import log_summary, write_sweep_report
from flywheel.tracking import Tracker, check_reachable, tracking_uri
from simulators.dataset import atomic_write


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["simulator.fidelity=0,0.5"]`` -> ``{"simulator.fidelity": ["0", "0.5"]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"--grid {item!r} must look like key=v1,v2,... (e.g. simulator.fidelity=0,0.5,1)")
        grid[key.strip()] = vals
    if not grid:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    return check_grid(grid)


def check_grid(grid: dict[str, list[str]]) -> dict[str, list[str]]:
    """A grid whose values are distinct per key (a repeated value would plan two runs into one directory)."""
    for key, vals in grid.items():
        repeated = sorted({v for v in vals if vals.count(v) > 1})
        if repeated:
            raise ConfigError(f"grid key {key} repeats the value(s) {', '.join(repeated)}; allowed: distinct values")
    return grid


def load_spec(path: str | Path) -> tuple[list[str], dict[str, list[str]], int | list[int], bool]:
    """A sweep file: ``overrides`` (list), ``grid`` (key -> list of values), ``seeds`` and ``ablations``."""
    from omegaconf import OmegaConf

    from flywheel.config import CONFIG_DIR

    path = Path(path)
    packaged = CONFIG_DIR.parent / path          # configs/sweep/... of the installed package, from any directory
    if not path.is_file() and not path.is_absolute() and packaged.is_file():
        path = packaged
    if not path.is_file():
        shipped = ", ".join(f"configs/sweep/{p.name}" for p in sorted((CONFIG_DIR / "sweep").glob("*.yaml")))
        raise ConfigError(f"sweep file {path} does not exist; the shipped ones: {shipped or 'none'}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # noqa: BLE001 - YAML errors come in several types
        raise ConfigError(f"sweep file {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} is not a mapping of overrides, grid, seeds and ablations")
    unknown = set(data) - {"overrides", "grid", "seeds", "ablations"}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in sweep file {path}; allowed: overrides, grid, seeds, "
                          f"ablations")
    grid = check_grid({str(k): [str(v) for v in vals] for k, vals in (data.get("grid") or {}).items()})
    return ([str(o) for o in data.get("overrides") or []], grid, parse_seeds(data.get("seeds", 1)),
            bool(data.get("ablations", False)))


MAX_SEED_COUNT = 1000   # --seeds N: more runs per setting than this is a seed written without its comma

def parse_seeds(value: str | int | list) -> int | list[int]:
    """``--seeds``: a count (``5``: seed, seed+1, ...) or an explicit list (``1000,2000``, or a YAML list)."""
    items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
    try:
        seeds = [int(str(v).strip()) for v in items]
    except ValueError:
        raise ConfigError(f"--seeds is {value!r}; allowed: a count (e.g. 5) or a comma-separated list of seeds "
                          f"(e.g. 1000,2000)") from None
    explicit = isinstance(value, list) or "," in str(value)
    if not explicit and seeds and seeds[0] > MAX_SEED_COUNT:
        raise ConfigError(f"--seeds {value!r} is a count of seeds (runs seed, seed+1, ... per setting); allowed: a count "
                          f"1 to {MAX_SEED_COUNT}, or seeds separated by commas (one seed: seed={seeds[0]}, or "
                          f"--seeds '{seeds[0]},' with its comma)")
    if not seeds or (not explicit and seeds[0] < 1) or any(s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds is {value!r}; allowed: a count >= 1, or distinct seeds >= 0 separated by commas")
    return seeds if explicit else seeds[0]


def child_seeds(base_seed: int, seeds: int | list[int], grid: dict[str, list[str]]) -> list[int | None]:
    """The seeds each setting runs: ``None`` when ``seed`` is a grid axis (the grid's value is the seed)."""
    if "seed" in grid:
        if seeds != 1:
            raise ConfigError("'seed' is a --grid axis and --seeds is given too; allowed: one of them")
        return [None]
    return list(seeds) if isinstance(seeds, list) else [base_seed + k for k in range(seeds)]


def settings(grid: dict[str, list[str]]) -> list[list[str]]:
    return [[f"{k}={v}" for k, v in zip(grid, combo)] for combo in itertools.product(*grid.values())]


def slug(setting: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(setting))


ABLATIONS = ("no_retrain", "ppo_in_reality")


def plan_children(overrides: list[str], grid: dict[str, list[str]], seeds: int | list[int],
                  ablations: bool = False) -> list[dict]:
    """Every child run: each grid setting x seed, and with ``ablations`` beside each setting the same laps
    without world-model retraining, and (per reality) PPO trained directly in reality. Validated here."""
    base = load_config(overrides)
    for setting in settings(grid):                            # a bad grid value is named as the grid's
        try:
            load_config([*overrides, *setting])
        except ConfigError as exc:
            raise ConfigError(f"--grid setting {' '.join(setting)}: {exc}") from None
    plan: list[tuple[str, str, list[str]]] = []              # (label, variant, extra overrides)
    for setting in settings(grid):
        label = " ".join(s for s in setting if not s.startswith("seed=")) or "base"
        plan.append((label, "flywheel", setting))
        if ablations:
            plan.append((f"{label} | no retrain", "no_retrain", [*setting, "retrain=false"]))
    if ablations:
        realities = {}
        for setting in settings(grid):
            cfg = load_config([*overrides, *setting])
            key = json.dumps([cfg.reality.engine, vars(cfg.reality.params)], sort_keys=True)
            realities.setdefault(key, [s for s in setting if s.startswith(("reality.", "seed="))])
        for reality_setting in realities.values():
            cfg = load_config([*overrides, *reality_setting])
            in_reality = [f"engine.name={cfg.reality.engine}", "simulator.fidelity=1", "retrain=false",
                          *(f"engine.params.{k}={v}" for k, v in vars(cfg.reality.params).items())]
            label = " ".join(["PPO in reality", *(s for s in reality_setting if not s.startswith("seed="))])
            plan.append((label, "ppo_in_reality", [*reality_setting, *in_reality]))
    children = []
    for label, variant, extra in plan:
        for seed in child_seeds(base.seed, parse_seeds(seeds), grid):
            child_overrides = [*overrides, *extra, *([f"seed={seed}"] if seed is not None else [])]
            child = load_config(child_overrides)               # every setting is valid before anything starts
            children.append({"setting": describe(label, child), "label": label, "variant": variant,
                             "group": label.split(" | ")[0],
                             "seed": child.seed, "overrides": child_overrides,
                             "dir": f"{slug([label]) or 'base'}-seed{child.seed}"})
    return children


def describe(label: str, cfg) -> str:
    """A setting's name in reports; an agent trained or planning purely in the world model is named for what it is."""
    if cfg.simulator.fidelity == 0 and not label.startswith("PPO in reality"):
        return f"{label} [{'planner ' if cfg.agent.kind == 'planner' else ''}dream]"
    return label


def run_sweep(overrides: list[str], grid: dict[str, list[str]], seeds: int | list[int], sweep_dir: str | Path | None = None,
              say: Callable[[str], None] = print, parts: LapParts | None = None, ablations: bool = False,
              opened: Callable[[Path], None] = lambda sweep_dir: None) -> Path:
    """Run every (setting, seed) as a child run of one parent run; returns the sweep directory.

    ``seeds`` is a count (``base seed, base + 1, ...``) or an explicit list; ``seed`` may instead be a
    grid axis, whose values are then the seeds (asking for both is refused). ``ablations`` adds the
    no-retraining and PPO-in-reality baselines (see ``plan_children``). ``opened`` is told the sweep directory once
    its parent MLflow run exists. A stop or a failure ends the parent KILLED or FAILED, tagged with why.
    """
    base = load_config(overrides)
    children = plan_children(overrides, grid, seeds, ablations)
    check_reachable(tracking_uri(base))
    sweep_dir = Path(sweep_dir or Path(base.runs_root) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{base.task}").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    dir_lock.hold(sweep_dir)                                  # one driver per sweep; each run locks its own too
    try:
        return _run_children(sweep_dir, base, overrides, grid, seeds, children, say, parts, opened)
    finally:
        dir_lock.release(sweep_dir)


def _run_children(sweep_dir: Path, base, overrides, grid, seeds, children, say, parts, opened) -> Path:
    spec = {"overrides": overrides, "grid": grid, "seeds": seeds, "children": children}
    text = json.dumps(spec, indent=1).encode()
    atomic_write(sweep_dir / "sweep.json", lambda f: f.write(text))
    parent = Tracker.open(base, sweep_dir, run_name=sweep_dir.name, tags={"flywheel.sweep": json.dumps(grid)})
    say(f"[sweep] {len(children)} runs in {sweep_dir}  tracking: {parent.uri}  parent mlflow run: {parent.run_id}")
    opened(sweep_dir)
    i = -1
    try:
        for i, child in enumerate(children):
            say(f"[sweep] run {i + 1}/{len(children)}: {child['setting']} seed {child['seed']}")
            run_dir = sweep_dir / child["dir"]
            kw = {"say": say, "parts": parts, "parent_run_id": parent.run_id,
                  "run_name": f"{child['setting']} seed {child['seed']}"}
            if (run_dir / "state.json").exists():
                orch = Orchestrator.resume(run_dir, child["overrides"], **kw)
            else:
                orch = Orchestrator.create(load_config(child["overrides"]), run_dir, **kw)
            orch.run()
        files = write_sweep_report(sweep_dir, say)
        for f in files:
            parent.log_artifact(f, "report")
        log_summary(parent, sweep_dir)
    except (KeyboardInterrupt, SystemExit) as exc:
        signum = getattr(exc, "signum", None)
        parent.set_tag("flywheel.stopped", f"stopped by {signal.Signals(signum).name}" if signum
                       else str(exc) or type(exc).__name__)
        parent.finish("KILLED")
        raise
    except BaseException as exc:
        from flywheel.orchestrator import one_line

        where = f"run {i + 1}/{len(children)} ({children[i]['dir']})" if 0 <= i < len(children) else "the report"
        parent.set_tag("flywheel.error", f"{where}: {one_line(exc)}"[:5000])
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED")
    say(f"[sweep] done: {sweep_dir}  parent mlflow run: {parent.run_id}")
    return sweep_dir
