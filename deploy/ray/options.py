"""The Ray Serve app's options: plain data, importable without Ray (the CLI parses its
flags into them before it starts Ray; tests check that without the extra installed)."""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTINGS = ("affine", "round_robin")


@dataclass(frozen=True)
class ReplicaOptions:
    state_dir: str  # the shared adapter directory's root (adapter_dir.py)
    server_args: tuple[str, ...] = ()  # `loramux serve` flags: --model, --threads, --max-loras, ...
    adapter_dirs: tuple[str, ...] = ()  # read-only adapter folders every replica also serves
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the server


@dataclass(frozen=True)
class AppOptions:
    replica: ReplicaOptions
    num_replicas: int = 2
    routing: str = "affine"  # affine | round_robin
    max_adapters_per_replica: int = 256  # Serve's routing table per replica (LRU)
    max_ongoing_requests: int = 64  # per replica; past it Serve tries another replica
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_body_bytes: int = 256 << 20  # the ingress refuses bigger bodies with 413
    base_model: str | None = None  # the served model name (requests naming it are not routed by adapter)
    # Adapter management through the front door: the replicas' own rule (an admin key, or a
    # loopback-only server) applied to the ingress's address, which is what clients reach.
    management_open: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}")
        if self.num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
