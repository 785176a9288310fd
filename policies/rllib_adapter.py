"""The one module that imports RLlib: PPO (new API stack, torch) whose EnvRunners step the served simulator.

Canonical loop (what a lap's "improve the policy" phase does)::

    trainer = PolicyTrainer(ppo_config_for("pendulum"), EnvConfig(task="pendulum", addresses=[addr]))
    for m in trainer.train(iterations=5):      # metrics per iteration
        print(m["env_steps"], m["episode_return_mean"], m["reward/task"], m["success_rate"])
    trainer.save(path)                         # RLlib checkpoint (optimizer state included) + our configs
    policy = trainer.policy()                  # TorchPolicy: torch only, deterministic
    trainer.stop()

Each remote EnvRunner ``i`` (1-based) opens a ``services.RemoteVectorEnv`` session on
``addresses[(i - 1) % len(addresses)]`` (falling back to the others if that server is unreachable);
``addresses=["local"]`` steps an in-process ``services.local_env.LocalVectorEnv`` instead (no gRPC).
The reward PPO optimises is the service's combined reward; its terms and the success flags arrive
in the step infos and are logged as ``reward/<term>`` and ``success_rate``. A runner whose process
dies (or whose server goes away) is restarted by RLlib and training continues. Runners import
``services`` (numpy, grpc, torch) only, never JAX: ``runner_probe()`` reports what they loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

# RLlib imports JAX (via flax) at import time unless told not to; policy workers are torch-only.
os.environ.setdefault("RLLIB_TEST_NO_JAX_IMPORT", "1")

from typing import Self

import gymnasium as gym
import numpy as np
import ray

# RLlib's notices that say nothing to a Flywheel user (the JAX switch above, the new API stack being
# the default, a GPU monitor that is not installed, its own deprecations) stay out of the progress.
for _name in ("ray.rllib", "ray.tune.utils.util"):
    logging.getLogger(_name).setLevel(logging.ERROR)
from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.tune.registry import register_env

from policies.config import LOCAL, EnvConfig, PPOConfig
from policies.torch_policy import TorchPolicy

ENV_NAME = "flywheel-served-simulator"
TERMS = ("task", "imagination", "physics", "total")
HEAVY_MODULES = ("jax", "jaxlib", "mujoco.mjx", "brax")
_CONFIG_FILE = "flywheel_policy.json"
_runner_index = 0  # set in each EnvRunner process before its env is made


def make_served_env(ctx: dict) -> gym.vector.VectorEnv:
    """RLlib env creator: a ``RemoteVectorEnv`` on this runner's server (the others as fallbacks)."""
    from services.vector_env import RemoteVectorEnv  # deferred: the driver never opens a session

    env = EnvConfig(**{k: v for k, v in ctx.items() if k != "num_envs"})
    if env.addresses == [LOCAL]:
        from services.config import ServerConfig
        from services.local_env import LocalVectorEnv

        return LocalVectorEnv(env.task, int(ctx["num_envs"]), fidelity=env.fidelity, mode=env.mode,
                              seed=env.seed + 1000 * _runner_index, reward_weights=env.reward_weights or None,
                              horizon=env.horizon, config=ServerConfig(task=env.task, engine=env.local_engine))
    addresses = list(env.addresses)
    first = max(_runner_index - 1, 0) % len(addresses)
    order = addresses[first:] + addresses[:first]
    errors = []
    for address in order:
        try:
            return RemoteVectorEnv(address, env.task, int(ctx["num_envs"]), fidelity=env.fidelity, mode=env.mode,
                                   seed=env.seed + 1000 * _runner_index, reward_weights=env.reward_weights or None,
                                   horizon=env.horizon, world_model_version=env.world_model_version,
                                   streaming=env.streaming, timeout=env.timeout_s)
        except Exception as exc:  # noqa: BLE001 - try the next server, report all if none answers
            errors.append(f"{address}: {exc}")
    raise ConnectionError("no simulator server accepted a session:\n" + "\n".join(errors))


