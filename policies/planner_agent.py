"""The planning agent in a lap: Ray workers that plan with the world model and step the served simulator.

    trainer = PlannerTrainer(PlannerConfig(), EnvConfig(task="pendulum", addresses=[address], horizon=5),
                             num_envs=16, world_model_path="checkpoints/wm_seed.pt")
    trainer.restore(previous_dir)                  # verified; the planner's settings must match
    for m in trainer.train(env_steps=2048):        # env_steps_this_iter, episode_return_mean, success_rate, ...
        ...
    trainer.save(directory)                        # planner file + manifest of digests, replaced atomically
    trainer.policy().save("policy.pt")             # the evaluation-side PlannerPolicy
    trainer.stop()

The same interface as ``policies.PolicyTrainer`` (PPO), so a lap runs either. Worker ``i`` opens a
``services.RemoteVectorEnv`` session on a server of its own Ray node when there is one, else on
``addresses[i % len(addresses)]`` (the others as fallbacks), like a PPO EnvRunner, and plans with the
world-model file the servers serve: its version must equal the session's, so the agent's imagination
is the one the service grades. Nothing is learned between laps except the world model;
``weights_digest`` covers the planner's settings, the world model and any warm-start policy, and every
worker reports the digest of what it holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import ray

from policies.checkpoint import CheckpointError, read_manifest, replace_directory, state_digest, write_manifest
from policies.config import RESTART_SEED_BASE, EnvConfig
from policies.planner import PlannerConfig
from policies.planner_policy import PlannerPolicy, from_parts, warm_policy_spec
from simulators.cpus import local_ray_cpus

PLANNER_FILE = "planner.pt"
_NOT_SETTINGS = ("num_workers", "torch_threads")   # how it is run, not what the planner is


def planner_digest(config: PlannerConfig, world_model_bytes: bytes, warm: dict | None, window: int) -> str:
    """sha256 over the planner's settings, the world-model file, the warm-start weights and the window."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_SETTINGS}
    h = hashlib.sha256(json.dumps({"settings": settings, "window": int(window)}, sort_keys=True).encode())
    h.update(hashlib.sha256(world_model_bytes).digest())
    h.update((state_digest(warm["state_dict"]) if warm else "").encode())
    return h.hexdigest()


class PlannerWorker:
    """One Ray worker: a ``RemoteVectorEnv`` session and a ``PlannerPolicy`` acting in it."""

    def __init__(self, index: int, env: dict, num_envs: int, config: dict, world_model_bytes: bytes,
                 warm: dict | None, keep_windows: int = 0, incarnation: int = 0):
        import torch

        torch.set_num_threads(1)
        self.index, self.env_config = int(index), EnvConfig(**env)
        # a replacement of a dead worker plays other episodes: the server recorded those the dead one finished
        self.seed = self.env_config.seed + RESTART_SEED_BASE * int(incarnation)
        self.env = _open_env(self.env_config, int(num_envs), self.index, self.seed + 1000 * self.index)
        info = self.env.session_info
        cfg = PlannerConfig.from_object(config)
        self.policy = from_parts(world_model_bytes, cfg, info.action_low, info.action_high, info.horizon,
                                 info.episode_length, warm, keep_windows, seed=self.seed + 7919 * self.index)
        if info.wm_version != self.policy.planner.wm.version:
            self.env.close()
            raise ValueError(f"planner worker {index}: the server at {self.env.client.address} serves world model "
                             f"{info.wm_version}, the planner was given {self.policy.planner.wm.version}; both must "
                             "be the same file so the agent's imagination is the one graded")
        self.digest_value = planner_digest(cfg, world_model_bytes, warm, info.horizon)
        self.obs, _ = self.env.reset(seed=self.seed + 1000 * self.index)
        self.held = np.zeros(self.env.num_envs, bool)
        self.returns = np.zeros(self.env.num_envs)

    def spec(self) -> dict:
        info = self.env.session_info
        return {"action_low": info.action_low.tolist(), "action_high": info.action_high.tolist(),
                "window": int(info.horizon), "episode_length": int(info.episode_length), "wm_version": info.wm_version}

    def digest(self) -> dict:
        return {"worker_index": self.index, "pid": os.getpid(), "digest": self.digest_value, "seed": self.seed}

    def sample(self, env_steps: int) -> dict:
        """Step until ``env_steps`` transitions were served (held next-step resets not counted)."""
        import time

        p = self.policy
        done_returns, successes, served_imagination = [], [], []
        steps, errors0, plan0, t0 = 0, len(p.errors), p.plan_seconds, time.perf_counter()
        while steps < int(env_steps):
            actions = p.act(self.obs, skip=self.held)
            obs, reward, terminated, truncated, info = self.env.step(actions)
            live = ~self.held
            ended = (terminated | truncated) & live
            p.observe(obs, live, ended, info["episode_id"])
            steps += int(live.sum())
            self.returns += np.where(live, reward, 0.0)
            window = info["window"] & live
            served_imagination.extend(info["reward/imagination"][window].tolist())
            done_returns.extend(self.returns[ended].tolist())
            successes.extend(info["success"][ended].tolist())
            self.returns[ended] = 0.0
            self.obs, self.held = obs, ended
        return {"env_steps": steps, "returns": done_returns, "successes": successes,
                "imagination_errors": p.errors[errors0:], "served_imagination": served_imagination,
                "plan_seconds": p.plan_seconds - plan0, "seconds": time.perf_counter() - t0,
                "sessions_recreated": int(getattr(self.env, "sessions_recreated", 0))}

    def windows(self) -> list[dict]:
        return [vars(w) for w in self.policy.windows]

    def close(self) -> None:
        self.env.close()


