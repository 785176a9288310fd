"""World-model benchmarks: training throughput and held-out error against data size; corrected-simulator
step throughput as a ratio to the raw engine step at several batch sizes.

    .venv/bin/python benchmarks/world_model.py [--task pendulum] [--engine auto] [--sizes 5000,20000,50000]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch

from simulators import CorrectedSimulator, Reality, WorldModel, WorldModelConfig, make_engine
from simulators.world_model import one_step_error, open_loop_error


def per_call(fn, min_seconds: float = 1.0, min_calls: int = 5) -> float:
    """Seconds per call of ``fn`` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def in_bfloat16(wm: WorldModel) -> WorldModel:
    """The same weights, predicting with ``inference_dtype=bfloat16``."""
    low = copy.copy(wm)
    low.config = dataclasses.replace(wm.config, inference_dtype="bfloat16")
    return low


def training_table(args, config: WorldModelConfig) -> None:
    reality = Reality(args.task, engine="mujoco")
    sizes = sorted(int(x) for x in args.sizes.split(","))
    data = reality.collect(None, sizes[-1], n_envs=100, seed=0)
    test = reality.collect(None, 5000, n_envs=50, seed=1, lap=1)
    T = reality.task.episode_length
    print(f"\nWM training on {args.task} reality data (random actions), {config.max_epochs} epochs max, "
          f"ensemble {config.ensemble_size}x{config.num_layers}x{config.hidden_size}; error on 5000 independent "
          "transitions, normalised by the largest model's state_scale")
    print(f"{'transitions':>11} {'epochs':>6} {'train s':>8} {'trans/s':>9} {'1-step MSE':>11} {'10-step MSE':>11} "
          f"{'bf16 1-step':>11} {'bf16 10-step':>12}")
    rows = []
    for n in sizes:
        wm = WorldModel(args.task, reality.spec.state_size, reality.spec.action_size, config)
        m = wm.fit(data.select(data.episode_ids < n // T))
        rows.append((n, m, wm))
    scale = rows[-1][2].state_scale
    for n, m, wm in rows:
        wm.state_scale = scale
        ol = open_loop_error(wm, test, horizon=10)["open_loop_mse"]
        low = in_bfloat16(wm)
        ol16 = open_loop_error(low, test, horizon=10)["open_loop_mse"]
        print(f"{n:>11} {m['epochs']:>6} {m['seconds']:>8.1f} {m['transitions_per_second']:>9.0f} "
              f"{one_step_error(wm, test):>11.3g} {ol:>11.3g} {one_step_error(low, test):>11.3g} {ol16:>12.3g}")


def step_table(args, config: WorldModelConfig) -> None:
    engine = make_engine(args.engine, args.task)
    spec = engine.spec
    wm = WorldModel(args.task, spec.state_size, spec.action_size, config)  # cost does not depend on the weights
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads() if args.threads <= 0 else args.threads
    print(f"\nCorrected simulator step vs raw engine step ({engine.name}, {args.task}); ratio = time / engine time, "
          f"each the median of {args.rounds} interleaved rounds; f=0.5 ms: one blend step with imagination; "
          f"bf16: the world model's hidden products in bfloat16; torch threads {threads}")
    print(f"{'batch':>6} {'engine ms':>9} {'WM ms':>7} {'f=0 sim':>8} {'f=0.5 blend':>11} "
          f"{'f=0.2 reground':>14} {'f=1 sim':>8} {'f=0.5 ms':>9} {'bf16 blend':>10} {'bf16 ms':>8}")
    for b in (int(x) for x in args.batches.split(",")):
        s = engine.to_vector(engine.reset(0, b))
        a = rng.uniform(spec.action_low, spec.action_high, (b, spec.action_size))
        t_engine = per_call(lambda s=s, a=a: engine.step_vectors(s, a))
        t_wm = per_call(lambda s=s, a=a: wm.step(s, a))
        sims = {}
        for f, mode in ((0.0, "blend"), (0.5, "blend"), (0.2, "reground"), (1.0, "blend")):
            sims[(f, mode)] = CorrectedSimulator(args.task, wm, engine, f, mode=mode, num_envs=b)
            sims[(f, mode)].reset()
        sims["bf16"] = CorrectedSimulator(args.task, in_bfloat16(wm), engine, 0.5, num_envs=b)
        sims["bf16"].reset()
        rounds = []
        for _ in range(args.rounds):   # interleaved with the engine: the machine is shared and noisy
            t_engine = per_call(lambda s=s, a=a: engine.step_vectors(s, a))
            rounds.append([per_call(lambda sim=sim, a=a: sim.step(a)) / t_engine for sim in sims.values()]
                          + [t_engine, per_call(lambda sim=sims[(0.5, "blend")], a=a: sim.step(a)),
                             per_call(lambda sim=sims["bf16"], a=a: sim.step(a))])
        ratios = np.median(np.asarray(rounds), axis=0)
        print(f"{b:>6} {ratios[5] * 1e3:>9.2f} {t_wm * 1e3:>7.2f} {ratios[0]:>7.2f}x {ratios[1]:>10.2f}x "
              f"{ratios[2]:>13.2f}x {ratios[3]:>7.2f}x {ratios[6] * 1e3:>9.3f} {ratios[4]:>9.2f}x {ratios[7] * 1e3:>8.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pendulum")
    p.add_argument("--engine", default="auto")
    p.add_argument("--sizes", default="5000,20000,50000")
    p.add_argument("--batches", default="1,64,1024,4096")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each ratio; the median is printed")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--hidden", type=int, default=WorldModelConfig.hidden_size)
    p.add_argument("--layers", type=int, default=WorldModelConfig.num_layers)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args()
    config = WorldModelConfig(hidden_size=args.hidden, num_layers=args.layers, max_epochs=args.epochs,
                              num_threads=args.threads)
    if not args.skip_training:
        training_table(args, config)
    step_table(args, config)


if __name__ == "__main__":
    main()
