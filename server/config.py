"""The server's configuration (``knn-ssd serve`` flags), read by the app and by the state it builds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Everything ``serve`` needs; built from the CLI flags."""

    model: str = "default"
    index: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    target: str = "auto"
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
    ui: bool = True  # the playground page at / and /playground
    drain_timeout: float = 30.0  # seconds a stopping server waits for in-flight requests

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerConfig":
        values = {k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)}
        return cls(**values, adaptive_speculation=not args.no_adaptive_speculation,
                   ui=not getattr(args, "no_ui", False))
