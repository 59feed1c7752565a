"""`knn-ssd bench-serve`: aggregate throughput and latency of a live server under N concurrent clients.

Each client streams chat completions back to back (greedy, ``max_new_tokens`` each, EOS
ignored); aggregate tokens/s is all generated tokens over the level's wall time, time to first
token is measured per request from the client side. Each run starts with an empty prefix cache
(``POST /reset_prefix_cache``), so no run reuses an earlier run's prompts; prefixes shared
within a run (the chat template's system prompt) are reused as in real traffic. Modes: ``speculative``
(each request as the server routes it) and ``plain`` (``speculate: false``, the baseline), run level by level on the
same server; ``peer`` sends the same workload to any other OpenAI-compatible server (llama.cpp's ``llama-server``,
vLLM): OpenAI's fields only, plus ``cache_prompt: false``, llama-server's switch for its per-slot prompt cache,
so it prefills every prompt as knn-ssd does with ``--prefix-cache-mb 0``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


@dataclass(frozen=True)
class RequestTiming:
    tokens: int
    ttft_s: float
    total_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache served


MODES = ("speculative", "plain", "peer")


def request_body(model: str, prompt: str, max_tokens: int, mode: str) -> dict[str, Any]:
    """One streamed greedy chat request of ``mode`` (``peer``: no knn-ssd field, no prompt cache)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return {**body, "cache_prompt": False} if mode == "peer" else {**body, "speculate": mode == "speculative"}


