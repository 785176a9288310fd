"""RLlib's side of the EnvRunners: the served env, the runner class, its metrics and checked weight sync.

Part of the RLlib adapter (``policies.rllib_adapter`` builds the trainer from these pieces); nothing
outside ``policies`` imports it. The weight sync is explicit and verified::

    digests = sync_runner_weights(algo)          # learner -> every runner, blocking; digests compared
    verify_runner_weights(algo)                  # cheap: compare digests, resync only runners that differ

A runner compares what it holds after a sync with what it was sent and remembers that it was
synced; a runner process that was never synced (a fresh restart RLlib did not announce) refuses to
sample, so RLlib takes it out of service, restores it and this module syncs it before it samples.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sys

# RLlib imports JAX (via flax) at import time unless told not to; policy workers are torch-only.
os.environ.setdefault("RLLIB_TEST_NO_JAX_IMPORT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

# RLlib's notices that say nothing to a Flywheel user (the JAX switch above, the new API stack being
# the default, a GPU monitor that is not installed, its own deprecations) stay out of the progress.
for _name in ("ray.rllib", "ray.tune.utils.util"):
    logging.getLogger(_name).setLevel(logging.ERROR)
from ray.rllib.callbacks.callbacks import RLlibCallback  # noqa: E402
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID  # noqa: E402
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner  # noqa: E402
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO  # noqa: E402

from policies.checkpoint import state_digest  # noqa: E402
from policies.config import LOCAL, RESTART_SEED_BASE, EnvConfig  # noqa: E402
from policies.pipelined_sampler import lanes_of, sample_lanes  # noqa: E402

ENV_NAME = "flywheel-served-simulator"
TERMS = ("task", "imagination", "physics", "total")
HEAVY_MODULES = ("jax", "jaxlib", "mujoco.mjx", "brax")
SYNC_TIMEOUT_S = 120.0
_runner_index = 0  # set in each EnvRunner process before its env is made
_env_seed: int | None = None  # the seed this process's env was made with (``runner_probe``)


def env_seed(base: int) -> int:
    """The env seed of this runner: ``base``, or in a runner Ray restarted a fresh one above ``RESTART_SEED_BASE``.

    RLlib drops a dead runner's sample, but its server has recorded the episodes it finished; the restarted
    runner, seeded alike and sampling with the same weights, would play and record the very same episodes again,
    and the world model would train on each of them twice.
    """
    global _env_seed
    _env_seed = int(base)
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    try:
        restarted = bool(ctx and ctx.get_actor_id() and ctx.was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - the GCS did not answer: keep the planned seed (a restart may then repeat)
        restarted = False
    if restarted:
        _env_seed = RESTART_SEED_BASE * (1 + secrets.randbelow(2**20)) + int(base)
    return _env_seed


class WeightSyncError(RuntimeError):
    """An EnvRunner does not hold the learner's weights after an explicit, verified sync."""


def make_served_env(ctx: dict) -> gym.vector.VectorEnv:
    """RLlib env creator: a ``RemoteVectorEnv`` on this runner's server, preferably on its own node (the others
    as fallbacks), with the servers' token and TLS root certificate.

    The env takes normalized actions and maps them to the task's bounds for the whole batch at once
    (``normalized_actions``), so RLlib's per-env unsquash is off (``build_rllib_config``): one vectorised
    map per step instead of a Python call and a deep copy per env, which cost RLlib's own sampler a quarter
    of its time on Pendulum-v1 at 16 envs and over a third at 256."""
    from services.vector_env import RemoteVectorEnv  # deferred: the driver never opens a session

    env = EnvConfig(**{k: v for k, v in ctx.items() if k != "num_envs"})
    if env.addresses == [LOCAL]:
        from services.config import ServerConfig
        from services.local_env import LocalVectorEnv

        return LocalVectorEnv(env.task, int(ctx["num_envs"]), fidelity=env.fidelity, mode=env.mode,
                              seed=env_seed(env.seed + 1000 * _runner_index), reward_weights=env.reward_weights or None,
                              horizon=env.horizon, config=ServerConfig(task=env.task, engine=env.local_engine),
                              normalized_actions=True)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    errors = []
    seed, num_envs = env_seed(env.seed + 1000 * _runner_index), int(ctx["num_envs"])
    for address in env.server_order(node, max(_runner_index - 1, 0)):
        def session(lane: int, n: int, seed: int, address: str = address, client=None) -> RemoteVectorEnv:
            return RemoteVectorEnv(address, env.task, n, fidelity=env.fidelity, mode=env.mode, seed=seed,
                                   reward_weights=env.reward_weights or None, horizon=env.horizon,
                                   world_model_version=env.world_model_version, streaming=env.streaming,
                                   timeout=env.timeout_s, client=client, normalized_actions=True, **env.credentials())
        try:
            if env.lanes == 1:
                return session(0, num_envs, seed)
            from services.client import SimulatorClient
            from services.lanes import LanedVectorEnv

            client = SimulatorClient(address, timeout=env.timeout_s, **env.credentials())   # one channel, all lanes
            return LanedVectorEnv(functools.partial(session, client=client), num_envs, env.lanes, seed=seed,
                                  on_close=client.close)    # closes the client if a lane cannot be opened, too
        except Exception as exc:  # noqa: BLE001 - try the next server, report all if none answers
            errors.append(f"{address}: {exc}")
    raise ConnectionError("no simulator server accepted a session:\n" + "\n".join(errors))


