"""`loramux-ray`: N loramux replicas behind Ray Serve, one command.

    loramux-ray --replicas 2 --port 8000 -- --threads 1 --max-loras 8

Flags after `--` (or any flag this command does not know) go to every replica's
`loramux serve`. Without --address it starts a local Ray cluster; with one (or with
RAY_ADDRESS set) it joins that cluster. Keys: LORAMUX_API_KEY / LORAMUX_ADMIN_API_KEY in
the environment reach every replica's server (they are never put on a command line).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from loramux.ray_serve.options import ROUTINGS, AppOptions, ReplicaOptions

APP_NAME = "loramux"
KEY_VARIABLES = ("LORAMUX_API_KEY", "LORAMUX_ADMIN_API_KEY", "LORAMUX_HOME")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loramux-ray", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2, help="loramux replicas (default 2)")
    p.add_argument("--routing", choices=ROUTINGS, default="affine",
                   help="affine: Serve multiplexing by adapter id; round_robin: adapter-blind (a baseline)")
    p.add_argument("--host", default="127.0.0.1", help="the front door's address")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", default=None,
                   help="shared adapter directory root (default: $LORAMUX_HOME/ray); a shared volume on a cluster")
    p.add_argument("--adapter-dir", action="append", default=[], help="read-only adapter folder for every replica")
    p.add_argument("--address", default=None, help="a Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--max-adapters-per-replica", type=int, default=256,
                   help="adapters Serve remembers per replica for routing (least recently used leave first); "
                        "below the number of adapters a replica's CPU tier holds, forgotten adapters move")
    p.add_argument("--max-ongoing-requests", type=int, default=64, help="per replica, before Serve tries another")
    return p


def served_model_name(server_args: list[str]) -> str:
    """The base model's id as the replicas will serve it (loramux's rule: the directory name)."""
    named = _flag(server_args, "--served-model-name")
    if named:
        return named
    model = _flag(server_args, "--model")
    if model:
        return Path(model).name
    from loramux.server.model_fetch import default_model_dir

    return default_model_dir().name


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def options_from_args(args: argparse.Namespace, server_args: list[str]) -> AppOptions:
    from loramux.server.model_fetch import loramux_home

    state_dir = Path(args.state_dir) if args.state_dir else loramux_home() / "ray"
    env = {k: os.environ[k] for k in KEY_VARIABLES if k in os.environ}
    replica = ReplicaOptions(state_dir=str(state_dir.resolve()), server_args=tuple(server_args),
                             adapter_dirs=tuple(str(Path(d).resolve()) for d in args.adapter_dir), env=env)
    management_open = bool(env.get("LORAMUX_ADMIN_API_KEY")) or _is_loopback(args.host)
    return AppOptions(replica=replica, num_replicas=args.replicas, routing=args.routing,
                      management_open=management_open,
                      max_adapters_per_replica=args.max_adapters_per_replica,
                      max_ongoing_requests=args.max_ongoing_requests, cpus_per_replica=args.cpus_per_replica,
                      gpus_per_replica=args.gpus_per_replica, base_model=served_model_name(server_args))


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        argv, server_args = argv[:split], argv[split + 1:]
        args = build_parser().parse_args(argv)
    else:
        args, server_args = build_parser().parse_known_args(argv)
    options = options_from_args(args, server_args)

    import ray
    from ray import serve

    init = {"address": args.address} if args.address else {"include_dashboard": False}
    if args.num_cpus is not None and not args.address:
        init["num_cpus"] = args.num_cpus
    ray.init(**init, logging_level="WARNING")
    serve.start(http_options={"host": args.host, "port": args.port})
    from loramux.ray_serve.app import build_app  # imports Ray

    serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    print(f"loramux-ray: serving on http://{args.host}:{args.port} with {args.replicas} replicas "
          f"({args.routing} routing); shared adapters in {options.replica.state_dir}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
