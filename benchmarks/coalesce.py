"""Server throughput with many sessions: N concurrent sessions of B envs against one session of N*B envs.

Two servers run side by side (spawned processes), one coalescing Step calls (``coalesce_wait_ms``) and one
not; each is measured with one session of N*B envs and with N sessions of B envs stepped concurrently
(one client thread per session), in interleaved rounds. Prints env-steps/s and the ratio many / one.

    python -m benchmarks.coalesce [--sessions 8] [--envs 64] [--fidelity 0.5] [--wait-ms 2] [--seconds 3]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from services.client import SimulatorClient
from services.config import ServerConfig
from services.server import ServerProcess


def throughput(address: str, task: str, sessions: int, envs: int, fidelity: float, seconds: float) -> float:
    """Env-steps/s of ``sessions`` sessions of ``envs`` envs, each stepped in its own client thread."""
    clients = [SimulatorClient(address) for _ in range(sessions)]
    handles = [c.create_session(task, envs, fidelity=fidelity, seed=i) for i, c in enumerate(clients)]
    counts = [0] * sessions
    start = threading.Barrier(sessions + 1)
    stop = threading.Event()

    def run(i: int) -> None:
        s = handles[i]
        s.reset()
        a = np.random.default_rng(i).uniform(s.info.action_low, s.info.action_high,
                                             (envs, len(s.info.action_low))).astype(np.float32)
        s.step(a)
        start.wait()
        while not stop.is_set():
            s.step(a)
            counts[i] += envs

    threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    rate = sum(counts) / (time.perf_counter() - t0)
    for s, c in zip(handles, clients, strict=True):
        s.close()
        c.close()
    return rate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pendulum")
    p.add_argument("--engine", default="mujoco")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--envs", type=int, default=64)
    p.add_argument("--fidelity", type=float, default=0.5)
    p.add_argument("--wait-ms", type=float, default=2.0, help="coalesce_wait_ms of the coalescing server")
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args(argv)
    n, b = args.sessions, args.envs
    base = {"task": args.task, "engine": args.engine, "torch_threads": args.torch_threads,
            "workers": max(8, n + 2), "max_batch": max(4096, n * b)}
    servers = {"off": ServerConfig(**base), "on": ServerConfig(**base, coalesce_wait_ms=args.wait_ms)}
    procs = {k: ServerProcess(c).start() for k, c in servers.items()}
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for k, proc in procs.items():
                for shape, (sessions, envs) in (("one", (1, n * b)), ("many", (n, b))):
                    r = throughput(proc.address, args.task, sessions, envs, args.fidelity, args.seconds)
                    rates.setdefault((k, shape), []).append(r)
    finally:
        for proc in procs.values():
            proc.stop()
    med = {k: float(np.median(v)) for k, v in rates.items()}
    print(f"server throughput, {args.task} on {args.engine}, fidelity {args.fidelity}: {n} sessions x {b} envs "
          f"vs 1 session x {n * b} envs (env-steps/s, median of {args.rounds} interleaved rounds)")
    print(f"{'coalescing':>22} {'1 x ' + str(n * b):>10} {f'{n} x {b}':>10} {'many / one':>11}")
    for k, label in (("off", "off"), ("on", f"on ({args.wait_ms:g} ms)")):
        one, many = med[(k, "one")], med[(k, "many")]
        print(f"{label:>22} {one:>10,.0f} {many:>10,.0f} {many / one:>11.2f}")
    print(f"coalescing on / off, {n} x {b}: {med[('on', 'many')] / med[('off', 'many')]:.2f}")


if __name__ == "__main__":
    main()
