"""Self- and cross-attention of the Wan2.1 I2V block; the kernel is ``fsvideo.attention.attention``.

Keys and values share one ``Linear(dim → 2·dim)`` (``to_kv``: Wan's k weight stacked on its v
weight, see ``fsvideo.convert.wan``): one matmul instead of two, forward and backward.

Public API:
    SelfAttention(dim, num_heads, qk_norm, eps)
        forward(x, rotations, kv_source=None) -> ``B×N×dim``; keys/values from ``kv_source`` when
        given (Layer Memory), else from ``x``. With a ``sequence_parallel`` hook (set from outside by
        ``fsvideo.parallel``) x holds this rank's run of the N tokens, and the kernel runs on heads/cp heads of all
        N tokens between two all-to-alls.
    CrossAttention(dim, num_heads, qk_norm, eps, image_branch)
        forward(x, text, text_mask=None, image=None) -> ``B×N×dim``; text and image results summed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fsvideo.attention import attention
from fsvideo.dit.norms import FP32RMSNorm
from fsvideo.dit.rope import apply_rope

if TYPE_CHECKING:
    from fsvideo.parallel import UlyssesSequenceParallel


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, nh, N, hd)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, N, nh·hd)


def _norm(dim: int, enabled: bool, eps: float) -> nn.Module:
    return FP32RMSNorm(dim, eps) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = _norm(dim, qk_norm, eps)
        self.norm_k = _norm(dim, qk_norm, eps)
        self.sequence_parallel: UlyssesSequenceParallel | None = None
        """Set from outside (``fsvideo.parallel.apply_context_parallel``) to run context-parallel."""

    def forward(
        self, x: torch.Tensor, rotations: torch.Tensor, kv_source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x, kv_source: ``B×N×dim``; rotations: ``N×head_dim/2`` complex (``rope_rotations``). Under
        context parallel x and kv_source hold this rank's run of N_r tokens, rotations all N rows."""
        num_tokens = rotations.shape[0]
        if self.sequence_parallel is not None:
            rotations = self.sequence_parallel.shard_tokens(rotations, dim=0)  # (N_r, hd/2)
        q = apply_rope(self.norm_q(self.to_q(x)), rotations)
        k, v = self.to_kv(x if kv_source is None else kv_source).chunk(2, dim=-1)
        k = apply_rope(self.norm_k(k), rotations)
        heads = self.num_heads
        q, k, v = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)  # (B, nh, N, hd)
        if self.sequence_parallel is None:
            return self.to_out(_merge_heads(attention(q, k, v)))
        # Ulysses: (B, nh, N_r, hd) → (B, nh/cp, N, hd); norms and RoPE above ran over the whole width
        q, k, v = self.sequence_parallel.heads_to_sequence(q, k, v, total=num_tokens)
        out = self.sequence_parallel.sequence_to_heads(attention(q, k, v))  # (B, nh, N_r, hd)
        return self.to_out(_merge_heads(out))


class CrossAttention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, image_branch: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = _norm(dim, qk_norm, eps)
        self.norm_k = _norm(dim, qk_norm, eps)
        self.image_branch = image_branch
        if image_branch:
            self.to_kv_img = nn.Linear(dim, 2 * dim)
            self.norm_k_img = _norm(dim, qk_norm, eps)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: ``B×N×dim``; text: ``B×L×dim`` (embedded); text_mask: ``B×L`` bool (True = attend);
        image: ``B×M×dim`` (embedded), required exactly when the image branch exists."""
        heads = self.num_heads
        q = _split_heads(self.norm_q(self.to_q(x)), heads)
        k, v = self.to_kv(text).chunk(2, dim=-1)
        mask = None if text_mask is None else text_mask[:, None, None, :]  # (B, 1, 1, L)
        out = attention(q, _split_heads(self.norm_k(k), heads), _split_heads(v, heads), attn_mask=mask)
        if self.image_branch:
            k_img, v_img = self.to_kv_img(image).chunk(2, dim=-1)
            out = out + attention(q, _split_heads(self.norm_k_img(k_img), heads), _split_heads(v_img, heads))
        return self.to_out(_merge_heads(out))
