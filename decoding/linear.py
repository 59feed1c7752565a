"""Linear layers for the engine: full precision (native kernels on CPU, else oneDNN or torch) and the draft's
int8 and int4 copies."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import native


class Linear:
    """``y = x @ W.T + b`` over a 2-D input.

    On CPU with the engine's kernels (``native``), float32 weights (and bf16 ones where the CPU has
    AVX512-BF16) run ``linear_f32`` / ``linear_bf16`` for every forward on float32 activations, over
    a copy of the weights packed once for them. Each output row is bit-identical whether it is
    computed alone or among other rows, in a prefill chunk or a verify step (batch invariance), so
    a k-token verify reproduces the 1-token logits exactly. Without the kernels a float32 weight is
    pre-packed for oneDNN (a single row runs as two identical rows, oneDNN's fast case).
    """

    PACK_ROWS = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = None if bias is None else bias.detach()
        self._kernel = None
        self.kernel_weight = weight  # the weights in the layout the kernel reads
        kernels = None
        if weight.device.type == "cpu" and weight.is_contiguous():
            if weight.dtype == torch.float32:
                kernels = native.cpu_kernels()
            elif weight.dtype == torch.bfloat16 and weight.shape[1] % 32 == 0:
                kernels = native.bf16_kernels()
        if kernels is not None:
            pack, linear = ((kernels.pack_f32, kernels.linear_f32) if weight.dtype == torch.float32
                            else (kernels.pack_bf16, kernels.linear_bf16))
            self.kernel_weight = pack(weight)
            out_features = weight.shape[0]
            self._kernel = lambda x, w, b: linear(x, w, b, out_features)
            self.bias = None if bias is None else self.bias.float()
        self.packed = None if self._kernel is not None else _pack(weight, self.PACK_ROWS)

    @property
    def native(self) -> bool:
        """Whether the engine's native kernel runs this layer."""
        return self._kernel is not None

    @property
    def kernel_bytes(self) -> int:
        """Memory of the kernel's packed copy of the weights, 0 where there is none."""
        w = self.kernel_weight
        return 0 if w is self.weight else w.numel() * w.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.dtype == torch.float32:
            return self._kernel(x, self.kernel_weight, self.bias)
        if x.dtype != self.weight.dtype:  # float32 activations of a bf16 model, in a layer the kernel cannot run
            return self(x.to(self.weight.dtype)).to(x.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] == 1:
            return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), self.packed, self.bias, "none", [], "")[:1]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class BlockLinear:
    """``y = x @ W.T + b`` with W as a GGUF file stores it (the native target): blocks of Q4_0 ... Q8_0,
    Q4_K, Q5_K or Q6_K, read by ``qblock_linear``, never widened: re-laid once by ``qblock_pack`` in tiles
    of 16 output columns (the same bits per value and scale; Q4_K / Q5_K's 6-bit scales and mins as bytes,
    +2.8%). ``parts`` are the fused weights' (GGML type id, rows) in output order, e.g. Q4_K query and key
    rows then Q6_K value rows.

    Like ``Linear``'s kernels it is batch-invariant: each output row is one fixed chain of arithmetic
    over the row's own quantised inputs (int16 per row for the 32-input formats, int8 per 256-input block
    for the k-quants), whatever the rows computed with it.
    """

    native = True

    def __init__(self, parts: list[tuple[int, torch.Tensor]], in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        kernels = native.cpu_kernels()
        if kernels is None:
            raise RuntimeError("the native target needs the native CPU kernels (AVX2 and a C++ compiler)")
        self._kernel = kernels.qblock_linear
        stored = torch.cat([rows.reshape(-1) for _, rows in parts]).contiguous()
        types = torch.tensor([[type_id, rows.shape[0]] for type_id, rows in parts], dtype=torch.int64)
        # re-laid in tiles of 16 output columns (the same values and scales), so a vector lane is an output
        self.kernel_weight, self.parts = kernels.qblock_pack(stored, types, in_features)
        self.in_features = in_features
        self.out_features = sum(rows.shape[0] for _, rows in parts)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    @property
    def kernel_bytes(self) -> int:
        return self.kernel_weight.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x.float(), self.kernel_weight, self.parts, self.bias)


class BlockEmbedding:
    """Token embeddings read from a GGUF file's blocks (the native target): each looked-up row dequantised
    as ggml does, the table itself never widened. ``scale`` is the model's embedding multiplier (Gemma's)."""

    def __init__(self, stored: Any, scale: torch.Tensor | None = None) -> None:
        self._rows = native.cpu_kernels().qblock_rows
        self.weight_blocks, self.type_id, self.dim = stored.rows.reshape(-1).contiguous(), stored.type_id, \
            stored.in_features
        self.scale = scale

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows(self.weight_blocks, self.type_id, self.dim, ids)
        return rows * self.scale.to(rows.dtype) if self.scale is not None else rows


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """oneDNN-packed copy of ``weight`` on CPU, or None where that path is unavailable."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
    except RuntimeError:  # e.g. bf16 on a CPU without AVX-512
        return None


class DraftCopy:
    """A draft-only low-precision copy of a linear layer: ``qweight``, ``scale`` and ``bias`` tensors."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    _native: Any = None  # the engine's native kernel for this copy, if it runs it

    @property
    def nbytes(self) -> int:
        """Memory the copy holds."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.bias) if t is not None)

    @property
    def native(self) -> bool:
        """Whether the engine's native kernel runs this layer."""
        return self._native is not None


