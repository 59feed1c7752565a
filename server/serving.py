"""OpenAI completions and chat completions on top of the engine loop (protocol -> engine -> response)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from fastapi import Request

from decoding import RequestStats, SamplingParams, TokenLogprob, TokenSource
from decoding.grammar import GrammarError, constraint_grammar

from .engine_loop import EngineLoop, GenerationEvent, GenerationRequest, QueueFullError, RouteDecision
from .logprobs import LogprobFormatter
from .metrics import Metrics
from .prompt_log import PromptLog
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from .routing import PolicyResolver
from .tools import forced_call_grammar, template_renders_tools

log = logging.getLogger("knn_ssd.server")

DISCONNECT_POLL_S = 0.25


@dataclass
class Choice:
    """Accumulated output of one choice."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the prompt's first, where echoed
    finish_reason: str | None = None
    route: RouteDecision | None = None
    stats: RequestStats | None = None
    provenance: list[tuple[int, TokenSource, float | None]] = field(default_factory=list)  # (id, source, logprob)


class OpenAIServing:
    """Shared logic of /v1/completions and /v1/chat/completions."""

    def __init__(self, loop: EngineLoop, tokenizer: Any, model_name: str, max_model_len: int,
                 resolver: PolicyResolver, metrics: Metrics, prompt_log: PromptLog | None = None) -> None:
        self.loop = loop
        self.prompt_log = prompt_log  # --log-prompts: accepted requests' prompts, for calibrate --traffic
        self.tokenizer = tokenizer
        self.logprob_format = LogprobFormatter(tokenizer)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.resolver = resolver
        self.metrics = metrics
        self.target = loop.engine.runner.target  # what plain decoding runs and verification checks

    # ------------------------------------------------------------------ request preparation
    def check_model(self, name: str | None) -> None:
        """404 unless ``name`` is the served model's (None, where the field is optional, passes)."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        return self.token_lists(req.prompt, "prompt")

    def token_lists(self, value: str | list[str] | list[int] | list[list[int]], param: str) -> list[list[int]]:
        """The token ids of each input in OpenAI's prompt shapes (a string, strings, token ids, lists of
        token ids); a 400 naming ``param`` for an empty input or an id outside the vocabulary."""
        if isinstance(value, str):
            lists = [self.tokenizer(value).input_ids]
        elif value and all(isinstance(p, int) for p in value):
            lists = [list(value)]
        elif value and all(isinstance(p, str) for p in value):
            lists = [self.tokenizer(p).input_ids for p in value]
        elif value and all(isinstance(p, list) for p in value):
            lists = [list(p) for p in value]
        else:
            raise APIError(400, f"{param} must be a non-empty string, list of strings or list of token ids", param)
        for ids in lists:
            if not ids:
                raise APIError(400, f"{param} must not be empty", param)
            self.check_token_ids(ids, param)
        return lists

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """A 400 naming ``param`` unless every id is in the vocabulary."""
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"{param} token ids must be in [0, {vocab})", param)

    def chat_prompt(self, req: ChatCompletionRequest | TokenizeRequest,
                    add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids: ``req.messages`` (and ``req.tools``) through the chat template."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        tools = None
        if req.tools:
            if not template_renders_tools(str(template)):
                raise APIError(400, "this model's chat template does not render tools: serve it with "
                                    "--chat-template FILE naming a template that does (Hermes <tool_call> format)",
                               "tools")
            tools = [t.for_template() for t in req.tools]
        try:
            ids = self.tokenizer.apply_chat_template([m.for_template() for m in req.messages], tools=tools,
                                                     add_generation_prompt=add_generation_prompt, tokenize=True,
                                                     return_dict=False)
        except Exception as exc:  # templates raise on role orders they do not accept
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
        return list(ids)

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """``/tokenize``: the ids a completion or chat request with this prompt would decode from."""
        self.check_model(req.model)
        if req.messages is not None:
            ids = self.chat_prompt(req, req.add_generation_prompt)
        else:
            ids = self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": list(ids)}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        """``/detokenize``: the text of token ids (special tokens included)."""
        self.check_model(req.model)
        self.check_token_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def sampling_params(self, req: SamplingFields, prompt_len: int, max_tokens: int | None, index: int,
                        grammar: str | None = None, prediction: tuple[int, ...] = ()) -> SamplingParams:
        if prompt_len >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                                f"prompt has {prompt_len} tokens.", "prompt", "context_length_exceeded")
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                                f"for the completion).", "max_tokens", "context_length_exceeded")
        seed = None if req.seed is None else req.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=seed, stop=req.stop_list(), ignore_eos=req.ignore_eos,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              logit_bias=self.logit_bias(req), grammar=grammar,
                              logprobs=req.logprobs_count(), prompt_logprobs=req.prompt_logprobs_count(),
                              prediction=prediction)

    def logit_bias(self, req: SamplingFields) -> tuple[tuple[int, float], ...]:
        pairs = req.logit_bias_pairs()
        vocab = len(self.tokenizer)
        if any(token >= vocab for token, _ in pairs):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        return pairs

    def grammar(self, req: SamplingFields) -> str | None:
        """The grammar the output must follow (None for free text): a forced tool call's (``tool_choice``
        ``required`` or a named function), or the request's output constraint (``response_format``,
        ``structured_outputs`` or a ``guided_*`` field), checked to compile (else a 400 naming the field)."""
        forced = req.forced_tools() if isinstance(req, ChatCompletionRequest) else []
        constraint = None if forced else req.output_constraint()
        if constraint is None and not forced:
            return None
        param = constraint.param if constraint else "tools"
        try:
            if forced:
                parallel = req.parallel_tool_calls and req.tool_choice == "required"  # a named function: one call
                grammar = forced_call_grammar(forced, parallel)
            else:
                grammar = constraint_grammar(constraint.kind, constraint.value)
            self.loop.engine.grammars.check(grammar)
        except GrammarError as exc:
            raise APIError(400, f"{param}: {exc}", param) from exc
        return grammar

    def check_supported(self, req: SamplingFields) -> None:
        """Refuse a field this server cannot honour (400); log the fields it ignores (as vLLM does)."""
        bad = req.unsupported()
        if bad:
            raise APIError(400, bad[1], bad[0])
        if req.ignored_fields:
            log.warning("the following fields were present in the request but ignored: %s",
                        ", ".join(req.ignored_fields))

    # ------------------------------------------------------------------ running
    def submit(self, prompts: list[list[int]], req: CompletionRequest | ChatCompletionRequest,
               max_tokens: int | None, request_id: str) -> tuple[list[GenerationRequest], asyncio.Queue]:
        """Queue ``n`` choices per prompt; events arrive on the returned queue as (choice index, event).

        Choice ``i`` is ``{request_id}-{i}`` in the log (``request_id`` is the response's ``id``)."""
        self.check_supported(req)
        chooser = self.resolver.for_request(req)
        grammar = self.grammar(req)
        prediction = getattr(req, "prediction", None)  # chat only, as OpenAI
        predicted = tuple(self.tokenizer(prediction.text(), add_special_tokens=False).input_ids) if prediction else ()
        work = [(ids, self.sampling_params(req, len(ids), max_tokens, i, grammar, predicted))
                for ids in prompts for i in range(req.n)]
        gens, queue = self.enqueue(work, chooser, request_id)
        if self.prompt_log is not None:
            self.prompt_log.append(req)
        return gens, queue

    def enqueue(self, work: list[tuple[list[int], SamplingParams]], chooser: Callable[[torch.Tensor], RouteDecision],
                request_id: str) -> tuple[list[GenerationRequest], asyncio.Queue]:
        """Queue one sequence per (prompt ids, params), all or none (a 503 when the queue is full); events
        arrive on the returned queue as (index in ``work``, event)."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        gens = []
        for index, (ids, params) in enumerate(work):
            def emit(event: GenerationEvent, index: int = index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            gens.append(GenerationRequest(f"{request_id}-{index}", ids, params, chooser, emit))
        try:
            self.loop.submit(gens)
        except QueueFullError as exc:
            raise APIError(503, "The server is overloaded: too many queued requests. Retry later.", None,
                           "server_overloaded", headers={"Retry-After": "1"}) from exc
        return gens, queue

    async def events(self, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request | None,
                     ) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """Yield (index, event) until every choice finished; cancel all choices if the client goes away
        (checked every ``DISCONNECT_POLL_S``, also while events keep coming)."""
        pending, next_check = len(gens), time.monotonic() + DISCONNECT_POLL_S
        try:
            while pending:
                try:
                    index, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if request is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if event.error is not None:
                    raise _api_error(event.error)
                if event.finish_reason is not None:
                    pending -= 1
                yield index, event
        finally:
            for g in gens:
                g.cancelled.set()

    async def choice_events(self, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request | None,
                            choices: list[Choice]) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """``events`` applied to ``choices`` as they come, the request's outcome counted once however it ends:
        200 per choice when all finished, the error's status, or 499 per choice when the client left (also
        when the caller stops iterating: close it with ``contextlib.aclosing``)."""
        recorded = False
        try:
            async for index, event in self.events(gens, queue, request):
                apply_event(choices[index], event)
                yield index, event
            if all(c.finish_reason is not None for c in choices):
                self.record(200, choices)
                recorded = True
        except APIError as exc:
            self.metrics.request_done(exc.status, None)
            recorded = True
            raise
        finally:
            if not recorded:
                self.record(499, choices)

    async def collect(self, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request) -> list[Choice]:
        """Every choice's whole output (the request counted); a 499 if the client left first."""
        choices = [Choice(i) for i in range(len(gens))]
        async with contextlib.aclosing(self.choice_events(gens, queue, request, choices)) as events:
            async for _ in events:
                pass
        if any(c.finish_reason is None for c in choices):
            raise APIError(499, "client disconnected")
        return choices

    def provenance(self, body: SamplingFields, items: list[tuple[int, TokenSource, float | None]]) -> dict[str, Any]:
        """``{"provenance": [...]}`` for a choice or chunk whose request asked for it (else ``{}``): each
        token's text, id, source, verify step and log-probability (null unless the request asked for logprobs)."""
        if not body.provenance:
            return {}
        return {"provenance": [{"token": self.logprob_format.text(token), "id": token, "source": src.source,
                                "step": src.step, "logprob": logprob} for token, src, logprob in items]}

    def record(self, status: int, choices: list[Choice]) -> None:
        for c in choices:
            self.metrics.request_done(status, c.finish_reason)


