"""Sessions are leases and resources follow them: real servers, real client processes killed mid-session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from services.client import DeadlineExceeded, NotFound, ResourceExhausted, SimulatorClient
from services.config import ServerConfig
from services.leases import Leases
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.server import ServerProcess
from services.session import ServiceError

TASK = "pendulum"
CLIENT = textwrap.dedent("""
    import sys, numpy as np
    from services.client import SimulatorClient
    address, streaming = sys.argv[1], sys.argv[2] == "stream"
    client = SimulatorClient(address, timeout=30)
    session = client.create_session("pendulum", 2, seed=1)
    if streaming:
        session.use_stream()
    session.reset()
    session.step(np.zeros((2, 1), np.float32))
    print("ready", flush=True)
    while True:
        session.step(np.zeros((2, 1), np.float32))
""")


def start_client(address: str, mode: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, address, mode], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", "the client process did not open its session"
    return proc


def create_until_admitted(address: str, n: int, wait_s: float = 120.0) -> list:
    """Create ``n`` sessions, waiting (bounded) while the server is full of expiring ones."""
    sessions, end = [], time.monotonic() + wait_s
    with SimulatorClient(address) as client:
        while len(sessions) < n:
            try:
                sessions.append(client.create_session(TASK, 2))
            except ResourceExhausted:
                assert time.monotonic() < end, f"only {len(sessions)} of {n} sessions admitted after {wait_s:.0f} s"
                time.sleep(0.2)
        with pytest.raises(ResourceExhausted, match="maximum of"):
            client.create_session(TASK, 2)
        for s in sessions:
            s.close()
    return sessions


def test_killed_clients_sessions_expire_and_the_server_admits_full_capacity():
    config = ServerConfig(task=TASK, engine="mujoco", max_sessions=4, session_idle_s=1.0, workers=6)
    with ServerProcess(config) as proc:
        clients = [start_client(proc.address, mode) for mode in ("unary", "stream", "unary", "stream")]
        full = r"maximum of 4 sessions; close one first \(idle sessions expire after 1 s, ones never called after 1 s\)"
        with SimulatorClient(proc.address) as client, pytest.raises(ResourceExhausted, match=full):
            client.create_session(TASK, 2)
        for c in clients:
            c.send_signal(signal.SIGKILL)
            c.wait(30)
        create_until_admitted(proc.address, 4)
        report = proc.stop()
    assert report["sessions_expired"] == 4 and report["sessions_open"] == 0


def test_a_create_session_whose_caller_left_creates_nothing():
    config = ServerConfig(task=TASK, engine="mujoco", max_sessions=3, session_idle_s=3600.0)
    with ServerProcess(config) as proc:
        request = pb.CreateSessionRequest(task=TASK, num_envs=64, fidelity=0.5)
        answered = 0
        with SimulatorClient(proc.address) as client:
            for i in range(60):
                try:
                    reply = client.call("CreateSession", request, timeout=0.0005 * (1 + i % 20))
                except DeadlineExceeded:
                    continue
                answered += 1                       # answered in time: this client owns it and closes it
                client.call("CloseSession", pb.CloseSessionRequest(session_id=reply.session_id))
        create_until_admitted(proc.address, 3, wait_s=0.0)     # no slot is held by an abandoned creation
        report = proc.stop()
    assert report["sessions_created"] == 3 + answered and report["sessions_open"] == 0
    print(f"{answered} answered in time; rolled back {report['sessions_rolled_back']}; "
          f"cancelled before creation {report['calls_cancelled']}")


def test_an_expired_session_answers_not_found_and_the_env_carries_on():
    from services.vector_env import RemoteVectorEnv

    config = ServerConfig(task=TASK, engine="mujoco", session_idle_s=0.5)
    with ServerProcess(config) as proc:
        env = RemoteVectorEnv(proc.address, TASK, 2, seed=0)
        env.reset(seed=0)
        env.step(np.zeros((2, 1), np.float32))
        first = env.session.id
        for _ in range(30):                         # idle for longer than the lease, then step
            time.sleep(1.0)
            _obs, _r, _term, truncated, _info = env.step(np.zeros((2, 1), np.float32))
            if env.sessions_recreated:
                break
        assert env.sessions_recreated == 1 and truncated.all()
        with SimulatorClient(proc.address) as client, pytest.raises(NotFound, match="expired: no call for 0.5 s"):
            client.call("Reset", pb.ResetRequest(session_id=first))
        env.close()


def test_open_step_close_200_sessions_keeps_threads_and_memory_flat(tmp_path):
    config = ServerConfig(task=TASK, engine="mujoco", trajectory_dir=str(tmp_path), flush_every=10)
    with ServerProcess(config) as proc, SimulatorClient(proc.address) as client:
        server = psutil.Process(proc.pid)
        samples = {}
        for i in range(200):
            session = client.create_session(TASK, 4, seed=i)
            session.reset()
            for _ in range(3):
                session.step(np.zeros((4, 1), np.float32))
            session.close()
            if i + 1 in (20, 200):
                samples[i + 1] = (server.num_threads(), server.memory_info().rss / 2**20)
    (threads_20, rss_20), (threads_200, rss_200) = samples[20], samples[200]
    print(f"server after 20 sessions: {threads_20} threads, {rss_20:.1f} MiB; after 200: {threads_200} threads, "
          f"{rss_200:.1f} MiB")
    # gRPC's handler pool adds threads lazily, up to ``workers``, whenever a call arrives with none idle: a few may
    # appear late; a thread per session would be 180 more.
    assert threads_200 - threads_20 <= config.workers, "threads grew with closed sessions"
    assert rss_200 - rss_20 < 16, "memory grew with closed sessions"
    assert len(list(tmp_path.glob("*.npz"))) == 200      # every session's steps written, once


def test_admission_is_counted_under_the_lock_and_closed_answers_are_bounded():
    table = Leases(max_sessions=5, idle_s=3600.0, close=lambda s: f"closed {s.id}", kept=10)
    admitted, refused, barrier = [], [], threading.Barrier(20)

    def create(i: int) -> None:
        barrier.wait()
        try:
            with table.reserve():
                time.sleep(0.01)                    # a session takes a while to build
                table.add(SimpleNamespace(id=f"s{i}"))
                admitted.append(i)
        except ServiceError as exc:
            refused.append(exc.code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5 and refused == ["RESOURCE_EXHAUSTED"] * 15
    for i in admitted:
        assert table.close(f"s{i}") == f"closed s{i}" == table.close(f"s{i}")   # closing again: the same answer
    for i in range(100, 130):
        with table.reserve():
            table.add(SimpleNamespace(id=f"s{i}"))
        table.close(f"s{i}")
    assert len(table._closed) == 10 and len(table) == 0
    with pytest.raises(ServiceError, match="'s129' is closed"):
        with table.use("s129"):
            pass
    with pytest.raises(ServiceError, match="unknown session 's0'"):   # forgotten beyond the bound
        with table.use("s0"):
            pass


def test_a_session_never_called_expires_sooner_and_is_told_apart(monkeypatch):
    import services.leases as leases

    monkeypatch.setattr(leases, "CLAIM_S", 0.05)
    table = Leases(max_sessions=4, idle_s=0.3, close=lambda s: f"closed {s.id}")
    for sid in ("never", "used"):
        with table.reserve():
            table.add(SimpleNamespace(id=sid))
    with table.use("used"):
        pass
    time.sleep(0.1)
    assert table.reap() == 1                                     # only the unclaimed one, after CLAIM_S
    with pytest.raises(ServiceError, match=r"'never' expired: it had no call within 0\.05 s of its creation"):
        with table.use("never"):
            pass
    time.sleep(0.3)
    assert table.reap() == 1
    with pytest.raises(ServiceError, match=r"'used' expired: no call for 0\.3 s \(the server's session_idle_s\)"):
        with table.use("used"):
            pass
    assert table.counts["expired"] == 2
