"""Linear layers for the engine: full-precision with per-row-count layout choice, and int8 draft copies."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Layout = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _xw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _wx(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w @ x.T).T


def _wx_pair(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One row run as two identical rows: some BLAS builds are twice as fast per byte on 2 rows."""
    return (w @ x.expand(2, -1).T)[:, :1].T


# Mathematically identical ways to compute x @ w.T; which is fastest depends on the
# BLAS build, the weight shape and the number of rows, so autotune picks per case.
LAYOUTS: dict[str, Layout] = {"xw": _xw, "wx": _wx, "wx_pair": _wx_pair}


class Linear:
    """``y = x @ W.T + b`` over a 2-D input, with the matmul layout chosen per row count."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.layouts: dict[int, str] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        name = self.layouts.get(x.shape[0], "xw")
        if name == "wx_pair" and x.shape[0] != 1:
            name = "wx"
        y = LAYOUTS[name](x, self.weight)
        return y if self.bias is None else y + self.bias


class Int8Linear:
    """Weight-only int8 copy (symmetric, per output channel) used only by the draft.

    Activations run in bf16: the packed int8 kernel is slower than fp32 with fp32 inputs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self._use_kernel = _int8_kernel_works(self.qweight.device)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * 2
        return self.qweight.numel() + self.scale.numel() * 2 + extra

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self._use_kernel:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scale)
        else:
            y = F.linear(xb, self.qweight.to(torch.bfloat16) * self.scale[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


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
