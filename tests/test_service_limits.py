"""Every request's work is bounded and cancellable; every client call carries a deadline (real servers)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from services.client import DeadlineExceeded, ResourceExhausted, SimulatorClient, Unavailable
from services.config import ServerConfig
from services.server import ServerProcess, serve
from services.server_actor import free_port
from services.vector_env import RemoteVectorEnv

TASK = "pendulum"


@pytest.fixture(scope="module")
def small():
    config = ServerConfig(task=TASK, engine="mujoco", max_batch=32, max_horizon=50, max_elements=1000)
    with ServerProcess(config) as proc:
        yield proc.address


@pytest.mark.parametrize("call", ["imagine", "verify"])
def test_batch_horizon_and_elements_are_limited_for_every_rpc(small, call):
    with SimulatorClient(small) as client:
        run = getattr(client, call)

        def ask(b: int, h: int):
            args = (np.zeros((b, 2)), np.zeros((b, h, 1)))
            return run(*args) if call == "imagine" else run(*args, np.zeros((b, h, 2)))

        name = call.capitalize()
        with pytest.raises(ResourceExhausted, match=f"{name}: batch B=33 is over the server's max_batch 32"):
            ask(33, 1)
        with pytest.raises(ResourceExhausted, match=f"{name}: horizon H=203173 is over the server's max_horizon 50"):
            ask(1, 203_173)
        with pytest.raises(ResourceExhausted, match=rf"{name}: B\*H\*S = 30\*20\*2 = 1200 elements is over the server's "
                           "max_elements 1000"):
            ask(30, 20)
        assert ask(20, 20) is not None                 # within every limit


def test_a_session_is_limited_in_batch_horizon_and_elements(small):
    with SimulatorClient(small) as client:
        with pytest.raises(ResourceExhausted, match="num_envs 33 is over the server's max_batch 32"):
            client.create_session(TASK, 33)
        with pytest.raises(ResourceExhausted, match="horizon H=51 is over the server's max_horizon 50"):
            client.create_session(TASK, 2, horizon=51)
        with pytest.raises(ResourceExhausted, match=r"B\*H\*S = 30\*20\*2 = 1200 elements .* max_elements 1000"):
            client.create_session(TASK, 30, horizon=20)
        session = client.create_session(TASK, 20, horizon=20)
        session.reset()
        assert session.step(np.zeros((20, 1), np.float32)).observations.shape == (20, 3)
        session.close()


def test_work_stops_when_its_caller_has_gone():
    config = ServerConfig(task=TASK, engine="mujoco", max_horizon=10**6, max_elements=10**9)
    server = serve(config)
    try:
        with SimulatorClient(server.address, timeout=0.5) as client:
            with pytest.raises(DeadlineExceeded):       # ~40 s of world-model steps, asked with a 0.5 s deadline
                client.imagine(np.zeros((1, 2)), np.zeros((1, 200_000, 1)))
            end = time.monotonic() + 60
            while server.report()["calls_cancelled"] < 1:
                assert time.monotonic() < end, "the server kept working for a caller that had gone"
                time.sleep(0.05)
        with SimulatorClient(server.address) as client:
            imagined, _ = client.imagine(np.zeros((2, 2)), np.zeros((2, 3, 1)))
        assert imagined.shape == (2, 3, 2)
    finally:
        server.stop(0)


def test_a_stream_step_has_a_deadline_against_a_stopped_server():
    with ServerProcess(ServerConfig(task=TASK, engine="mujoco")) as proc:
        with SimulatorClient(proc.address, timeout=2.0) as client:
            session = client.create_session(TASK, 2)
            session.use_stream()
            session.reset()
            session.step(np.zeros((2, 1), np.float32))
            os.kill(proc.pid, signal.SIGSTOP)           # the server hangs: no answer, no disconnect
            try:
                with pytest.raises(DeadlineExceeded, match="no answer within 2 s"):
                    session.step(np.zeros((2, 1), np.float32))
                with pytest.raises(DeadlineExceeded):
                    session.step(np.zeros((2, 1), np.float32))   # a new stream, the same deadline
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            out = session.step(np.zeros((2, 1), np.float32))    # the same sequence number again: served
            assert out.observations.shape == (2, 3)
            session.close()


def test_remote_env_against_a_dead_address_fails_within_its_timeout():
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    with pytest.raises(Unavailable, match=f"no simulator server at {address} after 2 s"):
        RemoteVectorEnv(address, TASK, 2, timeout=2.0)


def test_streams_beyond_the_free_handler_threads_fall_back_to_unary_steps():
    with ServerProcess(ServerConfig(task=TASK, engine="mujoco", workers=2)) as proc:   # one stream slot
        with SimulatorClient(proc.address) as client:
            sessions = [client.create_session(TASK, 2, seed=i) for i in range(3)]
            for s in sessions:
                s.use_stream()
                s.reset()
            for _ in range(3):
                for s in sessions:
                    assert s.step(np.zeros((2, 1), np.float32)).observations.shape == (2, 3)
            assert client.health() == "SERVING"               # a handler thread is still free for probes
            for s in sessions:
                s.close()
        report = proc.stop()
    assert report["streams_refused"] == 2


def test_imagine_and_verify_share_the_stream_slots_so_a_probe_always_finds_a_thread():
    with ServerProcess(ServerConfig(task=TASK, engine="mujoco", workers=2)) as proc:   # one slot: workers - 1
        with SimulatorClient(proc.address) as client:
            streaming = client.create_session(TASK, 2, seed=0)
            streaming.use_stream()
            streaming.reset()
            streaming.step(np.zeros((2, 1), np.float32))            # the stream holds the one slot
            states, actions = np.zeros((2, 2), np.float32), np.zeros((2, 3, 1), np.float32)
            with pytest.raises(ResourceExhausted, match=r"Imagine: all 1 slots for streams and Imagine/Verify calls "
                                                        r"are in use"):
                client.imagine(states, actions)
            with pytest.raises(ResourceExhausted, match=r"Verify: all 1 slots"):
                client.verify(states, actions, np.zeros((2, 3, 2), np.float32))
            assert client.health() == "SERVING"                   # the free thread answers probes
            streaming.close()                                       # the slot is given back
            imagined, _ = client.imagine(states, actions)
            assert imagined.shape == (2, 3, 2)
        report = proc.stop()
    assert report["long_calls_refused"] == 2 and report["streams_refused"] == 0


def test_message_limits_beyond_what_grpc_holds_are_refused_in_one_line():
    from services.client import channel_options

    with pytest.raises(ValueError, match=r"ServerConfig.max_message_mb must be in \[1, 2047\].*got 2048"):
        ServerConfig(max_message_mb=2048).validate()
    with pytest.raises(ValueError, match=r"max_message_mb must be in \[1, 2047\].*got 4096"):
        SimulatorClient("127.0.0.1:1", max_message_mb=4096)
    assert dict(channel_options(2047))["grpc.max_send_message_length"] == 2047 * 2**20
    with pytest.raises(ValueError, match=r"episode_offset must be in \[0, 2\*\*62\]"):
        ServerConfig(episode_offset=2**63 - 1000).validate()


def test_a_step_that_got_no_answer_is_settled_by_retry_before_another():
    with ServerProcess(ServerConfig(task=TASK, engine="mujoco")) as proc:
        with SimulatorClient(proc.address, timeout=2.0) as client:
            session = client.create_session(TASK, 2)
            session.reset(seed=3)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(DeadlineExceeded):
                    session.step(np.full((2, 1), 0.5, np.float32))
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            with pytest.raises(RuntimeError, match=r"Step 2 got no answer and may have run on the server; call retry"):
                session.step(np.zeros((2, 1), np.float32))        # other actions: refused, nothing sent
            answered = session.retry()                              # the server ran it once: its answer
            assert answered.observations.shape == (2, 3)
            assert session.step(np.zeros((2, 1), np.float32)).observations.shape == (2, 3)   # and on it goes
            with pytest.raises(RuntimeError, match="no call waiting"):
                session.retry()
            session.close()


def test_stopping_a_hung_server_process_is_bounded_and_kills_it(monkeypatch):
    monkeypatch.setattr(ServerProcess, "STOP_MARGIN_S", 1.0)
    proc = ServerProcess(ServerConfig(task=TASK, engine="mujoco"), grace=0.5).start()
    child = proc._process
    os.kill(child.pid, signal.SIGSTOP)                        # hung: neither answers nor exits on SIGTERM
    assert proc.stop() is None                                 # no report from a hung server
    assert not child.is_alive() and child.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1", "", ":50051", "host:port"])
def test_a_malformed_address_is_named_at_once(address):
    with pytest.raises(ValueError, match=r"simulator address .* is not host:port with a port in \[1, 65535\]"):
        SimulatorClient(address, timeout=30)


def test_a_stalled_stream_gives_its_handler_thread_back_after_the_idle_lease():
    with ServerProcess(ServerConfig(task=TASK, engine="mujoco", workers=2, session_idle_s=1.0)) as proc:   # one slot
        with SimulatorClient(proc.address) as client:
            stalled = client.create_session(TASK, 2)
            stalled.use_stream()
            stalled.reset()
            stalled.step(np.zeros((2, 1), np.float32))             # the stream holds the only slot, then goes quiet
            time.sleep(3.0)                                          # > session_idle_s: the server cancels it
            imagined, _ = client.imagine(np.zeros((2, 2), np.float32), np.zeros((2, 3, 1), np.float32))
            assert imagined.shape == (2, 3, 2)                      # the slot is free again
        report = proc.stop()
    assert report["streams_idle_cancelled"] == 1 and report["long_calls_refused"] == 0


def test_a_failure_inside_the_server_is_internal_and_logged_not_the_clients_fault(monkeypatch, caplog):
    """A ``ValueError`` past the request's checks (a numpy shape error in grading, say) is the server's fault:
    INTERNAL with its trace in the server's log, not INVALID_ARGUMENT; bad actions stay INVALID_ARGUMENT."""
    import grpc

    from services import session as session_module
    from services.client import InvalidArgument, SimulatorError

    real, calls = session_module.grade_step, []

    def grade_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("operands could not be broadcast together with shapes (2,) (3,)")
        return real(*args, **kwargs)

    monkeypatch.setattr(session_module, "grade_step", grade_step)
    server = serve(ServerConfig(task=TASK, engine="mujoco", port=0))
    zeros = np.zeros((2, 1), np.float32)
    try:
        with SimulatorClient(server.address) as client, caplog.at_level("ERROR", logger="services.servicer"):
            session = client.create_session(TASK, 2, seed=0)
            session.reset()
            with pytest.raises(InvalidArgument, match="actions: non-finite values"):
                session.step(np.full((2, 1), np.nan, np.float32))
            session.step(zeros)
            session.step(zeros)
            with pytest.raises(SimulatorError) as failed:
                session.step(zeros)
            assert failed.value.code == grpc.StatusCode.INTERNAL, failed.value
            assert "stepping failed inside the server (ValueError: operands could not be broadcast" in failed.value.details
        traced = [r for r in caplog.records if r.exc_info and "Step failed" in r.getMessage()]
        assert traced and "operands could not be broadcast" in str(traced[0].exc_info[1].__cause__)
    finally:
        server.stop(0)


def test_a_refused_stream_is_known_by_its_metadata_not_by_the_words_of_its_message():
    from services.client import _refused_stream

    class Refusal(Exception):
        def __init__(self, trailing):
            self.trailing = trailing

        def trailing_metadata(self):
            return self.trailing

    assert _refused_stream(Refusal((("flywheel-refusal", "stream-slots"),)))
    assert not _refused_stream(Refusal((("other", "stream"),)))         # "stream" in a message or key is not it
    assert not _refused_stream(Refusal(None))
