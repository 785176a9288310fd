"""One lap of the flywheel, as named phases that read top to bottom.

    seed       (lap 0 only) collect random-policy data in reality; train the first world model
    serve      simulator server(s) start as Ray actors with the current world-model version
    self_play  PPO policy workers train in the served simulator; the server records every graded transition
    select     successful, accurate, physically plausible episodes go to the trajectory store
    retrain    the world model trains on the seed data plus every selected trajectory so far (a new version)
    evaluate   the policy and the new world model are measured in reality
    log        every metric to MLflow with ``step=lap``; report PNGs and checkpoints as artifacts

Each stage reads its inputs from the run directory (checkpoints, store) and returns its metrics,
so the orchestrator can resume a lap after its last finished stage. Checkpoints of lap ``L``:
``checkpoints/wm_lapL.pt`` (the world model after retraining), ``checkpoints/policy_lapL.pt``
(torch policy) and ``checkpoints/policy_lapL/`` (the trainer state, optimizer included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from flywheel.config import FlywheelConfig
from flywheel.selection import select_episodes
from flywheel.store import TrajectoryStore

STAGES = ("seed", "self_play", "select", "retrain", "evaluate", "log")
EPISODE_STRIDE = 100_000_000    # self-play episode ids of lap L start at (L + 1) * stride


@dataclass
class LapContext:
    """What every stage needs: the config, where things live, and how to report progress."""

    cfg: FlywheelConfig
    run_dir: Path
    store: TrajectoryStore
    lap: int
    say: Callable[[str], None] = print

    def wm_path(self, lap: int | None) -> Path:
        """World model after lap ``lap``'s retrain (``None``: the seed model of lap 0)."""
        return self.run_dir / "checkpoints" / ("wm_seed.pt" if lap is None or lap < 0 else f"wm_lap{lap:03d}.pt")

    def policy_path(self, lap: int, trainer: bool = False) -> Path:
        name = f"policy_lap{lap:03d}" + ("" if trainer else ".pt")
        return self.run_dir / "checkpoints" / name

    @property
    def lap_dir(self) -> Path:
        return self.run_dir / "laps" / f"lap_{self.lap:03d}"

    def reality(self):
        from simulators.reality import Reality

        return Reality(self.cfg.task, engine=self.cfg.reality.engine, params=vars(self.cfg.reality.params))


# -- seed ---------------------------------------------------------------------------------------
def seed(ctx: LapContext) -> dict:
    """Random-policy data from reality and the first world model trained on it."""
    from simulators.reality import RandomPolicy
    from simulators.world_model import WorldModel

    cfg = ctx.cfg
    reality = ctx.reality()
    policy = RandomPolicy(reality.spec, cfg.reality.seed_action_scale, seed=cfg.seed)
    data = reality.collect(policy, n_steps=cfg.reality.seed_steps, n_envs=cfg.reality.seed_envs, seed=cfg.seed, lap=0)
    ctx.store.add(0, "seed", data)
    ctx.say(f"seed: {len(data)} reality transitions ({int(data.dones.sum())} episodes)")
    wm = WorldModel(cfg.task, data.states.shape[1], data.actions.shape[1], replace(cfg.world_model, seed=cfg.seed))
    fit = wm.fit(data)
    wm.save(ctx.wm_path(None))
    return {"data/seed_transitions": len(data), **{f"world_model/seed_{k}": v for k, v in _scalars(fit).items()}}


