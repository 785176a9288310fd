"""The real parts of a lap: Ray, simulator-server actors, the agent (RLlib PPO or the planner), the torch world model, reality.

``real_parts()`` is what ``flywheel run`` uses; tests hand ``Orchestrator`` a ``LapParts`` of their own
(fakes for speed, or these real ones).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from flywheel.config import FlywheelConfig
from flywheel.lap import EPISODE_STRIDE, LapContext, LapParts, Served
from simulators.dataset import atomic_write


def init_ray(cfg: FlywheelConfig) -> None:
    """``ray.init`` once per process: the configured cluster, or this machine's cores."""
    from policies.rllib_adapter import init_ray as init

    init(cfg.ray.num_cpus, cfg.ray.address, cfg.ray.include_dashboard)


def start_ray(cfg: FlywheelConfig) -> None:
    """Once per run: ``init_ray``, then on a cluster (or more than one node) the checks of every node
    (``flywheel.cluster.preflight``: the servers' token, the same code everywhere)."""
    from flywheel import cluster

    init_ray(cfg)
    if cluster.cluster_mode(cfg) or len(cluster.alive_nodes()) > 1:
        cluster.preflight(cfg)
    else:
        check_local_cpus(cfg)


def check_local_cpus(cfg: FlywheelConfig) -> None:
    """``ConfigError`` when self-play asks this machine's own Ray for more CPUs than it has: Ray would leave the
    policy workers pending for good (on a cluster, an autoscaler may add nodes: not checked there)."""
    import ray

    from flywheel.layers import ConfigError

    have = float(ray.cluster_resources().get("CPU", 0.0))
    if cfg.agent.kind == "planner":
        workers, per, names = cfg.agent.num_workers, 1.0, "agent.num_workers"
    else:
        workers, per, names = cfg.ppo.num_env_runners, float(cfg.ppo.num_cpus_per_runner), \
            "ppo.num_env_runners or ppo.num_cpus_per_runner"
    svc = cfg.service
    servers = svc.servers_per_node if svc.placement == "per_node" else cfg.self_play.num_servers
    need = workers * per + servers * float(svc.num_cpus)
    if need > have:
        raise ConfigError(f"self-play needs {need:g} of this machine's Ray CPUs ({workers} policy worker(s) x {per:g} + "
                          f"{servers} server(s) x {float(svc.num_cpus):g}, service.num_cpus) but its local Ray has "
                          f"{have:g}; Ray would leave workers waiting for good; allowed: a smaller {names}, or "
                          f"ray.num_cpus >= {need:g} (more than the cores shares them)")


@contextlib.contextmanager
def ray_servers(ctx: LapContext) -> Iterator[Served]:
    """Simulator servers as Ray actors serving the latest world model and recording into the store.

    They are placed by ``flywheel.cluster`` (``service.placement``); a server on another node than the
    driver records on its own disk and its shards are copied into the store when it stops.
    """
    import ray

    from flywheel import cluster
    from services.server_actor import start_server_actors, stop_server_actors
    from simulators.world_model.checkpoint import read_payload

    cfg = ctx.cfg
    read_payload(ctx.wm_path(ctx.lap - 1))          # a bad checkpoint is named here, not in a server actor's death
    init_ray(cfg)
    nodes = cluster.server_nodes(cfg)
    raw, wm, stride = ctx.store.raw_dir(ctx.lap), ctx.wm_path(ctx.lap - 1), EPISODE_STRIDE // max(16, len(nodes))
    base = cluster.server_config(cfg)
    cluster.check_ports(base.port, nodes)
    configs = [replace(base, task=cfg.task, engine=cfg.engine.name, engine_params=vars(cfg.engine.params),
                       world_model_path=str(wm), trajectory_dir=str(raw), lap=ctx.lap,
                       episode_offset=(ctx.lap + 1) * EPISODE_STRIDE + i * stride, seed=cfg.seed, reward=cfg.rewards)
               for i in range(len(nodes))]
    placements = cluster.stage(nodes, wm)
    actors, addresses = start_server_actors(configs, placements)
    collect = [str(raw) if p.staging else None for p in placements]
    served = Served(list(addresses), lost=servers_watch(actors, addresses, base.max_restarts))
    stopped = False
    try:
        cluster.remember_servers(addresses, nodes, ray.get([a.pid.remote() for a in actors]))
        yield served
        stopped = True
        reports = stop_server_actors(actors, collect=collect)   # raises RecordingError if a shard was lost
        served.report = {"served": sum(r["transitions_served"] for r in reports),
                         "stored": sum(r["transitions_stored"] for r in reports),
                         "shards": sum(r["shards"] for r in reports),
                         "collected": sum(r.get("collected", 0) for r in reports),
                         "server_restarts": sum(max(0, r["incarnation"]) for r in reports),
                         "torch_threads": min((r["torch_threads"] for r in reports if "torch_threads" in r), default=0),
                         "servers_lost": [{"address": a, "error": r["stop_error"].strip().splitlines()[0][:300]}
                                          for a, r in zip(addresses, reports) if r.get("stop_error")]}
        for lost in served.report["servers_lost"]:       # its node died: what it had not written is gone
            ctx.say(f"serve: server {lost['address']} was lost before it could stop ({lost['error']}); "
                    "transitions it had not written are not in the store")
        if any(collect):
            remote = [a for a, c in zip(addresses, collect) if c]
            gone = {lost["address"] for lost in served.report["servers_lost"]}
            ctx.say(f"serve: {served.report['collected']} shard(s) copied into the store from "
                    f"{sum(1 for a in remote if a not in gone)} of {len(remote)} server(s) on other nodes")
    finally:
        if not stopped:
            with contextlib.suppress(Exception):        # the body's error is the one to report
                stop_server_actors(actors)


