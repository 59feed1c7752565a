"""Model loading: local Hugging Face directories, clear errors for bad specs, and the packaged (split-GGUF)
model install path."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from tiny_models import tiny_model

from decoding import (
    PLAIN,
    DraftPolicy,
    ModelLoadError,
    ModelRunner,
    SamplingParams,
    SkipSet,
    SpeculativeEngine,
    load_model,
    native,
)
from decoding.loading import check_architecture, converted_gguf, default_gguf_path
from decoding.packaged import (
    PACKAGED_MODELS,
    PackagedModelError,
    _install_part,
    assemble,
    installed_gguf,
)
from server.cli import main


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*qwen2.5-coder-1.5b"):
        load_model(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither a directory nor a .gguf"):
        load_model(str(path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_layers_without_skippable_sub_modules(default_model):
    hf_model = default_model[0]
    q_proj = hf_model.model.layers[3].self_attn.q_proj
    del hf_model.model.layers[3].self_attn.q_proj
    try:
        with pytest.raises(ModelLoadError, match="layer 3 lacks .*q_proj"):
            check_architecture(hf_model)
    finally:
        hf_model.model.layers[3].self_attn.q_proj = q_proj


def test_packaged_model_not_installed_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("KNN_SSD_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="knn-ssd install-model qwen2.5-coder-1.5b"):
        load_model("qwen2.5-coder-1.5b")
    with pytest.raises(PackagedModelError, match="not installed"):
        installed_gguf("qwen2.5-coder-1.5b")


def test_assemble_checks_size_and_sha256(tmp_path):
    parts = []
    for n, payload in enumerate((b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7)):
        parts.append(tmp_path / f"part{n}.bin")
        parts[-1].write_bytes(payload)
    whole = b"".join(p.read_bytes() for p in parts)
    good = hashlib.sha256(whole).hexdigest()
    target = tmp_path / "out" / "model.gguf"
    assemble(parts, target, len(whole), good)
    assert target.read_bytes() == whole
    target.unlink()
    with pytest.raises(PackagedModelError, match="corrupted"):
        assemble(parts[::-1], target, len(whole), good)  # wrong order: same size, other hash
    with pytest.raises(PackagedModelError, match="161 bytes"):
        assemble(parts, target, len(whole) + 1, good)
    assert not target.exists() and not list(target.parent.glob("*.tmp*"))  # nothing half-written is left


def test_install_part_from_the_registry(tmp_path):
    """The real pip path for the smallest part: --no-deps into a folder, data file where the spec says."""
    spec = PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    data = _install_part(spec, spec.parts, tmp_path)
    assert data.is_file() and data.name == f"part{spec.parts}.bin"
    assert 0 < data.stat().st_size < spec.size
    assert _install_part(spec, spec.parts, tmp_path) == data  # a second call finds it installed


def test_install_model_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        main(["install-model", "no-such-model"])
    assert "invalid choice" in capsys.readouterr().err


def test_default_model_info(default_model):
    _, _, info = default_model
    assert info.architecture == "LlamaForCausalLM" and info.num_layers == 30 and info.hidden_size == 576
    assert info.dtype == "float32" and info.device == "cpu" and len(info.fingerprint) == 32


def test_a_gguf_is_converted_once_wherever_it_lies(tmp_path, default_model):
    """The conversion is keyed by the file's content: a copy of the GGUF in another place (another clone's
    virtual environment) reuses the converted directory instead of adding a 517 MB one."""
    original = default_gguf_path()
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    assert converted_gguf(copy) == converted_gguf(original)


def test_the_native_targets_copy_of_a_gguf_leaves_its_blocks_in_the_file(default_model):
    """The native target reads the quantised blocks from the GGUF file, so its converted copy holds only the
    rest: the same config, generation config and tokenizer as the full dequantised copy, and the same values
    of every other tensor (here the norms), with none of the blocks (3.6 MB against 517 MB)."""
    import safetensors.torch

    from decoding.gguf_blocks import BLOCK_TYPES, gguf_tensors

    full = converted_gguf(default_gguf_path())
    light = converted_gguf(default_gguf_path(), skip_native_blocks=True)
    assert light != full and converted_gguf(default_gguf_path(), skip_native_blocks=True) == light
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (light / name).read_bytes() == (full / name).read_bytes(), name
    full_values = safetensors.torch.load_file(full / "model.safetensors")
    light_values = safetensors.torch.load_file(light / "model.safetensors")
    _, tensors = gguf_tensors(default_gguf_path())
    outside_blocks = [t for t in tensors if t.type_id not in BLOCK_TYPES]
    assert len(light_values) == len(outside_blocks) == 61 and len(full_values) == 272
    for name, value in light_values.items():
        assert value.dtype == full_values[name].dtype and torch.equal(value, full_values[name]), name


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_local_hf_directory_loads_in_its_own_dtype_where_native(tmp_path, default_model, stored):
    """``--dtype auto`` on CPU keeps a bf16 checkpoint in bf16 where the kernels run bf16 natively (exact and
    faster), else fp32; the loaded directory then speculates losslessly."""
    model = tiny_model("qwen2").to(stored)
    model.save_pretrained(tmp_path)
    default_model[1].save_pretrained(tmp_path)
    hf_model, tokenizer, info = load_model(str(tmp_path), device="cpu")
    native_bf16 = stored == torch.bfloat16 and native.bf16_kernels() is not None
    assert info.dtype == ("bfloat16" if native_bf16 else "float32") and info.model_type == "qwen2"
    engine = SpeculativeEngine(ModelRunner(hf_model), tokenizer)
    ids = tokenizer("The quick brown fox").input_ids
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    assert engine.run(ids, params, DraftPolicy(SkipSet([1], [2]))).generated == engine.run(ids, params, PLAIN).generated


def test_a_model_without_weights_is_filled_but_for_what_the_caller_reads_elsewhere(tmp_path, default_model):
    """``load_model(weights=False)`` + ``load_weights``: the native target's way, which never widens the
    blocks it reads from the GGUF file. Skipped parameters (and the LM head tied to a skipped embedding)
    stay empty; every other one is the converted copy's value; a missing one is an error."""
    from decoding.loading import load_weights

    full, _, full_info = default_model
    skeleton, _, info = load_model("default", device="cpu", dtype="float32", weights=False)
    assert info.parameters == full_info.parameters  # counted on the empty parameters, the tie included
    assert skeleton.generation_config.eos_token_id == full.generation_config.eos_token_id
    skip = {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"}
    load_weights(skeleton, converted_gguf(default_gguf_path()), skip)
    values = dict(full.named_parameters())
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        if name in skip or name == "lm_head.weight":
            assert param.numel() == 0, name
        else:
            assert torch.equal(param, values[name]), name
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight

    copy = tmp_path / "converted"
    shutil.copytree(converted_gguf(default_gguf_path()), copy)
    (copy / "model.safetensors").unlink()
    skeleton, _, _ = load_model(str(copy), device="cpu", dtype="float32", weights=False)
    with pytest.raises(ModelLoadError, match="no weights for"):
        load_weights(skeleton, copy, set())
