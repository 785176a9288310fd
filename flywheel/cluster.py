"""Where a lap's pieces run on a Ray cluster, and what is checked before anything starts there.

    preflight(cfg)                          # every node: same code, the servers' token (once per run)
    nodes = server_nodes(cfg)               # one Ray node id per simulator server
    configs = [server_config(cfg)] ...      # bind host and token file filled in
    placements = stage(nodes, wm_path)      # servers away from the driver record on their own disk

Cluster mode is ``ray.address`` set or ``preset=cluster``: servers then listen beyond loopback
(``0.0.0.0`` unless ``service.host`` names an interface) and report their node's IP, so they need a
token. ``service.placement`` puts ``self_play.num_servers`` servers spread over the nodes that can host
one (``spread``) or ``service.servers_per_node`` on each of them (``per_node``); a node can host one when it
has ``service.num_gpus`` GPUs. A server on the driver's node records straight into the run directory;
one on any other node records into a staging directory on its own disk, and its shards travel back to
the driver through Ray when it stops (``services.server_actor.collect_recordings``). Nothing of a lap
needs a shared filesystem: the world model reaches remote servers as bytes, world-model fits return
their checkpoints as bytes, and everything else runs on the driver.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.layers import ConfigError

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig
    from services.config import ServerConfig
    from services.server_actor import Placement

CLUSTER_PRESET = "cluster"
PLACEMENTS = ("spread", "per_node")
WIDE_HOST = "0.0.0.0"
PACKAGES = ("flywheel", "services", "policies", "simulators", "rewards")
_SERVERS: dict[str, dict] = {}      # address -> {"node_id", "pid"} of the servers this driver started


class ClusterError(RuntimeError):
    """A node cannot take part in the run: names the node and what it lacks."""


@dataclass(frozen=True)
class Node:
    """An alive Ray node: its id, IP and total resources."""

    node_id: str
    ip: str
    resources: dict


# -- where servers listen and what they need ------------------------------------------------------
def cluster_mode(cfg: FlywheelConfig) -> bool:
    """A run on a Ray cluster: ``ray.address`` is set or ``preset=cluster``."""
    return bool(cfg.ray.address) or cfg.preset == CLUSTER_PRESET


def bind_host(cfg: FlywheelConfig) -> str:
    """``service.host``; in cluster mode a loopback host becomes ``0.0.0.0`` (every node must reach the servers)."""
    from services.auth import is_loopback

    host = cfg.service.host
    return WIDE_HOST if cluster_mode(cfg) and is_loopback(host) else host


def token_file(cfg: FlywheelConfig) -> str | None:
    """The token file servers and runners read (the same path on every node): ``service.token_file``, else
    ``$FLYWHEEL_TOKEN_FILE`` of the driver; None leaves each process to its own environment."""
    path = cfg.service.token_file or os.environ.get("FLYWHEEL_TOKEN_FILE") or None
    return os.path.expanduser(path) if path else None


def tls_root_cert(cfg: FlywheelConfig) -> str | None:
    """The CA runners trust for TLS servers: ``service.tls_root_cert``, else the (self-signed) ``service.tls_cert_file``."""
    path = cfg.service.tls_root_cert or cfg.service.tls_cert_file or None
    return os.path.expanduser(path) if path else None


def server_config(cfg: FlywheelConfig) -> ServerConfig:
    """The ``service`` section as a plain ``ServerConfig`` with the bind host and token file filled in."""
    from services.config import ServerConfig

    base = ServerConfig(**{f.name: getattr(cfg.service, f.name) for f in fields(ServerConfig)})
    return replace(base, host=bind_host(cfg), token_file=token_file(cfg))


def driver_token_digest(cfg: FlywheelConfig) -> str | None:
    """sha256 of the token the servers will require; a ``ConfigError`` when they listen beyond loopback without one."""
    from services.auth import is_loopback, load_token

    host = bind_host(cfg)
    token = load_token(token_file(cfg))
    if token is None and not is_loopback(host):
        why = "cluster mode: ray.address or preset=cluster" if host != cfg.service.host else f"service.host={host}"
        raise ConfigError(f"config key 'service.token_file' is not set, and neither $FLYWHEEL_TOKEN_FILE nor "
                          f"$FLYWHEEL_TOKEN is, but the simulator servers listen on {host} ({why}), so they need a "
                          f"token; allowed: a file holding the token at the same path on every node (the cluster "
                          f"launcher's file_mounts copy ~/.flywheel/token, see configs/cluster/ray-cluster.yaml)")
    return _digest(token) if token else None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- nodes and placement -------------------------------------------------------------------------
def alive_nodes() -> list[Node]:
    """Ray's alive nodes, in the order Ray lists them."""
    import ray

    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n.get("Resources") or {})) for n in ray.nodes()
            if n.get("Alive")]


