"""Frame reward of the MPS kind (§2.3.2): a CLIP model scores single frames against the prompt.

MPS (Kwai's multi-dimensional preference score) is CLIP-H with a condition-aware fusion head trained on
preference pairs. This module implements the part that transformers' ``CLIPModel`` carries: the per-frame
image–text similarity ``logit_scale · cos(image, text)`` of a CLIP read from a local folder (MPS's released
weights are a whole pickled model with its own fusion module: they do not load here; a CLIP-H preference model
saved as a transformers ``CLIPModel``, such as PickScore or HPS v2, does).

To keep ReFL's memory down (§2.3.2) only the ``frames_with_grad`` lowest-scoring frames are scored with
gradient: every frame is scored without gradient, the lowest N are picked, and only those are scored again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from fsvideo.rewards.base import RewardModel, check_video, local_folder, model_pixels


@dataclass
class FrameRewardConfig:
    """An MPS-style frame reward over a local CLIP folder."""

    backbone: str = ""
    """Local folder of a transformers ``CLIPModel`` with its tokenizer (e.g. CLIP ViT-H/14)."""
    frames_with_grad: int = 10
    """N: the N lowest-scoring frames are scored with gradient and averaged (the paper's 10)."""
    frames_per_batch: int = 32
    """Frames per CLIP call when every frame is scored without gradient."""
    text_len: int = 77
    """Prompt length in tokens (CLIP's 77)."""
    dtype: str = "float32"
    """Backbone dtype: float32, or bfloat16 on GPUs."""

    def __post_init__(self) -> None:
        if self.frames_with_grad < 1 or self.frames_per_batch < 1 or self.text_len < 2:
            raise ValueError("frames_with_grad and frames_per_batch must be ≥ 1 and text_len ≥ 2.")


class FrameReward(RewardModel):
    """MPS-style reward: ``score(video, first_frame, prompts) -> B``, the mean over the N lowest frames."""

    config_class = FrameRewardConfig

    def __init__(self, config: FrameRewardConfig, backbone: CLIPModel | None = None) -> None:
        super().__init__()
        self.config = config
        folder = local_folder(config.backbone, "FrameRewardConfig.backbone (a CLIP folder)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if backbone is None:
            clip_config = CLIPConfig.from_pretrained(folder, local_files_only=True)
            backbone = CLIPModel(clip_config).to(getattr(torch, config.dtype))
        self.backbone = backbone
        self.image_size = backbone.config.vision_config.image_size

    @classmethod
    def from_backbone(cls, config: FrameRewardConfig, device: str | torch.device = "cpu") -> FrameReward:
        folder = local_folder(config.backbone, "FrameRewardConfig.backbone (a CLIP folder)")
        backbone = CLIPModel.from_pretrained(
            folder, dtype=getattr(torch, config.dtype), local_files_only=True
        )
        return cls(config, backbone).to(device)

    def save_backbone_files(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts → unit-norm text embeddings ``B×E``."""
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.config.text_len,
            truncation=True,
            return_tensors="pt",
        )
        device = self.backbone.logit_scale.device
        features = self.backbone.get_text_features(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        )
        return F.normalize(_pooled(features).float(), dim=-1)

    def frame_similarity(self, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Frames ``B×N×3×H×W`` in [-1, 1] and unit text embeddings ``B×E`` → ``B×N`` scaled cosine similarity."""
        b, n = frames.shape[:2]
        pixels = model_pixels(
            frames.flatten(0, 1).float(), self.image_size, self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        )
        features = self.backbone.get_image_features(pixel_values=pixels.to(self.backbone.dtype))
        image = F.normalize(_pooled(features).float(), dim=-1).unflatten(0, (b, n))  # (B, N, E)
        return self.backbone.logit_scale.exp().float() * torch.einsum("bne,be->bn", image, text)

    @torch.no_grad()
    def frame_scores(self, video: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Every frame's score without gradient: ``B×3×T×H×W`` → ``B×T``."""
        text = self.text_features(prompts)
        frames = video.detach().transpose(1, 2)  # (B, T, 3, H, W)
        chunk = max(1, self.config.frames_per_batch // video.shape[0])
        return torch.cat([self.frame_similarity(part, text) for part in frames.split(chunk, dim=1)], dim=1)

    def lowest_frames(self, video: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Indices ``B×N`` of the N = min(frames_with_grad, T) lowest-scoring frames, lowest first."""
        scores = self.frame_scores(video, prompts)
        n = min(self.config.frames_with_grad, scores.shape[1])
        return scores.argsort(dim=1)[:, :n]

    def score(
        self, video: torch.Tensor, first_frame: torch.Tensor | None, prompts: Sequence[str]
    ) -> torch.Tensor:
        """``video`` ``B×3×T×H×W`` in [-1, 1], B prompts → ``B``: the mean score of the N lowest frames, with
        gradient through those frames only. ``first_frame`` is not used (MPS scores single images)."""
        check_video(video, None, prompts)
        index = self.lowest_frames(video, prompts)  # (B, N), chosen without gradient
        frames = video.transpose(1, 2)  # (B, T, 3, H, W)
        chosen = frames.gather(
            1, index[:, :, None, None, None].expand(-1, -1, *frames.shape[2:])
        )  # (B, N, 3, H, W)
        return self.frame_similarity(chosen, self.text_features(prompts)).mean(dim=1)


def _pooled(features) -> torch.Tensor:
    """transformers returns the projected embedding as a tensor, or in ``pooler_output`` of an output object."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output
