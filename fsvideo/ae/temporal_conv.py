"""The decoder's non-causal and group-causal 3D convs (FSAE-Standard / FSAE-Lite, spec §2.2.3).

Both keep :class:`~fsvideo.ae.conv.CausalConv3d`'s weights and spatial padding and change only what
each output frame sees in time, so a causal decoder's weights load into either unchanged.

* :class:`NonCausalConv3d` centres the temporal kernel and zero pads both ends of the clip. It sees
  the future, so it cannot be split into temporal chunks exactly.
* :class:`GroupCausalConv3d` (IV-VAE) cuts the frames into groups, the first frame alone and then
  ``group_size`` frames each: a frame sees the previous frames (across groups, like a causal conv)
  and the frames after it inside its own group; past the end of the group the group's last frame is
  repeated (replication padding). No frame depends on a later group, so chunks cut at group borders
  with a :class:`~fsvideo.ae.conv.CausalCache` equal the one-shot pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsvideo.ae.conv import CausalCache, CausalConv3d, causal_pad, holds_first_frame


def _split(kernel_frames: int) -> tuple[int, int]:
    """Frames a centred temporal kernel reads before and after its output frame."""
    before = kernel_frames // 2
    return before, kernel_frames - 1 - before


class NonCausalConv3d(CausalConv3d):
    """3D conv with a centred temporal kernel, "same" zero padding in time and space."""

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×T×H×W`` → ``B×C'×T×H'×W'``."""
        if cache is not None and cache.carry:
            raise ValueError(
                "a non-causal decoder (decoder_variant=standard) reads future frames and cannot decode in "
                "temporal chunks; decode in one pass, or use decoder_variant=lite for chunked decoding"
            )
        before, after = _split(self.kernel_size[0])
        return nn.Conv3d.forward(self, F.pad(x, (0, 0, 0, 0, before, after)))


class GroupCausalConv3d(CausalConv3d):
    """3D conv, causal across frame groups and free inside one, replication padded after each group.

    Args:
        group_size: frames per group after the first frame, which is a group of its own.
    """

    def __init__(self, *args, group_size: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_size = group_size

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×T×H×W`` → ``B×C'×T×H'×W'``; T counts whole groups (the first frame alone when the chunk
        starts the video)."""
        before, after = _split(self.kernel_size[0])
        frames = x.shape[2]
        first = holds_first_frame(cache, self)
        head = 1 if first else 0
        if (frames - head) % self.group_size:
            raise ValueError(
                f"group-causal conv got {frames} frames: it needs {'1 + ' if first else ''}a multiple of "
                f"{self.group_size} (chunks must start at latent-frame borders)"
            )
        past = cache.past(self) if cache is not None and not first else None
        padded = causal_pad(x, past, before)
        out = None
        starts = (
            [0, *range(head, frames, self.group_size)] if head else list(range(0, frames, self.group_size))
        )
        for start in starts:
            end = start + (1 if head and start == 0 else self.group_size)
            window = padded[:, :, start : end + before]
            if after:
                window = torch.cat([window, window[:, :, -1:].expand(-1, -1, after, -1, -1)], dim=2)
            group = nn.Conv3d.forward(self, window)
            if out is None:  # written group by group: one group's temporaries at a time
                out = group.new_empty(*group.shape[:2], frames, *group.shape[3:])
            out[:, :, start:end] = group
        if cache is not None and before:
            # a copy: a view would keep this chunk's whole input alive until the next chunk
            cache.update(self, padded[:, :, padded.shape[2] - before :].clone())
        elif cache is not None:
            cache.update(self)
        return out


def temporal_conv_like(conv: CausalConv3d, variant: str, group_size: int = 1) -> CausalConv3d:
    """``conv``'s shape with ``variant``'s temporal padding (``causal`` and pointwise-in-time convs are
    returned as they are). Parameters are fresh: initialise or load them afterwards."""
    if variant == "causal" or conv.kernel_size[0] == 1:
        return conv
    if conv.stride[0] != 1:
        raise ValueError(f"a temporally strided conv has no {variant} form")
    conv_type = GroupCausalConv3d if variant == "lite" else NonCausalConv3d
    kwargs = {"group_size": group_size} if variant == "lite" else {}
    return conv_type(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        groups=conv.groups,
        bias=conv.bias is not None,
        **kwargs,
    )


def convert_temporal_convs(module: nn.Module, variant: str, group_size: int = 1) -> None:
    """Replace every causal conv inside ``module`` by :func:`temporal_conv_like`."""
    for name, child in list(module.named_children()):
        if type(child) is CausalConv3d:
            setattr(module, name, temporal_conv_like(child, variant, group_size))
        else:
            convert_temporal_convs(child, variant, group_size)
