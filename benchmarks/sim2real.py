"""Sim-to-real sample efficiency: reality transitions each approach spends until 0.9 reality success.

    python -m benchmarks.sim2real --quick          # pendulum, one seed, small budgets (a check)
    python -m benchmarks.sim2real                  # pendulum and cartpole, seeds 1000,2000,3000 (README figures)

Reality is the task as written; the simulator's engine is wrong in one parameter, its actuator gain (``GAPS``:
30% weaker on the cartpole, which breaks the engine-only policy in reality; 2x on the pendulum, where no gap
tried makes the engine-only policy fail). A results file keeps each task's gap and flywheel settings; runs made
with others are redone.
Three approaches, each per seed, each evaluated in reality after every lap or PPO iteration:

    flywheel      ``flywheel run`` with a per-lap reality budget (``reality.steps_per_lap``): reality
                  transitions = seed data + per-lap budgets (``reality/transitions_total``)
    ppo-reality   PPO trained only in reality: reality transitions = its sampled env steps
    ppo-engine    PPO trained only in the wrong engine: no reality transitions for training

Evaluation transitions (episodes x episode length per evaluation) are counted separately. The table
gives per seed the training transitions at the first evaluation with success >= the threshold, their
mean with a 95% bootstrap interval over seeds, and the flywheel's ratio to PPO in reality.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Point:
    """After some training: reality transitions spent on training so far, on evaluation so far, and success then."""

    train: int
    eval: int
    success: float
    engine: float | None = None   # success in the engine it was trained in (PPO in the engine only)


def check_curve(curve: Sequence[Point]) -> None:
    """``ValueError`` unless the counts never fall and every success rate lies in [0, 1]."""
    for i, p in enumerate(curve):
        if p.train < 0 or p.eval < 0:
            raise ValueError(f"point {i}: transition counts must be >= 0, got train={p.train}, eval={p.eval}")
        if not 0.0 <= p.success <= 1.0:
            raise ValueError(f"point {i}: success must be in [0, 1], got {p.success!r}")
        if i and (p.train < curve[i - 1].train or p.eval < curve[i - 1].eval):
            raise ValueError(f"point {i}: transition counts fall ({curve[i - 1].train}, {curve[i - 1].eval} -> "
                             f"{p.train}, {p.eval}); they are cumulative")


def first_reaching(curve: Sequence[Point], threshold: float) -> Point | None:
    """The first point whose success is at least ``threshold`` (``None`` if none is)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    check_curve(curve)
    return next((p for p in curve if p.success >= threshold), None)


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and the percentile bootstrap interval of the mean at ``level`` (resampling seeds)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-d list of values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"bootstrap_ci needs finite values, got {x.tolist()}")
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise ValueError(f"bootstrap_ci needs level in (0, 1) and n_boot >= 1, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def summarise(hits: Sequence[int | None], level: float = 0.95) -> str:
    """``mean [lo, hi]`` over the seeds that reached the threshold, with ``k/n`` when some did not."""
    if not hits:
        raise ValueError("summarise needs at least one seed")
    reached = [h for h in hits if h is not None]
    if not reached:
        return f"not reached (0/{len(hits)})"
    mean, lo, hi = bootstrap_ci(reached, level)
    text = f"{_k(mean)} [{_k(lo)}, {_k(hi)}]"
    return text if len(reached) == len(hits) else f"{text} ({len(reached)}/{len(hits)} reached)"


def ratio_ci(ours: Sequence[int | None], theirs: Sequence[int | None], level: float = 0.95,
             n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float] | None:
    """Mean(ours) / mean(theirs) with a bootstrap interval (seeds resampled independently); ``None`` unless all reached."""
    if not ours or not theirs or any(v is None for v in (*ours, *theirs)):
        return None
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if np.any(b <= 0):
        raise ValueError(f"ratio_ci needs positive denominators, got {b.tolist()}")
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)
    rb = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    r = ra / rb
    return float(a.mean() / b.mean()), float(np.quantile(r, tail)), float(np.quantile(r, 1.0 - tail))