def servers_watch(actors: list, addresses: list[str], max_restarts: int, every_s: float = 2.0):
    """A check (at most one probe round per ``every_s``) naming the servers when every one is dead for good (its
    restarts spent): the runners would wait on them for minutes; with one alive, they fall back to it."""
    import ray

    state = {"at": 0.0, "reason": None}

    def lost() -> str | None:
        if state["reason"] or time.monotonic() - state["at"] < every_s:
            return state["reason"]
        state["at"] = time.monotonic()
        dead = []
        for actor, address in zip(actors, addresses):
            try:
                ray.get(actor.address.remote(), timeout=10)
            except ray.exceptions.ActorDiedError:
                dead.append(address)
            except Exception:  # noqa: BLE001 - restarting, busy or slow: not gone for good
                return None
        if len(dead) == len(actors):
            state["reason"] = (f"every simulator server is gone for good ({', '.join(dead)}: died after "
                               f"{max_restarts} restart(s), service.max_restarts); self-play cannot go on")
        return state["reason"]

    return lost


def env_config(ctx: LapContext, addresses: list[str]):
    """The policy workers' ``EnvConfig``: the servers, their nodes (for locality), token file and TLS root."""
    from flywheel import cluster
    from policies.config import EnvConfig

    cfg = ctx.cfg
    return EnvConfig(task=cfg.task, addresses=list(addresses), fidelity=cfg.simulator.fidelity, mode=cfg.simulator.mode,
                     horizon=cfg.simulator.horizon, reward_weights=vars(cfg.rewards.weights), seed=cfg.seed + ctx.lap,
                     lanes=cfg.self_play.lanes,
                     server_nodes=cluster.nodes_of(list(addresses)), token_file=cluster.token_file(cfg),
                     tls_root_cert=cluster.tls_root_cert(cfg))


def rllib_trainer(ctx: LapContext, addresses: list[str]):
    """RLlib PPO whose EnvRunners step the served simulator; where each runner and server ran goes to
    ``laps/lap_NNN/placement.json``."""
    from flywheel import cluster
    from flywheel.lap import write_json
    from policies.rllib_adapter import PolicyTrainer

    cfg = ctx.cfg
    trainer = PolicyTrainer(replace(cfg.ppo, seed=cfg.seed), env_config(ctx, addresses))
    try:
        record = cluster.placement_record(list(addresses), trainer.runner_probe())
        write_json(ctx.lap_dir / "placement.json", record)
    except BaseException:
        trainer.stop()
        raise
    local = sum(r["local"] for r in record["runners"])
    ctx.say(f"placement: {len(record['runners'])} runner(s), {local} on their server's node; servers on "
            f"{len({s['node_id'] for s in record['servers']})} node(s)")
    return trainer


def planner_trainer(ctx: LapContext, addresses: list[str]):
    """The planning agent (``agent.kind=planner``): Ray workers planning with the world model the servers serve."""
    from policies.planner import PlannerConfig
    from policies.planner_agent import PlannerTrainer

    cfg = ctx.cfg
    env = env_config(ctx, addresses)
    return PlannerTrainer(PlannerConfig.from_object(cfg.agent), env, cfg.simulator.num_envs, ctx.wm_path(ctx.lap - 1))


def agent_trainer(ctx: LapContext, addresses: list[str]):
    """The trainer of the configured agent: ``agent.kind`` ppo (RLlib PPO) or planner."""
    return (planner_trainer if ctx.cfg.agent.kind == "planner" else rllib_trainer)(ctx, addresses)


