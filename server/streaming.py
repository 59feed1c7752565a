"""What chat, completion and Responses requests share once generation is submitted: the non-streamed
response or the SSE stream, and the OpenAI chunk stream of every choice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from decoding import TokenLogprob

from .engine_loop import GenerationRequest
from .protocol import APIError, SamplingFields
from .serving import REQUEST_ID_HEADER, Choice, OpenAIServing, knn_ssd_object, sse, usage

ChunkFn = Callable[[int, str, "str | None", "list[TokenLogprob]"], dict[str, Any]]


class ResponseBuilder(Protocol):
    """Builds one endpoint's response objects from a request's choices."""

    id: str

    def complete(self, choices: list[Choice]) -> dict[str, Any]:
        """The non-streamed response of finished ``choices``."""

    def stream(self, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request) -> AsyncIterator[str]:
        """The SSE stream of the submitted ``gens``."""


async def respond(srv: OpenAIServing, builder: ResponseBuilder, gens: list[GenerationRequest], queue: asyncio.Queue,
                  request: Request, stream: bool) -> Response:
    """The HTTP response of submitted generations: one JSON body, or an SSE stream; the id in ``x-request-id``."""
    headers = {REQUEST_ID_HEADER: builder.id}
    if not stream:
        choices = await srv.collect(gens, queue, request)
        return JSONResponse(builder.complete(choices), headers=headers)
    return StreamingResponse(builder.stream(gens, queue, request), media_type="text/event-stream", headers=headers)


async def stream_choices(srv: OpenAIServing, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request,
                         body: SamplingFields, prompt_tokens: int, base: dict[str, Any],
                         chunk: ChunkFn) -> AsyncIterator[str]:
    """SSE chunks of every choice; the last chunk carries ``knn_ssd`` (and usage if asked); then [DONE].

    A chunk carries the log-probabilities of the tokens committed since the choice's previous chunk
    (tokens whose text is held back, e.g. as a possible stop string, report with the next one).
    """
    choices = [Choice(i) for i in range(len(gens))]
    reported = [0] * len(gens)  # log-probabilities already sent, per choice
    traced = [0] * len(gens)  # provenance items already sent, per choice

    def new_logprobs(c: Choice) -> list[TokenLogprob]:
        items, reported[c.index] = c.logprobs[reported[c.index]:], len(c.logprobs)
        return items

    def with_provenance(c: Choice, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` (one choice's chunk) with the provenance of the tokens since that choice's last chunk."""
        items, traced[c.index] = c.provenance[traced[c.index]:], len(c.provenance)
        data["choices"][0].update(srv.provenance(body, items))
        return data

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    remaining = len(choices)
    try:
        async with aclosing(srv.choice_events(gens, queue, request, choices)) as events:
            async for index, event in events:
                c = choices[index]
                if event.finish_reason is None:
                    if event.text:
                        yield sse({**with_provenance(c, chunk(index, event.text, None, new_logprobs(c))),
                                   **({"usage": None} if include_usage else {})})
                    continue
                remaining -= 1
                data = with_provenance(c, chunk(index, event.text, event.finish_reason, new_logprobs(c)))
                if include_usage:
                    data["usage"] = None
                if remaining == 0 and not include_usage:
                    data["knn_ssd"] = knn_ssd_object(choices, srv.target)
                yield sse(data)
    except APIError as exc:
        yield sse(exc.body())
        yield sse("[DONE]")
        return
    if remaining:  # the client went away
        return
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(choices, prompt_tokens),
                   "knn_ssd": knn_ssd_object(choices, srv.target)})
    yield sse("[DONE]")
