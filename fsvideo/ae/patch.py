"""Stage-3 patch decoding (spec §2.2.1 and its footnote 3).

The decoder runs its inner stages on the whole latent, a 3D patch is cropped from the feature map
entering the last ``tail_stages`` stages (conv-only stages, so their receptive field is finite),
and only that patch goes through them. Near a spatial crop edge inside the frame the zero padding of
those convs differs from the real neighbours, so only an inner region of the patch output equals
the full decode; :class:`PatchDecodeOutput` reports it and the training loss uses only that region.
In time the tail is causal: the crop is extended back by the frames its receptive field needs
(:func:`tail_margins`, at most to the first frame), their outputs are dropped, and every frame of
the patch is exact. That history costs tail compute and memory, not validity.

Coordinates of the crop are those of the tail's input feature map: ``t`` in its frames (latent
frames when the tail holds every temporal upsampling), ``y``/``x`` in pixels / ``2^tail_stages``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fsvideo.ae.config import FSAEConfig
from fsvideo.ae.conv import CausalCache
from fsvideo.ae.decoder import Decoder


@dataclass(frozen=True)
class Box:
    """Half-open box ``[t0, t1) × [y0, y1) × [x0, x1)`` over the T×H×W axes of a video tensor."""

    t0: int
    t1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (max(0, self.t1 - self.t0), max(0, self.y1 - self.y0), max(0, self.x1 - self.x0))

    @property
    def is_empty(self) -> bool:
        return min(self.shape) == 0

    def index(self) -> tuple[slice, ...]:
        """Index of the box into a ``B×C×T×H×W`` tensor: ``video[box.index()]``."""
        return (
            slice(None),
            slice(None),
            slice(self.t0, self.t1),
            slice(self.y0, self.y1),
            slice(self.x0, self.x1),
        )

    def relative_to(self, origin: Box) -> Box:
        """The same box in the coordinates of a tensor that starts at ``origin``'s corner."""
        return Box(
            self.t0 - origin.t0,
            self.t1 - origin.t0,
            self.y0 - origin.y0,
            self.y1 - origin.y0,
            self.x0 - origin.x0,
            self.x1 - origin.x0,
        )


@dataclass
class PatchDecodeOutput:
    video: torch.Tensor
    """``B×3×T_p×H_p×W_p``: the last stages' output on the patch."""
    region: Box
    """Where ``video`` lies in the full decoded video."""
    valid: Box
    """The part of ``region`` equal to the full decode, in full-video coordinates (may be empty)."""

    def valid_video(self) -> torch.Tensor:
        """The patch output restricted to ``valid``; compare it with ``target[out.valid.index()]``."""
        return self.video[self.valid.relative_to(self.region).index()]


def first_frame_aligned(index: int, factor: int) -> int:
    """First output frame of input frame ``index`` when frame 0 maps to one frame, the rest to ``factor``."""
    return 0 if index == 0 else factor * (index - 1) + 1


def tail_margins(config: FSAEConfig, tail_stages: int = 3) -> tuple[int, int]:
    """Output frames after a cut in time and pixels beside a cut in space that differ from the full
    decode when the tail runs on a crop (the first sets how much history a patch carries).

    Each causal conv with ``kt`` taps spoils ``kt - 1`` more frames after a cut in time, each
    ``3×3`` conv one more pixel beside a cut in space; nearest upsampling doubles what is spoilt.
    """
    kt = config.temporal_kernel_size
    frames = pixels = 0
    for stage in range(tail_stages - 1, -1, -1):
        if stage < config.num_stages - 1:  # UpBlock: upsample, then one conv
            frames = (2 if stage < config.time_resample_stages else 1) * frames + kt - 1
            pixels = 2 * pixels + 1
        frames += 2 * (kt - 1) * config.decoder_depths[stage]  # ResBlock: two convs
        pixels += 2 * config.decoder_depths[stage]
    return frames + kt - 1, pixels + 1  # conv_out


def decode_patch(
    decoder: Decoder,
    latent: torch.Tensor,
    patch_size: tuple[int, int, int],
    origin: tuple[int, int, int] | None = None,
    generator: torch.Generator | None = None,
    tail_stages: int = 3,
) -> PatchDecodeOutput:
    """Decode the whole latent up to the last ``tail_stages`` stages, then only a 3D patch.

    Args:
        latent: ``B×C×t×h×w``.
        patch_size: ``(t, y, x)`` size of the crop of the tail's input feature map.
        origin: ``(t, y, x)`` corner of the crop; None draws it uniformly with ``generator``.
        tail_stages: decoder stages run on the patch (spec: 3); all must be conv stages.
    """
    config = decoder.config
    n = config.num_stages
    if not 1 <= tail_stages < n:
        raise ValueError(f"tail_stages must lie in [1, {n - 1}], got {tail_stages}")
    if any(config.is_attention_stage(i) for i in range(tail_stages)):
        raise ValueError(
            f"the last {tail_stages} decoder stages include attention, whose context is the whole frame, "
            f"so no crop of them is exact; use tail_stages <= num_conv_stages ({config.num_conv_stages})"
        )
    features = decoder.run_stages(decoder.stem(latent), range(n - 1, tail_stages - 1, -1))
    size = features.shape[2:]
    if len(patch_size) != 3 or any(p < 1 or p > s for p, s in zip(patch_size, size)):
        raise ValueError(f"patch_size {tuple(patch_size)} must be three ints in [1, {tuple(size)}] (t, y, x)")
    if origin is None:
        origin = tuple(
            int(torch.randint(s - p + 1, (1,), generator=generator)) for p, s in zip(patch_size, size)
        )
    if len(origin) != 3 or any(o < 0 or o + p > s for o, p, s in zip(origin, patch_size, size)):
        raise ValueError(
            f"patch at origin {tuple(origin)} of size {tuple(patch_size)} leaves the map {tuple(size)}"
        )
    (t0, y0, x0), (pt, py, px) = origin, patch_size
    scale = 2**tail_stages
    time_factor = 2 ** min(tail_stages, config.time_resample_stages)
    bad_frames, bad_pixels = tail_margins(config, tail_stages)

    # The tail is causal: with enough earlier frames of the crop run first (their outputs dropped),
    # every frame of the patch is exact, so only space loses a margin.
    start = max(0, t0 - math.ceil(bad_frames / time_factor))
    crop = features[:, :, start : t0 + pt, y0 : y0 + py, x0 : x0 + px]
    cache = None if start == 0 else CausalCache(starts_at_first_frame=False, carry=False)
    video = decoder.head(decoder.run_stages(crop, range(tail_stages - 1, -1, -1), cache), cache)
    video = video[:, :, first_frame_aligned(t0, time_factor) - first_frame_aligned(start, time_factor) :]

    region = Box(
        first_frame_aligned(t0, time_factor),
        time_factor * (t0 + pt - 1) + 1,
        scale * y0,
        scale * (y0 + py),
        scale * x0,
        scale * (x0 + px),
    )
    valid = Box(
        region.t0,
        region.t1,
        region.y0 + (bad_pixels if y0 > 0 else 0),
        region.y1 - (bad_pixels if y0 + py < size[1] else 0),
        region.x0 + (bad_pixels if x0 > 0 else 0),
        region.x1 - (bad_pixels if x0 + px < size[2] else 0),
    )
    return PatchDecodeOutput(video=video, region=region, valid=valid)
