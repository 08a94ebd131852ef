"""Norms computed in float32 whatever the activation dtype (as Wan does, for bf16 stability).

RMSNorm: on CUDA PyTorch's ``rms_norm`` is one fused kernel each way; on the CPU it is a chain of
about six elementwise kernels forward and fourteen backward, so there ``_CPURMSNorm`` computes the
same function with one reduction and two products forward and six passes backward.

Public API:
    FP32LayerNorm(dim, eps, affine)
    FP32RMSNorm(dim, eps)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class _CPURMSNorm(torch.autograd.Function):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dim; x ``…×D`` float32, weight ``D``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        rstd = mean_square.add_(eps).rsqrt_()  # (…, 1)
        ctx.save_for_backward(x, rstd, weight)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x_hat = grad * weight
            # d/dx of x·rstd: rstd·(g − x̂·mean(g·x̂))
            mean_dot = torch.linalg.vecdot(grad_x_hat, x_hat).unsqueeze(-1).div_(x.shape[-1])
            grad_x = torch.addcmul(grad_x_hat, x_hat, mean_dot, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


class FP32RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return _CPURMSNorm.apply(x.float(), self.weight.float(), self.eps).type_as(x)
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).type_as(x)
