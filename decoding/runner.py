"""The model forward pass over a Hugging Face decoder, with per-call sub-layer skipping.

The runner reads the weights and norm modules of a loaded transformers model and
runs its own forward (nanoGPT style) so that one call can skip any attention/MLP
sub-layers, run the draft's linear layers on an int8 or int4 copy, and write KV entries at
absolute positions. Verification and plain decoding always use the original weights.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import native
from .kv_cache import KVCache
from .gguf_blocks import BLOCK_TYPES, StoredTensor
from .linear import BlockEmbedding, BlockLinear, DraftCopy, Int4Linear, Int8Linear, Linear
from .policy import DraftPolicy, SkipSet

NO_SKIP = SkipSet()
# torch's attention kernels the runner lets SDPA choose from on CUDA: all but cuDNN's, which torch 2.11
# prefers for bf16 on Hopper and which made bf16 decoding several times slower on an H200 (float32 never
# takes it; docs/measurements.md, "Why the code is as it is").
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm:
    """Fused RMS norm with the effective weight of a HF norm module (Gemma's ``1 + w`` folded in)."""

    def __init__(self, module: torch.nn.Module) -> None:
        weight = module.weight.detach().float()
        self.weight = weight + 1.0 if "Gemma" in type(module).__name__ else weight
        self.eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        kernels = native.cpu_kernels() if self.weight.device.type == "cpu" else None
        self._kernel = None if kernels is None else kernels.rms_norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of each row; on CPU the one-pass native kernel (a row's result never depends on the others)."""
        if self._kernel is not None and x.dim() == 2:
            return self._kernel(x.float(), self.weight, self.eps).to(x.dtype)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)


@dataclass
class _Layer:
    """One decoder layer's pieces, in the engine's terms."""

    attn_norm: RMSNorm
    mlp_norm: RMSNorm
    attn_out_norm: RMSNorm | None  # Gemma2: norm on the attention output
    mlp_out_norm: RMSNorm | None  # Gemma2: norm on the MLP output
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    q_norm: RMSNorm | None  # Qwen3: per-head norms
    k_norm: RMSNorm | None
    act: Any
    q_heads: int
    kv_heads: int
    scaling: float
    softcap: float | None
    window: int | None
    silu: bool  # the MLP activation is SiLU (the native kernel fuses it with the product)
    drafts: dict[str, dict[str, DraftCopy]] = field(default_factory=dict)  # precision -> name -> copy


@dataclass(frozen=True)
class _LayerStack:
    """All decoder layers' tensors in the order ``knn_ssd::decoder_layers`` takes them."""

    norms: list[torch.Tensor]  # attention, MLP norm weights per layer
    weights: list[torch.Tensor]  # qkv, o, gate_up, down per layer
    scales: list[torch.Tensor]  # int8 per-channel scales or int4 group scales and mins; empty at full precision
    biases: list[torch.Tensor | None]
    windows: list[int]  # 0: no sliding window
    q_heads: int
    scaling: float
    eps: float


@dataclass(frozen=True)
class Segment:
    """One sequence's part of a packed forward: ``tokens`` (1-D) at positions ``start..`` of ``cache``."""

    tokens: torch.Tensor
    cache: KVCache
    start: int
    all_logits: bool = False  # logits of every position, else of the last only
    prefill: bool = False  # a prompt chunk: prefill kernels, and the final hidden states of its positions


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # (T_out, vocab) float32
    hidden: torch.Tensor | None = None  # (T, hidden) final-norm hidden states of a prefill segment


def _fuse(modules: list[torch.nn.Linear]) -> Linear:
    """Concatenate linears along outputs; the HF modules become views of the fused weight."""
    weight = torch.cat([m.weight.detach() for m in modules], dim=0).contiguous()
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device)
         for b, m in zip(biases, modules)])
    offset = 0
    for m in modules:  # share storage instead of holding the weights twice
        m.weight.data = weight[offset: offset + m.out_features]
        offset += m.out_features
    return Linear(weight, bias)