class FlywheelEnvRunner(SingleAgentEnvRunner):
    """A SingleAgentEnvRunner that tells the env creator its index (RLlib passes it only a plain dict)."""

    def make_env(self) -> None:
        global _runner_index
        _runner_index = int(self.worker_index)
        super().make_env()


def runner_probe(runner) -> dict:
    """Process facts of an EnvRunner: pid, index and which JAX/MJX/Brax modules it has imported."""
    loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES))
    env = getattr(runner, "env", None)
    client = getattr(env.unwrapped, "client", None) if env is not None else None
    return {"pid": os.getpid(), "worker_index": int(runner.worker_index), "heavy_modules": loaded,
            "address": getattr(client, "address", None)}


class ServedRewardMetrics(RLlibCallback):
    """Logs the service's per-term rewards (per-step means) and episode success as runner metrics."""

    def on_episode_step(self, *, episode, metrics_logger=None, **kwargs) -> None:
        info = episode.get_infos(-1)
        for term in TERMS:
            if f"reward/{term}" in info:
                metrics_logger.log_value(f"reward/{term}", float(info[f"reward/{term}"]), reduce="mean")

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        info = episode.get_infos(-1)
        if "success" in info:
            metrics_logger.log_value("success_rate", float(bool(info["success"])), reduce="mean")