def _open_env(env: EnvConfig, num_envs: int, index: int, seed: int):
    """A ``RemoteVectorEnv`` on worker ``index``'s server (one on its own node first), trying the others if it
    does not answer, with the servers' token and TLS root certificate."""
    from services.vector_env import RemoteVectorEnv

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    errors = []
    for address in env.server_order(node, index):
        try:
            return RemoteVectorEnv(address, env.task, num_envs, fidelity=env.fidelity, mode=env.mode,
                                   seed=seed, reward_weights=env.reward_weights or None,
                                   horizon=env.horizon, world_model_version=env.world_model_version,
                                   streaming=env.streaming, timeout=env.timeout_s, **env.credentials())
        except Exception as exc:  # noqa: BLE001 - try the next server, report all if none answers
            errors.append(f"{address}: {exc}")
    raise ConnectionError("no simulator server accepted a planner session:\n" + "\n".join(errors))


def init_ray(num_cpus: int | None = None) -> None:
    """A new local Ray on this machine's cores (project root on the workers' path) unless Ray is already running
    in this process; a cluster is joined by calling ``ray.init(address=...)`` first (the flywheel does)."""
    if ray.is_initialized():
        return
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=num_cpus or local_ray_cpus(), include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": path}})


MAX_WORKER_RESTARTS = 3     # per ``train`` call