class ModelRunner:
    """Runs forward passes of one loaded model; stateless between calls (state lives in ``KVCache``)."""

    def __init__(self, hf_model: Any, int8_draft: bool = True, int4_draft: bool = True,
                 stored: dict[str, StoredTensor] | None = None) -> None:
        """``stored``: the GGUF file's tensors (``gguf_blocks.read_stored_tensors``) for a native target, whose
        linears, LM head and embedding read the file's blocks as stored; the model's widened copies of them
        are freed, and no quantised draft copy is made (it would cost what the target does)."""
        self.model = hf_model
        self.target = "native" if stored is not None else "exact"
        self._stored = stored or {}
        self._names = {id(module): name for name, module in hf_model.named_modules()}
        self._widened: list[torch.nn.Module] = []  # modules whose weights the native target reads from the file
        config = hf_model.config
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        first_attn = hf_model.model.layers[0].self_attn
        self.head_dim = first_attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
        self.embed = self._embedding(hf_model.model.embed_tokens)
        self.final_norm = RMSNorm(hf_model.model.norm)
        # The engine's own CPU kernels (see native.py) for float32 models, and bfloat16 ones where the CPU
        # has AVX512-BF16: draft linears and norms, attention, and the linears of decode/verify steps.
        # Where they run, activations, KV entries and rotary tables are float32 whatever the weights.
        cpu = self.device.type == "cpu"
        self.kernels = (native.cpu_kernels() if cpu and self.dtype == torch.float32
                        else native.bf16_kernels() if cpu and self.dtype == torch.bfloat16 else None)
        self.act_dtype = torch.float32 if self.kernels is not None else self.dtype
        with torch.no_grad():  # rotary tables for every position, computed once
            positions = torch.arange(self.max_context, device=self.device)[None]
            cos, sin = hf_model.model.rotary_emb(torch.ones(1, dtype=self.act_dtype, device=self.device), positions)
        self.cos, self.sin = cos[0], sin[0]  # (max_context, head_dim)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        tied = "lm_head.weight" not in self._stored and bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = self._linear([hf_model.lm_head], hf_model.model.embed_tokens if tied else None)
        with torch.no_grad():
            self.layers = [self._build_layer(layer) for layer in hf_model.model.layers]
        self._release_widened()
        self._stored = {}  # the linears and the embedding hold what they read
        # Quantised drafts share one int8 copy of the LM head: a 4-bit head lost too many top-1s (the default
        # model's embedding is not stored in 4-bit groups; docs/measurements.md).
        self.draft_lm_head: Int8Linear | None = None
        self._into_huge_pages([lin for lin in self._full_linears if lin.kernel_bytes], "kernel_weight")
        self._full_stack = self._layer_stack(None)
        self._draft_stacks: dict[str, _LayerStack | None] = {}
        if int8_draft and stored is None:
            self.enable_int8_draft()
        if int4_draft and stored is None:
            self.enable_int4_draft()

    def _build_layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        gemma2_norms = hasattr(layer, "pre_feedforward_layernorm")
        window = getattr(attn, "sliding_window", None)
        if window is None and self.config.model_type == "mistral":
            window = getattr(self.config, "sliding_window", None)
        return _Layer(
            attn_norm=RMSNorm(layer.input_layernorm),
            mlp_norm=RMSNorm(layer.pre_feedforward_layernorm if gemma2_norms else layer.post_attention_layernorm),
            attn_out_norm=RMSNorm(layer.post_attention_layernorm) if gemma2_norms else None,
            mlp_out_norm=RMSNorm(layer.post_feedforward_layernorm) if gemma2_norms else None,
            qkv=self._linear([attn.q_proj, attn.k_proj, attn.v_proj]),
            o=self._linear([attn.o_proj]),
            gate_up=self._linear([mlp.gate_proj, mlp.up_proj]),
            down=self._linear([mlp.down_proj]),
            q_norm=RMSNorm(attn.q_norm) if hasattr(attn, "q_norm") else None,
            k_norm=RMSNorm(attn.k_norm) if hasattr(attn, "k_norm") else None,
            act=mlp.act_fn,
            q_heads=attn.q_proj.out_features // attn.head_dim,
            kv_heads=attn.k_proj.out_features // attn.head_dim,
            scaling=float(attn.scaling),
            softcap=getattr(attn, "attn_logit_softcapping", None),
            window=window,
            silu=type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"),
        )

    def _linear(self, modules: list[torch.nn.Linear], stored_as: torch.nn.Module | None = None) -> Linear | BlockLinear:
        """The linears ``modules`` fused along their outputs: on the native target the file's blocks (of
        ``stored_as``'s weight for a head tied to the embedding), where every part is in a block format the
        kernels read; else the loaded (widened) weights."""
        names = [self._names[id(stored_as if stored_as is not None else m)] for m in modules]
        parts = [self._stored.get(f"{name}.weight") for name in names]
        if not all(part is not None and part.quantised for part in parts):
            return _fuse(modules) if len(modules) > 1 else Linear(modules[0].weight.detach(),
                                                                   getattr(modules[0], "bias", None))
        biases = [self._stored.get(f"{name}.bias") for name in names]
        bias = None if all(b is None for b in biases) and all(getattr(m, "bias", None) is None for m in modules) \
            else torch.cat([b.rows.reshape(-1).float() if b is not None else m.bias.detach().float()
                            for b, m in zip(biases, modules)])
        self._widened += modules
        linear = BlockLinear([(part.type_id, part.rows) for part in parts], parts[0].in_features, bias)
        for name in names:  # re-laid: the file's rows are not needed again (peak memory at load)
            self._stored.pop(f"{name}.weight")
        return linear

    def _embedding(self, module: torch.nn.Module) -> Any:
        """The token embedding: the file's rows, dequantised per call, on the native target; else the module."""
        stored = self._stored.get(f"{self._names[id(module)]}.weight")
        if stored is None or not stored.quantised:
            return module
        self._widened.append(module)
        return BlockEmbedding(stored, getattr(module, "embed_scale", None))

    def _release_widened(self) -> None:
        """Free the loaded model's copies of the weights the native target reads from the file instead."""
        for module in self._widened:
            module.weight.data = torch.empty(0, dtype=module.weight.dtype)
        self._widened = []
        native.release_free_memory()

    @property
    def vocab_size(self) -> int:
        """Logit rows (may exceed the tokenizer's length)."""
        head = self.lm_head
        return head.out_features if isinstance(head, BlockLinear) else head.weight.shape[0]

    # ------------------------------------------------------------------ draft copies
    def enable_int8_draft(self) -> bool:
        """Make the int8 weight-only copy used by ``precision="int8"`` drafts (once), where it can pay
        (``Int8Linear.pays_on``: CPUs, not CUDA). Returns whether the copy exists."""
        if not Int8Linear.pays_on(self.device):
            return False
        self._enable_draft("int8", Int8Linear)
        return True

    def enable_int4_draft(self) -> bool:
        """Make the 4-bit copy used by ``precision="int4"`` drafts (once), where the native kernels run it
        (CPU with AVX2, every layer's input width a multiple of 32). Returns whether the copy exists."""
        layers = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if not all(Int4Linear.supports(lin.weight) for lin in layers):
            return False
        self._enable_draft("int4", Int4Linear)
        return True

    def _enable_draft(self, precision: str, make: type[DraftCopy]) -> None:
        if precision in self._draft_stacks:
            return
        with torch.no_grad():
            for layer in self.layers:
                layer.drafts[precision] = {name: make(lin.weight, lin.bias)
                                           for name, lin in (("qkv", layer.qkv), ("o", layer.o),
                                                             ("gate_up", layer.gate_up), ("down", layer.down))}
            copies = [copy for layer in self.layers for copy in layer.drafts[precision].values() if copy.native]
            if self.draft_lm_head is None:
                self.draft_lm_head = Int8Linear(self.lm_head.weight, self.lm_head.bias)
                copies += [self.draft_lm_head] if self.draft_lm_head.native else []
        self._into_huge_pages(copies, "qweight")
        self._draft_stacks[precision] = self._layer_stack(precision)

    def _into_huge_pages(self, holders: list[Any], attribute: str) -> None:
        """Move the ``attribute`` weights of ``holders`` (what the native kernels stream every step) into one
        block of 2 MiB pages (``huge_pages`` in the kernels: a 12-token verify ~0.95x the time)."""
        if self.kernels is not None and holders:
            moved = self.kernels.huge_pages([getattr(holder, attribute) for holder in holders])
            for holder, weight in zip(holders, moved):
                setattr(holder, attribute, weight)
            native.release_free_memory()  # the copies just replaced

    @property
    def quantised_precisions(self) -> tuple[str, ...]:
        """The quantised draft copies this runner made (``int8``, ``int4``)."""
        return tuple(self._draft_stacks)

    @property
    def draft_precisions(self) -> tuple[str, ...]:
        """The draft precisions this runner serves: ``full`` and each quantised copy."""
        return ("full", *self.quantised_precisions)

    @property
    def draft_copies_summary(self) -> str:
        """The quantised draft copies and their memory, for logs and reports."""
        copies = [f"{p} draft copy {self.draft_bytes(p) / 2**20:.0f} MiB" for p in self.quantised_precisions]
        return ", ".join(copies) or "no quantised draft copy"

    def _layer_stack(self, precision: str | None) -> _LayerStack | None:
        """The layers for the one-call native path of full-model decode/verify steps (``precision`` None)
        or quantised drafts, where the kernels run them all: plain pre-norm layers with SiLU MLPs and one
        norm epsilon, head count and scaling (Llama, Qwen2, Mistral). Other layouts (Gemma's extra norms
        and softcaps, Qwen3's head norms) keep the per-layer path."""
        layers = self.layers
        if self.kernels is None or any(layer.attn_out_norm or layer.mlp_out_norm or layer.q_norm or layer.softcap
                                       or not layer.silu for layer in layers):
            return None
        norms = [norm for layer in layers for norm in (layer.attn_norm, layer.mlp_norm)]
        if len({n.eps for n in norms}) != 1 or len({(la.q_heads, la.scaling) for la in layers}) != 1:
            return None
        names = ("qkv", "o", "gate_up", "down")
        linears = [layer.drafts[precision][name] if precision else getattr(layer, name)
                   for layer in layers for name in names]
        if not all(lin.native for lin in linears):
            return None
        blocks = all(isinstance(lin, BlockLinear) for lin in linears)
        if not precision and not blocks and any(isinstance(lin, BlockLinear) for lin in linears):
            return None  # a native target with some widened linears: the per-layer path mixes them
        return _LayerStack(norms=[n.weight for n in norms],
                           weights=[lin.qweight if precision else lin.kernel_weight for lin in linears],
                           scales=[lin.scale for lin in linears] if precision else
                           [lin.parts for lin in linears] if blocks else [],
                           biases=[lin.bias for lin in linears], windows=[layer.window or 0 for layer in layers],
                           q_heads=layers[0].q_heads, scaling=layers[0].scaling, eps=norms[0].eps)

    @property
    def target_summary(self) -> str:
        """What plain decoding runs and verification checks, for the startup log."""
        if self.target == "exact":
            return f"exact (weights as loaded: {str(self.dtype).removeprefix('torch.')})"
        counts: dict[str, int] = {}
        for lin in self._full_linears:
            for type_id, *_ in (lin.parts.tolist() if isinstance(lin, BlockLinear) else [(None, 0)]):
                name = BLOCK_TYPES.get(type_id, f"widened {str(self.dtype).removeprefix('torch.')}")
                counts[name] = counts.get(name, 0) + 1
        stored = sum(lin.kernel_bytes for lin in self._full_linears if isinstance(lin, BlockLinear))
        return (f"native (the GGUF's blocks as stored, tiled once, {stored / 2**20:.0f} MiB: " +
                ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) + ")")

    @property
    def kernel_summary(self) -> str:
        """Which kernels run the forwards, for the startup log."""
        if self.kernels is None:
            return "torch kernels"
        roles = (("full-model forwards", self._full_stack),
                 *((f"{precision} drafts", stack) for precision, stack in self._draft_stacks.items()))
        stacked = [role for role, stack in roles if stack is not None]
        packed = sum(lin.kernel_bytes for lin in self._full_linears)
        weights = " (bf16 weights on AVX512-BF16, float32 activations)" if self.dtype == torch.bfloat16 else ""
        weights += f" over a packed copy of the weights ({packed / 2**20:.0f} MiB)" if packed else ""
        listed = ", ".join(stacked[:-1]) + " and " + stacked[-1] if len(stacked) > 1 else "".join(stacked)
        return f"native CPU kernels{weights}, " + (f"{listed} in one call for all layers" if stacked
                                                   else "one call per layer")

    @property
    def batch_invariant(self) -> bool:
        """Whether every full-model forward runs the native kernels, whose results for a position never
        depend on the tokens computed with it: then a k-token verify gives the one-token logits exactly,
        in bfloat16 as in float32."""
        return all(lin.native for lin in self._full_linears) and all(self._native_attention(la) for la in self.layers)

    @property
    def _full_linears(self) -> list[Linear]:
        """The full model's linear layers: every layer's four, then the LM head."""
        return [lin for la in self.layers for lin in (la.qkv, la.o, la.gate_up, la.down)] + [self.lm_head]

    @property
    def int8_draft_bytes(self) -> int:
        """Memory the int8 draft copy costs (0 when not made), its LM head included."""
        return self.draft_bytes("int8")

    def draft_bytes(self, precision: str) -> int:
        """Memory the ``precision`` draft copy costs (0 when not made), the shared int8 LM head included."""
        if precision not in self._draft_stacks:
            return 0
        layers = sum(q.nbytes for layer in self.layers for q in layer.drafts[precision].values())
        return layers + self.draft_lm_head.nbytes

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the activations' (float32 where the native kernels run), but 16 bits where
        every layer attends with the native kernel, which rounds each entry once as it writes it (half the
        bytes decode rows read per step, where long contexts and batches spend most of it; the same entries
        in every forward): float16 on the native target, as llama.cpp keeps them (3 more mantissa bits than
        bfloat16), bfloat16 for bf16 models on the exact target."""
        if self.kernels is None or not all(self._native_attention(layer) for layer in self.layers):
            return self.act_dtype
        if self.target == "native":
            return torch.float16
        return torch.bfloat16 if self.dtype == torch.bfloat16 else self.act_dtype

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.num_layers, self.kv_heads, self.head_dim, capacity, self.kv_dtype, self.device)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, policy: DraftPolicy | None = None,
                all_logits: bool = False, prefill: bool = False) -> ForwardOutput:
        """Run ``tokens`` (1-D) of one sequence at positions ``start..``, writing KV there.

        ``policy`` None runs the full model; otherwise the draft (skips and precision
        of the policy). Returns logits of the last position, or of all when
        ``all_logits``; ``prefill`` runs it as a prompt chunk and adds its final hidden states.
        """
        return self.forward_packed([Segment(tokens, cache, start, all_logits, prefill)], policy)[0]

    @torch.inference_mode()
    def forward_packed(self, segments: list[Segment], policy: DraftPolicy | None = None) -> list[ForwardOutput]:
        """One forward over several sequences' tokens packed into one batch (one read of the weights).

        Linear layers, norms and rotary run on all tokens at once; attention runs per
        segment against its own cache. Each segment's results are bit-identical to
        running it alone (the linear layers are batch-invariant), so batching never
        changes an output.
        """
        skip = policy.skip if policy is not None else NO_SKIP
        quantised = policy.precision if policy is not None and policy.precision != "full" else None
        if quantised and quantised not in self._draft_stacks:
            raise ValueError(f"{quantised} draft requested but the runner was built without the {quantised} copy")
        lengths = [seg.tokens.shape[0] for seg in segments]
        tokens = torch.cat([seg.tokens for seg in segments]) if len(segments) > 1 else segments[0].tokens
        if len(segments) == 1:
            cos, sin = self.cos[segments[0].start:segments[0].start + lengths[0]], self.sin[
                segments[0].start:segments[0].start + lengths[0]]
        else:
            positions = torch.cat([torch.arange(seg.start, seg.start + n, device=self.device)
                                   for seg, n in zip(segments, lengths)])
            cos, sin = self.cos[positions], self.sin[positions]
        cos, sin = cos[:, None], sin[:, None]  # (T, 1, D): over heads
        h = self.embed(tokens).to(self.act_dtype)  # (T, H), all segments
        stack = self._stack_for(quantised)
        if stack is not None:
            h = self._stacked_layers(stack, h, cos[:, 0], sin[:, 0], segments, lengths, skip)
        else:
            with self._sdpa_backends():
                h = self._layers(h, quantised, cos, sin, segments, lengths, skip)
        h = self.final_norm(h)
        counts = [n if seg.all_logits else 1 for seg, n in zip(segments, lengths)]  # logit rows per segment
        if len(segments) == 1:  # a slice, not an index tensor: no host-to-device copy on CUDA
            h_out = h if segments[0].all_logits else h[-1:]
        else:  # each segment's last ``count`` positions
            picked = [i for end, count in zip(itertools.accumulate(lengths), counts) for i in range(end - count, end)]
            h_out = h[torch.tensor(picked, device=h.device)]
        logits = (self.draft_lm_head(h_out) if quantised else self.lm_head(h_out)).float()
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        outputs, offset, row = [], 0, 0
        for seg, n, count in zip(segments, lengths, counts):
            hidden = h[offset:offset + n] if seg.prefill else None
            outputs.append(ForwardOutput(logits=logits[row:row + count], hidden=hidden))
            offset += n
            row += count
        return outputs

    def _layers(self, h: torch.Tensor, quantised: str | None, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment], lengths: list[int], skip: SkipSet) -> torch.Tensor:
        """The decoder layers one at a time (where the one-call native stack does not serve the forward)."""
        for index, layer in enumerate(self.layers):
            lin = layer.drafts[quantised] if quantised else None
            if index not in skip.attention:
                h = h + self._attention(layer, lin, index, layer.attn_norm(h), cos, sin, segments, lengths)
            if index not in skip.mlp:
                h = h + self._mlp(layer, lin, layer.mlp_norm(h))
        return h

    def _sdpa_backends(self) -> contextlib.AbstractContextManager[None]:
        """The attention kernels torch's SDPA may use in this forward (``CUDA_SDPA_BACKENDS`` on CUDA)."""
        return sdpa_kernel(CUDA_SDPA_BACKENDS) if self.device.type == "cuda" else contextlib.nullcontext()

    def _stack_for(self, quantised: str | None) -> _LayerStack | None:
        """The one-call layer stack for this forward (quantised drafts; full-precision forwards, prefill
        included, where the kernels run every layer), or None for the per-layer path."""
        if quantised:
            return self._draft_stacks[quantised]
        return self._full_stack

    def _stacked_layers(self, stack: _LayerStack, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        segments: list[Segment], lengths: list[int], skip: SkipSet) -> torch.Tensor:
        """All layers in one native call: the same kernels in the same order as the per-layer path, so
        the same results, without ~8 trips through Python per layer."""
        ends = [seg.start + n for seg, n in zip(segments, lengths)]
        buffers = [seg.cache.layer_buffers(index, end) for index in range(self.num_layers)
                   for seg, end in zip(segments, ends)]
        layers = range(self.num_layers)
        return self.kernels.decoder_layers(
            h, stack.norms, stack.weights, stack.scales, stack.biases, [int(i in skip.attention) for i in layers],
            [int(i in skip.mlp) for i in layers], cos, sin, [k for k, _ in buffers], [v for _, v in buffers],
            [seg.start for seg in segments], lengths, stack.q_heads, stack.scaling, stack.windows, stack.eps)

    def _attention(self, layer: _Layer, lin: dict[str, DraftCopy] | None, index: int, x: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], lengths: list[int]) -> torch.Tensor:
        T = x.shape[0]
        qkv = (lin["qkv"](x) if lin else layer.qkv(x)).view(T, layer.q_heads + 2 * layer.kv_heads, self.head_dim)
        if self._native_attention(layer):
            y = self._cached_attention(layer, index, qkv, cos[:, 0], sin[:, 0], segments, lengths)
        else:
            y = self._sdpa_attention(layer, index, qkv, cos, sin, segments, lengths)
        y = lin["o"](y) if lin else layer.o(y)
        if layer.attn_out_norm is not None:
            y = layer.attn_out_norm(y)
        return y

    def _native_attention(self, layer: _Layer) -> bool:
        """Whether ``layer`` attends with the native kernel, for every forward (prefill, draft, verify): each
        (token, head) is computed alone, so a position's KV entries and output never depend on the
        chunk, batch or cached prefix around it. It is also as fast as torch's SDPA for prefill
        (docs/measurements.md)."""
        return self.kernels is not None and layer.q_norm is None and layer.softcap is None

    def _sdpa_attention(self, layer: _Layer, index: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        segments: list[Segment], lengths: list[int]) -> torch.Tensor:
        """Torch attention per segment (where the native kernel does not serve the layer)."""
        nq, nk = layer.q_heads, layer.kv_heads
        qk, v = qkv[:, : nq + nk], qkv[:, nq + nk:]
        if layer.q_norm is not None:
            qk = torch.cat((layer.q_norm(qk[:, :nq]), layer.k_norm(qk[:, nq:])), dim=1)
        qk = qk * cos + _rotate_half(qk) * sin  # rotary on queries and keys at once
        ys, offset = [], 0
        for seg, n in zip(segments, lengths):
            part = slice(offset, offset + n)
            q = qk[part, :nq].transpose(0, 1)[None]  # (1, Hq, n, D)
            k = qk[part, nq:].transpose(0, 1)[None]
            keys, values = seg.cache.write(index, seg.start, k, v[part].transpose(0, 1)[None])
            ys.append(_attend(q, keys, values, seg.start, layer)[0].transpose(0, 1).reshape(n, -1))
            offset += n
        return torch.cat(ys) if len(ys) > 1 else ys[0]

    def _cached_attention(self, layer: _Layer, index: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          segments: list[Segment], lengths: list[int]) -> torch.Tensor:
        """Rotary, KV writes and attention of all ``segments`` in one native call."""
        buffers = [seg.cache.layer_buffers(index, seg.start + n) for seg, n in zip(segments, lengths)]
        return self.kernels.cached_attention(qkv, cos, sin, [k for k, _ in buffers], [v for _, v in buffers],
                                             [seg.start for seg in segments], lengths, layer.q_heads,
                                             layer.scaling, layer.window or 0)

    def _mlp(self, layer: _Layer, lin: dict[str, DraftCopy] | None, x: torch.Tensor) -> torch.Tensor:
        gate_up = lin["gate_up"](x) if lin else layer.gate_up(x)
        if self.kernels is not None and layer.silu:
            hidden = self.kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = layer.act(gate) * up
        y = lin["down"](hidden) if lin else layer.down(hidden)
        if layer.mlp_out_norm is not None:
            y = layer.mlp_out_norm(y)
        return y


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, layer: _Layer) -> torch.Tensor:
    """Causal attention of ``q`` (positions start..start+T) over cached keys ``[0, start+T)``."""
    T, S = q.shape[2], keys.shape[2]
    mask = None
    if T > 1 or layer.window is not None:
        qpos = torch.arange(start, start + T, device=q.device)[:, None]
        kpos = torch.arange(S, device=q.device)[None, :]
        mask = kpos <= qpos
        if layer.window is not None:
            mask = mask & (kpos > qpos - layer.window)
    groups = q.shape[1] // keys.shape[1]
    if layer.softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scaling,
                                              enable_gqa=groups > 1)
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * layer.scaling
    scores = torch.tanh(scores / layer.softcap) * layer.softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values
