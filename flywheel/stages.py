"""The bodies of a lap's stages (the order lives in ``flywheel.lap.run_lap``).

Each takes the ``LapContext`` (and the ``LapParts`` it uses), reads its inputs from the run
directory and returns its metrics. What a stage cannot vouch for is a ``LapFailed``: a self-play
that sampled less than its budget or whose servers lost recordings, a missing previous policy.
"""

from __future__ import annotations

import time

import numpy as np

from flywheel.lap import LapContext, LapFailed, LapParts, LapRecord, write_json
from flywheel.selection import select_episodes


# -- seed ---------------------------------------------------------------------------------------
def seed(ctx: LapContext, parts: LapParts) -> dict:
    """Random-policy data from reality and the first world model trained on it."""
    from simulators.reality import RandomPolicy

    cfg = ctx.cfg
    reality = ctx.reality()
    policy = RandomPolicy(reality.spec, cfg.reality.seed_action_scale, seed=cfg.seed)
    data = reality.collect(policy, n_steps=cfg.reality.seed_steps, n_envs=cfg.reality.seed_envs, seed=cfg.seed, lap=0)
    ctx.store.add(0, "seed", data)
    ctx.say(f"seed: {len(data)} reality transitions ({int(data.dones.sum())} episodes)")
    wm, fit = parts.fit_world_model(ctx, data, None)
    wm.save(ctx.wm_path(None))
    return {"data/seed_transitions": len(data), **{f"world_model/seed_{k}": v for k, v in scalars(fit).items()}}


# -- self_play ----------------------------------------------------------------------------------
def self_play_budget(ctx: LapContext) -> int:
    """Env steps a lap's self-play must sample: iterations x the PPO batch."""
    return int(ctx.cfg.self_play.iterations) * int(ctx.cfg.ppo.train_batch_size)


def self_play(ctx: LapContext, parts: LapParts) -> dict:
    """PPO in the served simulator from the previous lap's policy, until the lap's step budget is sampled."""
    budget = self_play_budget(ctx)
    ctx.store.clear_raw(ctx.lap)                               # a restarted self-play stage records afresh
    t0 = time.time()
    with parts.serve(ctx) as served:
        ctx.say(f"serve: {len(served.addresses)} simulator server(s) at {', '.join(served.addresses)}")
        t1 = time.time()
        trainer = parts.trainer(ctx, served.addresses)
        trainer.abort = served.lost                 # every server dead for good: fail now, not after the timeouts
        try:
            carried = _carry_policy(ctx, trainer)
            history = _train(ctx, trainer, budget)
            carried["end_digest"] = trainer.weights_digest()
            trainer.save(str(ctx.policy_path(ctx.lap, trainer=True)))      # atomic, with a digest manifest
            trainer.policy().save(str(ctx.policy_path(ctx.lap)))
        finally:
            trainer.stop()
        t2 = time.time()
    write_json(ctx.lap_dir / "policy.json", carried)
    steps = int(sum(h["env_steps_this_iter"] for h in history))
    if steps < budget:                              # the trainer raises first; a lap never trusts it blindly
        raise LapFailed(f"self-play sampled {steps} of its {budget} env steps")
    report = served.report
    raw = ctx.store.read_raw(ctx.lap)                # what is on disk is what the lap has
    stored = 0 if raw is None else len(raw)
    if stored <= 0:
        raise LapFailed(f"self-play sampled {steps} env steps but the servers stored none "
                        f"({report.get('served', 0)} served); the lap has no data to select from")
    last = history[-1]
    runners = int(ctx.cfg.ppo.num_env_runners)
    out_of_service = max(0, runners - int(last.get("healthy_runners", runners)))
    if out_of_service:
        ctx.say(f"self_play: {out_of_service} of {runners} runner(s) out of service at the end of the lap "
                "(lost with their process or node; RLlib keeps restarting them, the others sampled the budget)")
    restarts = {"runner": int(last.get("runner_restarts", 0)), "server": int(report.get("server_restarts", 0))}
    if any(restarts.values()):                      # said, not only counted: each one changes what the lap holds
        ctx.say(f"self_play: {restarts['runner']} runner and {restarts['server']} server restart(s); "
                f"{stored} transitions stored for {steps} sampled (a dead server loses its episodes in flight; "
                f"a dead runner's finished episodes stay recorded and its replacement plays new ones)")
    return {"self_play/env_steps": float(steps), "self_play/iterations": float(len(history)),
            "self_play/runners_out_of_service": float(out_of_service),
            "self_play/episode_return_mean": float(last.get("episode_return_mean", np.nan)),
            "self_play/success_rate": float(last.get("success_rate", np.nan)),
            "self_play/runner_restarts": float(last.get("runner_restarts", 0)),
            **{k: float(last[k]) for k in last if k.startswith("planner/")},     # the planner's own figures
            "self_play/server_restarts": float(report.get("server_restarts", 0)),
            "self_play/servers_lost": float(len(report.get("servers_lost", []))),
            "self_play/server_torch_threads": float(report.get("torch_threads", 0)),
            "data/served_transitions": float(report.get("served", 0)),
            "data/stored_transitions": float(stored),
            "time/serve": (t1 - t0) + (time.time() - t2), "time/self_play": t2 - t1}


