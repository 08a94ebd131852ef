"""Down/up-sampling between stages with DC-AE's space-to-channel shortcuts, extended to time.

Each resampling adds a learned path (strided causal conv down; nearest upsampling + causal conv
up, as dc-ae-f32c32-sana) to a parameter-free shortcut: space(-time)-to-channel followed by an
average over channel groups (down), or channel repetition followed by channel-to-space(-time)
(up) — DC-AE's "residual autoencoding".

When time is resampled too, the first frame stays alone and the others go in pairs: ``1 + 2m``
frames ↔ ``1 + m``. The shortcut pairs the first frame with itself, so on a one-frame input it
reduces exactly to DC-AE's 2D shortcut. Channels are laid out as ``(c, dy, dx, dt)`` with time
innermost; that order is what makes the group means (and repeats) equal DC-AE's on a still image.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsvideo.ae.conv import CausalCache, CausalConv3d, holds_first_frame


def space_time_to_channel(x: torch.Tensor, time_factor: int, space_factor: int) -> torch.Tensor:
    """``B×C×T×H×W`` → ``B×(C·s²·f)×(T/f)×(H/s)×(W/s)``, channels ordered ``(c, dy, dx, dt)``."""
    b, c, t, h, w = x.shape
    f, s = time_factor, space_factor
    if t % f or h % s or w % s:
        raise ValueError(f"cannot fold {t}×{h}×{w} by time {f} and space {s}: sizes must divide")
    x = x.reshape(b, c, t // f, f, h // s, s, w // s, s)
    x = x.permute(0, 1, 5, 7, 3, 2, 4, 6)  # B, C, dy, dx, dt, T/f, H/s, W/s
    return x.reshape(b, c * s * s * f, t // f, h // s, w // s)


def channel_to_space_time(x: torch.Tensor, time_factor: int, space_factor: int) -> torch.Tensor:
    """Inverse of :func:`space_time_to_channel`."""
    b, c, t, h, w = x.shape
    f, s = time_factor, space_factor
    x = x.reshape(b, c // (s * s * f), s, s, f, t, h, w)
    x = x.permute(0, 1, 5, 4, 6, 2, 7, 3)  # B, C', T, dt, H, dy, W, dx
    return x.reshape(b, c // (s * s * f), t * f, h * s, w * s)


class DownBlock(nn.Module):
    """Halve H, W (and T when ``halve_time``): ``B×C_in×T×H×W`` → ``B×C_out×T'×H/2×W/2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        halve_time: bool,
        temporal_kernel_size: int,
    ) -> None:
        super().__init__()
        self.time_factor = 2 if halve_time else 1
        self.conv = CausalConv3d(
            in_channels,
            out_channels,
            (temporal_kernel_size, 3, 3),
            stride=(self.time_factor, 2, 2),
        )
        self.group_size = in_channels * 4 * self.time_factor // out_channels

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        first = holds_first_frame(cache, self)
        out = self.conv(x, cache)
        shortcut = x
        if self.time_factor > 1 and first:
            shortcut = torch.cat([x[:, :, :1], x], dim=2)  # the first frame stands alone as a pair
        shortcut = space_time_to_channel(shortcut, self.time_factor, 2)
        shortcut = shortcut.unflatten(1, (-1, self.group_size)).mean(dim=2)
        if cache is not None:
            cache.update(self)
        return out + shortcut


class UpBlock(nn.Module):
    """Double H, W (and T when ``double_time``): ``B×C_in×t×h×w`` → ``B×C_out×t'×2h×2w``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        double_time: bool,
        temporal_kernel_size: int,
    ) -> None:
        super().__init__()
        self.time_factor = 2 if double_time else 1
        self.conv = CausalConv3d(in_channels, out_channels, (temporal_kernel_size, 3, 3))
        self.repeats = out_channels * 4 * self.time_factor // in_channels

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        f = self.time_factor
        first = holds_first_frame(cache, self)
        up = F.interpolate(x, scale_factor=(f, 2, 2), mode="nearest")
        shortcut = x.repeat_interleave(self.repeats, dim=1)
        shortcut = channel_to_space_time(shortcut, f, 2)
        if f > 1 and first:  # the first latent frame maps back to a single frame
            up, shortcut = up[:, :, 1:], shortcut[:, :, 1:]
        if cache is not None:
            cache.update(self)
        return self.conv(up, cache) + shortcut