def flywheel_curve(run_dir: str | Path) -> list[Point]:
    """A flywheel run's curve from ``laps/lap_NNN/metrics.json``: reality training transitions (seed + per-lap
    budgets, ``reality/transitions_total``), evaluation transitions summed over laps, and reality success."""
    laps = sorted(Path(run_dir).glob("laps/lap_*/metrics.json"))
    curve, evals = [], 0
    for path in laps:
        m = json.loads(path.read_text()).get("metrics", {})
        missing = [k for k in ("reality/transitions_total", "reality/eval_transitions", "capability/success_rate")
                   if k not in m]
        if missing:
            break                                   # a lap still running (or stopped before its log stage)
        evals += int(m["reality/eval_transitions"])
        curve.append(Point(int(m["reality/transitions_total"]), evals, float(m["capability/success_rate"])))
    return curve


def seed_ratio(ours: int | None, ours_spent: int, theirs: int | None, theirs_spent: int,
               goal: float = 0.1) -> tuple[str, bool | None]:
    """One seed's flywheel / PPO-in-reality ratio of transitions to the threshold, and whether it meets ``goal``.

    Where PPO did not reach the threshold its need is more than it spent, so the ratio is at most
    ``ours / theirs_spent`` (``"<0.030"``); where the flywheel did not, at least ``ours_spent / theirs``
    (``">0.150"``). ``None``: neither reached, or a bound that cannot decide the goal.
    """
    if ours is not None and theirs is not None:
        r = ours / theirs
        return f"{r:.3f}", r <= goal
    if ours is not None and theirs_spent > 0:
        r = ours / theirs_spent
        return f"<{r:.3f}", True if r <= goal else None
    if theirs is not None:
        r = ours_spent / theirs
        return f">{r:.3f}", False if r > goal else None
    return "n/a", None


def _k(v: float) -> str:
    """A transition count, compact: 950, 12.3k, 1.2M."""
    if not math.isfinite(v):
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    return f"{v / 1e3:.1f}k" if abs(v) >= 1e3 else f"{v:.0f}"


# -- the three approaches ------------------------------------------------------------------------
TASK_ONLY = {"task": 1.0, "imagination": 0.0, "physics": 0.0}


@dataclass(frozen=True)
class Setting:
    """One task's benchmark: the engine's gap, the flywheel's overrides, PPO's env-step budget, laps."""

    gap: dict
    flywheel: tuple[str, ...]
    ppo_steps: int
    laps: int


# Pendulum: a policy trained in the true physics still succeeds 0.72 with a 30% weaker actuator (0.75 at 1.43x mass,
# 1.00 at 2x or 0.5x damping); PPO trained in a 2x stronger engine reached 0.97 in reality, in a 30% weaker one or
# one with 1.3x the mass 1.00: no single-parameter gap tried makes the pendulum fail. Not even 4x: PPO trained in a
# 4x stronger engine was at 0.00 in reality for up to 20 iterations, then reached 0.91-1.00 (seeds 1000-3000).
# Cartpole: PPO trained in a 1.43x stronger engine transfers (0.91-1.00 in reality, seeds 1000-3000), PPO trained
# in a 30% weaker one does not (0.06 in reality where it reached 0.91 in its own engine, seed 1000): the cartpole's
# gap is the weaker engine.
GAPS = {"pendulum": {"gain_scale": 2.0}, "cartpole": {"gain_scale": 0.7}}
_PENDULUM = ("reality.seed_steps=1000", "reality.steps_per_lap=200", "simulator.fidelity=0.5")
# Cartpole: the world model learns reality's difference from the engine (world_model.base=engine) and the policy
# trains in engine + learned difference (fidelity 0); at fidelity 0.5 with a world model of the whole dynamics the
# flywheel reached 0.9 on one seed of three (14k reality transitions).
_CARTPOLE = ("reality.seed_steps=1000", "reality.steps_per_lap=1000", "simulator.fidelity=0.0", "world_model.base=engine")
FULL = {"pendulum": Setting(GAPS["pendulum"], _PENDULUM, 60_000, 6),
        "cartpole": Setting(GAPS["cartpole"], _CARTPOLE, 200_000, 6)}   # PPO in the true physics: 1.0 at 88k