def _train(ctx: LapContext, trainer, budget: int) -> list[dict]:
    """PPO iterations until ``budget`` env steps are sampled (the trainer retries short ones or raises)."""
    history, steps = [], 0
    while steps < budget:
        try:
            batch = trainer.train(env_steps=min(ctx.cfg.ppo.train_batch_size, budget - steps))
        except Exception as exc:
            exc.add_note(f"the lap had sampled {steps} of its {budget} env steps (self_play.iterations x "
                         "ppo.train_batch_size)")
            raise
        for m in batch:
            history.append(m)
            steps += int(m["env_steps_this_iter"])
            if m["env_steps_this_iter"] <= 0:
                ctx.say(f"self_play: iteration {len(history)} sampled nothing ({int(m.get('healthy_runners', 0))} "
                        f"runner(s) in service, {int(m.get('runner_restarts', 0))} restart(s) so far); "
                        f"{steps}/{budget} steps")
                continue
            ctx.say(f"self_play: iteration {len(history)}, {steps}/{budget} steps, "
                    f"return {m['episode_return_mean']:.1f}, success {m.get('success_rate', float('nan')):.2f}")
        if not history or history[-1]["env_steps_this_iter"] <= 0:
            break                                   # nothing sampled: reported below, never looped on
    return history


def _carry_policy(ctx: LapContext, trainer) -> dict:
    """Lap L > 0 starts from lap L-1's trainer checkpoint, restored and verified on every runner."""
    out = {"restored_from": None}
    if ctx.lap > 0:
        previous = ctx.policy_path(ctx.lap - 1, trainer=True)
        if not previous.exists():
            raise LapFailed(f"lap {ctx.lap} must start from lap {ctx.lap - 1}'s policy, but {previous} is missing")
        trainer.restore(str(previous))              # checks the checkpoint's digests, syncs and verifies runners
        out["restored_from"] = str(previous)
    out["start_digest"] = trainer.weights_digest()
    out["runner_digests"] = [r["digest"] for r in trainer.runner_digests()]
    if any(d != out["start_digest"] for d in out["runner_digests"]):
        raise LapFailed(f"EnvRunner weights {out['runner_digests']} differ from the learner's {out['start_digest']}")
    return out


# -- reality ------------------------------------------------------------------------------------
REALITY_OFFSET = 500_000           # per-lap reality episodes: lap * 1e6 + this (seed episodes start at 0)


