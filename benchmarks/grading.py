"""Grading throughput: transitions graded per second (with the engine check) beside the raw engine step.

For each task and batch of ``B`` windows of ``H`` steps (``B * H`` transitions) it times, on the
same engine and the same transitions:

- ``engine``: the raw ``step_vectors`` of the ``B * H`` transitions (the physics alone);
- ``physics``: ``physics_violation`` (engine step, constraints, residual, kinematics);
- ``grade``: ``imagination_accuracy`` + ``physics_violation`` + ``composite``, everything a step pays.

Usage: ``python benchmarks/grading.py [--engine mujoco] [--tasks pendulum lift] [--batches 16 64 256]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import rewards
import simulators


def windows(engine, n: int, horizon: int, seed: int = 0):
    """``n`` windows of the engine's own trajectories, the imagination lightly perturbed."""
    spec = engine.spec
    rng = np.random.default_rng(seed)
    start = engine.to_vector(engine.reset(seed, n))
    actions = rng.uniform(spec.action_low, spec.action_high, size=(n, horizon, spec.action_size))
    s, actual = start, []
    for h in range(horizon):
        s = engine.step_vectors(s, actions[:, h])
        actual.append(s)
    actual = np.stack(actual, 1)
    imagined = actual + 1e-3 * rng.normal(size=actual.shape)
    return start, actions, imagined, actual


def rates(fns: list, transitions: int, repeats: int, min_seconds: float = 0.2) -> np.ndarray:
    """Transitions per second ``[repeats, len(fns)]``; the functions take turns within each repeat,
    so a noisy shared machine slows them alike and the per-repeat ratios stay meaningful."""
    for fn in fns:
        fn()  # warm-up (JIT compiles for JAX engines)
    out = np.zeros((repeats, len(fns)))
    for r in range(repeats):
        for j, fn in enumerate(fns):
            n, t0 = 0, time.perf_counter()
            while (dt := time.perf_counter() - t0) < min_seconds or n == 0:
                fn()
                n += 1
            out[r, j] = n * transitions / dt
    return out


def measure(engine, n_windows: int, cfg: rewards.RewardConfig, repeats: int) -> tuple[float, float, float, float]:
    """Median rates (raw engine, physics check, full grade) and the median grade/engine ratio."""
    start, actions, imagined, actual = windows(engine, n_windows, cfg.horizon)
    scale = np.maximum(actual.reshape(-1, actual.shape[-1]).std(0), 1e-3)
    n = n_windows * cfg.horizon
    flat_prev = np.concatenate([start[:, None], imagined[:, :-1]], 1).reshape(n, -1)
    flat_a = actions.reshape(n, -1)

    def raw():
        engine.step_vectors(flat_prev, flat_a)

    def physics():
        rewards.physics_violation(engine, start, actions, imagined, cfg, scale=scale)

    def grade():
        acc = rewards.imagination_accuracy(imagined, actual, scale, cfg.accuracy_sharpness)
        rep = rewards.physics_violation(engine, start, actions, imagined, cfg, scale=scale)
        rewards.composite({"imagination": acc, "physics": rep.reward}, cfg.weights)

    r = rates([raw, physics, grade], n, repeats)
    r_raw, r_phys, r_grade = np.median(r, axis=0)
    return r_raw, r_phys, r_grade, float(np.median(r[:, 2] / r[:, 0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="mujoco", choices=simulators.ENGINES)
    p.add_argument("--tasks", nargs="+", default=list(simulators.TASKS))
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256, 1024])
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cfg = rewards.RewardConfig(horizon=args.horizon)
    print(f"engine={args.engine} horizon={args.horizon}; transitions/s, medians of {args.repeats} interleaved runs")
    print(f"{'task':<10}{'windows':>8}{'trans.':>8}{'engine':>12}{'physics':>12}{'grade':>12}{'grade/engine':>14}")
    for name in args.tasks:
        engine = simulators.make_engine(args.engine, name)
        for b in args.batches:
            r_raw, r_phys, r_grade, ratio = measure(engine, b, cfg, args.repeats)
            print(f"{name:<10}{b:>8}{b * cfg.horizon:>8}{r_raw:>12,.0f}{r_phys:>12,.0f}{r_grade:>12,.0f}{ratio:>14.2f}")


if __name__ == "__main__":
    main()
