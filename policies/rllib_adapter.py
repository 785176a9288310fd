"""The RLlib adapter: PPO (new API stack, torch) whose EnvRunners step the served simulator.

Canonical loop (what a lap's "improve the policy" phase does)::

    trainer = PolicyTrainer(ppo_config_for("pendulum"), EnvConfig(task="pendulum", addresses=[addr]))
    trainer.restore(previous)                  # verified files; runners hold the restored weights (checked)
    for m in trainer.train(iterations=5):      # samples 5 * train_batch_size env steps, or SelfPlayError
        print(m["env_steps"], m["episode_return_mean"], m["reward/task"], m["success_rate"])
    trainer.save(path)                         # RLlib checkpoint + manifest of file digests + our configs
    policy = trainer.policy()                  # TorchPolicy: torch only, deterministic
    trainer.stop()

Each remote EnvRunner ``i`` (1-based) opens a ``services.RemoteVectorEnv`` session on
``addresses[(i - 1) % len(addresses)]`` (falling back to the others if that server is unreachable);
``addresses=["local"]`` steps an in-process ``services.local_env.LocalVectorEnv`` instead (no gRPC).
The reward PPO optimises is the service's combined reward; its terms and the success flags arrive
in the step infos and are logged as ``reward/<term>`` and ``success_rate``. A runner whose process
dies (or whose server goes away) is restarted by RLlib; it is given the learner's weights, checked by
digest, before it samples again. Runners import ``services`` (numpy, grpc, torch) only, never JAX:
``runner_probe()`` reports what they loaded. RLlib is imported here and in ``policies.rllib_runners`` only.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Self

# RLlib imports JAX (via flax) at import time unless told not to; policy workers are torch-only.
os.environ.setdefault("RLLIB_TEST_NO_JAX_IMPORT", "1")

import gymnasium as gym
import numpy as np
import ray
from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.tune.registry import register_env

from policies.checkpoint import CheckpointError, read_manifest, replace_directory, state_digest, write_manifest
from policies.config import EnvConfig, PPOConfig
from policies.rllib_runners import (
    ENV_NAME,
    HEAVY_MODULES,
    TERMS,
    FlywheelEnvRunner,
    ServedRewardMetrics,
    WeightSyncError,
    learner_module_state,
    make_served_env,
    runner_digests,
    runner_probe,
    sync_runner_weights,
    verify_runner_weights,
)
from policies.torch_policy import TorchPolicy
from simulators.cpus import local_ray_cpus

__all__ = ["CheckpointError", "PolicyTrainer", "SelfPlayError", "WeightSyncError", "build_rllib_config", "init_ray",
           "make_served_env", "runner_probe", "ENV_NAME", "HEAVY_MODULES", "TERMS"]


class SelfPlayError(RuntimeError):
    """Self-play sampled fewer env steps than its budget and could not make up for it; the message says why."""


def build_rllib_config(ppo: PPOConfig, env: EnvConfig) -> RLlibPPOConfig:
    """Our configs -> RLlib's PPOConfig (new API stack, torch, one learner in the driver)."""
    ppo.validate()
    env.validate()
    fragment = ppo.rollout_fragment_length or "auto"
    return (
        RLlibPPOConfig()
        .framework("torch")
        # the served env maps normalized actions to the task's bounds for its whole batch (``make_served_env``)
        .environment(env=ENV_NAME, env_config=env.to_dict(), normalize_actions=False, clip_actions=False)
        .env_runners(env_runner_cls=FlywheelEnvRunner, num_env_runners=ppo.num_env_runners,
                     num_envs_per_env_runner=ppo.num_envs_per_runner, num_cpus_per_env_runner=ppo.num_cpus_per_runner,
                     gym_env_vectorize_mode=gym.VectorizeMode.VECTOR_ENTRY_POINT, rollout_fragment_length=fragment,
                     sample_timeout_s=ppo.sample_timeout_s)
        .learners(num_learners=0)
        .training(lr=ppo.lr_schedule(), gamma=ppo.gamma, lambda_=ppo.lambda_, clip_param=ppo.clip, vf_clip_param=ppo.vf_clip,
                  vf_loss_coeff=ppo.vf_loss_coeff, entropy_coeff=ppo.entropy_coeff, use_kl_loss=ppo.kl_coeff > 0,
                  kl_coeff=ppo.kl_coeff, grad_clip=ppo.grad_clip or None, train_batch_size_per_learner=ppo.train_batch_size,
                  minibatch_size=ppo.minibatch_size, num_epochs=ppo.num_epochs)
        .rl_module(model_config={"fcnet_hiddens": list(ppo.hidden_sizes), "fcnet_activation": ppo.activation,
                                 "head_fcnet_hiddens": [], "vf_share_layers": False})
        .callbacks(ServedRewardMetrics)
        .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=ppo.max_runner_restarts,
                         delay_between_env_runner_restarts_s=ppo.restart_delay_s,
                         num_consecutive_env_runner_failures_tolerance=ppo.max_runner_restarts)
        .debugging(seed=ppo.seed, log_level="ERROR")
    )


