"""OpenAI request schemas (plus knn-ssd's extension fields) and the OpenAI error body."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from decoding import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 16
MAX_N = 16


def check_text_parts(content: Any, text_kinds: set[str]) -> Any:
    """``content`` unchanged, unless it is a list of parts with kinds other than ``text_kinds`` (an image, a
    file): then a ValueError naming them."""
    parts = content if isinstance(content, list) else []
    others = sorted({str(part.get("type")) for part in parts if isinstance(part, dict)} - text_kinds)
    if others:
        raise ValueError(f"only text content parts are supported by this server, not {', '.join(others)}")
    return content


class OpenAIObject(BaseModel):
    """A request object: fields this server does not know are ignored (``ignored_fields`` names them), and
    ``null`` stands for an omitted field where the field takes no ``null`` of its own (``"n": null`` is
    ``n`` 1), as OpenAI does."""

    model_config = ConfigDict(extra="ignore")
    _ignored_fields: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _null_means_omitted(cls, data: Any, handler: Any) -> Any:
        """Validate without the nulls that stand for omitted fields; note the fields this class does not know."""
        if not isinstance(data, dict):
            return handler(data)
        fields = {field.alias or name: field for name, field in cls.model_fields.items()}
        obj = handler({key: value for key, value in data.items()
                       if value is not None or key not in fields or type(None) in get_args(fields[key].annotation)})
        obj._ignored_fields = tuple(sorted(set(data) - set(fields) - set(cls.model_fields)))
        return obj

    @property
    def ignored_fields(self) -> tuple[str, ...]:
        """The fields of the request body this server does not know (and so ignores)."""
        return self._ignored_fields


class StreamOptions(OpenAIObject):
    include_usage: bool = False


class SkipLayers(BaseModel):
    """Explicit skip set: ``{"attention": [...], "mlp": [...]}``."""

    model_config = ConfigDict(extra="forbid")
    attention: list[int] = Field(default_factory=list)
    mlp: list[int] = Field(default_factory=list)


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema is enforced whatever ``strict`` says."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIObject):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self

    def required_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow, or None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.json_schema if self.type == "json_schema" else None


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must follow: ``kind`` ``json`` (a schema), ``regex``, ``choice`` (a list of strings)
    or ``grammar`` (Lark), as given by the request field ``param``."""

    param: str
    kind: str
    value: Any


class StructuredOutputs(OpenAIObject):
    """vLLM's ``structured_outputs``: the output follows the one constraint given."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def constraints(self) -> list[OutputConstraint]:
        found = [OutputConstraint(f"structured_outputs.{kind}", kind, value) for kind, value in
                 (("json", self.json_schema), ("regex", self.regex), ("choice", self.choice),
                  ("grammar", self.grammar)) if value is not None]
        if self.json_object:
            found.append(OutputConstraint("structured_outputs.json_object", "json", {"type": "object"}))
        return found


class SamplingFields(OpenAIObject):
    """Fields shared by completions and chat."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="vLLM-style extension: 0 disables")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1, description="a 64-bit signed integer, as OpenAI's")
    user: str | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None  # OpenAI's on chat; on completions as in vLLM
    structured_outputs: StructuredOutputs | None = None  # vLLM's constraints beyond JSON
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names of the same constraints
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # knn-ssd extensions (OpenAI SDKs send them through extra_body)
    speculate: bool = True
    domain: str | None = None
    skip_layers: SkipLayers | None = None
    draft_precision: Literal["full", "int8", "int4"] | None = None
    provenance: bool = False  # each choice (and chunk) lists where its tokens came from (draft, verify, ...)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        return value

    def output_constraint(self) -> OutputConstraint | None:
        """The constraint the output must follow (None for free text); an ``APIError`` (400) naming the field
        if several are given or one is malformed (an empty choice list, a JSON schema string that is not JSON)."""
        schema = self.response_format.required_schema() if self.response_format else None
        found = [OutputConstraint("response_format", "json", schema)] if schema is not None else []
        found += self.structured_outputs.constraints() if self.structured_outputs else []
        found += [OutputConstraint(f"guided_{kind}", kind, getattr(self, f"guided_{kind}"))
                  for kind in ("json", "regex", "choice", "grammar") if getattr(self, f"guided_{kind}") is not None]
        if len(found) > 1:
            raise APIError(400, f"give one output constraint, not {', '.join(c.param for c in found)}", found[1].param)
        if not found:
            return None
        constraint = found[0]
        if constraint.kind == "choice" and (not constraint.value or not all(constraint.value)):
            raise APIError(400, f"{constraint.param} must be a non-empty list of non-empty strings", constraint.param)
        if constraint.kind == "json" and isinstance(constraint.value, str):
            try:
                return OutputConstraint(constraint.param, "json", json.loads(constraint.value))
            except json.JSONDecodeError as exc:
                raise APIError(400, f"{constraint.param} is not a JSON schema: {exc}", constraint.param) from None
        return constraint

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def logprobs_count(self) -> int | None:
        """None: no log-probabilities; else each token's and this many most likely alternatives."""
        return None

    def prompt_logprobs_count(self) -> int | None:
        """As ``logprobs_count``, for the prompt's tokens."""
        return None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) of a field set to a value this server cannot honour."""
        if self.draft_precision is not None and self.skip_layers is None:
            return "draft_precision", "draft_precision applies only together with skip_layers"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_count(self) -> int | None:
        return self.logprobs if self.echo else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, 1) and self.best_of != self.n:
            return "best_of", "best_of is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        return super().unsupported()


class TextPart(OpenAIObject):
    type: Literal["text"]
    text: str


class FunctionDefinition(OpenAIObject):
    """A tool's ``function``: what the chat template shows the model, and the schema of its arguments."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIObject):
    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict[str, Any]:
        """The tool as chat templates render it (and the prompt log keeps it)."""
        return self.model_dump(exclude_none=True)


