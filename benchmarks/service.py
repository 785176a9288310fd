"""Simulator service throughput: env-steps/s over gRPC (server in a spawned process) vs in-process.

For each batch size: the in-process corrected simulator with grading (``LocalVectorEnv``'s session,
no wire) and the same session served over gRPC on 127.0.0.1, unary ``Step`` and streaming
``StreamStep``; the ratio gRPC / in-process; per-call latency at batch 1.

    python benchmarks/service.py [--task pendulum] [--engine auto] [--batches 1,64,1024,4096] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from services.client import SimulatorClient
from services.config import ServerConfig
from services.local_env import LocalVectorEnv
from services.server import ServerProcess


def rate(step, n: int, seconds: float) -> tuple[float, float]:
    """(env-steps per second, median seconds per call) of ``step()`` over about ``seconds``."""
    step()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return n * len(times) / sum(times), float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pendulum")
    p.add_argument("--engine", default="auto")
    p.add_argument("--fidelity", type=float, default=0.5)
    p.add_argument("--batches", default="1,64,1024,4096")
    p.add_argument("--seconds", type=float, default=1.0, help="per measurement; 3 interleaved rounds, best kept")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads on both sides (0 = default)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    config = ServerConfig(task=args.task, engine=args.engine, max_batch=max(batches), torch_threads=args.torch_threads)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    rows = []
    with ServerProcess(config) as proc, SimulatorClient(proc.address) as client:
        for n in batches:
            env = LocalVectorEnv(args.task, n, fidelity=args.fidelity, config=config)
            env.reset(seed=0)
            low, high = env.single_action_space.low, env.single_action_space.high
            a = np.random.default_rng(0).uniform(low, high, (n, len(low))).astype(np.float32)
            sessions = {m: client.create_session(args.task, n, fidelity=args.fidelity, seed=0) for m in ("unary", "stream")}
            sessions["stream"].use_stream()
            steps = {"local": lambda env=env, a=a: env.session.advance(a)}
            for m, s in sessions.items():
                s.reset()
                steps[m] = lambda s=s, a=a: s.step(a)
            best: dict[str, tuple[float, float]] = {}
            for _ in range(3):       # interleaved rounds: the machine is shared and noisy
                for m, fn in steps.items():
                    r = rate(fn, n, args.seconds)
                    best[m] = max(best.get(m, (0.0, 0.0)), r, key=lambda x: x[0])
            env.close()
            for s in sessions.values():
                s.close()
            rows.append((n, best["local"][0], *best["unary"], *best["stream"]))
    print(f"simulator service, task={args.task} engine={args.engine} fidelity={args.fidelity}")
    print(f"{'batch':>6} {'in-process/s':>13} {'gRPC unary/s':>13} {'ratio':>6} {'stream/s':>10} {'ratio':>6} "
          f"{'unary ms/call':>14} {'stream ms/call':>15}")
    for n, local, unary, unary_lat, stream, stream_lat in rows:
        print(f"{n:>6} {local:>13,.0f} {unary:>13,.0f} {unary / local:>6.2f} {stream:>10,.0f} {stream / local:>6.2f} "
              f"{unary_lat * 1e3:>14.2f} {stream_lat * 1e3:>15.2f}")


if __name__ == "__main__":
    main()
