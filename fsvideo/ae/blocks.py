"""FSAE blocks: DC-AE's residual conv block and EfficientViT block, with causal 3D kernels.

Every 2D kernel larger than 1×1 becomes a causal ``kt×k×k`` conv; 1×1 convs (and DC-AE's linear
projections) become ``1×1×1`` convs. Attention mixes positions only within a frame (H×W); time
enters only through the causal convs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fsvideo.ae.config import FSAEConfig
from fsvideo.ae.conv import CausalCache, CausalConv3d
from fsvideo.ae.norm import PixelNorm


def relu_linear_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, eps: float = 1e-15
) -> torch.Tensor:
    """EfficientViT's ReLU linear attention, channels first.

    This is a kernel (softmax-free) attention with cost linear in N, so it cannot go through the
    project's softmax ``fsvideo.attention.attention``; it computes, per head,
    ``out_n = Σ_m (q_n·k_m) v_m / Σ_m (q_n·k_m)`` with ReLU already applied to q and k.

    Args:
        query, key, value: ``B×heads×d×N`` (float32 recommended: the sums are long).

    Returns:
        ``B×heads×d×N``.
    """
    value = F.pad(value, (0, 0, 0, 1), value=1.0)  # extra row of ones yields the normaliser
    kv = value @ key.transpose(-1, -2)  # B, heads, d+1, d
    out = kv @ query  # B, heads, d+1, N
    return out[:, :, :-1] / (out[:, :, -1:] + eps)


class ResBlock(nn.Module):
    """conv → SiLU → conv → pixel norm, plus the input."""

    def __init__(self, channels: int, temporal_kernel_size: int, eps: float) -> None:
        super().__init__()
        kernel = (temporal_kernel_size, 3, 3)
        self.conv1 = CausalConv3d(channels, channels, kernel)
        self.conv2 = CausalConv3d(channels, channels, kernel, bias=False)
        self.norm = PixelNorm(channels, eps)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×T×H×W`` → same shape."""
        h = F.silu(self.conv1(x, cache))
        return x + self.norm(self.conv2(h, cache))


class MultiscaleProjection(nn.Module):
    """Aggregates q/k/v over a ``k×k`` neighbourhood: depthwise causal conv, then a per-head mix."""

    def __init__(
        self,
        channels: int,
        heads: int,
        kernel_size: int,
        temporal_kernel_size: int,
    ) -> None:
        super().__init__()
        self.depthwise = CausalConv3d(
            channels,
            channels,
            (temporal_kernel_size, kernel_size, kernel_size),
            groups=channels,
            bias=False,
        )
        self.pointwise = CausalConv3d(channels, channels, 1, groups=heads, bias=False)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self.pointwise(self.depthwise(x, cache))


class MultiscaleLinearAttention(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention over H×W, per frame, with a residual.

    q, k and v come from one ``1×1×1`` projection laid out as EfficientViT's fused qkv conv
    (diffusers splits it into ``to_q``/``to_k``/``to_v`` but concatenates them back), so a "head"
    is ``3·head_dim`` consecutive channels of that projection split into q, k and v.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        kernel_sizes: tuple[int, ...],
        temporal_kernel_size: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        self.qkv = CausalConv3d(channels, 3 * channels, 1, bias=False)
        self.multiscale = nn.ModuleList(
            MultiscaleProjection(3 * channels, 3 * heads, k, temporal_kernel_size) for k in kernel_sizes
        )
        self.proj = CausalConv3d(channels * (1 + len(kernel_sizes)), channels, 1, bias=False)
        self.norm = PixelNorm(channels, eps)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×T×H×W`` → same shape."""
        b, _, t, h, w = x.shape
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [scale(qkv, cache) for scale in self.multiscale], dim=1)
        # every frame is its own attention problem: fold time into the batch
        qkv = qkv.transpose(1, 2).reshape(b * t, -1, 3 * self.head_dim, h * w)  # B·T, heads, 3d, HW
        q, k, v = qkv.float().chunk(3, dim=2)
        out = relu_linear_attention(F.relu(q), F.relu(k), v).to(x.dtype)
        out = out.reshape(b, t, -1, h, w).transpose(1, 2)  # B, C·(1+scales), T, H, W
        return x + self.norm(self.proj(out))


class GLUMBConv(nn.Module):
    """Gated inverted-bottleneck conv: 1×1×1 expand → SiLU → depthwise causal conv → GLU → 1×1×1."""

    def __init__(
        self,
        channels: int,
        expand_ratio: float,
        temporal_kernel_size: int,
        eps: float,
    ) -> None:
        super().__init__()
        hidden = int(expand_ratio * channels)
        self.inverted = CausalConv3d(channels, 2 * hidden, 1)
        self.depthwise = CausalConv3d(2 * hidden, 2 * hidden, (temporal_kernel_size, 3, 3), groups=2 * hidden)
        self.pointwise = CausalConv3d(hidden, channels, 1, bias=False)
        self.norm = PixelNorm(channels, eps)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×T×H×W`` → same shape."""
        h = self.depthwise(F.silu(self.inverted(x)), cache)
        h, gate = h.chunk(2, dim=1)
        return x + self.norm(self.pointwise(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """Multi-scale linear attention (context) followed by a GLU MBConv (local), both residual."""

    def __init__(
        self,
        channels: int,
        head_dim: int,
        kernel_sizes: tuple[int, ...],
        expand_ratio: float,
        temporal_kernel_size: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, temporal_kernel_size, eps)
        self.mlp = GLUMBConv(channels, expand_ratio, temporal_kernel_size, eps)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self.mlp(self.attn(x, cache), cache)


def make_block(config: FSAEConfig, stage: int) -> nn.Module:
    """The block type of ``stage``: residual conv outside, EfficientViT inside."""
    width, kt, eps = config.widths[stage], config.temporal_kernel_size, config.norm_eps
    if config.is_attention_stage(stage):
        return EfficientViTBlock(
            width,
            config.attention_head_dim,
            config.multiscale_kernel_sizes,
            config.mlp_expand_ratio,
            kt,
            eps,
        )
    return ResBlock(width, kt, eps)


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, cache: CausalCache | None, checkpointing: bool
) -> torch.Tensor:
    """Apply ``blocks`` in order; with ``checkpointing`` each block's activations are recomputed in
    backward. Not with a carrying cache: the recomputation would see the cache already updated."""
    recompute = checkpointing and (cache is None or not cache.carry) and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, cache, use_reentrant=False) if recompute else block(x, cache)
    return x
