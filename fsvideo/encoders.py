"""Frozen encoders behind one small interface, loaded from local paths by transformers' own loaders.

Each encoder is an ``nn.Module`` that stays in eval mode with gradients off, and takes inputs in the
project's conventions (prompts as strings; images / videos in [-1, 1]):

    TextEncoder.from_pretrained(path, tokenizer_path=None, text_len=512)
        (prompts) -> (tokens ``B×text_len×D``, mask ``B×text_len`` bool); padded positions are zero
        (as Wan feeds UMT5 states to its DiT). Real model: UMT5-XXL encoder, D = 4096.
    ImageEncoder.from_pretrained(path)
        (images ``B×3×H×W``) -> penultimate-layer hidden states ``B×(1+P)×D``; real model: CLIP
        ViT-H/14 at 224², ``B×257×1280``. Preprocessing as Wan: bicubic resize of the whole image to the
        model's square input size (no crop), then CLIP mean/std.
    FrameFeatureEncoder.from_pretrained(path, frames_per_batch=16)
        (video ``B×3×T×H×W``) -> DINOv2 patch features ``B×C'×T×h'×w'``, frames resized to the nearest
        multiple of the patch size, ImageNet mean/std; for the VF loss (§2.2.2).

    drop_conditions(text_tokens, text_mask, image_tokens, text_drop_prob, image_drop_prob, ...)
        classifier-free-guidance dropout -> DroppedConditions
    save_tiny_encoders(directory) -> {"text": path, "image": path, "dino": path}
        tiny random encoders (and an offline-trained word-level tokenizer) for tests and CPU demos;
        their widths match ``DiTConfig.tiny()`` (text 32, image 32).

Nothing here downloads: every loader passes ``local_files_only=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.utils.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)


def _local_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"{what} path {path} is not a directory; point it at a local save_pretrained() folder "
            "(weights are never downloaded at run time)"
        )
    return path


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``N×3×H×W`` in [-1, 1] → normalised with per-channel mean / std of [0, 1] images."""
    mean_t = images.new_tensor(mean)[None, :, None, None]
    std_t = images.new_tensor(std)[None, :, None, None]
    return (images * 0.5 + 0.5 - mean_t) / std_t


class FrozenEncoder(nn.Module):
    """Base of the encoders: parameters frozen, always in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)


class TextEncoder(FrozenEncoder):
    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = 512) -> None:
        super().__init__(model)
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer_path: str | Path | None = None,
        text_len: int = 512,
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """Load a UMT5 encoder (``UMT5EncoderModel``) and its tokenizer (same folder unless given)."""
        path = _local_dir(path, "text encoder")
        tokenizer_dir = _local_dir(tokenizer_path or path, "tokenizer")
        model = UMT5EncoderModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, tokenizer, text_len)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → (tokens ``B×text_len×D``, mask ``B×text_len`` bool, True on real tokens)."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single string; wrap it in a list")
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            return_tensors="pt",
        )
        device = self.model.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden * mask[..., None], mask


class ImageEncoder(FrozenEncoder):
    def __init__(self, model: CLIPVisionModel) -> None:
        super().__init__(model)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> ImageEncoder:
        """Load a ``CLIPVisionModel`` (the vision tower of CLIP ViT-H/14 for Wan / FSVideo)."""
        path = _local_dir(path, "image encoder")
        return cls(CLIPVisionModel.from_pretrained(path, dtype=dtype, local_files_only=True))

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``B×3×H×W`` in [-1, 1] → penultimate hidden states ``B×(1+P)×D`` (P patches + class token)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B×3×H×W in [-1, 1], got shape {tuple(images.shape)}")
        size = self.model.config.image_size
        pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        pixels = _normalize(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.model.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


class FrameFeatureEncoder(FrozenEncoder):
    def __init__(self, model: Dinov2Model, frames_per_batch: int = 16) -> None:
        super().__init__(model)
        if frames_per_batch < 1:
            raise ValueError(f"frames_per_batch must be positive, got {frames_per_batch}")
        self.frames_per_batch = frames_per_batch

    @classmethod
    def from_pretrained(
        cls, path: str | Path, frames_per_batch: int = 16, dtype: torch.dtype = torch.float32
    ) -> FrameFeatureEncoder:
        """Load a ``Dinov2Model``; frames go through it ``frames_per_batch`` at a time."""
        path = _local_dir(path, "DINOv2")
        return cls(Dinov2Model.from_pretrained(path, dtype=dtype, local_files_only=True), frames_per_batch)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h', w')`` for frames of ``height×width`` (nearest multiple of the patch, ≥ 1)."""
        patch = self.model.config.patch_size
        return max(1, round(height / patch)), max(1, round(width / patch))

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``B×3×T×H×W`` in [-1, 1] → per-frame patch features ``B×C'×T×h'×w'`` (class token dropped)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be B×3×T×H×W in [-1, 1], got shape {tuple(video.shape)}")
        b, _, t, height, width = video.shape
        grid = self.grid_size(height, width)
        patch = self.model.config.patch_size
        frames = video.transpose(1, 2).reshape(b * t, 3, height, width)  # (B·T, 3, H, W)
        features = []
        for chunk in frames.split(self.frames_per_batch):
            pixels = F.interpolate(
                chunk.float(), size=(grid[0] * patch, grid[1] * patch), mode="bilinear", antialias=True
            )
            pixels = _normalize(pixels, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).to(self.model.dtype)
            tokens = self.model(pixel_values=pixels).last_hidden_state[:, 1:]  # (n, h'·w', C')
            features.append(tokens)
        tokens = torch.cat(features)
        return tokens.reshape(b, t, *grid, -1).permute(0, 4, 1, 2, 3)  # (B, C', T, h', w')