class FunctionName(OpenAIObject):
    name: str


class NamedToolChoice(OpenAIObject):
    """``tool_choice`` naming the function the model must call."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(OpenAIObject):
    name: str
    arguments: str


class MessageToolCall(OpenAIObject):
    """A call an earlier assistant message made (sent back with the conversation)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """The call as chat templates expect it: arguments as an object where they parse as one."""
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(OpenAIObject):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this result answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Name the unsupported part (an image, audio) instead of pydantic's union error about strings."""
        return check_text_parts(content, {"text"})

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it (a developer message is a system one)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.name:
            out["name"] = self.name
        return out


class Prediction(OpenAIObject):
    """OpenAI's predicted output: text the answer is expected to repeat, drafted by n-gram lookup."""

    type: Literal["content"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    prediction: Prediction | None = None
    # OpenAI fields this server refuses rather than silently drop: honouring them changes the output
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'logprobs' must be set to true when 'top_logprobs' is used")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("'tool_choice' other than 'none' or 'auto' needs 'tools'")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names():
            raise ValueError(f"tool_choice names the function {choice.function.name!r}, which is not in 'tools'")
        constraint = self.output_constraint() if self.forced_tools() else None
        if constraint is not None:
            raise ValueError(f"a forced tool call ('tool_choice') cannot be combined with '{constraint.param}'")
        return self

    def unsupported(self) -> tuple[str, str] | None:
        if self.functions is not None or self.function_call is not None:
            field = "functions" if self.functions is not None else "function_call"
            return field, f"the deprecated '{field}' is not supported by this server: send 'tools' and 'tool_choice'"
        if self.audio is not None or any(kind != "text" for kind in self.modalities or ()):
            return "audio" if self.audio is not None else "modalities", "audio output is not supported by this server"
        if self.web_search_options is not None:
            return "web_search_options", "web search is not supported by this server"
        return super().unsupported()

    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or ()]

    def calls_tools(self) -> bool:
        """Whether the output is parsed for tool calls (tools given and ``tool_choice`` not ``none``)."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced_tools(self) -> list[dict[str, Any]]:
        """The functions one of which the output must call (``required`` or a named function), else []."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return []
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        return [t.function.model_dump(exclude_none=True) for t in self.tools if named in (None, t.function.name)]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(OpenAIObject):
    """OpenAI's ``POST /v1/embeddings``: the unit-normalised prompt embedding of each input."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # must equal the model's width: the embedding is not truncated
    user: str | None = None


class TokenizeRequest(OpenAIObject):
    """``POST /tokenize`` (vLLM's shape): a completion ``prompt``, or chat ``messages`` (and ``tools``)
    rendered by the chat template exactly as a chat request's prompt is."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ToolDefinition] | None = None
    add_generation_prompt: bool = True  # messages: end with the assistant turn's opening, as chat requests do
    add_special_tokens: bool = True  # prompt: the tokenizer's special tokens (e.g. BOS), as completions add

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class DetokenizeRequest(OpenAIObject):
    """``POST /detokenize`` (vLLM's shape): token ids back to text."""

    model: str | None = None
    tokens: list[int]


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
