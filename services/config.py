"""``ServerConfig``: everything a simulator server needs (a plain dataclass, composable into OmegaConf)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rewards import RewardConfig


@dataclass
class ServerConfig:
    """Where to listen, what to simulate, where to record, and the limits that protect the server.

    The token itself is never a field (a saved config must not hold it): it is read from ``token_file``,
    else from the file named by ``$FLYWHEEL_TOKEN_FILE``, else from ``$FLYWHEEL_TOKEN`` (``services.auth``).
    A server bound beyond loopback refuses to start without one.
    """

    host: str = "127.0.0.1"
    port: int = 0                                   # 0 picks a free port (reported by the server)
    task: str = "pendulum"                          # task of the world model built when none is given
    engine: str = "auto"                            # physics backend correcting the world model
    engine_params: dict[str, float] = field(default_factory=dict)   # the simulator's physics (sim-to-real gap)
    world_model_path: str | None = None          # checkpoint to serve at start; None = an untrained model
    world_model_dir: str | None = None           # LoadWorldModel's only source: <dir>/<version>.pt
    trajectory_dir: str | None = None            # recorder shards; None = record nothing
    flush_every: int = 20_000                       # ended-episode transitions that trigger a shard write
    flush_seconds: float = 2.0                      # longest an ended episode waits in memory before its write
    lap: int = 0                                    # written into every recorded transition
    episode_offset: int = 0                         # first episode id; sessions take disjoint blocks after it
    max_batch: int = 4096                           # largest B: num_envs, Imagine and Verify batches
    max_horizon: int = 1000                         # largest H: a session's imagination horizon, Imagine, Verify
    max_elements: int = 4_194_304                   # largest B*H*S of one request (and of a session's windows)
    max_message_mb: int = 256                       # gRPC send and receive limit
    workers: int = 8                                # gRPC handler threads (a StreamStep holds one while open)
    coalesce_wait_ms: float = 0.0                   # Step calls of sessions within this wait share one engine and WM call; 0 = off
    torch_threads: int = 0                          # torch intra-op threads in the server; 0 = torch's default
    max_sessions: int = 64
    session_idle_s: float = 600.0                   # the lease: a session without a call for this long is closed
    idle_engines: int = 2                           # closed sessions' engines kept for the next session
    token_file: str | None = None                   # shared secret clients send; else $FLYWHEEL_TOKEN_FILE/_TOKEN
    tls_cert_file: str | None = None                # PEM server certificate (chain): serve over TLS
    tls_key_file: str | None = None                 # PEM private key of tls_cert_file
    tls_client_ca_file: str | None = None           # PEM CA of client certificates: mutual TLS (clients must show one)
    num_gpus: float = 0.0                           # GPUs a server actor asks Ray for (JAX engines use them)
    num_cpus: float = 0.0                           # CPUs a server actor reserves from Ray (0: none; it shares its node's)
    max_restarts: int = 3                           # times Ray restarts a killed server actor (same port)
    seed: int = 0                                   # seed of the untrained world model
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> ServerConfig:
        """Raise ``ValueError`` naming the first out-of-range field and what is allowed."""
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port!r}")
        for name in ("flush_every", "max_batch", "max_horizon", "max_elements", "max_message_mb", "workers",
                     "max_sessions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.max_message_mb) > 2047:
            raise ValueError(f"ServerConfig.max_message_mb must be in [1, 2047] (gRPC's limit is under 2 GiB), "
                             f"got {self.max_message_mb!r}")
        if not 0 <= int(self.episode_offset) <= 2**62:
            raise ValueError(f"ServerConfig.episode_offset must be in [0, 2**62] (episode ids are int64 and each "
                             f"session takes a block above it), got {self.episode_offset!r}")
        for name in ("lap", "episode_offset", "torch_threads", "max_restarts", "idle_engines"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < float(self.flush_seconds) <= 3600:
            raise ValueError(f"ServerConfig.flush_seconds must be in (0, 3600], got {self.flush_seconds!r}")
        if not 0 < float(self.session_idle_s) <= 7 * 86400:
            raise ValueError(f"ServerConfig.session_idle_s must be in (0, 604800] seconds, got {self.session_idle_s!r}")
        if not 0.0 <= float(self.coalesce_wait_ms) <= 100.0:
            raise ValueError(f"ServerConfig.coalesce_wait_ms must be in [0, 100], got {self.coalesce_wait_ms!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("ServerConfig.tls_cert_file and tls_key_file go together: give both (PEM files) or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("ServerConfig.tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file too")
        for name in ("num_gpus", "num_cpus"):
            if not 0 <= float(getattr(self, name)) <= 1024:
                raise ValueError(f"ServerConfig.{name} must be in [0, 1024], got {getattr(self, name)!r}")
        if not self.host or self.host.startswith("[") != self.host.endswith("]") or not re.fullmatch(
                r"\[?[A-Za-z0-9.:%_-]+\]?", self.host):
            raise ValueError(f"ServerConfig.host must be a host name or address (e.g. 127.0.0.1, ::1, [::1], 0.0.0.0), "
                             f"got {self.host!r}")
        return self