def reality(ctx: LapContext) -> dict:
    """Spend the lap's reality budget with the lap's policy; the transitions train the world model too."""
    from policies.loading import load_policy
    from simulators.reality import EPISODE_ID_STRIDE

    cfg = ctx.cfg
    policy = load_policy(ctx.policy_path(ctx.lap))
    data = ctx.reality().collect(policy, n_steps=cfg.reality.steps_per_lap, n_envs=cfg.reality.seed_envs,
                                 seed=cfg.seed + 7919 * (ctx.lap + 1), lap=ctx.lap,
                                 episode_offset=ctx.lap * EPISODE_ID_STRIDE + REALITY_OFFSET)
    entry = ctx.store.add(ctx.lap, "reality", data)
    ctx.say(f"reality: {len(data)} transitions with the lap's policy ({entry.successes}/{entry.episodes} successes)")
    return {"data/reality_transitions": len(data), "reality/lap_success_rate": entry.successes / max(entry.episodes, 1)}


# -- select -------------------------------------------------------------------------------------
def select(ctx: LapContext) -> dict:
    """Choose the lap's successful trajectories from the server's recordings and store them."""
    cfg = ctx.cfg
    raw = ctx.store.read_raw(ctx.lap)
    if raw is None or len(raw) == 0:
        raise LapFailed(f"no self-play recordings in {ctx.store.lap_dir(ctx.lap) / 'raw'}")
    chosen, stats = select_episodes(raw, cfg.selection, cfg.simulator.horizon)
    if chosen is not None:
        ctx.store.add(ctx.lap, "selected", chosen, stats)
    rejected = ", ".join(f"{k.split('/')[1]} {v}" for k, v in stats.items() if k.startswith("rejected/") and v)
    ctx.say(f"select: {stats['selected_episodes']}/{stats['episodes']} episodes selected"
            + (f" (rejected: {rejected})" if rejected else ""))
    out = {"data/selected_trajectories": stats["selected_episodes"], "data/self_play_transitions": len(raw),
           **{f"selection/{k}": v for k, v in stats.items()}}
    out.update(_grade_means(raw, cfg.simulator.horizon))
    out.update(guard(ctx, raw))
    return out


def guard(ctx: LapContext, raw) -> dict:
    """Replay self-play in the simulator's engine; flag (and optionally learn from) a world model exploited."""
    from flywheel.guard import exploitation_gap
    from simulators.physics import make_engine

    cfg = ctx.cfg
    engine = make_engine(cfg.engine.name, cfg.task, vars(cfg.engine.params))
    report = exploitation_gap(raw, ctx.reality_task(), engine, cfg.guard.max_episodes, cfg.guard.window)
    gap = report["return_gap"]
    flagged = bool(np.isfinite(gap) and gap > cfg.guard.threshold)
    replayed = 0
    if flagged:
        ctx.say(f"WARNING model exploitation: self-play earned {gap:.3f} more task reward per step than the engine "
                f"gives for the same actions ({report['episodes']} episodes replayed)")
        if cfg.guard.replay_on_flag:
            ctx.store.add(ctx.lap, "replay", report["replay"])
            replayed = len(report["replay"])
            ctx.say(f"guard: {replayed} engine-replayed transitions go to the world model's training data "
                    "(guard.replay_on_flag)")
    return {"exploitation/return_gap": gap, "exploitation/flagged": float(flagged),
            "exploitation/episodes": float(report["episodes"]), "data/replay_transitions": float(replayed)}


def _grade_means(raw, horizon: int) -> dict:
    """Mean per-term grades over the lap's self-play (imagination/physics over the windows that closed)."""
    closed = (raw.steps.astype(np.int64) + 1) % horizon == 0
    out = {}
    for key in ("task", "imagination", "physics", "total"):
        col = raw.rewards.get(key)
        rows = closed if key in ("imagination", "physics") and closed.any() else slice(None)
        out[f"reward/{key}"] = float(np.nanmean(col[rows])) if col is not None else np.nan
    return out


