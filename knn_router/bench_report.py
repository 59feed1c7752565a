"""Write a `knn-ssd bench` report: report.json, report.md (tables) and speedup.png (two panels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bench import BEST_FIX, FIX_PREFIX, KNN_METHOD, MIX_METHOD, ORACLE_METHOD, PLAIN_METHOD

PLOTTED = [BEST_FIX, MIX_METHOD, KNN_METHOD, ORACLE_METHOD]
LABELS = {BEST_FIX: "Self-SD Fix (best)", MIX_METHOD: "Self-SD Mix", KNN_METHOD: "KNN-SSD", ORACLE_METHOD: "oracle",
          PLAIN_METHOD: "plain"}


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write the three files of ``report`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "speedup.png")


def _label(method: str, methods: dict[str, Any]) -> str:
    if method == BEST_FIX:
        return f"Self-SD Fix (best: {methods[method]['variant'].removeprefix(FIX_PREFIX)})"
    if method.startswith(FIX_PREFIX):
        return f"Self-SD Fix ({method.removeprefix(FIX_PREFIX)})"
    return LABELS.get(method, method)


def _table(methods: dict[str, Any], domains: list[str], key: str, fmt: str) -> list[str]:
    lines = ["| method | overall | " + " | ".join(domains) + " |", "| --- " * (len(domains) + 2) + "|"]
    order = [PLAIN_METHOD, *sorted(m for m in methods if m.startswith(FIX_PREFIX)), BEST_FIX, MIX_METHOD,
             KNN_METHOD, ORACLE_METHOD]
    for method in (m for m in order if m in methods):
        r = methods[method]
        cells = [format(r["overall"][key], fmt)] + [format(r["domains"][d][key], fmt) if d in r["domains"] else "-"
                                                    for d in domains]
        name = f"**{_label(method, methods)}**" if method == KNN_METHOD else _label(method, methods)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _length(report: dict[str, Any]) -> str:
    if report.get("stop_at_eos"):
        return f"up to {report['max_new_tokens']} new tokens each (ending at EOS)"
    return f"{report['max_new_tokens']} new tokens each"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (the README embeds the latest one)."""
    m = report["machine"]
    domains = report["domains"]
    lines = [
        f"# knn-ssd bench: {report['model']} ({report['model_info']['architecture']}, "
        f"{report['model_info']['num_layers']} layers)",
        "",
        f"{report['prompts']} Spec-Bench prompts ({report['prompts_per_domain']} per domain, held-out half), "
        f"{_length(report)}, greedy; {report['device']} {report['dtype']}, {report.get('target', 'exact')} target, "
        f"on {m['cpu']} "
        f"({m['threads']} threads, torch {m['torch']}, {m['cpu_capability']}). Wall time {report['wall_s']:.0f} s.",
        "",
        f"Lossless: **{report['lossless']}** (exact match rate {report['exact_match_rate']:.3f}, divergences at "
        f"non-ties {report['divergences_at_non_ties']}; tolerance: {report['tie_tolerance']}). "
        f"Routing accuracy {report['routing']['accuracy']:.2f}, "
        f"lookup p50 {report['routing']['lookup_ms_p50']:.3f} ms, "
        f"p99 {report['routing']['lookup_ms_p99']:.3f} ms.",
    ]
    for stream, body in report["streams"].items():
        lines += ["", f"## Speedup over plain decoding, {body['description']}", "",
                  *_table(body["methods"], domains, "speedup", ".2f"),
                  "", f"## Mean accepted tokens per verify step, {body['description']}", "",
                  *_table(body["methods"], domains, "mean_accepted_tokens", ".2f")]
    if "headroom" in report:
        lines += ["", *_headroom(report["headroom"], report["streams"][report["stream"]]["description"])]
    lines += ["", "## Plain decoding tokens/s", "", *_table({PLAIN_METHOD: report["methods"][PLAIN_METHOD]}, domains,
                                                           "tokens_per_s", ".1f")]
    return "\n".join(lines) + "\n"


def _headroom(headroom: dict[str, Any], stream: str) -> list[str]:
    """What routing could win: each domain's best Self-SD Fix policy against Self-SD Mix."""
    lines = [f"## Per-domain headroom over Self-SD Mix, {stream}", "",
             "Each domain's best Self-SD Fix policy (`--headroom` adds lookup-only and draft-copy ones): a router "
             "choosing among these policies per domain wins at most this over one policy for all.", "",
             "| domain | best Self-SD Fix | its speedup | Self-SD Mix | headroom |", "| --- " * 5 + "|"]
    for domain, row in headroom["domains"].items():
        lines.append(f"| {domain} | {row['best']} | {row['best_speedup']:.2f} | {row['mix_speedup']:.2f} | "
                     f"{row['headroom']:.3f}x |")
    lines.append(f"| **every domain on its best** | | {headroom['best_per_domain_speedup']:.2f} | "
                 f"{headroom['mix_speedup']:.2f} | **{headroom['headroom']:.3f}x** |")
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars per domain (and overall): speedup, and mean accepted tokens, for the main stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = report["methods"]
    groups = ["overall", *report["domains"]]
    shown = [m for m in PLOTTED if m in methods]
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    width = 0.8 / len(shown)
    x = np.arange(len(groups))
    for ax, key, title in ((axes[0], "speedup", "speedup over plain decoding"),
                           (axes[1], "mean_accepted_tokens", "mean accepted tokens per verify step")):
        for i, method in enumerate(shown):
            r = methods[method]
            values = [r["overall"][key] if g == "overall" else r["domains"].get(g, {}).get(key, 0) for g in groups]
            ax.bar(x + (i - (len(shown) - 1) / 2) * width, values, width, label=_label(method, methods))
        if key == "speedup":
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(shown), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    axes[1].set_xticks(x, groups, rotation=15)
    fig.suptitle(f"{report['model']} ({report['dtype']}, {report['device']}), {report['prompts']} prompts x "
                 f"{'up to ' if report.get('stop_at_eos') else ''}{report['max_new_tokens']} tokens, "
                 f"{report['stream']} stream", y=0.995, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
