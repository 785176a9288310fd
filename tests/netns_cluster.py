"""A Ray cluster of separate hosts on one machine: each node in its own Linux network namespace.

Every node has its own IP address on a private bridge and its own loopback, so an address that only
works on the machine it came from (``127.0.0.1``, a port bound to one node's loopback, the head's IP
handed to a worker) fails here as it would between real hosts. Needs root and iproute2 (``ip netns``).

    with NetnsCluster(tmp_path, workers=2, worker_resources={"num_gpus": 1}) as c:
        c.run(["python", "-m", "flywheel", "run", f"ray.address={c.address}", ...])   # on the head's host
        state = c.ray_state()        # Ray's own tables, read from the head's host

Run as a script (``python tests/netns_cluster.py state ADDRESS``), it prints those tables as JSON.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD_PORT = 6379                    # each namespace has its own ports: the usual one is free in the head's


def available() -> str:
    """Why network namespaces cannot be made here, or ``""`` when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`"
    return ""


class NetnsCluster:
    """Head plus ``workers`` Ray nodes, each in a network namespace of its own, on a bridge ``10.X.Y.0/24``."""

    def __init__(self, workdir: Path, workers: int = 2, worker_resources: dict | None = None):
        tag = f"{os.getpid() % 100000}"
        self.workdir = Path(workdir)
        self.bridge = f"fwb{tag}"
        self.names = [f"fw{tag}n{i}" for i in range(workers + 1)]          # [0] is the head
        net = 10, 200 + os.getpid() % 50, os.getpid() // 50 % 250
        self.ips = [f"{net[0]}.{net[1]}.{net[2]}.{i + 1}" for i in range(workers + 1)]
        self.address = f"{self.ips[0]}:{HEAD_PORT}"
        self.resources = {"num_cpus": 1, **(worker_resources or {})}
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self._made: list[str] = []

    # -- the hosts -----------------------------------------------------------------------------
    def __enter__(self) -> NetnsCluster:
        remove_stale()
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._made.append("bridge")
            self._ip("link", "set", self.bridge, "up")
            for ns, ip in zip(self.names, self.ips):
                self._ip("netns", "add", ns)
                self._made.append(ns)
                self._ip("link", "add", f"{ns}v", "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._ip("link", "set", f"{ns}v", "master", self.bridge, "up")
                self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
            self._ray_start(0, ["--head", f"--port={HEAD_PORT}", "--num-cpus=0", "--include-dashboard=false"])
            for i in range(1, len(self.names)):
                args = [f"--address={self.address}", f"--num-cpus={self.resources['num_cpus']}"]
                if self.resources.get("num_gpus"):
                    args.append(f"--num-gpus={self.resources['num_gpus']}")
                self._ray_start(i, args)
            self._wait_for_nodes()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        """Stop every process in the namespaces (``ray stop`` would stop every Ray on the machine), remove them."""
        _remove([ns for ns in self.names if ns in self._made], self.bridge if "bridge" in self._made else None)
        self._made.clear()

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _ray_start(self, i: int, args: list[str]) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        log = self.workdir / f"ray-start-{i}.log"
        done = self.run([ray, "start", f"--node-ip-address={self.ips[i]}", "--disable-usage-stats", *args],
                        host=i, timeout=180, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"ray start on {self.ips[i]} failed ({done.returncode}): {log.read_text()[-2000:]}")

    def _wait_for_nodes(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = [n for n in self.ray_state()["nodes"] if n["alive"]]
            if len(nodes) == len(self.names):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(nodes)} of {len(self.names)} Ray nodes came up: {nodes}")
            time.sleep(1.0)

    def start_mlflow(self, store: Path, port: int = 5000, timeout_s: float = 120.0) -> None:
        """An MLflow tracking server on the head's host, as the cluster launcher starts one (``store``: its sqlite
        file and artifacts); it stops with the head's host."""
        venv = Path(sys.executable).parent
        subprocess.Popen(["ip", "netns", "exec", self.names[0], str(venv / "mlflow"), "server", "--host", "0.0.0.0",
                          "--port", str(port), "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                          "--artifacts-destination", f"{store}/mlartifacts"], cwd=ROOT, env=self.env,
                         stdout=open(store / "mlflow-server.log", "w"), stderr=subprocess.STDOUT)
        probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=2)"
        deadline = time.monotonic() + timeout_s
        while self.run([sys.executable, "-c", probe], timeout=30).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no MLflow server on the head after {timeout_s:.0f} s: "
                                   f"{(store / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(1.0)

    def kill_host(self, i: int) -> int:
        """SIGKILL every process on host ``i`` (a machine that lost power); returns how many there were."""
        pids = _pids(self.names[i])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    # -- running on a host ---------------------------------------------------------------------
    def run(self, argv: list[str], host: int = 0, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``host`` (0: the head) with the cluster's Ray token, from the project root."""
        kw.setdefault("capture_output", "stdout" not in kw)
        return subprocess.run(["ip", "netns", "exec", self.names[host], *argv], cwd=ROOT, env=self.env,
                              text=True, timeout=timeout, **kw)

    def ray_state(self) -> dict:
        """Ray's nodes (id, IP, alive), actors (class, node, pid, state) and task events (name -> nodes), read on the head."""
        done = self.run([sys.executable, str(Path(__file__).resolve()), "state", self.address], timeout=120)
        if done.returncode:
            raise RuntimeError(f"reading Ray's state failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def remove_stale() -> None:
    """Remove the hosts of a cluster whose test process died without removing them (killed, timed out)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    stale: dict[str, list[str]] = {}
    for name in re.findall(r"^(fw\d+n\d+)", out, flags=re.M):
        tag = re.match(r"fw(\d+)n", name).group(1)
        if not any(int(p) % 100000 == int(tag) for p in os.listdir("/proc") if p.isdigit()):
            stale.setdefault(tag, []).append(name)
    for tag, names in stale.items():
        _remove(names, f"fwb{tag}")


def _remove(names: list[str], bridge: str | None) -> None:
    for ns in names:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in _pids(ns):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while _pids(ns) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _pids(ns):
                break
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if bridge:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def _pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def task_nodes() -> dict[str, tuple[str, str]]:
    """Task id -> (name, node id) of every task Ray's task events place on a node (in a connected driver;
    the events arrive asynchronously)."""
    from ray._private import state as ray_state

    names: dict[str, str] = {}
    where: dict[str, str] = {}
    for event in ray_state.state._get_all_task_events():
        tid = event.task_id.hex()
        if event.task_info.name:
            names[tid] = event.task_info.name
        if event.state_updates.node_id:
            where[tid] = event.state_updates.node_id.hex()
    return {tid: (names.get(tid, "?"), node) for tid, node in where.items()}


def _print_state(address: str) -> None:
    import ray
    from ray._private import state as ray_state

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    nodes = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": bool(n["Alive"]),
              "resources": n.get("Resources", {})} for n in ray.nodes()]
    actors = [{"class": a["ActorClassName"], "node_id": a["Address"]["NodeID"], "ip": a["Address"]["IPAddress"],
               "pid": a["Pid"], "state": a["State"]} for a in ray_state.actors().values()]
    tasks: dict[str, list[str]] = {}
    for name, node in task_nodes().values():
        tasks.setdefault(name, []).append(node)
    jobs = [{"driver_ip": j["DriverIPAddress"], "is_dead": j["IsDead"]} for j in ray_state.jobs()]
    ray.shutdown()
    print(json.dumps({"nodes": nodes, "actors": actors, "tasks": tasks, "jobs": jobs}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "state":
        _print_state(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} state ADDRESS")