def init_ray(num_cpus: int | None = None, address: str | None = None, include_dashboard: bool = False) -> None:
    """``ray.init`` once per process: a cluster at ``address``, else a new local Ray on this machine's cores
    (never a cluster that happens to run on this machine; no dashboard).

    Every worker gets the project on its path and RLlib's switch that keeps JAX out of it.
    """
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"RLLIB_TEST_NO_JAX_IMPORT": "1", "PYTHONPATH": _worker_pythonpath()}}
    kwargs = {"include_dashboard": include_dashboard, "log_to_driver": False, "configure_logging": False,
              "runtime_env": runtime_env}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus or local_ray_cpus(), **kwargs)


def _worker_pythonpath() -> str:
    """The project root first, so workers import the same packages as the driver."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


class PolicyTrainer:
    """PPO on RLlib's new API stack, trained in the served simulator; built from ``PPOConfig`` + ``EnvConfig``.

    Every EnvRunner holds the learner's weights before it samples: they are pushed explicitly and
    compared by digest at construction, after ``restore``/``set_weights``, after a runner restart and
    at the start of every iteration; a runner that still differs is a ``WeightSyncError``.
    ``action_space`` is the task's action bounds: the module acts in [-1, 1] and the served env maps its
    actions there (``make_served_env``), as ``policy()`` does.
    """

    def __init__(self, ppo: PPOConfig, env: EnvConfig, num_cpus: int | None = None):
        self.ppo, self.env = ppo.validate(), env.validate()
        init_ray(num_cpus)
        register_env(ENV_NAME, make_served_env)
        try:
            self.algo = build_rllib_config(ppo, env).build_algo()
        except IndexError as exc:   # RLlib asks its runners for the spaces and indexes the (empty) answers
            raise SelfPlayError(f"no EnvRunner of {ppo.num_env_runners} came up while RLlib built the PPO trainer "
                                f"(each died while starting: killed, out of memory, or its server unreachable; "
                                f"Ray's worker logs say why): {type(exc).__name__}: {exc}") from exc
        self.iteration = 0
        self.abort: Callable[[], str | None] = lambda: None   # why sampling cannot go on (checked while sampling)
        self.abort_every_s = 1.0
        self.runners_cut = 0                                  # EnvRunners killed because sampling could not go on
        self.action_space = self._physical_action_space()
        self.sync_runners()

    def _physical_action_space(self) -> gym.spaces.Box:
        """The task's action bounds (the module acts in [-1, 1]; the served env maps to these)."""
        group = self.algo.env_runner_group
        if group.num_remote_env_runners():
            return group.foreach_env_runner(lambda r: r.env.unwrapped.physical_action_space, local_env_runner=False)[0]
        return group.local_env_runner.env.unwrapped.physical_action_space

    # -- training ------------------------------------------------------------------------------
    def train(self, iterations: int = 1, env_steps: int | None = None, max_retries: int = 3) -> list[dict]:
        """Sample ``env_steps`` (default ``iterations * train_batch_size``) env steps with PPO; metrics per iteration.

        An iteration that samples less than ``train_batch_size`` (runners died) is followed by more,
        after waiting for RLlib to restart the runners and syncing them, up to ``max_retries`` short
        iterations; then ``SelfPlayError`` says how many steps were sampled and why.
        """
        budget = int(env_steps) if env_steps else int(iterations) * self.ppo.train_batch_size
        if budget < 1 or int(max_retries) < 0:
            raise ValueError(f"train needs iterations >= 1 or env_steps > 0 and max_retries >= 0, "
                             f"got iterations={iterations}, env_steps={env_steps}, max_retries={max_retries}")
        out: list[dict] = []
        sampled = short = 0
        while sampled < budget:
            self._check_abort()
            self.verify_runners()
            before, t0 = self.env_steps, time.perf_counter()
            result = self._train_watched()
            self.iteration += 1
            m = self._summarise(result, time.perf_counter() - t0, self.env_steps - before)
            out.append(m)
            sampled += m["env_steps_this_iter"]
            if m["env_steps_this_iter"] >= self.ppo.train_batch_size or sampled >= budget:
                continue
            short += 1
            cause = (f"{m['env_steps_this_iter']} of {self.ppo.train_batch_size} env steps sampled in iteration "
                     f"{self.iteration}: {self._health()}")
            if short > int(max_retries):
                raise SelfPlayError(f"self-play sampled {sampled} of {budget} env steps after {len(out)} iteration(s) "
                                    f"and {short - 1} retries; last: {cause}")
            self._await_runners()
        return out

    def _health(self) -> str:
        group = self.algo.env_runner_group
        total = group.num_remote_env_runners()
        if total == 0:
            return "sampling in the driver (no remote EnvRunners)"
        return (f"{total - group.num_healthy_remote_env_runners()} of {total} EnvRunners unhealthy, "
                f"{self.runner_restarts()} restarted so far")

    def runner_restarts(self) -> int:
        """Times Ray restarted this trainer's EnvRunners (the GCS's count per actor: RLlib's own counts only the
        runners it brought back into service, not one killed again before that)."""
        group = self.algo.env_runner_group
        try:
            from ray._private import state

            actors = self._runner_actors()
            return sum(int(state.actors(a._actor_id.hex()).get("NumRestarts", 0)) for a in actors.values())
        except Exception:  # noqa: BLE001 - the GCS did not answer: RLlib's count, a lower bound
            return int(group.num_remote_worker_restarts())

    def _check_abort(self) -> None:
        reason = self.abort()
        if reason:
            raise SelfPlayError(reason)

    def _train_watched(self) -> dict:
        """One ``algo.train()`` while a thread checks ``abort`` every ``abort_every_s``: once it gives a reason,
        the EnvRunners are killed for good (they would wait out their clients' retries, a minute, on servers that
        are gone) and ``SelfPlayError`` names the reason."""
        stop, reasons = threading.Event(), []

        def watch():
            while not stop.wait(self.abort_every_s):
                reason = self.abort()
                if reason:
                    reasons.append(reason)
                    self.runners_cut += self._kill_runners()
                    return

        watcher = threading.Thread(target=watch, name="flywheel-abort-watch", daemon=True)
        watcher.start()
        try:
            result = self.algo.train()
        except Exception as exc:
            stop.set()
            watcher.join()
            if reasons:
                raise SelfPlayError(f"{reasons[0]} (sampling stopped, {self.runners_cut} EnvRunner(s) killed)") from exc
            raise
        stop.set()
        watcher.join()
        if reasons:
            raise SelfPlayError(f"{reasons[0]} (sampling stopped, {self.runners_cut} EnvRunner(s) killed)")
        return result

    def _runner_actors(self) -> dict:
        """The remote EnvRunners' actor handles by id (RLlib keeps no public list of them)."""
        return self.algo.env_runner_group._worker_manager.actors()

    def _kill_runners(self) -> int:
        """Kill every remote EnvRunner, not to be restarted; how many."""
        actors = self._runner_actors()
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        return len(actors)

    def _await_runners(self, timeout_s: float | None = None) -> None:
        """Wait (bounded) until RLlib has restarted the failed runners, then sync and verify them."""
        group = self.algo.env_runner_group
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.ppo.sample_timeout_s)
        gone_since = None
        while True:
            self._check_abort()
            gone = self._runners_gone_for_good()
            gone_since = (gone_since or time.monotonic()) if gone else None
            if gone and time.monotonic() - gone_since >= 1.0:   # for a second: not a ping that raced a restart
                raise SelfPlayError(f"every EnvRunner ({gone}) is dead for good: Ray restarts a killed runner at most "
                                    f"ppo.max_runner_restarts={self.ppo.max_runner_restarts} times; self-play cannot "
                                    "go on (Ray's worker logs say why they died)")
            restored = self.algo.restore_env_runners(group)
            if restored:
                sync_runner_weights(self.algo, list(restored))
            if group.num_healthy_remote_env_runners() >= group.num_remote_env_runners() or time.monotonic() > deadline:
                return
            time.sleep(min(1.0, max(0.1, self.ppo.restart_delay_s)))

    def _runners_gone_for_good(self) -> int:
        """How many remote EnvRunners there are when every one is dead for good (its restarts spent), else 0."""
        actors = self._runner_actors()
        if not actors:
            return 0
        for actor in actors.values():
            try:
                ray.get(actor.ping.remote(), timeout=2)
                return 0
            except ray.exceptions.ActorDiedError:
                continue
            except Exception:  # noqa: BLE001 - restarting or busy: not gone for good
                return 0
        return len(actors)

    def _summarise(self, result: dict, seconds: float, sampled: int) -> dict:
        runners = result.get("env_runners") or {}
        learner = (result.get("learners") or {}).get(DEFAULT_MODULE_ID) or {}
        m = {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "env_steps_this_iter": max(0, int(sampled)),
            "env_steps_asked": int(self.ppo.train_batch_size),
            "episode_return_mean": _float(runners.get("episode_return_mean")),
            "episode_len_mean": _float(runners.get("episode_len_mean")),
            "episodes": _int(runners.get("num_episodes")),
            "success_rate": _ratio(runners.get("served_successes"), runners.get("served_episodes")),
            "healthy_runners": int(self.algo.env_runner_group.num_healthy_remote_env_runners()),
            "runner_restarts": self.runner_restarts(),
            "policy_loss": _float(learner.get("policy_loss")),
            "vf_loss": _float(learner.get("vf_loss")),
            "entropy": _float(learner.get("entropy")),
            "lr": _float(learner.get("default_optimizer_learning_rate")),
            "time_s": float(seconds),
        }
        m.update({f"reward/{t}": _ratio(runners.get(f"reward_sum/{t}"), runners.get("reward_steps")) for t in TERMS})
        return m

    @property
    def env_steps(self) -> int:
        """Env steps sampled over the trainer's lifetime (restored with a checkpoint)."""
        return _int(self.algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))

    # -- weights on the runners ----------------------------------------------------------------
    def weights_digest(self) -> str:
        """``state_digest`` of the learner's inference-only module state: what every runner must hold."""
        return state_digest(learner_module_state(self.algo)[0])

    def runner_digests(self) -> list[dict]:
        """Per healthy runner: ``worker_index``, ``pid``, ``digest``, ``expected`` (the learner's), ``matches``."""
        return runner_digests(self.algo)

    def sync_runners(self) -> dict[int, str]:
        """Push the learner's weights to every healthy runner (blocking) and verify them; ``{index: digest}``."""
        return sync_runner_weights(self.algo)

    def verify_runners(self) -> dict[int, str]:
        """Compare every healthy runner's digest with the learner's, resyncing (verified) any that differ."""
        return verify_runner_weights(self.algo)

    def last_samples(self) -> list[dict]:
        """Per healthy runner, the first step of its latest sample: the weights ``digest`` it sampled with, ``pid``,
        ``obs``, ``action_dist_inputs`` and ``action`` (``None`` for a runner that has not sampled yet)."""
        group = self.algo.env_runner_group
        if not group.num_remote_env_runners():
            return [group.local_env_runner.flywheel_last_sample()]
        return group.foreach_env_runner("flywheel_last_sample", local_env_runner=False)

    # -- weights, policy, checkpoints ----------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """The learner's module weights as numpy arrays (actor, critic and value head)."""
        weights = self.algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
        return {k: np.array(v) for k, v in weights.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load module weights into the learner and into every EnvRunner (verified)."""
        self.algo.learner_group.set_weights({DEFAULT_MODULE_ID: dict(weights)})
        self.sync_runners()

    def policy(self) -> TorchPolicy:
        """The current actor as a torch-only deterministic ``TorchPolicy``."""
        weights = self.get_weights()
        obs_size = int(weights["encoder.actor_encoder.net.mlp.0.weight"].shape[1])
        space = self.action_space
        policy = TorchPolicy(obs_size, space.low, space.high, self.ppo.hidden_sizes, self.ppo.activation)
        return policy.load_module_weights(weights)

    def save(self, path: str) -> str:
        """Checkpoint (weights, optimizer state, counters) into directory ``path`` with a manifest of file
        digests; replaced atomically."""
        path = os.path.abspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.algo.save_to_path(tmp)
        write_manifest(tmp, {"ppo": asdict(self.ppo), "env": asdict(self.env), "iteration": self.iteration,
                             "env_steps": self.env_steps, "module_digest": self._module_digest(),
                             "weights_digest": self.weights_digest()})
        return replace_directory(tmp, path)

    def restore(self, path: str) -> dict[int, str]:
        """Restore a checkpoint written by ``save`` and give every runner its weights (verified).

        ``CheckpointError`` (naming the file) for a missing, truncated or altered checkpoint; ``ValueError``
        for one whose network or task differs from this trainer's. Returns the runners' digests.
        """
        meta = read_manifest(path)
        for key in ("hidden_sizes", "activation"):
            if meta["ppo"][key] != getattr(self.ppo, key):
                raise ValueError(f"checkpoint {path} has PPOConfig.{key}={meta['ppo'][key]!r}, this trainer has "
                                 f"{getattr(self.ppo, key)!r}; build the trainer with the checkpoint's network")
        if meta["env"]["task"] != self.env.task:
            raise ValueError(f"checkpoint {path} is for task {meta['env']['task']!r}, this trainer is for {self.env.task!r}")
        self.algo.restore_from_path(path)
        if self._module_digest() != meta["module_digest"]:
            raise CheckpointError(f"policy checkpoint {path}: the learner's weights after restoring differ from "
                                  f"the saved ones (digest {self._module_digest()[:16]}, saved "
                                  f"{meta['module_digest'][:16]})")
        self.iteration = int(meta.get("iteration", 0))
        return self.sync_runners()

    def _module_digest(self) -> str:
        return state_digest(self.get_weights())

    # -- workers -------------------------------------------------------------------------------
    def runner_probe(self) -> list[dict]:
        """``runner_probe`` of every healthy remote EnvRunner."""
        return self.algo.env_runner_group.foreach_env_runner(runner_probe, local_env_runner=False)

    def stop(self) -> None:
        """Stop the EnvRunners (closing their sessions) and the learner; Ray itself keeps running."""
        if self.algo is not None:
            # dead runners' stop calls fail; RLlib logs each with the traceback of whatever is being handled (the
            # lap's own error, already reported): not the terminal's business
            manager = logging.getLogger("ray.rllib.utils.actor_manager")
            level = manager.level
            manager.setLevel(logging.CRITICAL)
            try:
                self.algo.stop()
            finally:
                manager.setLevel(level)
            self.algo = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _float(value) -> float:
    """A metric as a float; missing -> NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ratio(total, count) -> float:
    """``total / count`` of two summed metrics; NaN when either is missing or nothing was counted."""
    total, count = _float(total), _float(count)
    return total / count if count > 0 else math.nan


def _int(value) -> int:
    """A count as an int; missing or NaN (a dead runner's metrics) -> 0."""
    v = _float(value)
    return int(v) if math.isfinite(v) else 0
