"""A simulator server under client churn: its threads, memory and sessions stay flat, its latency recovers.

Eight client slots on 127.0.0.1, each a spawned process that opens clients one after another (connect,
create a session, reset, step 10-60 times, then close it, abandon it without closing, or time out a
CreateSession) until the benchmark SIGKILLs the process mid-step after 4-10 s and starts a fresh one.
A probe process steps its own session throughout. Phases: quiet (the probe alone), steady (eight
clients in the same slots that step the same way but never die: the same load without the churn),
churn, after (the churn killed, abandoned sessions left to expire). Every second it prints the
server's OS threads, RSS and open sessions, and the probe's median step latency; at the end, ratios
measured in this run: the churn's second half / its first half for threads, memory and open sessions
(flat is 1.0: nothing accumulates), after / quiet for latency (a leak would show here), churn /
steady (what dying clients cost the others beyond their load) and churn / quiet (the load of eight
clients sharing the machine's cores with the server, which on a 2-core machine dominates).

By default a client thinks 200 ms between steps (a policy worker's pace) and runs at nice 19, so the
churn (a process started and SIGKILLed every 4-10 s per slot, sessions opened, abandoned and timed out)
is the full churn while the step load it adds stays small: the probe's latency then measures what the
churn does to the server. ``--think-ms 20 --client-nice 0`` turns the clients into a heavy load that
shares the cores with the server (then ``churn / quiet`` measures the load and ``churn / steady`` the churn).

    python benchmarks/service_churn.py [--minutes 5] [--quick] [--engine mujoco] [--envs 16] [--think-ms 200]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import psutil

TASK = "pendulum"


def churn_client(address: str, seed: int, envs: int, think_s: float, nice: int = 0, steady: bool = False) -> None:
    """Clients one after another, each ending by close, abandon or a timed-out CreateSession (until killed);
    ``steady``: one client that steps its session the same way for ever (the churn's load without the churn)."""
    if nice:
        os.nice(nice)
    from services.client import SimulatorClient, SimulatorError
    from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb

    rng = np.random.default_rng(seed)
    if steady:
        with SimulatorClient(address, timeout=30.0) as client:
            session = client.create_session(TASK, envs, seed=int(rng.integers(2**31)))
            session.reset()
            low, high = session.info.action_low, session.info.action_high
            while True:
                session.step(rng.uniform(low, high, (envs, len(low))).astype(np.float32))
                time.sleep(think_s)
    while True:
        try:
            client = SimulatorClient(address, timeout=10.0)
        except SimulatorError:
            time.sleep(0.2)
            continue
        how = rng.choice(["close", "abandon", "timeout"], p=[0.4, 0.4, 0.2])
        try:
            if how == "timeout":
                client.call("CreateSession", pb.CreateSessionRequest(task=TASK, num_envs=envs),
                            timeout=float(rng.uniform(0.0005, 0.005)))
                continue
            session = client.create_session(TASK, envs, seed=int(rng.integers(2**31)))
            session.reset()
            low, high = session.info.action_low, session.info.action_high
            for _ in range(int(rng.integers(10, 60))):
                session.step(rng.uniform(low, high, (envs, len(low))).astype(np.float32))
                time.sleep(think_s)
            if how == "close":
                session.close()
        except SimulatorError:
            time.sleep(0.1)
        finally:
            client.close()                   # "abandon": the channel goes, the session stays behind


def probe(address: str, envs: int, out) -> None:
    """Step one session back to back; every second put ``(median seconds per step, steps)`` on ``out``."""
    from services.client import SimulatorClient

    with SimulatorClient(address, timeout=30.0) as client:
        session = client.create_session(TASK, envs, seed=1)
        session.reset(seed=1)
        a = np.zeros((envs, 1), np.float32)
        times, last = [], time.monotonic()
        while True:
            t0 = time.perf_counter()
            session.step(a)
            times.append(time.perf_counter() - t0)
            if time.monotonic() - last >= 1.0:
                out.put((float(np.median(times)), len(times)))
                times, last = [], time.monotonic()


class Churn:
    """Client slots, each a process killed after 4-10 s and replaced (``steady``: started once, never killed)."""

    def __init__(self, ctx, address: str, slots: int, envs: int, think_s: float, seed: int, nice: int = 0,
                 steady: bool = False):
        self.ctx, self.address, self.envs, self.think_s, self.nice = ctx, address, envs, think_s, nice
        self.steady = steady
        self.rng = np.random.default_rng(seed)
        self.slots: list[tuple | None] = [None] * slots
        self.started = self.killed = 0

    def tick(self) -> None:
        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            if slot is not None and (self.steady or now < slot[1]):
                continue
            if slot is not None:
                self._kill(slot[0])
            proc = self.ctx.Process(target=churn_client, args=(self.address, int(self.rng.integers(2**31)), self.envs,
                                                                self.think_s, self.nice, self.steady), daemon=True)
            proc.start()
            self.started += 1
            self.slots[i] = (proc, now + float(self.rng.uniform(4.0, 10.0)))

    def _kill(self, proc) -> None:
        proc.kill()                          # SIGKILL: no CloseSession, no goodbye
        proc.join(10)
        self.killed += 1

    def stop(self) -> None:
        for slot in self.slots:
            if slot is not None:
                self._kill(slot[0])
        self.slots = [None] * len(self.slots)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0, help="length of the churn phase")
    p.add_argument("--quick", action="store_true", help="about 40 s in all: 5 s quiet, 10 s steady, 18 s churn, 7 s after")
    p.add_argument("--steady-s", type=float, default=60.0, help="length of the steady phase (8 clients, no churn)")
    p.add_argument("--engine", default="mujoco")
    p.add_argument("--envs", type=int, default=16, help="envs per session")
    p.add_argument("--slots", type=int, default=8, help="concurrent churning clients")
    p.add_argument("--think-ms", type=float, default=200.0, help="a churn client's pause between steps (its policy)")
    p.add_argument("--idle", type=float, default=3.0, help="the server's session_idle_s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client-nice", type=int, default=19,
                   help="niceness of the churning client processes: with 19 they take only the CPU the server and the "
                        "probe leave, so the probe's latency measures the server's churn handling, not CPU sharing")
    args = p.parse_args(argv)
    from services.config import ServerConfig  # the server side only: spawned clients import the client alone
    from services.server import serve

    quiet_s, steady_s, churn_s = (5.0, 10.0, 18.0) if args.quick else (20.0, args.steady_s, 60.0 * args.minutes)
    after_s = args.idle + (4.0 if args.quick else 20.0)
    config = ServerConfig(task=TASK, engine=args.engine, session_idle_s=args.idle, max_sessions=64, workers=8,
                          torch_threads=1)
    server = serve(config)
    me = psutil.Process(os.getpid())
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    prober = ctx.Process(target=probe, args=(server.address, args.envs, out), daemon=True)
    prober.start()
    churn = Churn(ctx, server.address, args.slots, args.envs, args.think_ms / 1000, args.seed, args.client_nice)
    steady = Churn(ctx, server.address, args.slots, args.envs, args.think_ms / 1000, args.seed + 1, args.client_nice,
                   steady=True)
    rows: list[dict] = []
    print(f"server {server.address} ({args.engine}, {args.envs} envs per session, idle lease {args.idle:g} s); "
          f"phases: quiet {quiet_s:g} s, steady {steady_s:g} s, churn {churn_s:g} s, after {after_s:g} s; "
          f"clients at nice {args.client_nice}; "
          f"{os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'t_s':>6} {'phase':>6} {'threads':>7} {'rss_MiB':>8} {'open':>5} {'created':>7} {'expired':>7} "
          f"{'rolled':>6} {'p50_ms':>7}", flush=True)
    out.get(timeout=120)                     # the probe is up (its first window is a warm-up)
    start = time.monotonic()
    try:
        for phase, seconds in (("quiet", quiet_s), ("steady", steady_s), ("churn", churn_s), ("after", after_s)):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if phase in ("steady", "churn"):
                    (steady if phase == "steady" else churn).tick()
                try:
                    latency, _steps = out.get(timeout=0.25)
                except Exception:  # noqa: BLE001 - queue.Empty: no probe window closed yet
                    continue
                report = server.report()
                row = {"t": time.monotonic() - start, "phase": phase, "threads": me.num_threads(),
                       "rss": me.memory_info().rss / 2**20, "open": report["sessions_open"],
                       "created": report["sessions_created"], "expired": report["sessions_expired"],
                       "rolled": report["sessions_rolled_back"], "p50": latency * 1000}
                rows.append(row)
                print(f"{row['t']:6.1f} {phase:>6} {row['threads']:7d} {row['rss']:8.1f} {row['open']:5d} "
                      f"{row['created']:7d} {row['expired']:7d} {row['rolled']:6d} {row['p50']:7.2f}", flush=True)
            if phase == "steady":
                steady.stop()
            if phase == "churn":
                churn.stop()
    finally:
        steady.stop()
        churn.stop()
        prober.kill()
        prober.join(10)
    summarize(rows, churn, server.report())
    server.stop(1.0)


