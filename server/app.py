"""The FastAPI app: routes (each a few lines over ``OpenAIServing`` and a response builder), auth, lifespan."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from decoding import ModelLoadError
from decoding.build import ChatTemplateError
from decoding.packaged import PackagedModelError
from knn_router.artifact import ArtifactError

from . import package_version
from .chat import ChatCompletionBuilder
from .completions import CompletionBuilder
from .config import ServerConfig
from .errors import install_error_handlers
from .prompt_log import PromptLogError
from .embeddings import embeddings
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from .responses import ResponseBuilder, ResponsesRequest
from .serving import REQUEST_ID_HEADER, OpenAIServing, new_id
from .state import ServerState, build_state, reload_router
from .streaming import respond

log = logging.getLogger("knn_ssd.server")
PLAYGROUND = Path(__file__).with_name("static") / "playground.html"


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.server.serving


def _bearer_auth(api_key: str | None) -> Any:
    """The dependency that checks ``Authorization: Bearer <key>`` (a no-op without ``--api-key``)."""
    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")
    return authorize


def _model_card(s: ServerState) -> dict[str, Any]:
    """OpenAI's model object, plus what a client (the playground) needs to show a draft policy."""
    return {"id": s.serving.model_name, "object": "model", "created": s.started, "owned_by": "knn-ssd",
            "root": s.info.source, "max_model_len": s.serving.max_model_len,
            "knn_ssd": {"num_layers": s.engine.runner.num_layers, "target": s.serving.target,
                        "domains": s.router.domains if s.router else []}}


def _lifespan(config: ServerConfig, loaded: ServerState) -> Any:
    """Start the engine loop with the app (SIGHUP re-reads ``--index``), stop it on shutdown."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.server = loaded
        loaded.loop.start()
        # `kill -HUP <pid>` re-reads --index, e.g. after `calibrate --traffic` (only a main thread has signals:
        # a Ray Serve replica runs the app on another one)
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_router, loaded, config)
        log.info("ready: serving %r", loaded.serving.model_name)
        try:
            yield
        finally:
            log.info("shutting down the engine loop")
            loaded.loop.stop()
    return lifespan


def create_app(config: ServerConfig, loaded: ServerState) -> FastAPI:
    """The app over ``loaded`` (``build_state(config)``: model, router, engine)."""
    app = FastAPI(title="knn-ssd", version=package_version(), lifespan=_lifespan(config, loaded))
    if config.allowed_origins:  # browser pages of these origins may call the API (preflights answered here)
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
        log.info("CORS: browser pages of %s may call the API", ", ".join(config.allowed_origins))
    install_error_handlers(app)
    if config.ui:
        _add_playground(app)
    _add_service_routes(app)
    _add_api_routes(app, [Depends(_bearer_auth(config.api_key))])
    return app


def _add_playground(app: FastAPI) -> None:
    """The playground page (one static file; it calls the API with the key the user types, if any)."""
    page = PLAYGROUND.read_text()

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground() -> Response:
        return HTMLResponse(page)


def _add_service_routes(app: FastAPI) -> None:
    """Health, version and metrics: open without an API key, for probes and scrapers."""
    @app.get("/health")
    async def health(s: ServerState = Depends(_state)) -> Response:
        ok = s.loop.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        """The server's knn-ssd version (vLLM's endpoint of this name)."""
        return {"version": package_version()}

    @app.get("/metrics")
    async def metrics(s: ServerState = Depends(_state)) -> Response:
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_api_routes(app: FastAPI, auth: list[Any]) -> None:
    """The OpenAI endpoints and vLLM's utility ones, each behind ``auth``."""
    @app.get("/v1/models", dependencies=auth)
    async def models(s: ServerState = Depends(_state)) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(s)]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str, s: ServerState = Depends(_state)) -> dict[str, Any]:
        """One model's card (the SDKs' ``models.retrieve``); 404 for a model this server does not serve."""
        s.serving.check_model(model)
        return _model_card(s)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, request: Request, srv: OpenAIServing = Depends(_serving)) -> Response:
        srv.check_model(body.model)
        prompt = srv.chat_prompt(body)
        rid = new_id("chatcmpl")
        gens, queue = srv.submit([prompt], body, body.token_limit(), rid)
        return await respond(srv, ChatCompletionBuilder(srv, body, rid, len(prompt)), gens, queue, request,
                             body.stream)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request,
                          srv: OpenAIServing = Depends(_serving)) -> Response:
        srv.check_model(body.model)
        prompts = srv.completion_prompts(body)
        rid = new_id("cmpl")
        gens, queue = srv.submit(prompts, body, body.max_tokens, rid)
        return await respond(srv, CompletionBuilder(srv, body, rid, prompts), gens, queue, request, body.stream)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embed(body: EmbeddingRequest, request: Request, srv: OpenAIServing = Depends(_serving)) -> Response:
        """The unit-normalised prompt embedding of each input: what the router sees (``server.embeddings``)."""
        rid = new_id("embd")
        return JSONResponse(await embeddings(srv, body, request, rid), headers={REQUEST_ID_HEADER: rid})

    @app.post("/v1/responses", dependencies=auth)
    async def responses(body: ResponsesRequest, request: Request, srv: OpenAIServing = Depends(_serving)) -> Response:
        """OpenAI's Responses API for text: generated as the equivalent chat request (``server.responses``)."""
        srv.check_model(body.model)
        srv.check_supported(body)
        chat = body.chat_request()
        prompt = srv.chat_prompt(chat)
        rid = new_id("resp", "_")
        gens, queue = srv.submit([prompt], chat, chat.token_limit(), rid)
        return await respond(srv, ResponseBuilder(srv, body, rid, len(prompt)), gens, queue, request, body.stream)

    @app.api_route("/v1/responses/{response_id:path}", methods=["GET", "DELETE", "POST"], dependencies=auth)
    async def stored_response(response_id: str) -> None:
        """Stored responses (retrieve, delete, cancel, input items): none exist, as none are stored."""
        raise APIError(404, f"No response found with id '{response_id.split('/')[0]}': this server stores no "
                            "responses", None, "not_found")

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest, srv: OpenAIServing = Depends(_serving)) -> dict[str, Any]:
        """Token ids of a prompt or of chat messages through the template (vLLM's endpoint of this name)."""
        return srv.tokenize(body)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest, srv: OpenAIServing = Depends(_serving)) -> dict[str, Any]:
        """Text of token ids (vLLM's endpoint of this name)."""
        return srv.detokenize(body)

    @app.post("/reset_prefix_cache", dependencies=auth)
    async def reset_prefix_cache(s: ServerState = Depends(_state)) -> dict[str, Any]:
        """Drop every prefix cache block (e.g. between benchmark runs), as vLLM's endpoint of this name."""
        return await asyncio.wrap_future(s.loop.call(s.engine.clear_prefix_cache))


def run_server(args: argparse.Namespace) -> int:
    """Entry point of ``knn-ssd serve``."""
    import uvicorn

    config = ServerConfig.from_args(args)
    try:  # load before uvicorn starts: a bad --model/--index/--device is one line, not a lifespan traceback
        state = build_state(config)
    except (ModelLoadError, PackagedModelError, ArtifactError, PromptLogError, ChatTemplateError) as exc:
        raise SystemExit(f"knn-ssd serve: {exc}") from None
    app = create_app(config, state)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=config.drain_timeout)
    return 0