def build_rllib_config(ppo: PPOConfig, env: EnvConfig) -> RLlibPPOConfig:
    """Our configs -> RLlib's PPOConfig (new API stack, torch, one learner in the driver)."""
    ppo.validate()
    env.validate()
    fragment = ppo.rollout_fragment_length or "auto"
    return (
        RLlibPPOConfig()
        .framework("torch")
        .environment(env=ENV_NAME, env_config=env.to_dict())
        .env_runners(env_runner_cls=FlywheelEnvRunner, num_env_runners=ppo.num_env_runners,
                     num_envs_per_env_runner=ppo.num_envs_per_runner, num_cpus_per_env_runner=ppo.num_cpus_per_runner,
                     gym_env_vectorize_mode=gym.VectorizeMode.VECTOR_ENTRY_POINT, rollout_fragment_length=fragment,
                     sample_timeout_s=ppo.sample_timeout_s)
        .learners(num_learners=0)
        .training(lr=ppo.lr, gamma=ppo.gamma, lambda_=ppo.lambda_, clip_param=ppo.clip, vf_clip_param=ppo.vf_clip,
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
    """``ray.init`` once per process: a cluster at ``address``, else this machine's cores (no dashboard).

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
        ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 1), **kwargs)


def _worker_pythonpath() -> str:
    """The project root first, so workers import the same packages as the driver."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


class PolicyTrainer:
    """PPO on RLlib's new API stack, trained in the served simulator; built from ``PPOConfig`` + ``EnvConfig``."""

    def __init__(self, ppo: PPOConfig, env: EnvConfig, num_cpus: int | None = None):
        self.ppo, self.env = ppo.validate(), env.validate()
        init_ray(num_cpus)
        register_env(ENV_NAME, make_served_env)
        self.algo = build_rllib_config(ppo, env).build_algo()
        self.iteration = 0

    # -- training ------------------------------------------------------------------------------
    def train(self, iterations: int = 1, env_steps: int | None = None) -> list[dict]:
        """Run ``iterations`` PPO iterations (or until ``env_steps`` more steps); metrics per iteration."""
        if int(iterations) < 1 and not env_steps:
            raise ValueError(f"train needs iterations >= 1 or env_steps > 0, got {iterations}, {env_steps}")
        start, out = self.env_steps, []
        while (len(out) < iterations) if not env_steps else (self.env_steps - start < env_steps):
            t0 = time.perf_counter()
            result = self.algo.train()
            self.iteration += 1
            out.append(self._summarise(result, time.perf_counter() - t0))
        return out

    def _summarise(self, result: dict, seconds: float) -> dict:
        runners = result.get("env_runners", {})
        learner = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})
        nan = math.nan
        m = {
            "iteration": self.iteration,
            "env_steps": int(result.get("num_env_steps_sampled_lifetime", 0)),
            "env_steps_this_iter": int(runners.get("num_env_steps_sampled", 0)),
            "episode_return_mean": float(runners.get("episode_return_mean", nan)),
            "episode_len_mean": float(runners.get("episode_len_mean", nan)),
            "episodes": int(runners.get("num_episodes", 0)),
            "success_rate": float(runners.get("success_rate", nan)),
            "healthy_runners": int(self.algo.env_runner_group.num_healthy_remote_env_runners()),
            "policy_loss": float(learner.get("policy_loss", nan)),
            "vf_loss": float(learner.get("vf_loss", nan)),
            "entropy": float(learner.get("entropy", nan)),
            "time_s": seconds,
        }
        m.update({f"reward/{t}": float(runners.get(f"reward/{t}", nan)) for t in TERMS})
        return m

    @property
    def env_steps(self) -> int:
        """Env steps sampled over the trainer's lifetime (restored with a checkpoint)."""
        return int(self.algo.metrics.peek("num_env_steps_sampled_lifetime", default=0))

    # -- weights, policy, checkpoints ----------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """The learner's module weights as numpy arrays (actor, critic and value head)."""
        weights = self.algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
        return {k: np.array(v) for k, v in weights.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load module weights into the learner and push them to every EnvRunner."""
        self.algo.learner_group.set_weights({DEFAULT_MODULE_ID: dict(weights)})
        self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group,
                                                inference_only=True)

    def policy(self) -> TorchPolicy:
        """The current actor as a torch-only deterministic ``TorchPolicy``."""
        space = self.algo.get_module().action_space if self.algo.get_module() else None
        if space is None:
            space = self.algo.env_runner_group.foreach_env_runner(
                lambda r: r.env.unwrapped.single_action_space, local_env_runner=False)[0]
        obs_size = int(self.get_weights()["encoder.actor_encoder.net.mlp.0.weight"].shape[1])
        policy = TorchPolicy(obs_size, space.low, space.high, self.ppo.hidden_sizes, self.ppo.activation)
        return policy.load_module_weights(self.get_weights())

    def save(self, path: str) -> str:
        """Checkpoint (weights, optimizer state, counters) into directory ``path``; replaced atomically."""
        path = os.path.abspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.algo.save_to_path(tmp)
        with open(os.path.join(tmp, _CONFIG_FILE), "w") as f:
            json.dump({"ppo": asdict(self.ppo), "env": asdict(self.env), "iteration": self.iteration}, f, indent=1)
        old = f"{path}.old-{os.getpid()}"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def restore(self, path: str) -> None:
        """Restore a checkpoint written by ``save``; refuses one whose network differs from this trainer's."""
        meta_path = os.path.join(path, _CONFIG_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} is not a policy checkpoint (no {_CONFIG_FILE})")
        with open(meta_path) as f:
            meta = json.load(f)
        for key in ("hidden_sizes", "activation"):
            if meta["ppo"][key] != getattr(self.ppo, key):
                raise ValueError(f"checkpoint {path} has PPOConfig.{key}={meta['ppo'][key]!r}, this trainer has "
                                 f"{getattr(self.ppo, key)!r}; build the trainer with the checkpoint's network")
        if meta["env"]["task"] != self.env.task:
            raise ValueError(f"checkpoint {path} is for task {meta['env']['task']!r}, this trainer is for {self.env.task!r}")
        self.algo.restore_from_path(path)
        self.iteration = int(meta.get("iteration", 0))

    # -- workers -------------------------------------------------------------------------------
    def runner_probe(self) -> list[dict]:
        """``runner_probe`` of every healthy remote EnvRunner."""
        return self.algo.env_runner_group.foreach_env_runner(runner_probe, local_env_runner=False)

    def stop(self) -> None:
        """Stop the EnvRunners (closing their sessions) and the learner; Ray itself keeps running."""
        if self.algo is not None:
            self.algo.stop()
            self.algo = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
