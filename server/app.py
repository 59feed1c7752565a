"""FastAPI application: endpoints, auth, error shapes, lifespan (model + router loaded once)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding import ModelLoadError, TokenLogprob
from decoding.packaged import PackagedModelError
from knn_router.artifact import ArtifactError

from . import package_version
from .prompt_log import PromptLogError
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from .responses import ResponseBuilder, ResponsesRequest, stream_response
from .scheduler import GenerationRequest
from .serving import (
    REQUEST_ID_HEADER,
    Choice,
    OpenAIServing,
    knn_ssd_object,
    new_id,
    now,
    sse,
    usage,
)
from .state import ChatTemplateError, ServerState, build_state, reload_router
from .tools import ToolCallStream, parse_tool_calls

log = logging.getLogger("knn_ssd.server")


@dataclass
class ServerConfig:
    """Everything ``serve`` needs; built from the CLI flags."""

    model: str = "default"
    index: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    served_model_name: str | None = None
    api_key: str | None = None
    max_batch_size: int = 8
    max_num_batched_tokens: int = 512
    adaptive_speculation: bool = True
    max_queue: int = 64
    max_model_len: int | None = None
    prefix_cache_mb: float = 256.0
    log_prompts: str | None = None
    chat_template: str | None = None
    allowed_origins: list[str] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerConfig":
        values = {k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)}
        return cls(**values, adaptive_speculation=not args.no_adaptive_speculation)


def create_app(config: ServerConfig, loaded: ServerState) -> FastAPI:
    """The app over ``loaded`` (``build_state(config)``: model, router, engine); the lifespan starts and
    stops the engine loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.server = loaded
        loaded.loop.start()
        if hasattr(signal, "SIGHUP"):  # `kill -HUP <pid>` re-reads --index, e.g. after `calibrate --traffic`
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_router, loaded, config)
        log.info("ready: serving %r", loaded.serving.model_name)
        try:
            yield
        finally:
            log.info("shutting down the engine loop")
            loaded.loop.stop()

    app = FastAPI(title="knn-ssd", version="0.1.0", lifespan=lifespan)
    if config.allowed_origins:  # browser pages of these origins may call the API (preflights answered here)
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
        log.info("CORS: browser pages of %s may call the API", ", ".join(config.allowed_origins))

    def state(request: Request) -> ServerState:
        return request.app.state.server

    def serving(request: Request) -> OpenAIServing:
        return request.app.state.server.serving

    async def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status != 499:  # a disconnect is counted per choice where it is detected
            request.app.state.server.metrics.request_done(exc.status, None)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        message = err.get("msg", "invalid request").removeprefix("Value error, ")  # our validators' own words
        if err.get("type") == "json_invalid":  # its location is a character offset, not a parameter
            message, loc = "We could not parse the JSON body of your request.", []
        elif not loc and err.get("type") == "model_attributes_type":  # the body is no JSON object
            content_type = request.headers.get("content-type", "")
            message = "The request body must be a JSON object" + ("" if "json" in content_type else
                      f" sent with 'Content-Type: application/json' (this one's is {content_type or 'missing'})")
        api = APIError(400, f"{message}" + (f" (at {'.'.join(loc)})" if loc else ""),
                       ".".join(loc) or None, err.get("type"))
        return await api_error(request, api)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown paths and methods get OpenAI's error shape too (FastAPI's default is ``{"detail": ...}``)."""
        messages = {404: f"Unknown endpoint {request.url.path}: this server serves /v1/chat/completions, "
                         "/v1/completions, /v1/responses, /v1/models[/{model}], /tokenize, /detokenize, "
                         "/reset_prefix_cache, /health, /version and /metrics",
                    405: f"Method {request.method} is not allowed on {request.url.path}"}
        codes = {404: "unknown_url", 405: "method_not_allowed"}
        api = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), None,
                       codes.get(exc.status_code), headers=dict(exc.headers or {}))
        return await api_error(request, api)

    @app.get("/health")
    async def health(s: ServerState = Depends(state)) -> Response:
        ok = s.loop.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        """The server's knn-ssd version (vLLM's endpoint of this name); open like /health."""
        return {"version": package_version()}

    @app.get("/metrics")
    async def metrics(s: ServerState = Depends(state)) -> Response:
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache", dependencies=[Depends(authorize)])
    async def reset_prefix_cache(s: ServerState = Depends(state)) -> dict[str, Any]:
        """Drop every prefix cache block (e.g. between benchmark runs), as vLLM's endpoint of this name."""
        cache = s.engine.prefix_cache
        if cache is None:
            return {"enabled": False, "cleared_blocks": 0, "freed_bytes": 0}

        def clear() -> dict[str, Any]:
            cleared = {"enabled": True, "cleared_blocks": len(cache), "freed_bytes": cache.nbytes}
            cache.clear()
            return cleared

        return await asyncio.wrap_future(s.loop.call(clear))

    def model_card(s: ServerState) -> dict[str, Any]:
        return {"id": s.serving.model_name, "object": "model", "created": s.started, "owned_by": "knn-ssd",
                "root": s.info.source, "max_model_len": s.serving.max_model_len}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models(s: ServerState = Depends(state)) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(s)]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorize)])
    async def model(model: str, s: ServerState = Depends(state)) -> dict[str, Any]:
        """One model's card (the SDKs' ``models.retrieve``); 404 for a model this server does not serve."""
        s.serving.check_model(model)
        return model_card(s)

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: TokenizeRequest, srv: OpenAIServing = Depends(serving)) -> dict[str, Any]:
        """Token ids of a prompt or of chat messages through the template (vLLM's endpoint of this name)."""
        return srv.tokenize(body)

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: DetokenizeRequest, srv: OpenAIServing = Depends(serving)) -> dict[str, Any]:
        """Text of token ids (vLLM's endpoint of this name)."""
        return srv.detokenize(body)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request, response: Response,
                          srv: OpenAIServing = Depends(serving)):
        srv.check_model(body.model)
        prompts = srv.completion_prompts(body)
        rid, created = new_id("cmpl"), now()
        gens, queue = srv.submit(prompts, body, body.max_tokens, rid)
        prompt_tokens = sum(len(p) for p in prompts)  # each prompt once, whatever n (as OpenAI and vLLM)
        echoes = [srv.tokenizer.decode(p) if body.echo else "" for p in prompts]
        base = {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name}
        offsets = [0] * len(gens)  # characters before each choice's next reported token

        def logprobs(index: int, items: list[TokenLogprob]) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            out = srv.logprob_format.completion(items, offsets[index])
            offsets[index] += sum(map(len, out["tokens"]))
            return out

        if not body.stream:
            response.headers[REQUEST_ID_HEADER] = rid
            choices = await srv.collect(gens, queue, request)
            return {**base, "choices": [{"index": c.index, "text": echoes[c.index // body.n] + c.text,
                                         "logprobs": logprobs(c.index, c.logprobs), "finish_reason": c.finish_reason}
                                        for c in choices],
                    "usage": usage(choices, prompt_tokens), "knn_ssd": knn_ssd_object(choices)}
        # an echo goes out first, or, with logprobs, in a choice's first chunk with its prompt's logprobs
        echo_later = [bool(echoes[i // body.n]) and body.logprobs is not None for i in range(len(gens))]

        def chunk(index: int, text: str, finish: str | None, items: list[TokenLogprob]) -> dict[str, Any]:
            if echo_later[index]:
                text, echo_later[index] = echoes[index // body.n] + text, False
            return {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs(index, items),
                                         "finish_reason": finish}]}

        async def stream() -> AsyncIterator[str]:
            for i in range(len(gens)):
                if echoes[i // body.n] and not echo_later[i]:
                    yield sse(chunk(i, echoes[i // body.n], None, []))
            async for data in _stream_events(srv, gens, queue, request, body, prompt_tokens, base, chunk):
                yield data

        return StreamingResponse(stream(), media_type="text/event-stream", headers={REQUEST_ID_HEADER: rid})

    @app.post("/v1/responses", dependencies=[Depends(authorize)])
    async def responses(body: ResponsesRequest, request: Request, response: Response,
                        srv: OpenAIServing = Depends(serving)):
        """OpenAI's Responses API for text: generated as the equivalent chat request (``server.responses``)."""
        srv.check_model(body.model)
        srv.check_supported(body)
        chat = body.chat_request()
        prompt = srv.chat_prompt(chat)
        rid, created = new_id("resp", "_"), now()
        gens, queue = srv.submit([prompt], chat, chat.token_limit(), rid)
        builder = ResponseBuilder(body, rid, created, srv.model_name, len(prompt))
        if not body.stream:
            response.headers[REQUEST_ID_HEADER] = rid
            choices = await srv.collect(gens, queue, request)
            return builder.response(choices[0])
        return StreamingResponse(stream_response(srv, gens, queue, request, builder), media_type="text/event-stream",
                                 headers={REQUEST_ID_HEADER: rid})

    @app.api_route("/v1/responses/{response_id:path}", methods=["GET", "DELETE", "POST"],
                   dependencies=[Depends(authorize)])
    async def stored_response(response_id: str) -> None:
        """Stored responses (retrieve, delete, cancel, input items): none exist, as none are stored."""
        raise APIError(404, f"No response found with id '{response_id.split('/')[0]}': this server stores no "
                            "responses", None, "not_found")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest, request: Request, response: Response,
                   srv: OpenAIServing = Depends(serving)):
        srv.check_model(body.model)
        prompt = srv.chat_prompt(body)
        rid, created = new_id("chatcmpl"), now()
        gens, queue = srv.submit([prompt], body, body.token_limit(), rid)
        prompt_tokens = len(prompt)  # once, whatever n
        base = {"id": rid, "object": "chat.completion", "created": created, "model": srv.model_name,
                "system_fingerprint": None}

        def logprobs(items: list[TokenLogprob]) -> dict[str, Any] | None:
            return srv.logprob_format.chat(items) if body.logprobs else None

        if not body.stream:
            response.headers[REQUEST_ID_HEADER] = rid
            choices = await srv.collect(gens, queue, request)
            return {**base, "choices": [_chat_choice(c, body, logprobs(c.logprobs)) for c in choices],
                    "usage": usage(choices, prompt_tokens), "knn_ssd": knn_ssd_object(choices)}
        base = {**base, "object": "chat.completion.chunk"}
        tool_streams = [ToolCallStream(body.tool_names()) for _ in gens] if body.calls_tools() else []

        def chunk(index: int, text: str, finish: str | None, items: list[TokenLogprob]) -> dict[str, Any]:
            calls: list[dict[str, Any]] = []
            if tool_streams:  # content up to a tool call, then the call's name and its arguments as written
                text, calls = tool_streams[index].feed(text)
                if finish is not None:
                    rest, more, called = tool_streams[index].finish()
                    text, calls, finish = text + rest, calls + more, "tool_calls" if called else finish
            delta: dict[str, Any] = {"content": text} if text else {}
            if calls:
                delta["tool_calls"] = calls
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs(items) if items else None,
                                         "finish_reason": finish}]}

        async def stream() -> AsyncIterator[str]:
            for i in range(len(gens)):  # OpenAI sends the role first, then content deltas
                role = {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}
                yield sse({**role, "usage": None} if body.stream_options and body.stream_options.include_usage
                          else role)
            async for data in _stream_events(srv, gens, queue, request, body, prompt_tokens, base, chunk):
                yield data

        return StreamingResponse(stream(), media_type="text/event-stream", headers={REQUEST_ID_HEADER: rid})

    return app


def _chat_choice(choice: Choice, req: ChatCompletionRequest, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """A finished chat choice; with tools, its text split into content and tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    finish = choice.finish_reason
    if req.calls_tools():
        content, calls = parse_tool_calls(choice.text, req.tool_names())
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": [call.to_dict() for call in calls]}
            finish = "tool_calls"
    return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish}


ChunkFn = Callable[[int, str, "str | None", "list[TokenLogprob]"], dict[str, Any]]


async def _stream_events(srv: OpenAIServing, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request,
                         body: SamplingFields, prompt_tokens: int, base: dict[str, Any],
                         chunk: ChunkFn) -> AsyncIterator[str]:
    """SSE chunks of every choice; the last chunk carries ``knn_ssd`` (and usage if asked); then [DONE].

    A chunk carries the log-probabilities of the tokens committed since the choice's previous chunk
    (tokens whose text is held back, e.g. as a possible stop string, report with the next one).
    """
    choices = [Choice(i) for i in range(len(gens))]
    reported = [0] * len(gens)  # log-probabilities already sent, per choice

    def new_logprobs(c: Choice) -> list[TokenLogprob]:
        items, reported[c.index] = c.logprobs[reported[c.index]:], len(c.logprobs)
        return items

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    remaining = len(choices)
    try:
        async with aclosing(srv.choice_events(gens, queue, request, choices)) as events:
            async for index, event in events:
                c = choices[index]
                if event.finish_reason is None:
                    if event.text:
                        yield sse({**chunk(index, event.text, None, new_logprobs(c)),
                                   **({"usage": None} if include_usage else {})})
                    continue
                remaining -= 1
                data = chunk(index, event.text, event.finish_reason, new_logprobs(c))
                if include_usage:
                    data["usage"] = None
                if remaining == 0 and not include_usage:
                    data["knn_ssd"] = knn_ssd_object(choices)
                yield sse(data)
    except APIError as exc:
        yield sse(exc.body())
        yield sse("[DONE]")
        return
    if remaining:  # the client went away
        return
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(choices, prompt_tokens), "knn_ssd": knn_ssd_object(choices)})
    yield sse("[DONE]")


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
                timeout_graceful_shutdown=args.drain_timeout)
    return 0