class FlywheelEnvRunner(SingleAgentEnvRunner):
    """A SingleAgentEnvRunner that knows its index, samples only once synced, and reports its weights."""

    _flywheel_synced = False
    _flywheel_last_sample: dict | None = None
    _flywheel_lanes = None      # the pipelined sampler's per-lane state (None: reset before a laned sample)

    def make_env(self) -> None:
        global _runner_index
        _runner_index = int(self.worker_index)
        super().make_env()

    def sample(self, **kwargs):
        if self.module is not None and not self._flywheel_synced:
            raise WeightSyncError(f"EnvRunner {self.worker_index} (pid {os.getpid()}) has not received the learner's "
                                  f"weights; it must be synced before it samples")
        digest = self.flywheel_digest()["digest"]
        episodes = super().sample(**kwargs)
        self._flywheel_last_sample = _first_step(episodes, digest)
        return episodes

    def _sample(self, *, num_timesteps=None, num_episodes=None, explore, random_actions=False, force_reset=False):
        """RLlib's loop, or with a laned env the pipelined one (``policies.pipelined_sampler``) for timesteps."""
        if num_timesteps is None or random_actions or lanes_of(self) is None:
            self._flywheel_lanes = None        # RLlib's loop resets what it needs; lanes start afresh after it
            return super()._sample(num_timesteps=num_timesteps, num_episodes=num_episodes, explore=explore,
                                   random_actions=random_actions, force_reset=force_reset)
        return sample_lanes(self, num_timesteps=num_timesteps, explore=explore, force_reset=force_reset)

    def flywheel_digest(self) -> dict:
        """Index, pid, the module's state keys and their ``state_digest``."""
        state = self.module.get_state() if self.module is not None else {}
        return {"worker_index": int(self.worker_index), "pid": os.getpid(), "keys": sorted(state),
                "digest": state_digest(state), "synced": bool(self._flywheel_synced)}

    def flywheel_load_weights(self, module_state: dict, seq_no: int) -> dict:
        """Load the learner's (inference-only) module state, adopt its sequence number, report the digest."""
        if isinstance(module_state, ray.ObjectRef):
            module_state = ray.get(module_state)
        self.module.set_state(module_state)
        self._weights_seq_no = int(seq_no)   # later RLlib pushes compare against the learner's count
        report = self.flywheel_digest()
        self._flywheel_synced = bool(report["keys"]) and set(report["keys"]) <= set(module_state) and \
            report["digest"] == state_digest(module_state, report["keys"])
        report["synced"] = self._flywheel_synced
        return report

    def flywheel_last_sample(self) -> dict | None:
        """The first step of the latest sample: the digest it sampled with, observation, distribution inputs, action."""
        return self._flywheel_last_sample


def _first_step(episodes, digest: str) -> dict:
    out = {"digest": digest, "pid": os.getpid()}
    try:
        ep = episodes[0]
        out["obs"] = np.asarray(ep.get_observations(0), np.float32)
        out["action"] = np.asarray(ep.get_actions(0), np.float32)
        out["action_dist_inputs"] = np.asarray(ep.get_extra_model_outputs("action_dist_inputs", 0), np.float32)
    except (IndexError, KeyError, TypeError):   # no episodes, or random actions without distribution inputs
        pass
    return out


def runner_probe(runner) -> dict:
    """Process facts of an EnvRunner: pid, index, Ray node, its server and which JAX/MJX/Brax modules it has imported."""
    loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES))
    env = getattr(runner, "env", None)
    client = getattr(env.unwrapped, "client", None) if env is not None else None
    return {"pid": os.getpid(), "worker_index": int(runner.worker_index), "heavy_modules": loaded, "env_seed": _env_seed,
            "address": getattr(client, "address", None), "node_id": ray.get_runtime_context().get_node_id()}


class ServedRewardMetrics(RLlibCallback):
    """Logs the service's per-term rewards and episode success; syncs restarted runners before they sample."""

    def on_sample_end(self, *, env_runner=None, metrics_logger=None, samples=(), **kwargs) -> None:
        """Sums of each term's per-step reward (``reward_sum/<term>``) and of the steps (``reward_steps``) in this
        sample, one value per sample (per-step logging cost the sampler about as much as a Pendulum-v1 step).
        Sums, not means: RLlib merges runners' means as a mean of means, whatever each runner sampled."""
        sums, steps = dict.fromkeys(TERMS, 0.0), 0
        for episode in samples:
            for info in episode.get_infos():
                if "reward/total" in info:
                    steps += 1
                    for term in TERMS:
                        sums[term] += float(info[f"reward/{term}"])
        if steps and metrics_logger is not None:
            metrics_logger.log_value("reward_steps", steps, reduce="sum")
            for term in TERMS:
                metrics_logger.log_value(f"reward_sum/{term}", sums[term], reduce="sum")

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        info = episode.get_infos(-1)
        if "success" in info:                  # counts, summed over runners: the rate is per episode
            metrics_logger.log_value("served_episodes", 1, reduce="sum")
            metrics_logger.log_value("served_successes", int(bool(info["success"])), reduce="sum")

    def on_env_runners_recreated(self, *, algorithm, env_runner_group, env_runner_indices, is_evaluation,
                                 **kwargs) -> None:
        if not is_evaluation and env_runner_indices:
            sync_runner_weights(algorithm, list(env_runner_indices))


