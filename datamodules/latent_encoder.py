"""The frozen encoders of the DiT stages in one module: a video batch → FSAE latents, text and image tokens.

The latent cache (``datamodules.latent_writer.encode_shards``) and on-the-fly encoding
(``datamodules.latents.EncodingVideoDataModule``) both go through ``LatentEncoder``, so a cached sample and one
encoded during training are the same numbers.

Public API:
    EncoderPaths             where the FSAE and the text / image encoders live (a config section); .latent_space()
    LatentEncoder(autoencoder, text_encoder=None, image_encoder=None)
        .from_paths(paths) -> LatentEncoder         everything loaded from local paths, eval mode, frozen
        forward(video, captions) -> dict            ``latent`` (+ ``text_tokens``, ``text_mask``, ``image_tokens``)
        empty_text() -> (tokens ``1×L×D``, mask ``1×L``)   the unconditional prompt for CFG dropout
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fsvideo.ae import FSAE
from fsvideo.encoders import ImageEncoder, TextEncoder
from fsvideo.latent_space import LatentSpace
from fsvideo.pretrained import load_network

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, what: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{what}={name!r} is not a dtype name; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


@dataclass
class EncoderPaths:
    """Local paths of the frozen networks that turn a video sample into DiT inputs (nothing is downloaded)."""

    autoencoder: str
    """FSAE saved-model folder (``fsvideo export``), run directory or checkpoint of a run."""
    text_encoder: str | None = None
    """UMT5 encoder folder (``save_pretrained`` layout with its tokenizer); None encodes latents only."""
    image_encoder: str | None = None
    """CLIP vision folder (``save_pretrained`` layout); None encodes latents only. Give both or neither."""
    text_len: int = 512
    """Text tokens per prompt after padding / truncation (Wan: 512)."""
    dtype: str = "float32"
    """Weights of the text and image encoders: float32, bfloat16 or float16 (the FSAE stays float32)."""

    def __post_init__(self) -> None:
        if (self.text_encoder is None) != (self.image_encoder is None):
            raise ValueError(
                "give both text_encoder and image_encoder (the DiT is conditioned on both), or neither for a "
                f"latents-only cache; got text_encoder={self.text_encoder!r}, image_encoder={self.image_encoder!r}."
            )
        parse_dtype(self.dtype, "dtype")

    @property
    def has_conditions(self) -> bool:
        return self.text_encoder is not None

    def latent_space(self, autoencoder: FSAE) -> LatentSpace:
        """The latent space of ``autoencoder`` (loaded from these paths) with these condition encoders."""
        encoders = (
            "" if self.text_encoder is None else f", encoders {self.text_encoder}, {self.image_encoder}"
        )
        return LatentSpace.of(
            autoencoder,
            self.text_encoder,
            self.image_encoder,
            self.text_len,
            f"FSAE {self.autoencoder}{encoders}",
        )


class LatentEncoder(nn.Module):
    """FSAE encoder + text encoder + image encoder, frozen and always in eval mode."""

    def __init__(
        self,
        autoencoder: nn.Module,
        text_encoder: TextEncoder | None = None,
        image_encoder: ImageEncoder | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder

    @classmethod
    def from_paths(cls, paths: EncoderPaths) -> LatentEncoder:
        """Loads every network on the CPU; move the result with ``.to(device)``."""
        autoencoder = load_network(paths.autoencoder, FSAE)
        if not paths.has_conditions:
            return cls(autoencoder)
        dtype = parse_dtype(paths.dtype, "dtype")
        text = TextEncoder.from_pretrained(paths.text_encoder, text_len=paths.text_len, dtype=dtype)
        image = ImageEncoder.from_pretrained(paths.image_encoder, dtype=dtype)
        return cls(autoencoder, text, image)

    def train(self, mode: bool = True) -> LatentEncoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @torch.no_grad()
    def forward(self, video: torch.Tensor, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode a batch.

        Args:
            video: ``B×3×T×H×W`` in [-1, 1] (``T = 1 + 4k``, ``H, W`` multiples of 64); frame 0 is the I2V
                input image, so the image tokens are those of ``video[:, :, 0]``.
            captions: B prompts.

        Returns:
            ``latent`` ``B×C×t×h×w`` float32 and, with the condition encoders, ``text_tokens`` ``B×L×D``
            (zero past the prompt), ``text_mask`` ``B×L`` bool and ``image_tokens`` ``B×M×D'``.
        """
        if len(captions) != video.shape[0]:
            raise ValueError(f"{len(captions)} captions for a batch of {video.shape[0]} videos.")
        out = {"latent": self.encode_latent(video)}
        if self.text_encoder is not None:
            out["text_tokens"], out["text_mask"] = self.text_encoder(list(captions))
            out["image_tokens"] = self.image_encoder(video[:, :, 0])
        return out

    @torch.no_grad()
    def encode_latent(self, video: torch.Tensor) -> torch.Tensor:
        """FSAE latent ``B×C×t×h×w`` float32 of ``B×3×T×H×W`` in [-1, 1]."""
        return self.autoencoder.encode(video.float()).float()

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``1×L×D`` and mask ``1×L`` of the empty prompt: what dropped text becomes (CFG)."""
        if self.text_encoder is None:
            raise ValueError("this LatentEncoder has no text encoder; set EncoderPaths.text_encoder.")
        return self.text_encoder([""])