QUICK = {"pendulum": Setting(GAPS["pendulum"], _PENDULUM, 24_576, 4)}


def run_flywheel(task: str, seed: int, setting: Setting, threshold: float, root: Path, say=print) -> list[Point]:
    """``flywheel run`` lap by lap with the engine's gap, stopped at the first lap with success >= ``threshold``."""
    from flywheel.config import load_config
    from flywheel.orchestrator import Orchestrator
    from flywheel.tracking import Tracker

    gap = [f"engine.params.{k}={v}" for k, v in setting.gap.items()]
    cfg = load_config([f"task={task}", f"seed={seed}", f"laps={setting.laps}", f"runs_root={root}", *gap,
                       *setting.flywheel])
    orch = Orchestrator.create(cfg, root / f"{task}-flywheel-s{seed}", say=lambda m: say(f"    {m}"))
    orch.tracker = Tracker.open(cfg, orch.run_dir, run_name=f"sim2real-{task}-s{seed}")
    status = "FAILED"
    try:
        orch.parts.start(cfg)
        for lap in range(setting.laps):
            orch.run_lap(lap)
            if flywheel_curve(orch.run_dir)[-1].success >= threshold:
                break
        status = "FINISHED"
    finally:
        orch.tracker.finish(status)
    return flywheel_curve(orch.run_dir)


def run_ppo(task: str, seed: int, train_params: dict, steps: int, threshold: float, count_training: bool,
            episodes: int = 32, say=print) -> list[Point]:
    """PPO (the task's settings) in the engine with ``train_params``, evaluated in reality after every iteration.

    ``count_training``: its sampled env steps are reality transitions (PPO in reality) or not (in the engine).
    """
    from policies import EnvConfig, PolicyTrainer, evaluate, ppo_config_for
    from services.config import ServerConfig
    from services.server import ServerProcess
    from simulators.reality import Reality

    server = ServerProcess(ServerConfig(task=task, engine="mujoco", engine_params=train_params)).start() \
        if train_params else None
    addresses = [server.address] if server else ["local"]
    env = EnvConfig(task=task, addresses=addresses, fidelity=1.0, local_engine="mujoco", reward_weights=TASK_ONLY,
                    seed=seed)
    reality = Reality(task, engine="mujoco")
    trained_in = None if count_training else Reality(task, engine="mujoco", params=train_params or None)
    trainer = PolicyTrainer(ppo_config_for(task, seed=seed, num_env_runners=0), env)
    curve: list[Point] = []
    try:
        while not curve or (curve[-1].success < threshold and trainer.env_steps < steps):
            m = trainer.train(1)[-1]
            ev = evaluate(trainer.policy(), reality, episodes=episodes, seed=seed + 1_000_003)
            own = (float(evaluate(trainer.policy(), trained_in, episodes=episodes, seed=seed + 1_000_003)["success_rate"])
                   if trained_in else None)
            evals = (curve[-1].eval if curve else 0) + episodes * reality.task.episode_length
            curve.append(Point(int(m["env_steps"]) if count_training else 0, evals, float(ev["success_rate"]), own))
            say(f"    iteration {m['iteration']}: {m['env_steps']} env steps, reality success {ev['success_rate']:.2f}"
                + (f", in its own engine {own:.2f}" if own is not None else ""))
    finally:
        trainer.stop()
        if server:
            server.stop()
    return curve


# -- the table -----------------------------------------------------------------------------------
APPROACHES = ("flywheel", "ppo-reality", "ppo-engine")