class PlannerTrainer:
    """``PolicyTrainer``'s interface for the planning agent: Ray workers in the served simulator."""

    def __init__(self, config: PlannerConfig, env: EnvConfig, num_envs: int, world_model_path: str | Path,
                 keep_windows: int = 0):
        self.config, self.env = config.validate(), env.validate()
        if list(env.addresses) == ["local"]:
            raise ValueError("the planner steps simulator servers over gRPC; EnvConfig.addresses must be host:port")
        self.world_model_bytes = Path(world_model_path).read_bytes()
        self.warm = warm_policy_spec(config.warm_start)
        self.num_envs, self.keep_windows = int(num_envs), int(keep_windows)
        init_ray()
        self.abort: Callable[[], str | None] = lambda: None   # why sampling cannot go on (checked while sampling)
        self.abort_every_s = 1.0
        self.incarnations = [0] * config.num_workers
        self.workers = [self._spawn(i) for i in range(config.num_workers)]
        try:
            self.spec = ray.get(self.workers[0].spec.remote())
        except BaseException:
            self.stop()
            raise
        self.iteration, self.env_steps, self.restored_from, self.worker_restarts = 0, 0, None, 0
        self._policy: PlannerPolicy | None = None

    def _spawn(self, index: int, incarnation: int = 0):
        """Worker ``index``: a Ray actor with its own session on a server (Ray does not restart it; ``train`` does,
        as a new ``incarnation`` seeded apart from the ones before it)."""
        remote = ray.remote(PlannerWorker).options(num_cpus=1, max_restarts=0)
        return remote.remote(index, self.env.to_dict(), self.num_envs, self.config.to_dict(), self.world_model_bytes,
                             self.warm, self.keep_windows, incarnation)

    # -- digests -------------------------------------------------------------------------------
    def weights_digest(self) -> str:
        return planner_digest(self.config, self.world_model_bytes, self.warm, self.spec["window"])

    def runner_digests(self) -> list[dict]:
        return ray.get([w.digest.remote() for w in self.workers])

    # -- sampling ------------------------------------------------------------------------------
    def train(self, iterations: int = 1, env_steps: int | None = None) -> list[dict]:
        """Plan and act until ``env_steps`` env steps are served (split over the workers); one summary.

        Without ``env_steps``, each of ``iterations`` is one episode's length in every env of every worker.
        """
        episode = self.num_envs * self.spec["episode_length"] * len(self.workers)
        budget = int(env_steps) if env_steps else int(iterations) * episode
        if budget < 1:
            raise ValueError(f"train needs iterations >= 1 or env_steps > 0, got {iterations}, {env_steps}")
        n = len(self.workers)
        shares = [budget // n + (i < budget % n) for i in range(n)]
        parts = self._sample(shares)
        self.iteration += 1
        steps = sum(p["env_steps"] for p in parts)
        self.env_steps += steps
        returns = [r for p in parts for r in p["returns"]]
        successes = [s for p in parts for s in p["successes"]]
        errors = [e for p in parts for e in p["imagination_errors"]]
        graded = [g for p in parts for g in p["served_imagination"]]
        plan_s = sum(p["plan_seconds"] for p in parts)
        return [{"iteration": self.iteration, "env_steps": self.env_steps, "env_steps_this_iter": steps,
                 "episode_return_mean": _mean(returns), "episodes": len(returns), "success_rate": _mean(successes),
                 "runner_restarts": self.worker_restarts, "sessions_recreated": sum(p["sessions_recreated"] for p in parts),
                 "planner/imagination_error": _mean(errors), "reward/imagination": _mean(graded),
                 "planner/plan_ms_per_step": 1000 * plan_s / max(steps, 1),
                 "time_s": max(p["seconds"] for p in parts)}]

    def _sample(self, shares: list[int]) -> list[dict]:
        """Each worker samples its share; a worker that dies is replaced by a new one that samples its share again
        (at most ``MAX_WORKER_RESTARTS`` per call, then the error names the worker). The dead worker's transitions
        already served stay recorded by the server; only finished shares count toward the budget. ``abort`` is
        checked every ``abort_every_s`` while they sample."""
        pending = {self.workers[i].sample.remote(s): i for i, s in enumerate(shares) if s > 0}
        parts, restarts = [], 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.abort_every_s)
            if not ready:                             # still sampling: a reason to stop kills the workers now
                reason = self.abort()                 # (they would wait out their clients' retries on gone servers)
                if reason:
                    for w in self.workers:
                        ray.kill(w)
                    raise RuntimeError(f"{reason} (sampling stopped, {len(self.workers)} planner worker(s) killed)")
                continue
            i = pending.pop(ready[0])
            ref = ready[0]
            try:
                parts.append(ray.get(ref))
            except ray.exceptions.RayActorError as exc:
                reason = self.abort()
                if reason:                            # e.g. every server gone: a new worker could not connect either
                    raise RuntimeError(f"planner worker {i} died and {reason}") from exc
                if restarts >= MAX_WORKER_RESTARTS:
                    raise RuntimeError(f"planner worker {i} died and {restarts} restarts were already spent in this "
                                       f"iteration (at most {MAX_WORKER_RESTARTS}): {exc}") from exc
                restarts += 1
                self.worker_restarts += 1
                self.incarnations[i] += 1
                self.workers[i] = self._spawn(i, self.incarnations[i])
                pending[self.workers[i].sample.remote(shares[i])] = i
        return parts

    def windows(self) -> list[dict]:
        """The windows each worker kept (``keep_windows``), with ``worker`` set."""
        out = []
        for i, ws in enumerate(ray.get([w.windows.remote() for w in self.workers])):
            out += [{**w, "worker": i} for w in ws]
        return out

    # -- policy and checkpoints ----------------------------------------------------------------
    def policy(self) -> PlannerPolicy:
        """The evaluation-side planner: the same settings, world model and warm start (fresh plans)."""
        if self._policy is None:
            s = self.spec
            self._policy = from_parts(self.world_model_bytes, self.config, s["action_low"], s["action_high"],
                                      s["window"], s["episode_length"], self.warm)
        return self._policy

    def save(self, path: str) -> str:
        """The planner file and a manifest of digests in directory ``path``, replaced atomically."""
        path = os.path.abspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.policy().save(os.path.join(tmp, PLANNER_FILE))
        write_manifest(tmp, {"kind": "planner", "planner": self.config.to_dict(), "env": self.env.to_dict(),
                             "iteration": self.iteration, "env_steps": self.env_steps,
                             "weights_digest": self.weights_digest()})
        return replace_directory(tmp, path)

    def restore(self, path: str) -> list[dict]:
        """Check a checkpoint written by ``save`` (digests, task, planner settings); returns the workers' digests.

        The world model is not restored: each lap plans with the world model its servers serve.
        """
        meta = read_manifest(path, "planner checkpoint")
        if meta.get("kind") != "planner":
            raise CheckpointError(f"{path} is not a planner checkpoint (kind {meta.get('kind')!r}); a lap cannot "
                                  "switch agent.kind in the middle of a run")
        if meta["env"]["task"] != self.env.task:
            raise ValueError(f"checkpoint {path} is for task {meta['env']['task']!r}, this planner is for {self.env.task!r}")
        mine, theirs = self.config.to_dict(), meta["planner"]
        changed = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items()
                   if k not in _NOT_SETTINGS and theirs.get(k) != v]
        if changed:
            raise ValueError(f"checkpoint {path} was planned with other settings ({'; '.join(changed)})")
        PlannerPolicy.load(os.path.join(path, PLANNER_FILE))
        self.iteration, self.env_steps = int(meta.get("iteration", 0)), int(meta.get("env_steps", 0))
        self.restored_from = path
        return self.runner_digests()

    def stop(self) -> None:
        """Close every worker's session and end the workers."""
        for w in self.workers:
            try:
                ray.get(w.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead worker has no session left to close
                pass
            ray.kill(w)
        self.workers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _mean(values: list) -> float:
    return float(np.mean(values)) if len(values) else math.nan