def plan_servers(placement: str, count: int, per_node: int, num_gpus: float, nodes: list[Node],
                 driver: str = "", num_cpus: float = 0.0) -> list[str]:
    """One node id per server: ``count`` spread round-robin (``spread``) or ``per_node`` on each node (``per_node``),
    over the nodes with ``num_gpus`` GPUs and ``num_cpus`` CPUs (all nodes when 0), the driver's node first."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"config key 'service.placement' is {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    fit = [n for n in nodes if num_gpus <= 0 or float(n.resources.get("GPU", 0)) >= num_gpus]
    if not fit:
        have = ", ".join(f"{n.ip} ({n.node_id[:8]}): {n.resources.get('GPU', 0):g} GPU" for n in nodes) or "none"
        raise ClusterError(f"no Ray node has the {num_gpus:g} GPU(s) a simulator server asks for (service.num_gpus); "
                           f"alive nodes: {have}; allowed: service.num_gpus=0, or add GPU nodes")
    fit = [n for n in fit if num_cpus <= 0 or float(n.resources.get("CPU", 0)) >= num_cpus]
    if not fit:
        have = ", ".join(f"{n.ip} ({n.node_id[:8]}): {n.resources.get('CPU', 0):g} CPU" for n in nodes) or "none"
        raise ClusterError(f"no Ray node{' with the GPUs' if num_gpus > 0 else ''} has the {num_cpus:g} CPU(s) a simulator "
                           f"server asks for (service.num_cpus); alive nodes: {have}; allowed: a smaller "
                           f"service.num_cpus (0: the server reserves none)")
    fit.sort(key=lambda n: n.node_id != driver)
    if placement == "per_node":
        return [n.node_id for n in fit for _ in range(per_node)]
    return [fit[i % len(fit)].node_id for i in range(count)]


def server_nodes(cfg: FlywheelConfig) -> list[str]:
    """The Ray node of each simulator server this lap starts (``plan_servers`` over the alive nodes)."""
    import ray

    svc = cfg.service
    return plan_servers(svc.placement, cfg.self_play.num_servers, svc.servers_per_node, float(svc.num_gpus),
                        alive_nodes(), ray.get_runtime_context().get_node_id(), float(svc.num_cpus))


def check_ports(port: int, nodes: list[str]) -> None:
    """A fixed ``service.port`` allows one server per node; ``ConfigError`` when the plan puts more on one."""
    crowded = sorted({n for n in nodes if nodes.count(n) > 1})
    if port and crowded:
        raise ConfigError(f"config key 'service.port' is {port}, but {nodes.count(crowded[0])} servers go to node "
                          f"{crowded[0][:8]} and cannot all bind it; allowed: service.port=0 (a free port each), or "
                          f"one server per node (service.servers_per_node=1, or self_play.num_servers <= the nodes)")


def stage(nodes: list[str], world_model: Path | None) -> list[Placement]:
    """Each server's ``Placement``: pinned to its node; away from the driver's node it records into a fresh
    staging directory there and gets the world model as bytes (one object for all of them)."""
    import ray

    from services.server_actor import Placement

    here, attempt = ray.get_runtime_context().get_node_id(), uuid.uuid4().hex[:12]
    blob = None
    out = []
    for i, node in enumerate(nodes):
        if node == here:
            out.append(Placement(node_id=node))
            continue
        if blob is None and world_model is not None and Path(world_model).is_file():
            blob = ray.put(Path(world_model).read_bytes())
        out.append(Placement(node_id=node, staging=f"{attempt}-{i}", world_model=blob))
    return out


def remember_servers(addresses: list[str], nodes: list[str], pids: list[int]) -> None:
    """Note where each server runs, for the runners' locality and the placement record."""
    _SERVERS.update({a: {"node_id": n, "pid": int(p)} for a, n, p in zip(addresses, nodes, pids)})