def table(results: dict, threshold: float) -> str:
    """Markdown table from ``{task: {approach: {seed: [Point, ...]}}}``, with the flywheel's ratio per task."""
    lines = [f"| task | approach | seeds | reality transitions to {threshold:g} (per seed) | mean [95% CI] | "
             f"evaluation transitions (per seed) | last success (per seed) |", "|---|---|---|---|---|---|---|"]
    ratios = []
    for task, per in results.items():
        hits, spent = {}, {}
        for approach in APPROACHES:
            runs = per.get(approach) or {}
            if not runs:
                continue
            seeds = sorted(runs, key=int)
            points = [first_reaching(runs[s], threshold) for s in seeds]
            hits[approach] = [p.train if p else None for p in points]
            spent[approach] = {s: (runs[s][-1].train if runs[s] else 0) for s in seeds}
            hits[approach + "/seeds"] = seeds
            per_seed = ", ".join(_k(p.train) if p else f">{_k(runs[s][-1].train)}" if runs[s] else "-"
                                 for s, p in zip(seeds, points))
            evals = ", ".join(_k((p or runs[s][-1]).eval) if runs[s] else "-" for s, p in zip(seeds, points))
            last = ", ".join(_last(runs[s]) for s in seeds)
            lines.append(f"| {task} | {approach} | {','.join(seeds)} | {per_seed} | {summarise(hits[approach])} | "
                         f"{evals} | {last} |")
        if "flywheel" in hits and "ppo-reality" in hits:
            r = ratio_ci(hits["flywheel"], hits["ppo-reality"])
            ratios.append(f"{task}: flywheel / ppo-reality = " + (f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] "
                          f"(goal <= 0.1: {'met' if r[2] <= 0.1 else 'not met' if r[1] > 0.1 else 'undecided'})"
                          if r else "n/a (not every seed reached the threshold)"))
            ours = dict(zip(hits["flywheel/seeds"], hits["flywheel"]))
            theirs = dict(zip(hits["ppo-reality/seeds"], hits["ppo-reality"]))
            both = sorted(set(ours) & set(theirs), key=int)
            per_seed = [seed_ratio(ours[s], spent["flywheel"][s], theirs[s], spent["ppo-reality"][s]) for s in both]
            verdicts = [v for _, v in per_seed]
            verdict = ("met on every seed" if all(v is True for v in verdicts) else
                       "not met on " + ", ".join(s for s, v in zip(both, verdicts) if v is False)
                       if any(v is False for v in verdicts) else "undecided on some seed")
            ratios.append(f"{task}: per seed ({', '.join(both)}): {', '.join(t for t, _ in per_seed)} "
                          f"(goal <= 0.1: {verdict})")
    return "\n".join(lines + [""] + ratios)


def _last(curve: Sequence[Point]) -> str:
    """The last success in reality, with the engine's own where it was measured: ``0.06 (engine 0.91)``."""
    if not curve:
        return "-"
    p = curve[-1]
    return f"{p.success:.2f}" + (f" (engine {p.engine:.2f})" if p.engine is not None else "")


GAP_DEPENDENT = ("flywheel", "ppo-engine")   # runs made with the engine's gap; PPO in reality does not use it


def load_results(path: Path, gaps: dict | None = None, say=print, flywheel: dict | None = None) -> dict:
    """``{task: {approach: {seed: [Point]}}}`` from ``path``. Runs made with another engine gap than ``gaps[task]``
    (or with an unrecorded one) are dropped, naming them, so that a changed gap is never reported with old runs;
    so are flywheel runs made with other flywheel settings than ``flywheel[task]``."""
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    saved_gaps, tasks = (raw.get("gaps", {}), raw["tasks"]) if "tasks" in raw else ({}, raw)
    saved_flywheel = raw.get("flywheel", {}) if "tasks" in raw else {}
    results = {t: {a: {s: [Point(**p) for p in c] for s, c in per.items()} for a, per in ap.items()}
               for t, ap in tasks.items()}
    for task, per in results.items():
        if gaps is not None and task in gaps and saved_gaps.get(task) != gaps[task]:
            for approach in GAP_DEPENDENT:
                if per.pop(approach, None):
                    say(f"{path}: dropping {task} {approach} runs made with engine gap "
                        f"{saved_gaps.get(task, 'unrecorded')} (now {gaps[task]})")
        if flywheel is not None and task in flywheel and saved_flywheel.get(task) != list(flywheel[task]) \
                and per.pop("flywheel", None):
            say(f"{path}: dropping {task} flywheel runs made with settings {saved_flywheel.get(task, 'unrecorded')} "
                f"(now {list(flywheel[task])})")
    return results


