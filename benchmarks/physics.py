"""Physics throughput: steps/s per engine x task x batch, beside a bare ``mujoco.mj_step`` loop.

Columns:
- ``bare mj_step``: a single-threaded Python loop of ``mujoco.mj_step`` over the batch (the floor);
- ``engine call``: the backend's own batched call (``jax.vmap(mjx.step)`` jitted, Brax's
  ``vmap(pipeline.step)``, ``mujoco.rollout`` on threads), via ``engine.bare_step``;
- ``step``: the project's ``engine.step`` (action checks, clipping, conversion) around that call;
- ``layer``: the project's own work in ``step`` (shape and finiteness checks, clipping, the
  conversion to the engine's arrays), timed alone, over the ``engine call`` time (aim < 5%).
  Timing it alone keeps the figure out of the noise of two large, nearly equal timings.

A step is one control step (``task.n_substeps`` physics steps) of one env. The fastest backend
per batch is marked; ``simulators.physics.auto_backend()`` must pick the one fastest here.

Usage: ``python benchmarks/physics.py [--engines mujoco mjx brax] [--tasks ...] [--batches 1 64 1024 4096]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mujoco
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simulators
from simulators.physics import UnsupportedTask, auto_backend


def best_time(fn, repeats: int, budget_s: float = 2.0) -> float:
    """Median seconds per call over ``repeats`` calls (fewer if the budget runs out), after a warm-up."""
    fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return float(np.median(times))


def interleaved_times(a, b, rounds: int = 7, budget_s: float = 3.0) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, timed in alternating rounds (shared machines drift)."""
    a(), b()
    ta, tb = [], []
    start = time.perf_counter()
    for _ in range(rounds):
        ta.append(best_time(a, 5, budget_s / (2 * rounds)))
        tb.append(best_time(b, 5, budget_s / (2 * rounds)))
        if time.perf_counter() - start > 4 * budget_s:
            break
    return float(np.median(ta)), float(np.median(tb))


def block(x):
    leaves = getattr(x, "qpos", None)
    if leaves is None:
        leaves = getattr(x, "q", x)
    if hasattr(leaves, "block_until_ready"):
        leaves.block_until_ready()
    return x


def bare_loop_rate(task, batch: int) -> float:
    """Steps/s of a single-threaded mj_step loop over ``min(batch, 256)`` envs."""
    model = mujoco.MjModel.from_xml_string(task.xml)
    data = mujoco.MjData(model)
    n = min(batch, 256)

    def run():
        for _ in range(n):
            for _ in range(task.n_substeps):
                mujoco.mj_step(model, data)

    return n / best_time(run, 5)


def own_work(engine, state, actions: np.ndarray, batch: int):
    """What ``engine.step`` does besides the engine call (mirrors ``EngineBase.step`` of each backend)."""
    if engine.name == "mujoco":
        return engine.check_actions(actions, len(engine.check_vectors(state)))
    import jax.numpy as jnp

    return jnp.asarray(engine.check_actions(actions, batch), dtype=jnp.float32).block_until_ready()


def engine_rates(engine, batch: int) -> tuple[float, float, float]:
    """(engine call steps/s, project step steps/s, own work / engine call) at ``batch``."""
    spec = engine.spec
    state = engine.reset(0, batch)
    actions = np.random.default_rng(0).uniform(spec.action_low, spec.action_high, (batch, spec.action_size))
    if engine.name == "mujoco":
        raw_state, raw_actions = engine.to_vector(state), actions
    else:
        import jax.numpy as jnp

        raw_state, raw_actions = state, jnp.asarray(actions, dtype=jnp.float32)
    bare = lambda: block(engine.bare_step(raw_state, raw_actions))
    step = lambda: block(engine.step(state, actions))
    t_bare, t_step = interleaved_times(bare, step)
    t_own = best_time(lambda: own_work(engine, state, actions, batch), 50)
    return batch / t_bare, batch / t_step, t_own / t_bare


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="+", default=["mujoco", "mjx", "brax"])
    p.add_argument("--tasks", nargs="+", default=list(simulators.TASKS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 1024, 4096])
    args = p.parse_args(argv)

    rows = []
    for task_name in args.tasks:
        task = simulators.make_task(task_name)
        for batch in args.batches:
            bare = bare_loop_rate(task, batch)
            results = {}
            for name in args.engines:
                try:
                    eng = simulators.make_engine(name, task)
                except UnsupportedTask as exc:
                    print(f"  {task_name:9s} batch {batch:5d} {name:7s} refused: {exc}", flush=True)
                    continue
                results[name] = engine_rates(eng, batch)
                print(f"  {task_name:9s} batch {batch:5d} {name:7s} {results[name][1]:12,.0f} steps/s", flush=True)
            fastest = max(results, key=lambda k: results[k][1])
            for name, (call, step, layer) in results.items():
                rows.append((task_name, batch, name, bare, call, step, step / bare, layer, name == fastest))

    print()
    header = f"{'task':9s} {'batch':>5s} {'engine':7s} {'bare mj_step/s':>15s} {'engine call/s':>14s} " \
             f"{'step/s':>12s} {'x bare':>7s} {'layer':>7s}  fastest"
    print(header)
    print("-" * len(header))
    for task_name, batch, name, bare, call, step, ratio, layer, fastest in rows:
        print(f"{task_name:9s} {batch:5d} {name:7s} {bare:15,.0f} {call:14,.0f} {step:12,.0f} {ratio:7.2f} "
              f"{layer:7.1%}  {'*' if fastest else ''}")
    print(f"\nauto picks: {auto_backend()}")


if __name__ == "__main__":
    main()