# -- weights: learner -> runners, verified ---------------------------------------------------------
def learner_module_state(algo) -> tuple[dict, int]:
    """The learner's inference-only module state (what a runner holds) and its weights sequence number."""
    state = algo.learner_group.get_state(components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}",
                                         inference_only=True)[COMPONENT_LEARNER]
    return dict(state[COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]), int(state.get(WEIGHTS_SEQ_NO, 0))


def _remote(algo) -> bool:
    return algo.env_runner_group.num_remote_env_runners() > 0


def _check(report: dict, module_state: dict) -> dict:
    keys = report["keys"]
    known = bool(keys) and set(keys) <= set(module_state)
    expected = state_digest(module_state, keys) if known else "(keys differ from the learner's)"
    return {**report, "expected": expected, "matches": known and report["digest"] == expected}


def runner_digests(algo, module_state: dict | None = None) -> list[dict]:
    """Each healthy remote runner's digest next to the learner's over the same keys (``matches``).

    With no remote runners, the local runner (index 0, the one that samples) is reported.
    """
    module_state = learner_module_state(algo)[0] if module_state is None else module_state
    group = algo.env_runner_group
    if not _remote(algo):
        reports = [group.local_env_runner.flywheel_digest()]
    else:
        reports = group.foreach_env_runner("flywheel_digest", local_env_runner=False, timeout_seconds=SYNC_TIMEOUT_S)
    return sorted((_check(r, module_state) for r in reports), key=lambda r: r["worker_index"])


def sync_runner_weights(algo, indices: list[int] | None = None, attempts: int = 2) -> dict[int, str]:
    """Load the learner's weights into runners ``indices`` (default: all healthy) and verify each digest.

    Blocking (no fire-and-forget); a runner that still differs after ``attempts`` is a ``WeightSyncError``
    naming it. A runner that dies meanwhile is left to RLlib's restart (and synced again then).
    Returns ``{runner index: digest}``.
    """
    module_state, seq_no = learner_module_state(algo)
    group = algo.env_runner_group
    local = group.local_env_runner
    if local is not None and local.module is not None:
        report = _check(local.flywheel_load_weights(module_state, seq_no), module_state)
        if not _remote(algo):
            if not report["matches"]:
                raise WeightSyncError(_mismatch(report))
            return {0: report["digest"]}
    ref = ray.put(module_state)
    todo = list(group.healthy_env_runner_ids()) if indices is None else list(indices)
    done: dict[int, str] = {}
    bad: list[dict] = []
    for _ in range(max(1, attempts)):
        if not todo:
            break
        reports = group.foreach_env_runner("flywheel_load_weights", kwargs={"module_state": ref, "seq_no": seq_no},
                                           local_env_runner=False, remote_worker_ids=todo,
                                           timeout_seconds=SYNC_TIMEOUT_S)
        checked = [_check(r, module_state) for r in reports]
        done.update({r["worker_index"]: r["digest"] for r in checked if r["matches"]})
        bad = [r for r in checked if not r["matches"]]
        silent = set(todo) - {r["worker_index"] for r in checked}
        hung = sorted(i for i in silent if i in set(group.healthy_env_runner_ids()))
        if hung:
            raise WeightSyncError(f"EnvRunner(s) {hung} did not answer the weight sync within {SYNC_TIMEOUT_S:.0f} s "
                                  f"but are still marked healthy")
        todo = [r["worker_index"] for r in bad]
    if bad:
        raise WeightSyncError("; ".join(_mismatch(r) for r in bad))
    return done


def verify_runner_weights(algo) -> dict[int, str]:
    """Compare every healthy runner's digest with the learner's; resync (verified) the ones that differ."""
    module_state, _ = learner_module_state(algo)
    reports = runner_digests(algo, module_state)
    good = {r["worker_index"]: r["digest"] for r in reports if r["matches"] and r["synced"]}
    stale = [r["worker_index"] for r in reports if r["worker_index"] not in good]
    if stale:
        good.update(sync_runner_weights(algo, stale if _remote(algo) else None))
    return dict(sorted(good.items()))


def _mismatch(report: dict) -> str:
    return (f"EnvRunner {report['worker_index']} (pid {report['pid']}) holds weights with digest "
            f"{report['digest'][:16]} after an explicit sync, the learner's are {report['expected'][:16]} "
            f"over the runner's {len(report['keys'])} keys")
