"""Self-play under faults with real RLlib processes: a SIGKILLed EnvRunner either comes back with the
learner's weights (checked by digest) and the step budget is reached, or training fails with SelfPlayError.

One EnvRunner (the case where a dead runner means 0 steps sampled), in-process simulators, small network.
"""

import math
import os
import signal
import threading
import time

import psutil
import pytest
import ray

from policies import EnvConfig, ppo_config_for
from policies.config import RESTART_SEED_BASE
from policies.rllib_adapter import PolicyTrainer, SelfPlayError

BATCH = 512


@pytest.fixture(scope="module")
def trainer():
    ppo = ppo_config_for("pendulum", num_env_runners=1, num_envs_per_runner=4, train_batch_size=BATCH, minibatch_size=128,
                         num_epochs=1, hidden_sizes=[16, 16], num_cpus_per_runner=0.5, restart_delay_s=0.2)
    t = PolicyTrainer(ppo, EnvConfig(task="pendulum", addresses=["local"]), num_cpus=2)
    yield t
    t.stop()
    ray.shutdown()


def _cpu_ticks(pid: int) -> int:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])                       # utime + stime


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_when_sampling(pid: int, done: threading.Event, killed: list) -> None:
    """SIGKILL ``pid`` once it burns CPU (it is sampling), or when training ends without that."""
    start = _cpu_ticks(pid)
    while not done.is_set():
        if _cpu_ticks(pid) >= start + 5:
            break
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)


def _assert_budget_or_clear_failure(trainer, run) -> list[dict] | None:
    try:
        metrics = run()
    except SelfPlayError as exc:
        assert "env steps" in str(exc) and "EnvRunner" in str(exc), str(exc)
        return None
    for m in metrics:
        assert isinstance(m["env_steps_this_iter"], int) and m["env_steps_this_iter"] >= 0
        assert isinstance(m["env_steps"], int)
        assert not math.isnan(m["time_s"])
    return metrics


def test_a_reason_to_stop_fails_sampling_at_once_naming_it(trainer):
    trainer.abort = lambda: "every simulator server is gone for good"
    try:
        with pytest.raises(SelfPlayError, match="every simulator server is gone for good"):
            trainer.train(1)
    finally:
        trainer.abort = lambda: None


def test_sigkill_during_sample_reaches_the_budget_with_a_resynced_runner_or_fails_clearly(trainer):
    trainer.train(1)
    first = trainer.runner_probe()[0]
    victim = first["pid"]
    assert first["env_seed"] == 1000 * first["worker_index"]              # EnvConfig.seed 0 + 1000 x index
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_when_sampling, args=(victim, done, killed), daemon=True)
    killer.start()
    steps_before = trainer.env_steps
    try:
        metrics = _assert_budget_or_clear_failure(trainer, lambda: trainer.train(iterations=2, max_retries=4))
    finally:
        done.set()
        killer.join()
    assert killed == [victim]
    if metrics is None:
        return
    sampled = sum(m["env_steps_this_iter"] for m in metrics)
    assert sampled >= 2 * BATCH and trainer.env_steps - steps_before == sampled
    # the restarted runner does not replay the dead one's episodes (its server recorded those it finished)
    again = trainer.runner_probe()[0]
    assert again["pid"] != victim and again["env_seed"] != first["env_seed"]
    assert again["env_seed"] % RESTART_SEED_BASE == first["env_seed"]
    if len(metrics) == 2:                                       # the kill landed after the last sample
        metrics += trainer.train(1, max_retries=4)
    probes = trainer.runner_probe()
    assert [p["worker_index"] for p in probes] == [1] and probes[0]["pid"] != victim
    digests = trainer.runner_digests()
    assert all(d["matches"] and d["synced"] for d in digests) and digests[0]["digest"] == trainer.weights_digest()
    trainer.train(1)
    assert trainer.last_samples()[0]["pid"] == probes[0]["pid"]


