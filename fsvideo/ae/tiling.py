"""Memory-bounded FSAE inference: temporal splitting and 3D tiling (spec §2.2.1).

Temporal splitting runs the causal network over consecutive chunks of latent frames, carrying each
causal conv's past frames in a :class:`~fsvideo.ae.conv.CausalCache`; attention is per frame and
norms are per pixel, so the result equals the one-shot pass exactly (up to float reassociation).

3D tiling cuts the video into overlapping ``t×h×w`` tiles (sizes in latent units), runs each on its
own and blends neighbours with linear ramps across their overlaps. A tile sees neither the frames
before it nor the pixels around it (and its attention only sees the tile), so tiling is approximate;
a tile that starts mid-video is run as a continuation (no frame is treated as the video's first).
Both can be combined: each tile is then split into temporal chunks.

Frames map as ``latent τ ↔ pixel frames [f·(τ-1)+1, f·τ+1)`` for ``τ ≥ 1`` and ``0 ↔ [0, 1)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from fsvideo.ae.conv import CausalCache
from fsvideo.ae.decoder import Decoder
from fsvideo.ae.encoder import Encoder
from fsvideo.ae.patch import Box, first_frame_aligned


@dataclass
class TilingConfig:
    chunk_latent_frames: int = 0
    """Temporal splitting: latent frames per causal chunk (the encoder reads ``1 + f·(n-1)`` pixel
    frames for the first chunk, ``f·n`` after). Exact. 0: one pass over time."""
    tile_latent_size: tuple[int, int, int] = (0, 0, 0)
    """3D tile size ``(t, h, w)`` in latent units; 0 keeps that axis whole. Approximate (blended)."""
    tile_latent_overlap: tuple[int, int, int] = (1, 2, 2)
    """Overlap of neighbouring tiles ``(t, h, w)`` in latent units, blended with linear ramps."""

    def __post_init__(self) -> None:
        self.tile_latent_size = tuple(self.tile_latent_size)
        self.tile_latent_overlap = tuple(self.tile_latent_overlap)
        if self.chunk_latent_frames < 0:
            raise ValueError(f"chunk_latent_frames must be >= 0, got {self.chunk_latent_frames}")
        if len(self.tile_latent_size) != 3 or len(self.tile_latent_overlap) != 3:
            raise ValueError("tile_latent_size and tile_latent_overlap take three ints (t, h, w)")
        for size, overlap in zip(self.tile_latent_size, self.tile_latent_overlap):
            if size < 0 or overlap < 0 or (size > 0 and overlap >= size):
                raise ValueError(
                    f"tile sizes {self.tile_latent_size} must be >= 0 and overlaps "
                    f"{self.tile_latent_overlap} >= 0 and smaller than their tile"
                )


def _pixel_frames(a: int, b: int, factor: int, starts_at_first_frame: bool) -> tuple[int, int]:
    """Pixel frames of latent frames ``[a, b)``; mid-video windows have no single first frame."""
    if starts_at_first_frame:
        return first_frame_aligned(a, factor), factor * (b - 1) + 1
    return factor * a, factor * b


def encode_chunked(
    encoder: Encoder, video: torch.Tensor, chunk_latent_frames: int, starts_at_first_frame: bool = True
) -> torch.Tensor:
    """Encode ``B×3×T×H×W`` → ``B×C×t×h×w`` in chunks of ``chunk_latent_frames`` latent frames."""
    f = encoder.config.temporal_compression
    frames = video.shape[2]
    latents = 1 + (frames - 1) // f if starts_at_first_frame else frames // f
    chunk = chunk_latent_frames or latents
    cache = CausalCache(starts_at_first_frame, carry=chunk < latents)
    out = []
    for a in range(0, latents, chunk):
        p0, p1 = _pixel_frames(a, min(a + chunk, latents), f, starts_at_first_frame)
        out.append(encoder(video[:, :, p0:p1], cache)[0])
    return torch.cat(out, dim=2)


def decode_chunked(
    decoder: Decoder, latent: torch.Tensor, chunk_latent_frames: int, starts_at_first_frame: bool = True
) -> torch.Tensor:
    """Decode ``B×C×t×h×w`` → ``B×3×T×H×W`` in chunks of ``chunk_latent_frames`` latent frames."""
    latents = latent.shape[2]
    chunk = chunk_latent_frames or latents
    cache = CausalCache(starts_at_first_frame, carry=chunk < latents)
    return torch.cat([decoder(latent[:, :, a : a + chunk], cache) for a in range(0, latents, chunk)], dim=2)


def decode_chunked_checkpointed(
    decoder: Decoder, latent: torch.Tensor, chunk_latent_frames: int
) -> torch.Tensor:
    """``decode_chunked`` for backpropagating to the latent (ReFL): each chunk's activations are recomputed in
    backward, so the decoder holds one chunk's activations at a time instead of the whole video's.

    The decoder's own per-block checkpointing cannot run with a carrying cache (a recomputed block would read
    the cache as later chunks left it), so the whole chunk is one checkpointed function that starts from a copy
    of the cache as the previous chunk left it and returns the cache it leaves; a recomputation starts from the
    same copy. Gradients flow between chunks through the carried frames. Exact, like ``decode_chunked``.

    Args:
        latent: ``B×C×t×h×w`` (first frame at index 0).
        chunk_latent_frames: latent frames per chunk; 0 decodes in one checkpointed pass.

    Returns:
        ``B×3×(1 + f·(t−1))×H×W``.
    """
    latents = latent.shape[2]
    chunk = chunk_latent_frames or latents
    cache = CausalCache(carry=chunk < latents)

    def run_chunk(part: torch.Tensor, before: CausalCache) -> tuple[torch.Tensor, CausalCache]:
        after = before.copy()
        return decoder(part, after), after

    out = []
    for a in range(0, latents, chunk):
        frames, cache = checkpoint(run_chunk, latent[:, :, a : a + chunk], cache, use_reentrant=False)
        out.append(frames)
    return torch.cat(out, dim=2)


def _axis_tiles(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Overlapping ``[start, end)`` tiles covering ``range(length)``; the last one ends at ``length``."""
    if tile == 0 or tile >= length:
        return [(0, length)]
    starts = [*range(0, length - tile, tile - overlap), length - tile]
    return [(s, s + tile) for s in starts]