class DroppedConditions(NamedTuple):
    text_tokens: torch.Tensor
    """``B×L×D`` with dropped rows replaced by the empty prompt (or zeros)."""
    text_mask: torch.Tensor
    """``B×L`` bool, matching the replaced rows."""
    image_tokens: torch.Tensor
    """``B×M×D`` with dropped rows zeroed."""
    text_dropped: torch.Tensor
    """``B`` bool."""
    image_dropped: torch.Tensor
    """``B`` bool."""


def drop_conditions(
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    text_drop_prob: float,
    image_drop_prob: float,
    empty_text: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> DroppedConditions:
    """Classifier-free-guidance dropout, independently per sample for text and image.

    Args:
        text_tokens, text_mask: ``B×L×D`` and ``B×L`` from ``TextEncoder``.
        image_tokens: ``B×M×D`` from ``ImageEncoder``.
        empty_text: ``TextEncoder([""])`` (tokens ``1×L×D``, mask ``1×L``) — the unconditional branch
            the sampler will use; None replaces dropped text by zeros attended everywhere (mask all
            True, so attention stays defined).
        generator: CPU generator for the drop decisions.
    """
    for name, p in (("text_drop_prob", text_drop_prob), ("image_drop_prob", image_drop_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    batch = text_tokens.shape[0]
    text_dropped = (torch.rand(batch, generator=generator) < text_drop_prob).to(text_tokens.device)
    image_dropped = (torch.rand(batch, generator=generator) < image_drop_prob).to(image_tokens.device)
    if empty_text is None:
        empty_tokens, empty_mask = torch.zeros_like(text_tokens[:1]), torch.ones_like(text_mask[:1])
    else:
        empty_tokens, empty_mask = empty_text
        if empty_tokens.shape[1:] != text_tokens.shape[1:] or empty_mask.shape[1:] != text_mask.shape[1:]:
            raise ValueError(
                f"empty_text shapes {tuple(empty_tokens.shape)}, {tuple(empty_mask.shape)} do not match the "
                f"text tokens {tuple(text_tokens.shape)}; encode '' with the same TextEncoder"
            )
    row = text_dropped[:, None]
    return DroppedConditions(
        text_tokens=torch.where(row[..., None], empty_tokens.to(text_tokens), text_tokens),
        text_mask=torch.where(row, empty_mask.to(text_mask), text_mask),
        image_tokens=torch.where(image_dropped[:, None, None], torch.zeros_like(image_tokens), image_tokens),
        text_dropped=text_dropped,
        image_dropped=image_dropped,
    )


_TINY_SENTENCES = (
    "a cat walks across the garden in the morning light",
    "the camera pans slowly over a city at night",
    "waves crash on a rocky beach while birds fly overhead",
    "a person rides a red bicycle down the street",
)


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        _TINY_SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    )
    # UMT5's tokenizer ends every prompt with </s>
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_encoders(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """For tests and CPU demos only: write tiny random UMT5 (+ tokenizer), CLIP vision and DINOv2
    models under ``directory`` (``text/``, ``image/``, ``dino/``) and return those paths.

    Widths: text 32, image 32 (5 tokens: 28² input, patch 14), DINOv2 32 (patch 14).
    """
    directory = Path(directory)
    paths = {name: directory / name for name in ("text", "image", "dino")}
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        image = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=28,
                patch_size=14,
            )
        )
        dino = Dinov2Model(
            Dinov2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                mlp_ratio=2,
                image_size=28,
                patch_size=14,
            )
        )
    text.save_pretrained(paths["text"])
    tokenizer.save_pretrained(paths["text"])
    image.save_pretrained(paths["image"])
    dino.save_pretrained(paths["dino"])
    return paths
