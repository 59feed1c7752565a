"""Opt-in log of served prompts (``serve --log-prompts FILE``): the input of ``knn-ssd calibrate --traffic``."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from .protocol import ChatCompletionRequest, CompletionRequest


class PromptLogError(ValueError):
    """The prompt log's file cannot be written."""


class PromptLog:
    """Appends one JSONL line per prompt of each accepted request: ``messages`` (chat, as the template takes
    them, with ``tools`` where the request had them), ``prompt`` (completion text) or ``prompt_ids``
    (completion token ids). Sampling settings and outputs are not logged; the file holds user text, so it
    is written only when asked for."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as exc:
            raise PromptLogError(f"--log-prompts {path}: cannot write there ({exc.strerror})") from None
        self._lock = threading.Lock()

    def append(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        """Log the prompt(s) of ``req``."""
        rows = [self._chat(req)] if isinstance(req, ChatCompletionRequest) else self._completion(req)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(text)

    @staticmethod
    def _chat(req: ChatCompletionRequest) -> dict[str, Any]:
        """The messages as the chat template took them (tool calls and results included) and the tools it
        rendered, so that calibration re-renders the prompt the router saw."""
        row: dict[str, Any] = {"messages": [m.for_template() for m in req.messages]}
        if req.tools:
            row["tools"] = [t.for_template() for t in req.tools]
        return row

    @staticmethod
    def _completion(req: CompletionRequest) -> list[dict[str, Any]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            return [{"prompt": prompt}]
        if all(isinstance(p, int) for p in prompt):
            return [{"prompt_ids": list(prompt)}]
        return [{"prompt": p} if isinstance(p, str) else {"prompt_ids": list(p)} for p in prompt]