def _ramp(spans: list[tuple[int, int]], k: int) -> torch.Tensor:
    """Blend weights of span ``k``: rising across the overlap with span ``k-1``, falling into ``k+1``."""
    start, end = spans[k]
    weight = torch.ones(end - start)
    if k > 0 and (overlap := spans[k - 1][1] - start) > 0:
        weight[:overlap] = torch.arange(1, overlap + 1) / (overlap + 1)
    if k + 1 < len(spans) and (overlap := end - spans[k + 1][0]) > 0:
        falling = torch.arange(overlap, 0, -1) / (overlap + 1)
        weight[-overlap:] = torch.minimum(weight[-overlap:], falling)
    return weight


def run_tiled(
    run: Callable[[torch.Tensor, bool], torch.Tensor],
    x: torch.Tensor,
    latent_size: tuple[int, int, int],
    tiling: TilingConfig,
    time_factor: int,
    space_factor: int,
    encoding: bool,
) -> torch.Tensor:
    """Run ``run(tile, starts_at_first_frame)`` on every 3D tile of ``x`` and blend the outputs.

    Tiles are laid out in latent units (``latent_size``, ``tiling``); ``encoding`` says whether ``x``
    is pixels (tiles mapped to pixels, outputs in latent units) or latents (the reverse). Each output
    is weighted by separable linear ramps across its overlaps and the sum normalised by the weights.
    """
    latent_spans = [
        _axis_tiles(length, tile, overlap)
        for length, tile, overlap in zip(latent_size, tiling.tile_latent_size, tiling.tile_latent_overlap)
    ]
    pixel_spans = [
        [_pixel_frames(a, b, time_factor, True) for a, b in latent_spans[0]],
        *[[(space_factor * a, space_factor * b) for a, b in spans] for spans in latent_spans[1:]],
    ]
    in_spans, out_spans = (pixel_spans, latent_spans) if encoding else (latent_spans, pixel_spans)
    ramps = [[_ramp(spans, k) for k in range(len(spans))] for spans in out_spans]
    out = weight_sum = None
    for kt, ky, kx in itertools.product(*(range(len(spans)) for spans in in_spans)):
        src = Box(*in_spans[0][kt], *in_spans[1][ky], *in_spans[2][kx])
        dst = Box(*out_spans[0][kt], *out_spans[1][ky], *out_spans[2][kx])
        tile = run(x[src.index()], kt == 0)
        if out is None:
            full = tuple(spans[-1][1] for spans in out_spans)
            out = tile.new_zeros(*tile.shape[:2], *full)
            weight_sum = tile.new_zeros(full)
        weight = ramps[0][kt][:, None, None] * ramps[1][ky][None, :, None] * ramps[2][kx][None, None, :]
        weight = weight.to(tile)
        out[dst.index()] += tile * weight
        weight_sum[dst.index()[2:]] += weight
    return out / weight_sum


def encode_tiled(encoder: Encoder, video: torch.Tensor, tiling: TilingConfig) -> torch.Tensor:
    """Encode ``B×3×T×H×W`` → ``B×C×t×h×w`` with ``tiling``'s temporal chunks and 3D tiles."""
    config = encoder.config
    latent_size = config.latent_shape(*video.shape[2:])[1:]
    return run_tiled(
        lambda tile, first: encode_chunked(encoder, tile, tiling.chunk_latent_frames, first),
        video,
        latent_size,
        tiling,
        config.temporal_compression,
        config.spatial_compression,
        encoding=True,
    )


def decode_tiled(decoder: Decoder, latent: torch.Tensor, tiling: TilingConfig) -> torch.Tensor:
    """Decode ``B×C×t×h×w`` → ``B×3×T×H×W`` with ``tiling``'s temporal chunks and 3D tiles."""
    config = decoder.config
    return run_tiled(
        lambda tile, first: decode_chunked(decoder, tile, tiling.chunk_latent_frames, first),
        latent,
        tuple(latent.shape[2:]),
        tiling,
        config.temporal_compression,
        config.spatial_compression,
        encoding=False,
    )
