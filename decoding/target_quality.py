"""How closely one target follows another (the native target against the exact one, or another server against
the exact target): teacher-forced top-1 agreement and perplexity on held-out text, and the common prefix of
greedy outputs on benchmark prompts."""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .engine import SpeculativeEngine
from .policy import PLAIN
from .sampling import SamplingParams


def heldout_text() -> str:
    """Text no calibration or benchmark prompt contains: the Python standard library's LICENSE.txt (legal
    English, about 2,000 words), present wherever Python is."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()


@torch.inference_mode()
def teacher_forced(engine: SpeculativeEngine, ids: list[int], window: int = 512) -> tuple[torch.Tensor, float]:
    """Each position's next-token logits' argmax over ``ids`` (windows of ``window`` tokens, each prefilled
    from its start) and the negative log-likelihood sum of the actual next tokens."""
    runner = engine.runner
    top1, nll = [], 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        cache = runner.new_cache(len(chunk))
        logits = runner.forward(torch.tensor(chunk[:-1]), cache, 0, all_logits=True).logits.float()
        top1.append(logits.argmax(dim=-1))
        nll -= torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(chunk[1:])[:, None]).sum().item()
    return torch.cat(top1), nll


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy_outputs(engine: SpeculativeEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Plain greedy decoding of every prompt, ``max_tokens`` each (EOS ignored)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [engine.run(ids, params, PLAIN).generated for ids in tqdm(prompts, desc="greedy", unit="prompt")]


def compare_targets(reference: SpeculativeEngine, candidates: dict[str, SpeculativeEngine | Callable[[str], str]],
                    prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Each candidate against ``reference``: engines get the teacher-forced metrics on ``heldout_text`` and
    greedy outputs; a callable (prompt text -> greedy answer text, e.g. another server) gets the greedy
    comparison only. Outputs are compared as the reference's tokenizer tokenizes their text, so a server
    whose token ids are not at hand is measured like an engine."""
    tokenizer = reference.tokenizer
    text_ids = tokenizer(heldout_text(), add_special_tokens=False).input_ids
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for p in prompts]
    ref_top1, ref_nll = teacher_forced(reference, text_ids)
    ref_text = [tokenizer.decode(out) for out in greedy_outputs(reference, chats, max_tokens)]
    positions = len(text_ids) - 1
    report: dict[str, Any] = {"heldout_tokens": positions, "prompts": len(prompts), "max_tokens": max_tokens,
                              "reference": {"perplexity": math.exp(ref_nll / positions)}}
    for name, candidate in candidates.items():
        if isinstance(candidate, SpeculativeEngine):
            top1, nll = teacher_forced(candidate, text_ids)
            texts = [tokenizer.decode(out) for out in greedy_outputs(candidate, chats, max_tokens)]
            row = {"top1_agreement": (top1 == ref_top1).float().mean().item(),
                   "perplexity": math.exp(nll / positions)}
        else:
            texts = [candidate(p) for p in tqdm(prompts, desc=name, unit="prompt")]
            row = {}
        prefixes = [common_prefix(tokenizer(a, add_special_tokens=False).input_ids,
                                  tokenizer(b, add_special_tokens=False).input_ids) for a, b in zip(ref_text, texts)]
        row.update(mean_common_prefix=sum(prefixes) / len(prefixes),
                   identical=sum(a == b for a, b in zip(ref_text, texts)), common_prefixes=prefixes)
        report[name] = row
    return report


def server_greedy(url: str, max_tokens: int) -> Callable[[str], str]:
    """A function that asks the OpenAI-compatible server at ``url`` for a greedy chat answer (EOS ignored,
    llama-server's prompt cache off), for ``compare_targets``."""
    import httpx

    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

    def answer(prompt: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "cache_prompt": False}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        reply.raise_for_status()
        return reply.json()["choices"][0]["message"]["content"]
    return answer