def fit_world_model(ctx: LapContext, data, init: Path | None):
    """A world model fitted on ``data``: new (``init=None``) or warm-started from checkpoint ``init``.

    With Ray running, the fit is a Ray task asking for ``world_model.num_gpus`` (0 = CPU), so it runs on
    any node that has them; the checkpoints travel as bytes, so no node needs the driver's disk.
    Without Ray (a library user, a test) it fits in this process. The architecture comes from the
    checkpoint (checked against the run's config); the fitting settings always from the run's config.
    """
    import ray

    cfg = replace(ctx.cfg.world_model, seed=ctx.cfg.seed)
    if init is not None:
        from simulators.world_model.checkpoint import read_payload

        read_payload(init)                           # named here (missing, truncated, corrupt), before any Ray task
    init_bytes = Path(init).read_bytes() if init is not None else None
    args = (ctx.cfg.task, data, cfg, init_bytes, vars(ctx.cfg.engine.params))
    if not ray.is_initialized():
        wm, metrics = _fit(*args)
        return wm, metrics
    task = ray.remote(_fit_remote).options(num_cpus=1, num_gpus=cfg.num_gpus or None, name="fit_world_model",
                                           max_retries=1)
    blob, metrics = ray.get(task.remote(*args))
    return _from_bytes(blob, ctx.cfg.task, cfg), metrics          # on the driver's device, as the run's config says


def _fit(task: str, data, cfg, init_bytes: bytes | None, engine_params: dict | None = None):
    from simulators.world_model import WorldModel

    if cfg.num_gpus > 0:
        import torch

        cfg = replace(cfg, device="cuda" if torch.cuda.is_available() else cfg.device)
    if init_bytes is None:
        wm = WorldModel(task, data.states.shape[1], data.actions.shape[1], cfg, base_params=engine_params)
    else:
        wm = _from_bytes(init_bytes, task, cfg)
    return wm, wm.fit(data)


def _fit_remote(task: str, data, cfg, init_bytes: bytes | None, engine_params: dict | None = None
                ) -> tuple[bytes, dict]:
    """The Ray task: fit, and send the checkpoint back as bytes (its digest is checked when loaded).

    Ray sets ``OMP_NUM_THREADS`` to the task's one CPU (so torch would fit on one thread, or on whatever a reused
    worker was started with): ``world_model.num_threads=0`` is made explicit here as every CPU of the node, as
    it means outside Ray (the run's other work waits on the fit)."""
    import tempfile

    import ray

    from simulators.cpus import usable_cpus

    if not cfg.num_threads:
        cfg = replace(cfg, num_threads=usable_cpus())
    wm, metrics = _fit(task, data, cfg, init_bytes, engine_params)
    with tempfile.TemporaryDirectory() as tmp:
        wm.save(Path(tmp) / "wm.pt")
        blob = (Path(tmp) / "wm.pt").read_bytes()
    return blob, {**metrics, "node": ray.get_runtime_context().get_node_id()}


def _from_bytes(blob: bytes, task: str, cfg=None):
    import tempfile

    from simulators.world_model import WorldModel

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "wm.pt").write_bytes(blob)
        return WorldModel.load(Path(tmp) / "wm.pt", task=task, config=cfg)


def evaluate_in_reality(ctx: LapContext) -> dict:
    """Capability in reality: the policy's success and return; the world model's errors on reality data."""
    import rewards
    from policies.evaluate import evaluate as evaluate_policy
    from policies.loading import load_policy
    from simulators.dataset import SOURCE_REALITY
    from simulators.physics import make_engine
    from simulators.reality import episodes_to_dataset
    from simulators.world_model import WorldModel, one_step_error, open_loop_error

    cfg, H = ctx.cfg, ctx.cfg.simulator.horizon
    reality = ctx.reality()
    policy = load_policy(ctx.policy_path(ctx.lap))
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
    # physics feedback comes from the simulator's own engine: reality is only observed, never stepped from
    # imagined states (a real system could not offer that)
    engine = make_engine(cfg.engine.name, cfg.task, vars(cfg.engine.params))
    report = rewards.physics_violation(engine, starts.reshape(B * k, S), acts.reshape(B * k, H, -1), imagined,
                                       cfg.rewards, scale=wm.state_scale)
    real0 = ep.states[0, : k * H + 1]
    imag0 = np.concatenate([ep.states[0, :1], imagined.reshape(B, k * H, S)[0]])
    ctx.lap_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(ctx.lap_dir / "trajectory.npz", lambda f: np.savez(f, real=real0, imagined=imag0, horizon=H,
                                                                     dt=engine.spec.control_dt,
                                                                     labels=np.array(engine.spec.state_names)))
    ctx.say(f"evaluate: success {ev['success_rate']:.2f}, return {ev['return_mean']:.1f} over {ev['episodes']} "
            f"reality episodes")
    return {"capability/success_rate": ev["success_rate"], "capability/return": ev["return_mean"],
            "capability/return_std": ev["return_std"],
            "capability/goal_time_fraction": float(np.mean(ep.good)),
            "world_model/one_step_error": one_step_error(wm, data),
            "world_model/open_loop_error": open_loop_error(wm, data, horizon=H)["open_loop_mse"],
            "imagination/accuracy": float(np.mean(accuracy)),
            "physics/violation_rate": float(np.mean(report.violates))}


def real_parts() -> LapParts:
    """Ray actors, the configured agent (RLlib PPO or the planner), the torch world model and reality."""
    return LapParts(start=start_ray, serve=ray_servers, trainer=agent_trainer, fit_world_model=fit_world_model,
                    evaluate=evaluate_in_reality)
