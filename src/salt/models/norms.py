"""The encoder's normalisation layers: LayerNorm or RMSNorm (`model.encoder.norm`).

- `LayerNorm`: `(x - mean(x)) / sqrt(var(x) + eps)`, with a learned scale and shift when
  affine (`torch.nn.LayerNorm`; GN1/GN2).
- `RMSNorm` (Zhang & Sennrich 2019, arXiv:1910.07467): `x / sqrt(mean(x^2) + eps)`, no
  centring, with a learned scale when affine (it has no shift): `torch.nn.RMSNorm`, as the
  old tool's GN3 configs use it (there it always has the learned scale: `norm_affine: true`).

Both use eps = 1e-5 (torch's LayerNorm default, the old tool's RMSNorm's). `RMSNorm` here is
`torch.nn.RMSNorm` (same parameters and state dict) that also exports: torch's TorchScript
ONNX exporter has no `aten::rms_norm` at opset 20, so the export traces the formula written
out in ONNX's basic ops.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn

EPS = 1e-5


class Norm(enum.StrEnum):
    LayerNorm = "LayerNorm"
    RMSNorm = "RMSNorm"


NORMS = tuple(Norm)


class RMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` over the last dimension, exportable with the TorchScript exporter.

    A bf16/fp16 input (autocast) is normalised in fp32 and returned in its dtype, as
    LayerNorm's kernel does: torch's fused kernel refuses a weight of another dtype (and
    warns on every call).
    """

    def __init__(self, dim: int, affine: bool = False) -> None:
        super().__init__(dim, eps=EPS, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return self.formula(x)
        if x.dtype in (torch.bfloat16, torch.float16):
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)

    def formula(self, x: Tensor) -> Tensor:
        """`x * rsqrt(mean(x^2) + eps) * weight`, in ops every ONNX opset has."""
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        return out if self.weight is None else out * self.weight


def make_norm(kind: str, dim: int, affine: bool = False) -> nn.Module:
    """A `kind` norm (`NORMS`) over the last dimension `dim`, with learned scale (and, for
    LayerNorm, shift) when `affine`."""
    if kind == Norm.LayerNorm:
        return nn.LayerNorm(dim, eps=EPS, elementwise_affine=affine)
    if kind == Norm.RMSNorm:
        return RMSNorm(dim, affine)
    raise ValueError(f"norm {kind!r} unknown; choose from {', '.join(NORMS)}")
