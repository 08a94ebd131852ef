"""The one causal 3D convolution of FSAE and the cache that carries it across temporal chunks.

Time is padded on the past side only, with zeros, so output frame ``i`` sees input frames ``<= i``
and the first frame is computed on its own: an image is a one-frame video. Space is zero padded
on both sides like DC-AE's 2D convs, so a 2D kernel placed in the last temporal slot reproduces
the 2D conv exactly on every frame.

Temporal splitting runs a video through the network a chunk of frames at a time. A
:class:`CausalCache` passed to every layer holds, per layer, the input frames the next chunk still
needs (the tail of its padded input that no complete window has consumed yet), so chunked outputs
equal the one-shot output exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalCache:
    """Per-layer state of a chunked causal pass; make one per video and pass it to every chunk.

    Args:
        starts_at_first_frame: False when the first chunk is a window from the middle of a video
            (a 3D tile, a training patch): layers then treat no frame as the video's first and
            pad the unknown past with zeros.
        carry: keep each layer's trailing frames for the next chunk. False for a single window,
            which makes the cache stateless (safe under activation checkpointing).
    """

    def __init__(self, starts_at_first_frame: bool = True, carry: bool = True) -> None:
        self.starts_at_first_frame = starts_at_first_frame
        self.carry = carry
        self._past: dict[nn.Module, torch.Tensor] = {}
        self._seen: set[nn.Module] = set()

    def holds_first_frame(self, layer: nn.Module) -> bool:
        """Whether the chunk ``layer`` is about to process begins with the video's first frame."""
        return self.starts_at_first_frame and layer not in self._seen

    def past(self, layer: nn.Module) -> torch.Tensor | None:
        return self._past.get(layer)

    def copy(self) -> CausalCache:
        """A cache in the same state whose updates leave this one untouched: what a chunk recomputed under
        activation checkpointing starts from (``fsvideo.ae.tiling.decode_chunked_checkpointed``)."""
        twin = CausalCache(self.starts_at_first_frame, self.carry)
        twin._past = dict(self._past)
        twin._seen = set(self._seen)
        return twin

    def update(self, layer: nn.Module, past: torch.Tensor | None = None) -> None:
        """Record that ``layer`` has processed a chunk, keeping ``past`` for the next one."""
        if not self.carry:
            return
        self._seen.add(layer)
        if past is not None:
            # A copy, not a view: a view would keep the whole chunk's input alive until the next chunk.
            self._past[layer] = past.clone()


def holds_first_frame(cache: CausalCache | None, layer: nn.Module) -> bool:
    """One-shot passes (no cache) always start at the first frame."""
    return cache is None or cache.holds_first_frame(layer)


def causal_pad(x: torch.Tensor, past: torch.Tensor | None, frames: int) -> torch.Tensor:
    """Prepend the frames before ``x`` in time: ``past`` when known, else ``frames`` zero frames.

    Args:
        x: ``B×C×T×H×W``.
        past: ``B×C×P×H×W`` frames preceding ``x`` or None.
        frames: zero frames to prepend when ``past`` is None.
    """
    if past is not None:
        return torch.cat([past, x], dim=2)
    if frames == 0:
        return x
    return F.pad(x, (0, 0, 0, 0, frames, 0))


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


class CausalConv3d(nn.Conv3d):
    """3D conv, causal in time, "same" zero padding in space.

    Args:
        kernel_size: ``(kt, kh, kw)`` or an int for all three; kh and kw odd.
        stride: ``(st, sh, sw)``; with ``st > 1`` output frame ``j`` covers input frames
            ``st·j - kt + 1 … st·j``, so frame 0 is still computed from the first frame alone.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        kt, kh, kw = _triple(kernel_size)
        st, _, _ = _triple(stride)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel must be odd for 'same' padding, got {kh}×{kw}")
        if st > kt:
            raise ValueError(f"temporal stride {st} larger than temporal kernel {kt} would skip frames")
        super().__init__(
            in_channels,
            out_channels,
            (kt, kh, kw),
            stride=_triple(stride),
            padding=(0, kh // 2, kw // 2),
            groups=groups,
            bias=bias,
        )

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``B×C×T×H×W`` → ``B×C'×T'×H'×W'``; ``T' = T`` for stride 1."""
        kt, st = self.kernel_size[0], self.stride[0]
        if kt == 1 and st == 1:  # pointwise in time: no past needed
            return super().forward(x)
        past = cache.past(self) if cache is not None else None
        # A chunk from the middle of a video whose past is unknown is aligned to the stride grid,
        # so only kt - st frames are missing before its first complete window.
        missing = kt - 1 if holds_first_frame(cache, self) else kt - st
        x = causal_pad(x, past, missing)
        out = super().forward(x)
        if cache is not None:
            consumed = out.shape[2] * st
            cache.update(self, x[:, :, consumed:])
        return out
