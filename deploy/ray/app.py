"""The Serve application: one ingress in front of N loramux replicas.

The ingress reads each request once (bounded), finds the adapter it names (routing.py)
and calls the replicas' deployment handle with that id as Serve's multiplexed model id,
so Serve's router prefers the replica that already holds the adapter (and, for a new
one, the replica holding the fewest). With routing="round_robin" it passes no id and
Serve spreads requests without regard to adapters, as a plain load balancer does: the
baseline the tests and `make bench-replicas` compare against.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from loramux.ray_serve.options import ROUTINGS, AppOptions, ReplicaOptions  # noqa: F401 (re-exported)
from loramux.ray_serve.replica import make_replica_class
from loramux.ray_serve.routing import adapter_for_request, wants_stream

# Adapter management: done on one replica, published through the shared directory.
ADMIN_PREFIXES = ("/v1/adapters",)
# Every route that changes a server's adapters (vLLM's load/unload act on one replica).
MANAGEMENT_PREFIXES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")




# No docs routes of its own: /docs and /openapi.json are the replicas'.
api = FastAPI(title="loramux on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, replicas: DeploymentHandle, routing: str, max_body_bytes: int,
                 base_model: str | None, management_open: bool) -> None:
        self.replicas = replicas
        self.routing = routing
        self.max_body_bytes = max_body_bytes
        self.base_model = base_model
        self.management_open = management_open

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def proxy(self, request: Request, path: str) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return JSONResponse({"error": f"request body over {self.max_body_bytes} bytes"}, status_code=413)
        headers = {k.lower(): v for k, v in request.headers.items()}
        route = "/" + path
        method = request.method
        managing = route.startswith(MANAGEMENT_PREFIXES) and method in ("POST", "DELETE")
        if managing and not self.management_open:
            return JSONResponse({"error": {"message": "adapter management is disabled: the front door listens on a "
                                           "non-loopback address and LORAMUX_ADMIN_API_KEY is not set",
                                           "type": "PermissionDenied", "code": 403}}, status_code=403)
        if route.startswith(ADMIN_PREFIXES) and method in ("POST", "DELETE"):
            handle, call = self.replicas.options(stream=True), "admin"
        else:
            adapter = adapter_for_request(method, route, headers, bytes(body), self.base_model)
            options = {"stream": True}
            if adapter and self.routing == "affine":
                options["multiplexed_model_id"] = adapter
            handle, call = self.replicas.options(**options), "handle"
        stream = getattr(handle, call).remote(method, route, request.url.query, headers, bytes(body))
        iterator = stream.__aiter__()
        try:
            status, out_headers = await iterator.__anext__()
        except Exception as exc:  # noqa: BLE001 - the replica died or Serve could not reach one
            return JSONResponse({"error": {"message": f"no replica could answer ({type(exc).__name__}); retry",
                                           "type": "ServiceUnavailable", "code": 503}},
                                status_code=503, headers={"Retry-After": "1"})
        if wants_stream(route, bytes(body)) and status == 200:
            return StreamingResponse(iterator, status_code=status, headers=out_headers)
        chunks = []
        async for chunk in iterator:
            chunks.append(chunk)
        return Response(b"".join(chunks), status_code=status, headers=out_headers)


def build_app(options: AppOptions):
    """The bound application: `serve.run(build_app(options))`."""
    replica_class = make_replica_class(options.max_adapters_per_replica)
    actor_options = {"num_cpus": options.cpus_per_replica}
    if options.gpus_per_replica:
        actor_options["num_gpus"] = options.gpus_per_replica
    replicas = serve.deployment(
        replica_class,
        name="LoramuxReplica",
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options=actor_options,
        health_check_period_s=5,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=60,
    ).bind(options.replica)
    return Ingress.bind(replicas, options.routing, options.max_body_bytes, options.base_model,
                        options.management_open)