def test_a_runner_with_unsynced_weights_refuses_to_sample_and_is_synced_on_its_restore(trainer):
    """As a runner process that Ray restarted without RLlib noticing: fresh weights, never synced."""
    module = trainer.algo.env_runner_group.foreach_env_runner(lambda r: r.module.get_state(), local_env_runner=False)[0]
    fresh = {k: v * 0.5 for k, v in module.items()}

    def forget(runner):
        runner.module.set_state(fresh)
        runner._flywheel_synced = False

    trainer.algo.env_runner_group.foreach_env_runner(forget, local_env_runner=False)
    stale = trainer.runner_digests()[0]
    assert not stale["synced"] and not stale["matches"]
    before = trainer.env_steps
    trainer.algo.train()                                         # RLlib alone: the runner refuses, is taken out
    assert trainer.env_steps == before
    assert trainer.algo.env_runner_group.num_healthy_remote_env_runners() == 0
    metrics = trainer.train(1, max_retries=2)                    # RLlib restores it; it is synced before sampling
    assert sum(m["env_steps_this_iter"] for m in metrics) >= BATCH
    digests = trainer.runner_digests()
    assert all(d["matches"] and d["synced"] for d in digests)
    assert trainer.last_samples()[0]["digest"] not in (stale["digest"],)


def _runner_processes() -> set[int]:
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any("FlywheelEnvRunner" in part for part in proc.info["cmdline"] or ()):
            found.add(proc.info["pid"])
    return found


def test_restarts_are_counted_also_for_a_runner_killed_again_before_rllib_saw_it_back(trainer):
    before = trainer.runner_restarts()
    first = trainer.runner_probe()[0]["pid"]
    os.kill(first, signal.SIGKILL)
    deadline, second = time.monotonic() + 120, set()
    while not second and time.monotonic() < deadline:         # Ray's next incarnation, killed as it comes up
        second = _runner_processes() - {first}
        time.sleep(0.05)
    assert second, "Ray did not restart the runner"
    for pid in second:
        os.kill(pid, signal.SIGKILL)
    metrics = trainer.train(1, max_retries=6)
    assert sum(m["env_steps_this_iter"] for m in metrics) >= BATCH
    assert trainer.runner_restarts() - before == 2 and metrics[-1]["runner_restarts"] - before == 2


def test_a_reason_to_stop_that_comes_while_sampling_kills_the_runners_and_names_it(trainer):
    """Servers gone for good while the runners sample: their clients would retry for a minute; the trainer's watch
    kills them for good at its next check and the error names the reason. (Last use of the module's runners.)"""
    calls = []

    def abort():                                     # clear before the iteration, gone once sampling has begun
        calls.append(1)
        return None if len(calls) == 1 else "every simulator server is gone for good"

    trainer.abort = abort
    trainer.abort_every_s = 0.01
    pid = trainer.runner_probe()[0]["pid"]
    try:
        with pytest.raises(SelfPlayError, match=r"every simulator server is gone for good \(sampling stopped, "
                                                r"1 EnvRunner\(s\) killed\)"):
            trainer.train(1)
    finally:
        trainer.abort = lambda: None
    assert trainer.runners_cut == 1
    deadline = time.monotonic() + 30
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), f"runner {pid} still alive"


def test_a_runner_that_stays_dead_is_a_self_play_error_naming_the_cause():
    ppo = ppo_config_for("pendulum", num_env_runners=1, num_envs_per_runner=2, train_batch_size=64, minibatch_size=32,
                         num_epochs=1, hidden_sizes=[8], num_cpus_per_runner=0.5, max_runner_restarts=0)
    with PolicyTrainer(ppo, EnvConfig(task="pendulum", addresses=["local"]), num_cpus=2) as t:
        t.train(1)
        os.kill(t.runner_probe()[0]["pid"], signal.SIGKILL)
        with pytest.raises(SelfPlayError, match=r"every EnvRunner \(1\) is dead for good: Ray restarts a killed runner "
                                                r"at most ppo.max_runner_restarts=0 times"):
            t.train(2, max_retries=1)


def test_runners_that_die_while_rllib_builds_the_trainer_are_named(monkeypatch):
    """RLlib indexes its runners' (empty) answers when every one died while starting: an IndexError, as such."""
    from types import SimpleNamespace

    from policies import rllib_adapter

    monkeypatch.setattr(rllib_adapter, "build_rllib_config", lambda ppo, env: SimpleNamespace(build_algo=lambda: [][0]))
    ppo = ppo_config_for("pendulum", num_env_runners=2, num_cpus_per_runner=0.5)
    with pytest.raises(SelfPlayError, match=r"no EnvRunner of 2 came up while RLlib built the PPO trainer .*IndexError"):
        PolicyTrainer(ppo, EnvConfig(task="pendulum", addresses=["local"]), num_cpus=2)
