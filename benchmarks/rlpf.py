"""RLPF precision: false positives on true windows and detection of hand-made violations, per task x engine.

For every registered task and engine (an engine that refuses a task is listed with its reason):

- false positives: the share of windows of the engine's own episodes (half under random, half under
  bang-bang actions, tumbling windows of ``--horizon`` steps) that the RLPF check flags, checked by
  the same engine (``own``) and by MuJoCo's C engine (``vs C``, what a MuJoCo Verify would say);
- detection per corruption kind (``rewards.corruptions.KINDS``) of ``--size`` tolerances: one
  transition per window corrupted, the share of windows flagged, and in brackets the share flagged
  by the component meant to catch it; ``n/a`` where the task has nothing to corrupt (no joint limit,
  no contact pair).

The residual's scale is the task's data scale (``simulators.physics.scale.data_scale``), Verify's
default. A JAX engine is called in chunks of one fixed size (one compile per task).

Usage: ``python -m benchmarks.rlpf [--windows 10000] [--engines mujoco mjx brax] [--tasks ...] [--size 2]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards
import simulators
from rewards.corruptions import CAUGHT_BY, KINDS, corrupt, true_windows
from simulators.physics import UnsupportedTask
from simulators.physics.scale import data_scale


def check(engine, start, actions, nxt, scale, chunk: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``violates [W]`` and per-component ``fired [W]`` of windows, in calls of ``chunk`` transitions."""
    W, H = nxt.shape[:2]
    per = max(1, chunk // H)
    out, fired = [], {k: [] for k in rewards.COMPONENTS}
    for i in range(0, W, per):
        idx = np.arange(i, i + per) % W       # the last call is topped up to the same size, then trimmed
        rep = rewards.physics_violation(engine, start[idx], actions[idx], nxt[idx], scale=scale)
        keep = min(per, W - i)
        out.append(rep.violates[:keep])
        for k, v in rep.fired().items():
            fired[k].append(v[:keep])
    return np.concatenate(out), {k: np.concatenate(v) for k, v in fired.items()}


def clean_windows(engine, n: int, horizon: int, seed: int):
    """``n`` true windows, half under random and half under bang-bang actions."""
    per_env = engine.task.episode_length // horizon
    envs = -(-(n // 2) // per_env)
    parts = [true_windows(engine, envs, horizon, seed=seed + bang, bang=bool(bang)) for bang in (0, 1)]
    take = (n // 2, n - n // 2)
    return tuple(np.concatenate([p[j][:k] for p, k in zip(parts, take)]) for j in range(3))


def corrupted(kind: str, engine, start, nxt, size: float, scale, rng) -> tuple[np.ndarray, np.ndarray]:
    """Windows with one transition each corrupted (``kind``), and which windows it applied to."""
    W, H = nxt.shape[:2]
    t = rng.integers(H, size=W)
    prev = np.where((t == 0)[:, None], start, nxt[np.arange(W), np.maximum(t - 1, 0)])
    bad, applicable = corrupt(kind, engine, prev, nxt[np.arange(W), t], size, scale=scale, rng=rng)
    out = nxt.copy()
    out[np.arange(W), t] = bad
    return out, applicable


def measure(engine, reference, n: int, horizon: int, size: float, chunk: int, seed: int) -> dict:
    task = engine.task.name
    scale = data_scale(task)
    start, actions, nxt = clean_windows(engine, n, horizon, seed)
    row = {"windows": len(start)}
    row["fp_own"] = check(engine, start, actions, nxt, scale, chunk)[0].mean()
    row["fp_ref"] = check(reference, start, actions, nxt, scale, chunk)[0].mean() if engine is not reference else np.nan
    rng = np.random.default_rng(seed)
    for kind in KINDS:
        bad, applicable = corrupted(kind, engine, start, nxt, size, scale, rng)
        if not applicable.any():
            row[kind] = None
            continue
        a = np.flatnonzero(applicable)
        violates, fired = check(engine, start[a], actions[a], bad[a], scale, chunk)
        row[kind] = (violates.mean(), fired[CAUGHT_BY[kind]].mean(), len(a))
    return row


def format_row(task: str, name: str, row: dict | str) -> str:
    if isinstance(row, str):
        return f"{task:9s} {name:7s} refuses the task: {row.split(': ', 1)[-1][:100]}"
    ref = "-" if np.isnan(row["fp_ref"]) else f"{row['fp_ref']:.2%}"
    cells = "".join(f" {'n/a':>18s}" if row[k] is None else f" {row[k][0]:>9.2%} ({row[k][1]:>6.2%})" for k in KINDS)
    fewer = [f"{k} {row[k][2]}" for k in KINDS if row[k] is not None and row[k][2] < row["windows"]]
    return f"{task:9s} {name:7s} {row['windows']:7d} {row['fp_own']:7.2%} {ref:>8s}{cells}" + \
        (f"   (corrupted windows: {', '.join(fewer)})" if fewer else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=10_000, help="true windows per task x engine")
    p.add_argument("--engines", nargs="+", default=[e for e in simulators.ENGINES if e != "auto"])
    p.add_argument("--tasks", nargs="+", default=list(simulators.TASKS))
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--size", type=float, default=2.0, help="corruption size in tolerances")
    p.add_argument("--chunk", type=int, default=4096, help="transitions per engine call")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    print(f"RLPF precision: {args.windows} true windows of {args.horizon} steps per task x engine "
          f"(half random, half bang-bang); corruptions of {args.size:g} tolerances, one per window")
    print("detection: share of corrupted windows flagged (share flagged by the component meant to catch it)")
    head = f"{'task':9s} {'engine':7s} {'windows':>7s} {'FP own':>7s} {'FP vs C':>8s}" + "".join(f" {k:>18s}" for k in KINDS)
    print(head + "\n" + "-" * len(head), flush=True)
    t0 = time.perf_counter()
    for task in args.tasks:
        reference = simulators.make_engine("mujoco", task)
        for name in args.engines:
            try:
                engine = reference if name == "mujoco" else simulators.make_engine(name, task)
            except UnsupportedTask as exc:
                print(format_row(task, name, str(exc)), flush=True)
                continue
            row = measure(engine, reference, args.windows, args.horizon, args.size, args.chunk, args.seed)
            print(format_row(task, name, row), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