def nodes_of(addresses: list[str]) -> list[str]:
    """The Ray node of each address ("" where unknown)."""
    return [_SERVERS.get(a, {}).get("node_id", "") for a in addresses]


def placement_record(addresses: list[str], probes: list[dict]) -> dict:
    """What ran where this lap: each server (address, node, pid) and each runner (index, node, pid, server)."""
    servers = [{"address": a, **_SERVERS.get(a, {"node_id": "", "pid": 0})} for a in addresses]
    where = {s["address"]: s["node_id"] for s in servers}
    runners = [{"worker_index": p.get("worker_index"), "pid": p.get("pid"), "node_id": p.get("node_id", ""),
                "address": p.get("address"),
                "local": bool(p.get("node_id")) and where.get(p.get("address")) == p.get("node_id")}
               for p in sorted(probes, key=lambda p: p.get("worker_index", 0))]
    return {"servers": servers, "runners": runners}


# -- checks on every node ------------------------------------------------------------------------
def code_digest() -> str:
    """sha256 over the project's Python sources (path and content), wherever they are installed."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            h.update(f"{pkg}:missing".encode())
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                h.update(f"{pkg}/{path.relative_to(root).as_posix()}".encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def node_facts(token_path: str | None) -> dict:
    """This node's code digest and the digest of the token a server here would require (run on each node)."""
    import ray

    from services.auth import load_token

    facts = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
             "code": code_digest(), "token": None, "token_error": ""}
    try:
        token = load_token(token_path)
        facts["token"] = _digest(token) if token else None
    except ValueError as exc:
        facts["token_error"] = str(exc)
    return facts


def check_nodes(facts: list[dict], code: str, token: str | None, token_path: str | None) -> list[str]:
    """The problems of each node against the driver's code digest and token digest (empty: all fine)."""
    where = f"the token file {token_path}" if token_path else "$FLYWHEEL_TOKEN_FILE / $FLYWHEEL_TOKEN"
    problems = []
    for f in facts:
        name = f"node {f['ip']} ({f['node_id'][:8]})"
        if f.get("error"):
            problems.append(f"{name} cannot run the flywheel's code: {f['error']}; install the project there "
                            f"(configs/cluster/ray-cluster.yaml's setup_commands)")
            continue
        if f["code"] != code:
            problems.append(f"{name} runs other flywheel sources than the driver (digest {f['code'][:12]} vs "
                            f"{code[:12]}); check out the same commit on every node")
        if token and f["token"] != token:
            got = f["token_error"] or ("no token" if f["token"] is None else "a different token")
            problems.append(f"{name} does not have the servers' token from {where}: {got}")
    return problems


def preflight(cfg: FlywheelConfig, timeout_s: float = 300.0) -> list[dict]:
    """Before the first lap on a cluster: the token (on the driver and every node) and the same code everywhere.

    Runs ``node_facts`` as a task pinned to each alive node; raises ``ConfigError`` (no token) or
    ``ClusterError`` naming each node that cannot take part. Returns the facts.
    """
    import ray

    from services.server_actor import _pinned

    token = driver_token_digest(cfg)
    path = token_file(cfg)
    task = ray.remote(node_facts)
    nodes = alive_nodes()
    refs = [task.options(num_cpus=0, scheduling_strategy=_pinned(n.node_id), max_retries=0).remote(path) for n in nodes]
    facts = []
    for n, ref in zip(nodes, refs):
        try:
            facts.append(ray.get(ref, timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - reported per node
            text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            facts.append({"node_id": n.node_id, "ip": n.ip, "error": text})
    problems = check_nodes(facts, code_digest(), token, path)
    if problems:
        raise ClusterError("the Ray cluster cannot run this flywheel: " + "; ".join(problems))
    return facts