def apply_event(choice: Choice, event: GenerationEvent) -> None:
    choice.text += event.text
    choice.logprobs += (event.prompt_logprobs or []) + (event.logprobs or [])
    logprobs = [t.logprob for t in event.logprobs] if event.logprobs else [None] * len(event.token_ids)
    choice.provenance += zip(event.token_ids, event.sources, logprobs)
    if event.route is not None:
        choice.route = event.route
    if event.finish_reason is not None:
        choice.finish_reason = event.finish_reason
        choice.stats = event.stats


def _api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {exc}")


def usage(choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts prompt tokens read from the
    prefix cache (the most any choice got: they share the prompt); the prediction counts are summed over
    choices, as completion tokens are."""
    stats = [c.stats for c in choices if c.stats]
    completion = sum(s.completion_tokens for s in stats)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": max((s.cached_tokens for s in stats), default=0)},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "accepted_prediction_tokens": sum(s.accepted_prediction_tokens for s in stats),
                "rejected_prediction_tokens": sum(s.rejected_prediction_tokens for s in stats)}}


def knn_ssd_object(choices: list[Choice], target: str) -> dict[str, Any]:
    """The ``knn_ssd`` response extension: routing and speculation figures (summed over choices), and the
    ``target`` that decoded them (``native``: the GGUF's stored blocks; ``exact``: dequantised weights)."""
    first = choices[0]
    route, policy = first.route, first.route.policy if first.route else None
    stats = [c.stats for c in choices if c.stats]
    drafts = sum(s.draft_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    steps = sum(s.verify_steps for s in stats)
    step_tokens = sum(s.step_tokens for s in stats)
    plain = policy is None or policy.is_plain
    out = {
        "domain": route.domain if route else None,
        "similarity": route.similarity if route else None,
        "policy": "plain" if plain else "speculative",
        "skip_attention": [] if plain else sorted(policy.skip.attention),
        "skip_mlp": [] if plain else sorted(policy.skip.mlp),
        "draft_precision": None if plain else policy.precision,
        "draft_threshold": None if plain else policy.threshold,
        "max_draft": None if plain else policy.max_draft,
        "lookup": False if plain else policy.lookup,
        "lookup_tokens": sum(s.lookup_tokens for s in stats),
        "draft_tokens": drafts,
        "accepted_tokens": accepted,
        "verify_steps": steps,
        "acceptance_rate": accepted / drafts if drafts else 0.0,
        "mean_accepted_tokens": step_tokens / steps if steps else 0.0,
        "router_ms": route.router_ms if route else 0.0,
        "target": target,
    }
    if len(choices) > 1:
        out["choices"] = [{"index": c.index, "domain": c.route.domain if c.route else None,
                           "policy": "plain" if not c.route or c.route.policy.is_plain else "speculative"}
                          for c in choices]
    return out


REQUEST_ID_HEADER = "x-request-id"  # the response's id, as OpenAI's API sends one


def new_id(prefix: str, separator: str = "-") -> str:
    """A fresh object id as OpenAI spells them (``chatcmpl-...``; the Responses API's ``resp_...``)."""
    return f"{prefix}{separator}{uuid.uuid4().hex[:24]}"


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def now() -> int:
    return int(time.time())