# -- serve + self_play --------------------------------------------------------------------------
@contextlib.contextmanager
def serve(ctx: LapContext) -> Iterator[list[str]]:
    """Simulator servers (Ray actors, GPU where asked) serving the latest world model, recording into the store."""
    from flywheel.orchestrator import init_ray
    from services.server_actor import start_server_actors, stop_server_actors

    cfg = ctx.cfg
    ctx.store.clear_raw(ctx.lap)               # a restarted self-play stage records afresh
    configs = [replace(cfg.service, task=cfg.task, engine=cfg.engine.name, engine_params=vars(cfg.engine.params),
                       world_model_path=str(ctx.wm_path(ctx.lap - 1)), trajectory_dir=str(ctx.store.raw_dir(ctx.lap)),
                       lap=ctx.lap, episode_offset=(ctx.lap + 1) * EPISODE_STRIDE + i * (EPISODE_STRIDE // 16),
                       seed=cfg.seed, reward=cfg.rewards)
               for i in range(cfg.self_play.num_servers)]
    init_ray(cfg)
    actors, addresses = start_server_actors(configs)
    try:
        ctx.say(f"serve: {len(addresses)} simulator server(s) at {', '.join(addresses)}")
        yield addresses
    finally:
        stop_server_actors(actors)             # a graceful stop flushes the recorders


def self_play(ctx: LapContext, addresses: list[str]) -> dict:
    """Train the policy with PPO in the served simulator, continuing from the previous lap's policy."""
    from policies.config import EnvConfig
    from policies.rllib_adapter import PolicyTrainer

    cfg = ctx.cfg
    env = EnvConfig(task=cfg.task, addresses=list(addresses), fidelity=cfg.simulator.fidelity, mode=cfg.simulator.mode,
                    horizon=cfg.simulator.horizon, reward_weights=vars(cfg.rewards.weights), seed=cfg.seed + ctx.lap)
    trainer = PolicyTrainer(replace(cfg.ppo, seed=cfg.seed), env)
    try:
        previous = ctx.policy_path(ctx.lap - 1, trainer=True)
        if ctx.lap > 0 and previous.exists():
            trainer.restore(str(previous))
        history = []
        for it in range(cfg.self_play.iterations):
            history += trainer.train(1)
            m = history[-1]
            ctx.say(f"self_play: iteration {it + 1}/{cfg.self_play.iterations}, "
                    f"{int(m.get('env_steps', 0))} steps, return {m.get('episode_return_mean', float('nan')):.1f}")
        trainer.save(str(ctx.policy_path(ctx.lap, trainer=True)))     # atomic directory replace
        trainer.policy().save(str(ctx.policy_path(ctx.lap)))
    finally:
        trainer.stop()
    last = history[-1] if history else {}
    return {"self_play/env_steps": float(sum(h.get("env_steps_this_iter", 0) for h in history)),
            "self_play/episode_return_mean": float(last.get("episode_return_mean", np.nan)),
            "self_play/success_rate": float(last.get("success_rate", np.nan))}


# -- select -------------------------------------------------------------------------------------
def select(ctx: LapContext) -> dict:
    """Choose the lap's successful trajectories from the server's recordings and store them."""
    cfg = ctx.cfg
    raw = ctx.store.read_raw(ctx.lap)
    chosen, stats = select_episodes(raw, cfg.selection, cfg.simulator.horizon)
    if chosen is not None:
        ctx.store.add(ctx.lap, "selected", chosen, stats)
    rejected = ", ".join(f"{k.split('/')[1]} {v}" for k, v in stats.items() if k.startswith("rejected/") and v)
    ctx.say(f"select: {stats['selected_episodes']}/{stats['episodes']} episodes selected"
            + (f" (rejected: {rejected})" if rejected else ""))
    out = {"data/selected_trajectories": stats["selected_episodes"], "data/self_play_transitions": 0 if raw is None
           else len(raw), **{f"selection/{k}": v for k, v in stats.items()}}
    out.update(_grade_means(raw, cfg.simulator.horizon))
    return out


def _grade_means(raw, horizon: int) -> dict:
    """Mean per-term grades over the lap's self-play (imagination/physics over the windows that closed)."""
    if raw is None or len(raw) == 0:
        return {f"reward/{k}": np.nan for k in ("task", "imagination", "physics", "total")}
    closed = (raw.steps.astype(np.int64) + 1) % horizon == 0
    out = {}
    for key in ("task", "imagination", "physics", "total"):
        col = raw.rewards.get(key)
        rows = closed if key in ("imagination", "physics") and closed.any() else slice(None)
        out[f"reward/{key}"] = float(np.nanmean(col[rows])) if col is not None else np.nan
    return out


# -- retrain ------------------------------------------------------------------------------------
def retrain(ctx: LapContext) -> dict:
    """A new world-model version: warm-started from the last one, fitted on seed + all selected data."""
    from simulators.world_model import WorldModel

    data = ctx.store.training_data(ctx.lap)
    wm = WorldModel.load(ctx.wm_path(ctx.lap - 1), task=ctx.cfg.task)
    fit = wm.fit(data)
    wm.save(ctx.wm_path(ctx.lap))
    ctx.say(f"retrain: {len(data)} transitions, world model {wm.version}")
    return {"data/total_transitions": len(data), **{f"world_model/fit_{k}": v for k, v in _scalars(fit).items()}}


# -- evaluate -----------------------------------------------------------------------------------
def evaluate(ctx: LapContext) -> dict:
    """Capability in reality: the policy's success and return; the world model's errors on reality data."""
    import rewards
    from policies.evaluate import evaluate as evaluate_policy
    from policies.torch_policy import TorchPolicy
    from simulators.dataset import SOURCE_REALITY
    from simulators.reality import episodes_to_dataset
    from simulators.world_model import WorldModel, one_step_error, open_loop_error

    cfg, H = ctx.cfg, ctx.cfg.simulator.horizon
    reality = ctx.reality()
    policy = TorchPolicy.load(str(ctx.policy_path(ctx.lap)))
    wm = WorldModel.load(ctx.wm_path(ctx.lap), task=cfg.task)
    eval_seed = cfg.seed + 1_000_003             # the same reality episodes every lap
    ev = evaluate_policy(policy, reality, episodes=cfg.reality.eval_episodes, seed=eval_seed)
    ep = reality.rollout(policy, n_envs=min(16, cfg.reality.eval_episodes), seed=eval_seed)
    data = episodes_to_dataset(ep, 0, ctx.lap, SOURCE_REALITY, cfg.task)
    # the agent's imagination in reality: tumbling H-step windows of the policy's real episodes
    B, T, S = ep.states.shape[0], ep.actions.shape[1], ep.states.shape[2]
    k = T // H
    starts = ep.states[:, : k * H: H]                                       # [B, k, S]
    acts = ep.actions[:, : k * H].reshape(B, k, H, -1)
    actual = ep.states[:, 1: k * H + 1].reshape(B, k, H, S)
    imagined = wm.imagine(starts.reshape(B * k, S), acts.reshape(B * k, H, -1))
    accuracy = rewards.imagination_accuracy(imagined, actual.reshape(B * k, H, S), wm.state_scale)
    engine = reality.engine                      # the agent's imagination is checked against reality's physics
    report = rewards.physics_violation(engine, starts.reshape(B * k, S), acts.reshape(B * k, H, -1), imagined,
                                       cfg.rewards, scale=wm.state_scale)
    real0 = ep.states[0, : k * H + 1]
    imag0 = np.concatenate([ep.states[0, :1], imagined.reshape(B, k * H, S)[0]])
    ctx.lap_dir.mkdir(parents=True, exist_ok=True)
    np.savez(ctx.lap_dir / "trajectory.npz", real=real0, imagined=imag0, dt=engine.spec.control_dt, horizon=H,
             labels=np.array(engine.spec.state_names))
    ctx.say(f"evaluate: success {ev['success_rate']:.2f}, return {ev['return_mean']:.1f} over {ev['episodes']} "
            f"reality episodes")
    return {"capability/success_rate": ev["success_rate"], "capability/return": ev["return_mean"],
            "capability/return_std": ev["return_std"],
            "world_model/one_step_error": one_step_error(wm, data),
            "world_model/open_loop_error": open_loop_error(wm, data, horizon=H)["open_loop_mse"],
            "imagination/accuracy": float(np.mean(accuracy)),
            "physics/violation_rate": float(np.mean(report.violates))}


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
