"""The Ray Serve application: ``EngineReplica`` (a whole knn-ssd server each) behind one ``Ingress``.

The ingress takes every HTTP request, reads the prompt text the request router matches, and forwards
the request unchanged to one replica, which answers it with the single-process server's own FastAPI app
(same routes, errors, streaming, API key, ``knn_ssd`` object); the response streams back as the replica
sends it. The ingress itself answers ``/health`` (the application) and ``/metrics`` (every replica's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
import torch
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..config import ServerConfig
from ..protocol import APIError
from ..serving import sse
from .asgi import AsgiApp, ForwardedRequest, ResponseStart
from .metrics import ReplicaDirectory, ReplicaEntry, merge, scrape, serve_registry
from .request_router import PrefixAffinityRouter, prompt_text

log = logging.getLogger("knn_ssd.scaleout")

APP_NAME = "knn-ssd"
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}  # set again by the ingress's server


@dataclass(frozen=True)
class ScaleConfig:
    """How many replicas, and how big: fixed (``min == max``) or autoscaled between the two."""

    min_replicas: int
    max_replicas: int
    initial_replicas: int
    threads: int  # torch threads per replica, and the CPUs Ray reserves for it
    target_ongoing_requests: float
    upscale_delay_s: float
    downscale_delay_s: float
    window_s: float  # the load is averaged over this many seconds

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas


def directory_name(app_name: str) -> str:
    return f"knn-ssd-replicas:{app_name}"


def replica_directory(app_name: str) -> ray.actor.ActorHandle:
    """The application's ``ReplicaDirectory`` (created by whichever replica or ingress asks first)."""
    return ray.remote(num_cpus=0)(ReplicaDirectory).options(
        name=directory_name(app_name), namespace="serve", get_if_exists=True, lifetime="detached").remote()


class EngineReplica:
    """One knn-ssd server (model, router artifact, engine loop, metrics) in a Ray Serve replica."""

    async def __init__(self, config: ServerConfig, threads: int) -> None:
        from ..app import create_app
        from ..state import build_state

        torch.set_num_threads(threads)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.app = AsgiApp(create_app(config, build_state(config)))
        await self.app.startup()
        state = self.app.app.state.server
        self.loop = state.loop
        node = ray.util.get_node_ip_address()
        self.directory = replica_directory(context.app_name)
        entry = ReplicaEntry(self.replica, serve_registry(state.metrics.registry, node), os.getpid(), node)
        await self.directory.add.remote(entry)
        log.info("replica %s ready on %s (pid %d, %d threads), metrics at %s", self.replica, node, os.getpid(),
                 threads, entry.metrics_url)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The app's response to ``request``: its start, then its body chunks as they are sent."""
        async for part in self.app.request(request):
            yield part

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop stopped is replaced."""
        if not self.loop.alive:
            raise RuntimeError("the engine loop has stopped")

    async def __del__(self) -> None:  # graceful shutdown (scale-down, redeploy): leave the directory, stop
        if hasattr(self, "directory"):  # else stopped while starting
            await self.directory.remove.remote(self.replica)
            await self.app.shutdown()


class Ingress:
    """The application's HTTP entry: forwards each request to a replica chosen by ``PrefixAffinityRouter``."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine.options(stream=True)
        self.directory = replica_directory(serve.get_replica_context().app_name)  # whatever the deploy named it

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/metrics":
            return await self.metrics()
        if request.url.path == "/health":
            return await self.health()
        body = await request.body()
        forwarded = ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                     [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_HEADERS],
                                     body, prompt_text(body) if body else None)
        parts = self.engine.forward.remote(forwarded)
        try:
            start = await parts.__anext__()
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers
                       if k.lower() not in HOP_HEADERS}
            if (start.header(b"content-type") or b"").startswith(b"text/event-stream"):
                return StreamingResponse(self._relay(parts), status_code=start.status, headers=headers)
            content = b"".join([chunk async for chunk in parts])
        except Exception as exc:  # noqa: BLE001 - the replica died or failed: an OpenAI error, not a hang
            parts.cancel()
            error = _api_error(exc)
            return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        except BaseException:  # the client left (the proxy cancels this handler): so does the replica's work
            parts.cancel()
            raise
        return Response(content, status_code=start.status, headers=headers)

    async def _relay(self, parts: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """A streamed body; a replica failure mid-stream ends it with an OpenAI error event and [DONE]."""
        try:
            async for chunk in parts:
                yield chunk
        except Exception as exc:  # noqa: BLE001
            yield (sse(_api_error(exc).body()) + sse("[DONE]")).encode()
        finally:
            parts.cancel()  # a client that left: the replica cancels the generation

    async def replica_metrics(self) -> dict[str, str]:
        """Every listed replica's metrics text by replica id; replicas that do not answer leave the list."""
        texts, silent = await scrape(await self.directory.entries.remote())
        for entry in silent:
            await self.directory.remove.remote(entry.replica)
        return texts

    async def metrics(self) -> Response:
        return Response(merge(await self.replica_metrics()), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(self) -> Response:
        """200 while at least one replica answers (listing them), else 503."""
        texts = await self.replica_metrics()
        ok = bool(texts)
        return JSONResponse({"status": "ok" if ok else "no replica answers", "replicas": sorted(texts)},
                            status_code=200 if ok else 503)


def _api_error(exc: BaseException) -> APIError:
    """A replica failure in OpenAI's shape: 503 when the replica died (the request may be retried), 500 else."""
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        log.warning("replica failed during a request: %s", exc)
        return APIError(503, "The replica serving this request failed; the request did not complete. Retry it.",
                        None, "replica_failed", headers={"Retry-After": "1"})
    log.error("request failed in its replica: %r", exc)
    return APIError(500, f"The request failed in its replica: {type(exc).__name__}", None, "internal_error")


def build_application(config: ServerConfig, scale: ScaleConfig) -> serve.Application:
    """The bound application: ``scale`` replicas of ``config``'s server behind one ingress."""
    replicas = {"autoscaling_config": AutoscalingConfig(
        min_replicas=scale.min_replicas, max_replicas=scale.max_replicas,
        initial_replicas=scale.initial_replicas, target_ongoing_requests=scale.target_ongoing_requests,
        upscale_delay_s=scale.upscale_delay_s, downscale_delay_s=scale.downscale_delay_s,
        look_back_period_s=scale.window_s, metrics_interval_s=min(10.0, scale.window_s / 2))} \
        if scale.autoscaling else {"num_replicas": scale.min_replicas}
    engine = serve.deployment(
        EngineReplica, name="EngineReplica", **replicas,
        max_ongoing_requests=config.max_batch_size,  # "room" = a free batch slot; the rest wait at the ingress
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
        ray_actor_options={"num_cpus": scale.threads,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(scale.threads)}}},
        graceful_shutdown_timeout_s=config.drain_timeout, health_check_period_s=5.0)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(config, scale.threads))
