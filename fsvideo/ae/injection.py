"""What FSAE-Standard and FSAE-Lite feed into their decoder besides the latent (spec §2.2.3).

* :class:`FirstFrameCrossAttention`: every frame's tokens of a decoder stage attend to the encoder's
  first-frame feature tokens of the same stage. Its output projection starts at zero, so a decoder
  initialised from the stage-3 one starts from that decoder's behaviour.
* :class:`NoiseSource`: standard Gaussian noise added before every conv block. With a generator the
  noise of frame ``f`` of block ``k`` is a function of (generator state at the call, ``k``, ``f``)
  only, so a seeded decode is reproducible and a chunked decode draws the same noise as one pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fsvideo.ae.norm import PixelNorm
from fsvideo.attention import attention


class FirstFrameCrossAttention(nn.Module):
    """Residual softmax cross-attention from decoder tokens (per frame) to first-frame feature tokens.

    Args:
        channels: decoder stage width.
        feature_channels: width of the encoder stage whose first-frame feature is attended to.
        head_dim: channels per head.
    """

    def __init__(self, channels: int, feature_channels: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.heads = channels // head_dim
        self.norm = PixelNorm(channels, eps)
        self.feature_norm = PixelNorm(feature_channels, eps)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(feature_channels, 2 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init for q/k/v, zero output projection (the block starts as the identity)."""
        self.norm.reset_parameters()
        self.feature_norm.reset_parameters()
        self.to_q.reset_parameters()
        self.to_kv.reset_parameters()
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """``x``: ``B×C×T×H×W``, ``feature``: ``B×C_f×1×H×W`` (any token count) → ``B×C×T×H×W``."""
        b, c, t, h, w = x.shape
        if feature.shape[0] != b:
            raise ValueError(f"first-frame feature batch {feature.shape[0]} does not match the latent's {b}")
        # queries attend independently, so all frames' tokens share one attention call against the
        # first frame's keys (no per-frame copies of the keys)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # B, T·H·W, C
        q = self.to_q(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # B, heads, T·H·W, d
        context = self.feature_norm(feature).flatten(2).transpose(1, 2)  # B, N, C_f
        k, v = self.to_kv(context).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)  # B, heads, N, d
        out = attention(q, k, v).transpose(1, 2).reshape(b, t * h * w, c)
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, t, h, w)


class NoiseSource:
    """Noise of one decode call: ``x + weight·N(0, 1)`` before each conv block.

    Args:
        weight: noise standard deviation (0.05 in §2.2.3).
        generator: seeds the call; None draws from the global RNG (training).
    """

    def __init__(self, weight: float, generator: torch.Generator | None = None) -> None:
        self.weight = weight
        self.seed = None
        if generator is not None:
            self.seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        self._frames_done: dict[int, int] = {}

    def add(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """Add noise to ``x`` (``B×C×T×H×W``), the next ``T`` frames of conv block number ``block``."""
        if self.weight == 0:
            return x
        if self.seed is None:
            return torch.randn_like(x).mul_(self.weight).add_(x)
        start = self._frames_done.get(block, 0)
        self._frames_done[block] = start + x.shape[2]
        shape = (x.shape[0], x.shape[1], *x.shape[3:])
        out = x.clone()
        for k in range(x.shape[2]):  # frame by frame: one frame of noise alive at a time
            seed = (self.seed + 1_000_003 * block + 7_919 * (start + k)) % 2**63
            generator = torch.Generator(device=x.device).manual_seed(seed)
            noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            out[:, :, k].add_(noise, alpha=self.weight)
        return out