async def _one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestTiming:
    t0 = time.perf_counter()
    ttft, usage = None, {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    total = time.perf_counter() - t0
    return RequestTiming(usage.get("completion_tokens", 0), ttft if ttft is not None else total, total,
                         usage.get("prompt_tokens", 0),
                         (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))


async def run_level(url: str, model: str, prompts: list[str], clients: int, requests_per_client: int,
                    max_tokens: int, ramp_s: float, bar: tqdm, mode: str = "speculative"
                    ) -> tuple[list[RequestTiming], float]:
    """``clients`` concurrent clients, each sending ``requests_per_client`` requests one after another;
    returns every request's timing and the wall time.

    Client ``i`` starts after ``i * ramp_s / clients`` seconds (0: all at once, a burst).
    """
    timings: list[RequestTiming] = []

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(index * ramp_s / clients)
        for r in range(requests_per_client):
            prompt = prompts[(index * requests_per_client + r) % len(prompts)]
            timings.append(await _one_request(client, request_body(model, prompt, max_tokens, mode)))
            bar.update()

    # a peer such as llama-server may close idle keep-alive connections under load: a fresh one per request
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0 if mode == "peer" else None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await client.post("/reset_prefix_cache")  # a server without one answers 404: nothing to reset
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        return timings, time.perf_counter() - t0


def level_summary(clients: int, mode: str, runs: list[tuple[list[RequestTiming], float]],
                  ramp_s: float) -> dict[str, Any]:
    """The figures of one level in one mode over its runs (tokens and wall time summed)."""
    timings = [t for run, _ in runs for t in run]
    tokens, wall = sum(t.tokens for t in timings), sum(w for _, w in runs)
    ttfts = sorted(t.ttft_s for t in timings)
    return {"clients": clients, "mode": mode, "runs": len(runs), "requests": len(timings), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "run_tokens_per_s": [sum(t.tokens for t in run) / w for run, w in runs],  # in the order they ran
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "per_request_tokens_per_s": statistics.median(t.tokens / t.total_s for t in timings),
            "request_latency_p50_s": statistics.median(t.total_s for t in timings), "ramp_s": ramp_s,
            "prompt_tokens_mean": statistics.mean(t.prompt_tokens for t in timings),
            "cached_tokens_mean": statistics.mean(t.cached_tokens for t in timings)}


def bench_serve(url: str, model: str, prompts: list[str], levels: list[int], requests_per_client: int,
                max_tokens: int, ramp_s: float | None = None, modes: tuple[str, ...] = ("speculative",),
                rounds: int = 1) -> dict[str, Any]:
    """Run every concurrency level in every mode; each client sends ``requests_per_client`` requests back
    to back. ``x first`` ratios compare a level with the first level of the same mode; with both modes,
    speculative levels also get ``vs_plain`` (their tokens/s over plain decoding's at that level).

    Each level runs every mode ``rounds`` times, the order of the modes reversed every other round
    (2 rounds: A B B A), so neither mode always runs first: the machine's drift and any warm-up hit
    both alike; a mode's figures sum its rounds.

    ``ramp_s`` None staggers client starts over the first level's median request latency, so
    arrivals spread as in steady traffic instead of coming as synchronized waves (with a fixed
    ``max_tokens`` and no EOS, clients that start together also finish together, forever).
    """
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"modes must be among {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    results: list[dict[str, Any]] = []
    total = sum(levels) * requests_per_client * len(modes) * rounds
    with tqdm(total=total, desc="bench-serve", unit="request") as bar:
        for level, clients in enumerate(levels):
            # every mode of a level arrives with the same stagger
            ramp = 0.0 if level == 0 else (results[0]["request_latency_p50_s"] if ramp_s is None else ramp_s)
            runs: dict[str, list] = {mode: [] for mode in modes}
            for round_ in range(rounds):
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    runs[mode].append(asyncio.run(run_level(url, model, prompts, clients, requests_per_client,
                                                            max_tokens, ramp, bar, mode)))
            results += [level_summary(clients, mode, runs[mode], ramp) for mode in modes]
    for r in results:
        base = next(b for b in results if b["mode"] == r["mode"])
        r["throughput_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["ttft_p50_vs_first"] = r["ttft_p50_s"] / base["ttft_p50_s"]
        plain = [p for p in results if p["mode"] == "plain" and p["clients"] == r["clients"]]
        if r["mode"] == "speculative" and plain:
            r["vs_plain"] = r["tokens_per_s"] / plain[0]["tokens_per_s"]
    return {"url": url, "model": model, "max_new_tokens": max_tokens, "requests_per_client": requests_per_client,
            "rounds": rounds, "modes": list(modes), "levels": results}


def print_report(report: dict[str, Any]) -> None:
    """The report as a table: one line per level and mode."""
    print(f"{'clients':>7} {'mode':>11} {'ramp s':>6} {'requests':>8} {'prompt':>6} {'cached':>6} {'tokens':>7} "
          f"{'wall s':>7} {'tokens/s':>9} {'x first':>8} {'TTFT p50':>9} {'x first':>8} {'TTFT p95':>9} "
          f"{'vs plain':>8}")
    for r in report["levels"]:
        vs_plain = f"{r['vs_plain']:>8.2f}" if "vs_plain" in r else f"{'':>8}"
        print(f"{r['clients']:>7} {r['mode']:>11} {r['ramp_s']:>6.1f} {r['requests']:>8} "
              f"{r['prompt_tokens_mean']:>6.0f} {r['cached_tokens_mean']:>6.0f} {r['tokens']:>7} "
              f"{r['wall_s']:>7.1f} {r['tokens_per_s']:>9.1f} {r['throughput_vs_first']:>8.2f} {r['ttft_p50_s']:>9.3f} "
              f"{r['ttft_p50_vs_first']:>8.2f} {r['ttft_p95_s']:>9.3f} {vs_plain}")
    if report["rounds"] > 1:  # the spread behind each sum, and any order effect
        print("tokens/s of each mode's runs in order (modes alternate which runs first): " + "; ".join(
            f"{r['clients']} {r['mode']} " + " ".join(f"{v:.1f}" for v in r["run_tokens_per_s"])
            for r in report["levels"]))


def plot(report: dict[str, Any], path: Path) -> None:
    """Aggregate tokens/s and time to first token (p50 solid, p95 dashed) against concurrent clients, a line
    per mode, each throughput point labelled with its multiple of the mode's first level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in report["modes"]:
        levels = [r for r in report["levels"] if r["mode"] == mode]
        clients = [r["clients"] for r in levels]
        line, = rate.plot(clients, [r["tokens_per_s"] for r in levels], marker="o", label=mode)
        for r in levels:
            rate.annotate(f"{r['throughput_vs_first']:.2f}x", (r["clients"], r["tokens_per_s"]), fontsize=8,
                          textcoords="offset points", xytext=(4, -11 if mode == "plain" else 5))
        ttft.plot(clients, [r["ttft_p50_s"] for r in levels], marker="o", color=line.get_color(), label=f"{mode} p50")
        ttft.plot(clients, [r["ttft_p95_s"] for r in levels], marker=".", linestyle="--", color=line.get_color(),
                  label=f"{mode} p95")
    for ax, label in ((rate, "aggregate tokens/s"), (ttft, "time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["clients"] for r in report["levels"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rate.set_ylim(bottom=0)
    ttft.set_yscale("log")  # p95 under load is tens of times p50
    fig.suptitle(f"{report['model']}: {report['max_new_tokens']} tokens per request, "
                 f"{report['requests_per_client']} requests per client, {report['rounds']} round(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