def summarize(rows: list[dict], churn: Churn, report: dict) -> None:
    def at(phase: str) -> list[dict]:
        return [r for r in rows if r["phase"] == phase]

    quiet, loaded, busy, after = at("quiet")[1:], at("steady")[2:], at("churn"), at("after")
    first, second = busy[: len(busy) // 2], busy[len(busy) // 2:]
    settled = [r for r in after if r["open"] == after[-1]["open"]] or after
    med = lambda rs, k: float(np.median([r[k] for r in rs]))
    top = lambda rs, k: max(r[k] for r in rs)
    print(f"\nchurn: {churn.started} client processes started, {churn.killed} SIGKILLed; sessions created "
          f"{report['sessions_created']}, closed {report['sessions_closed']}, expired {report['sessions_expired']}, "
          f"rolled back {report['sessions_rolled_back']}, refused (full) {report['sessions_refused_full']}")
    for key, name, fmt in (("threads", "OS threads", "{:.0f}"), ("rss", "RSS MiB", "{:.1f}"), ("open", "open sessions", "{:.0f}")):
        f = fmt.format
        print(f"{name}: quiet {f(quiet[-1][key])}, churn max first half {f(top(first, key))}, second half "
              f"{f(top(second, key))} (ratio {top(second, key) / top(first, key):.2f}), after {f(after[-1][key])}")
    print(f"step latency p50 ms: quiet {med(quiet, 'p50'):.2f}, after {med(settled, 'p50'):.2f} (after / quiet "
          f"{med(settled, 'p50') / med(quiet, 'p50'):.2f}); during the churn {med(busy, 'p50'):.2f} (churn / quiet "
          f"{med(busy, 'p50') / med(quiet, 'p50'):.2f}); with 8 steady clients {med(loaded, 'p50'):.2f} (churn / steady "
          f"{med(busy, 'p50') / med(loaded, 'p50'):.2f}: what dying clients cost beyond their load)")
    flat = all(top(second, k) / top(first, k) <= 1.2 for k in ("threads", "rss", "open"))
    close = med(busy, "p50") / med(quiet, "p50") <= 1.2
    print(f"goals: threads, memory and sessions flat across the churn (second / first half <= 1.2): "
          f"{'met' if flat else 'NOT met'}; step latency during the churn within 1.2x of the quiet server: "
          f"{'met' if close else 'NOT met'}")


if __name__ == "__main__":
    main()