def save_results(path: Path, results: dict, gaps: dict, flywheel: dict | None = None) -> None:
    """Atomically, with each task's engine gap and flywheel settings (``load_results`` checks them)."""
    data = {"gaps": {t: gaps[t] for t in results if t in gaps},
            "flywheel": {t: list(flywheel[t]) for t in results if t in (flywheel or {})},
            "tasks": {t: {a: {s: [vars(p) for p in c] for s, c in per.items()} for a, per in ap.items()}
                      for t, ap in results.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def parse_seeds(text: str) -> list[int]:
    """``"1000,2000"`` -> ``[1000, 2000]``; ``ValueError`` naming a seed that is not a non-negative integer."""
    seeds = []
    for part in text.split(","):
        if not part.strip().isdigit():
            raise ValueError(f"--seeds takes a comma-separated list of non-negative integers, got {part.strip()!r}")
        seeds.append(int(part))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {text}")
    return seeds


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import shutil
    import time

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="pendulum, one seed, small budgets")
    p.add_argument("--tasks", nargs="+", choices=sorted(FULL), default=None)
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 1000,2000,3000; quick: 1000)")
    p.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES))
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out", default=None, help="results directory; finished runs in it are reused")
    args = p.parse_args(argv)
    settings = QUICK if args.quick else FULL
    tasks = args.tasks or list(settings)
    unknown = [t for t in tasks if t not in settings]
    if unknown:
        p.error(f"--tasks {unknown} have no {'quick' if args.quick else 'full'} setting; allowed: {sorted(settings)}")
    try:
        seeds = parse_seeds(args.seeds or ("1000" if args.quick else "1000,2000,3000"))
    except ValueError as exc:
        p.error(str(exc))
    out = Path(args.out or f"runs/sim2real{'-quick' if args.quick else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    try:
        results = load_results(path, {t: s.gap for t, s in settings.items()},
                               flywheel={t: s.flywheel for t, s in settings.items()})
    except (ValueError, KeyError, TypeError) as exc:
        p.error(f"{path} is not a sim2real results file ({type(exc).__name__}: {exc}); move it away or choose another --out")
    t0 = time.time()
    for task in tasks:
        s = settings[task]
        for approach in args.approaches:
            for seed in seeds:
                done = results.setdefault(task, {}).setdefault(approach, {})
                if str(seed) in done:
                    continue
                print(f"{task} {approach} seed {seed} (gap: engine {s.gap})", flush=True)
                t1 = time.time()
                if approach == "flywheel":
                    shutil.rmtree(out / f"{task}-flywheel-s{seed}", ignore_errors=True)
                    curve = run_flywheel(task, seed, s, args.threshold, out)
                else:
                    engine_only = approach == "ppo-engine"
                    curve = run_ppo(task, seed, s.gap if engine_only else {}, s.ppo_steps, args.threshold,
                                    count_training=not engine_only)
                done[str(seed)] = curve
                save_results(path, results, {t: settings[t].gap for t in results if t in settings},
                             {t: settings[t].flywheel for t in results if t in settings})
                print(f"  {approach} seed {seed}: {time.time() - t1:.0f} s", flush=True)
    import ray

    ray.shutdown()
    print(f"\nengine gap: {', '.join(f'{t}: {settings[t].gap}' for t in tasks)}; reality: the task as written")
    print(table({t: results[t] for t in tasks if t in results}, args.threshold))
    print(f"\nwall-clock this invocation: {time.time() - t0:.0f} s; results: {path}")


if __name__ == "__main__":
    main()