class Int8Linear(DraftCopy):
    """Weight-only int8 copy (symmetric, per output channel) used only by the draft.

    On an AVX2 CPU the engine's own kernel (``native.cpu_kernels``) runs it on
    float32 activations quantised to int16 per row; elsewhere torch's packed int8
    kernel runs it with bf16 activations (with float32 ones it is slower than fp32).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        kernels = native.cpu_kernels() if self.qweight.device.type == "cpu" else None
        self._native = None if kernels is None else kernels.int8_linear
        dtype = torch.float32 if self._native is not None else torch.bfloat16
        self.scale = scale.to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self._use_kernel = self._native is None and _int8_kernel_works(self.qweight.device)

    @staticmethod
    def pays_on(device: torch.device) -> bool:
        """Whether an int8 draft can cost less than the full weights on ``device``: on a CPU with the native
        kernels or torch's packed int8 kernel. Not on CUDA, where the copy is dequantised every call: on an
        H100 (torch 2.11) the default model's int8 draft took 1.49x the time of a full fp32 forward."""
        return device.type == "cpu" and (native.cpu_kernels() is not None or _int8_kernel_works(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._native is not None:
            return self._native(x.float(), self.qweight, self.scale, self.bias).to(x.dtype)
        xb = x.to(torch.bfloat16)
        if self._use_kernel:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scale)
        else:
            y = F.linear(xb, self.qweight.to(torch.bfloat16) * self.scale[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class Int4Linear(DraftCopy):
    """Weight-only 4-bit copy used only by the draft, on the engine's native CPU kernel (``int4_linear``).

    Groups of 32 inputs per output channel hold ``w = scale * q + min`` with q in 0..15 and float16
    scale and min (round to nearest from the group's min and max). That is the layout of GGUF's Q4_1
    and Q4_K blocks, so weights dequantised from such a file come back almost exactly (on the default
    model this draft's top-1 agrees with the full model more often than the int8 copy's).
    """

    GROUP = 32

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """Whether ``weight`` can have this copy: on CPU with the native kernels, input width a multiple of 32."""
        return weight.device.type == "cpu" and weight.shape[1] % cls.GROUP == 0 and native.cpu_kernels() is not None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if not self.supports(weight):
            raise ValueError("an int4 draft copy needs the native CPU kernels and input widths that are "
                             "multiples of 32")
        self._native = native.cpu_kernels().int4_linear
        n, k = weight.shape
        w = weight.detach().float().view(n, k // self.GROUP, self.GROUP)
        low, high = w.amin(dim=2), w.amax(dim=2)
        scale, low = ((high - low) / 15).half(), low.half()  # the grid the kernel will use
        step = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]
        q = torch.round((w - low.float()[..., None]) / step).clamp(0, 15).to(torch.uint8)
        half = self.GROUP // 2
        self.qweight = (q[..., :half] | (q[..., half:] << 4)).reshape(n, k // 2).contiguous()
        self.scale = torch.stack((scale, low)).contiguous()  # (2, N, K / 32): group scales, then mins
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._native(x.float(), self.qweight, self.scale, self.bias).to(x.dtype)

    def dequantised(self) -> torch.Tensor:
        """The float32 weights this copy stands for (for tests and error measurements)."""
        q = torch.cat((self.qweight & 15, self.qweight >> 4), dim=1)  # per group: low nibbles, then high
        n = self.qweight.shape[0]
        q = q.view(n, 2, -1, self.GROUP // 2).transpose(1, 2).reshape(n, -1, self.GROUP).float()
        scale, low = self.scale.float()
        return (q * scale[..., None] + low[..., None]).reshape(n, -1)


_KERNEL_OK: dict[str, bool] = {}


def _int8_kernel_works(device: torch.device) -> bool:
    """Probe once per device type whether ``_weight_int8pack_mm`` runs there."""
    key = device.type
    if key not in _KERNEL_OK:
        try:
            torch.ops.aten._weight_int8pack_mm(
                torch.ones(1, 64, dtype=torch.bfloat16, device=device),
                torch.ones(8, 64, dtype=torch.int8, device=device),
                torch.ones(8, dtype=torch.bfloat16, device=device),
            )
            _KERNEL_OK[key] = True
        except (RuntimeError, NotImplementedError):
            _KERNEL_OK[key] = False
    return _KERNEL_OK[key]