# -- retrain ------------------------------------------------------------------------------------
def retrain(ctx: LapContext, parts: LapParts) -> dict:
    """A new world-model version: warm-started from the last one, fitted on seed + selected + reality data.

    With ``retrain=false`` (the ablation) the lap keeps the previous world model unchanged.
    """
    import shutil

    data = ctx.store.training_data(ctx.lap)
    if not ctx.cfg.retrain:
        shutil.copyfile(ctx.wm_path(ctx.lap - 1), ctx.wm_path(ctx.lap))
        ctx.say(f"retrain: off (retrain=false); the world model stays {ctx.wm_path(ctx.lap - 1).name}")
        return {"data/total_transitions": len(data)}
    wm, fit = parts.fit_world_model(ctx, data, ctx.wm_path(ctx.lap - 1))
    wm.save(ctx.wm_path(ctx.lap))
    ctx.say(f"retrain: {len(data)} transitions, world model {wm.version}")
    return {"data/total_transitions": len(data), **{f"world_model/fit_{k}": v for k, v in scalars(fit).items()}}


# -- log ----------------------------------------------------------------------------------------
def log(ctx: LapContext, rec: LapRecord) -> dict:
    """Every metric with ``step=lap``, the report PNGs and the lap's checkpoints as MLflow artifacts."""
    from flywheel.report import write_run_report

    t0 = time.time()
    rec.metrics["lap/seconds"] = sum(v for k, v in rec.metrics.items() if k.startswith("time/"))
    rec.metrics.update(lap_costs(ctx, rec.metrics))
    rec.logged = True
    rec.save(ctx.record_path)
    files = write_run_report(ctx.run_dir)
    rec.metrics["time/log"] = time.time() - t0
    n = ctx.tracker.log_metrics(rec.metrics, step=ctx.lap)
    for f in files:
        ctx.tracker.log_artifact(f, f"report/lap_{ctx.lap:03d}")
    for f in (ctx.wm_path(ctx.lap), ctx.policy_path(ctx.lap), ctx.wm_path(None) if ctx.lap == 0 else None):
        if f is not None:
            ctx.tracker.log_artifact(f, f"checkpoints/lap_{ctx.lap:03d}")
    ctx.tracker.log_artifact(ctx.run_dir / "config.yaml", "config")
    replaced = f" ({ctx.tracker.replaced} over other values an earlier attempt logged)" if ctx.tracker.replaced else ""
    ctx.say(f"log: {n} metrics at step {ctx.lap}{replaced}; lap took {rec.metrics['lap/seconds']:.0f} s")
    return {"time/log": rec.metrics["time/log"]}


def lap_costs(ctx: LapContext, m: dict) -> dict:
    """What a useful trajectory cost this lap, the reality transitions spent so far, and the sim-to-real gap."""
    selected = m.get("data/selected_trajectories", 0)
    spent = m.get("data/seed_transitions", ctx.cfg.reality.seed_steps) if ctx.lap == 0 else 0   # whole episodes
    spent += m.get("data/reality_transitions", 0)
    previous = previous_metrics(ctx)
    sim, real = m.get("self_play/success_rate", np.nan), m.get("capability/success_rate", np.nan)
    gap = sim - real if np.isfinite(sim) and np.isfinite(real) else np.nan
    flagged = bool(np.isfinite(gap) and gap > ctx.cfg.reality.gap_warning)
    if flagged:
        ctx.say(f"WARNING sim-to-real gap {gap:.2f}: success {sim:.2f} in the simulator vs {real:.2f} in reality")
    return {"cost/seconds_per_selected": m["lap/seconds"] / selected if selected else np.nan,
            "cost/steps_per_selected": m.get("self_play/env_steps", np.nan) / selected if selected else np.nan,
            "reality/transitions_total": previous.get("reality/transitions_total", 0.0) + spent,
            "reality/eval_transitions": float(ctx.cfg.reality.eval_episodes * ctx.reality_task().episode_length),
            "gap/sim_minus_reality_success": gap, "gap/flagged": float(flagged)}


def previous_metrics(ctx: LapContext) -> dict:
    """The previous lap's recorded metrics (empty in lap 0)."""
    if ctx.lap == 0:
        return {}
    return LapRecord.load(ctx.run_dir / "laps" / f"lap_{ctx.lap - 1:03d}" / "metrics.json", ctx.lap - 1).metrics


def scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
