"""Transformer block of the base DiT: the Wan2.1 I2V block with Layer Memory self-attention (Figure 5).

    x ─ LayerNorm ─ modulate(shift, scale) ─┬─ q ──────────────┐
        (router: mixture of X_0…X_{l−1} ─ LayerNorm ─ modulate) ─ k, v ─ self-attn (3D RoPE) ─ ·gate ─ + x
    x ─ LayerNorm(affine) ─ cross-attn(text) + cross-attn(image) ─ + x
    x ─ LayerNorm ─ modulate(shift, scale) ─ FFN(GELU tanh) ─ ·gate ─ + x

Shift/scale/gate come from a learned ``1×6×dim`` table added to the projected time embedding.
Norms and the modulation run in float32 (as in Wan); the residual stream keeps the input dtype.
Modulation and gated residuals are one ``addcmul`` each (Wan: a multiply, then an add).

Public API:
    FeedForward(dim, hidden_dim)
    DiTBlock(config, layer_index)      layer_index is 1-based; blocks with index ≥ 2 get a router
        forward(x, time_modulation, text, text_mask, image, rotations, history=None, return_router_max=False)
            -> (x ``B×N×dim``, router maxima ``B×l`` over tokens, or None unless asked and routed)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsvideo.dit.attention_layers import CrossAttention, SelfAttention
from fsvideo.dit.config import DiTConfig
from fsvideo.dit.layer_memory import LayerMemoryRouter
from fsvideo.dit.norms import FP32LayerNorm


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``norm(h)·(1 + scale) + shift`` in float32; h ``B×N×dim``, shift / scale ``B×dim``."""
    return torch.addcmul(shift[:, None], norm(h.float()), 1 + scale[:, None]).type_as(h)


def _gated_residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + update·gate`` computed in float32 (type promotion, no upcast copies); x, update ``B×N×dim``,
    gate ``B×dim`` float32."""
    return torch.addcmul(x, update, gate[:, None]).type_as(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden_dim)
        self.fc_out = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig, layer_index: int) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.layer_index = layer_index
        self.norm_attn = FP32LayerNorm(dim, eps, affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm_cross = FP32LayerNorm(dim, eps, affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(
            dim, config.num_heads, config.qk_norm, eps, image_branch=config.image_dim is not None
        )
        self.norm_ffn = FP32LayerNorm(dim, eps, affine=False)
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        # Block l sees X_0 … X_{l−1}: a choice exists only from l = 2 on.
        self.router = (
            LayerMemoryRouter(dim, layer_index, config.router_init_margin, config.router_gate_init)
            if config.layer_memory and layer_index >= 2
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        time_modulation: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        image: torch.Tensor | None,
        rotations: torch.Tensor,
        history: list[torch.Tensor] | None = None,
        return_router_max: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            x: ``B×N×dim`` hidden state X_{l−1}.
            time_modulation: ``B×6×dim`` float32 projected time embedding.
            text: ``B×L×dim`` embedded text tokens; text_mask: ``B×L`` bool or None.
            image: ``B×M×dim`` embedded image tokens, or None without an image branch.
            rotations: ``N×head_dim/2`` complex RoPE table (``rope_rotations``).
            history: [X_0 … X_{l−1}] (last is ``x``); required when the block has a router.
            return_router_max: also return the router's per-source max weight over tokens.
        """
        shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn = (
            self.modulation.float() + time_modulation
        ).unbind(1)  # each (B, dim)

        # 1. self-attention; with Layer Memory keys/values come from the routed mixture (eq. 8)
        x_mod = _modulate(x, shift_attn, scale_attn, self.norm_attn)
        kv_source, router_max = None, None
        if self.router is not None:
            if history is None:
                raise ValueError(f"block {self.layer_index} has a Layer Memory router and needs the history")
            mixture, weights = self.router(x_mod, history)
            kv_source = _modulate(mixture, shift_attn, scale_attn, self.norm_attn)
            if return_router_max:  # (B, l); 0 (weights are ≥ 0) on a context-parallel rank holding no token
                batch, tokens, sources = weights.shape
                router_max = weights.detach().amax(dim=1) if tokens else weights.new_zeros(batch, sources)
        x = _gated_residual(x, self.self_attn(x_mod, rotations, kv_source), gate_attn)

        # 2. cross-attention to text and image tokens (no modulation, no gate)
        x = x + self.cross_attn(self.norm_cross(x.float()).type_as(x), text, text_mask, image)

        # 3. feed-forward
        x = _gated_residual(x, self.ffn(_modulate(x, shift_ffn, scale_ffn, self.norm_ffn)), gate_ffn)
        return x, router_max
