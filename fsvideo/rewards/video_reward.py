"""Video reward of the VideoAlign kind (VideoReward, §2.3.2): a Qwen2-VL backbone and a linear reward head.

The backbone is transformers' own ``Qwen2VLForConditionalGeneration`` read from a local folder. The prompt
holds three special tokens, ``<|VQ_reward|>``, ``<|MQ_reward|>`` and ``<|TA_reward|>``; the head maps the
last hidden state at each of them to visual quality (VQ), motion quality (MQ) and text alignment (TA), as
VideoReward's ``rm_head`` does (``Linear(hidden, head_outputs, bias=False)``: with one output each token gives
its dimension's score; with three, token i's i-th output is dimension i). ``score`` is the weighted sum of the
three after each is normalised with a mean and std (VideoReward's inference statistics).

Trick 2 of §2.3.2: the input image is an extra image input before the video, and the instruction asks the
model to weigh consistency of colour, identity and details with it.

Pixels reach the backbone differentiably: frames are sampled at ``sample_fps`` from videos at ``input_fps``,
resized with ``F.interpolate`` and normalised with the processor's mean / std, then cut into the flattened
patches ``Qwen2VLVideoProcessor.patchify`` produces (``grid_t·grid_h·grid_w`` rows of
``3·temporal_patch·patch·patch``, 2×2 merge windows contiguous); a still image is a clip of one frame repeated
``temporal_patch_size`` times (what ``Qwen2VLImageProcessor`` does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from fsvideo.rewards.base import RewardModel, check_video, local_folder, model_pixels

DIMENSIONS = ("VQ", "MQ", "TA")
"""The three scores, in head order: visual quality, motion quality, text alignment."""

DEFAULT_INSTRUCTION = (
    "The first image is the input frame this video was generated from, followed by the video. Rate the video "
    "from 0 to 10 on three criteria, each independently.\n"
    "Visual quality: clarity, detail, aesthetics, plausible structure of every frame, and consistency with the "
    "input frame in colour, identity of subjects and fine details.\n"
    "Please provide the rating of visual quality: <|VQ_reward|>\n"
    "Motion quality: stable, natural, smooth and sufficiently large motion, with subjects keeping the colour, "
    "identity and details of the input frame from the first frame to the last.\n"
    "Please provide the rating of motion quality: <|MQ_reward|>\n"
    "Text alignment: how well subjects, motion, scene, style and camera follow the prompt: {prompt}\n"
    "Please provide the rating of text alignment: <|TA_reward|>"
)
"""Instruction of the reward prompt: ``{prompt}`` is the text prompt; the reward tokens mark where the head reads.
It stresses consistency with the first frame (trick 2); to score with VideoReward's released weights as they
were trained, pass VideoAlign's own ``detailed_special`` template instead."""


@dataclass
class VideoRewardConfig:
    """A VideoAlign-style video reward over a local Qwen2-VL folder."""

    backbone: str = ""
    """Local folder of a Qwen2-VL model as transformers saves it (config.json, weights, tokenizer,
    preprocessor_config.json), e.g. Qwen2-VL-2B-Instruct (VideoReward's base) or a converted VideoReward."""
    input_fps: float = 24.0
    """Frame rate of the videos passed to ``score``."""
    sample_fps: float = 2.0
    """Frames are sampled at this rate (VideoReward: 2 fps)."""
    max_frames: int = 32
    """At most this many sampled frames (the first ones)."""
    frame_height: int = 252
    """Height frames (and the first frame) are resized to; a multiple of patch_size · merge_size (28)."""
    frame_width: int = 448
    """Width frames are resized to; 252×448 is about VideoReward's 448² pixel budget at 16:9."""
    use_first_frame: bool = True
    """Give the first frame as an extra image input (§2.3.2 trick 2)."""
    system_prompt: str = "You are a helpful assistant."
    """System message of the chat template."""
    instruction: str = DEFAULT_INSTRUCTION
    """User message after the image and video: ``{prompt}`` and each of ``reward_tokens`` exactly once."""
    reward_tokens: tuple[str, str, str] = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
    """Special tokens whose last hidden states the head reads, in VQ, MQ, TA order (added to the tokenizer
    when missing)."""
    head_outputs: int = 1
    """Outputs of the head per reward token: 1, or 3 (token i's i-th output is dimension i)."""
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Weights of VQ, MQ, TA in ``score`` (VideoReward's "Overall" is their plain sum)."""
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Raw VQ, MQ, TA scores are normalised as (s - mean) / std before weighting (VideoReward's
    inference_config VQ_mean, …)."""
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """See ``mean``."""
    dtype: str = "float32"
    """Backbone dtype: float32, or bfloat16 on GPUs."""

    def __post_init__(self) -> None:
        self.reward_tokens = tuple(self.reward_tokens)
        self.weights, self.mean, self.std = tuple(self.weights), tuple(self.mean), tuple(self.std)
        if (
            len(self.reward_tokens) != 3
            or len(self.weights) != 3
            or len(self.mean) != 3
            or len(self.std) != 3
        ):
            raise ValueError("reward_tokens, weights, mean and std each need three entries (VQ, MQ, TA).")
        if self.head_outputs not in (1, 3):
            raise ValueError(f"head_outputs must be 1 or 3, got {self.head_outputs}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.input_fps <= 0 or self.sample_fps <= 0 or self.max_frames < 1:
            raise ValueError("input_fps and sample_fps must be positive and max_frames at least 1.")
        for token in ("{prompt}", *self.reward_tokens):
            if self.instruction.count(token) != 1:
                raise ValueError(f"instruction must contain {token!r} exactly once.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def frame_indices(self, num_frames: int) -> list[int]:
        """Indices of the frames sampled from a video of ``num_frames`` frames at ``input_fps``."""
        step = self.input_fps / self.sample_fps
        count = min(self.max_frames, math.floor((num_frames - 1) / step) + 1)
        return [min(num_frames - 1, round(i * step)) for i in range(count)]


def patchify(
    frames: torch.Tensor, patch: int, merge: int, temporal_patch: int
) -> tuple[torch.Tensor, list[int]]:
    """``T×3×H×W`` normalised pixels → (patches ``(t·h·w)×(3·temporal_patch·patch²)``, grid ``[t, h, w]``).

    The layout of transformers' ``Qwen2VLVideoProcessor.patchify``; T is padded to a multiple of
    ``temporal_patch`` with the last frame.
    """
    if pad := -frames.shape[0] % temporal_patch:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, height, width = frames.shape
    gt, gh, gw = t // temporal_patch, height // patch, width // patch
    x = frames.reshape(gt, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # (gt, gh/m, gw/m, m, m, C, temporal, patch, patch): each 2×2 merge window's patches are contiguous rows
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch * patch * patch), [gt, gh, gw]


class VideoReward(RewardModel):
    """VideoAlign-style reward: ``score(video, first_frame, prompts) -> B``; ``dimension_scores`` gives ``B×3``."""

    config_class = VideoRewardConfig

    def __init__(
        self, config: VideoRewardConfig, backbone: Qwen2VLForConditionalGeneration | None = None
    ) -> None:
        super().__init__()
        self.config = config
        folder = local_folder(config.backbone, "VideoRewardConfig.backbone (a Qwen2-VL folder)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        missing = [t for t in config.reward_tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if backbone is None:
            hf_config = Qwen2VLConfig.from_pretrained(folder, local_files_only=True)
            backbone = Qwen2VLForConditionalGeneration(hf_config).to(getattr(torch, config.dtype))
        self.backbone = backbone
        embeddings = backbone.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > embeddings:  # new reward tokens (Qwen2-VL's table has spare rows: grow only)
            backbone.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        hf = backbone.config
        self.hidden_size = hf.text_config.hidden_size
        self.head = nn.Linear(self.hidden_size, config.head_outputs, bias=False)
        vision = hf.vision_config
        self.patch, self.merge, self.temporal_patch = (
            vision.patch_size,
            vision.spatial_merge_size,
            vision.temporal_patch_size,
        )
        factor = self.patch * self.merge
        if config.frame_height % factor or config.frame_width % factor:
            raise ValueError(
                f"frame_height and frame_width must be multiples of {factor} (patch {self.patch} × merge "
                f"{self.merge}), got {config.frame_height}×{config.frame_width}"
            )
        self.pixel_mean, self.pixel_std = _processor_stats(folder)
        self.image_token_id, self.video_token_id = hf.image_token_id, hf.video_token_id
        self.vision_start_id = hf.vision_start_token_id
        self.vision_end_id = self.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.reward_token_ids = self.tokenizer.convert_tokens_to_ids(list(config.reward_tokens))
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_backbone(cls, config: VideoRewardConfig, device: str | torch.device = "cpu") -> VideoReward:
        folder = local_folder(config.backbone, "VideoRewardConfig.backbone (a Qwen2-VL folder)")
        backbone = Qwen2VLForConditionalGeneration.from_pretrained(
            folder, dtype=getattr(torch, config.dtype), local_files_only=True
        )
        return cls(config, backbone).to(device)

    def save_backbone_files(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        source = Path(self.config.backbone) / "preprocessor_config.json"
        if source.is_file():
            (folder / source.name).write_text(source.read_text())

    # ---- inputs ------------------------------------------------------------------------------------------

    def _token_ids(self, prompt: str, image_tokens: int, video_tokens: int) -> list[int]:
        """The chat-formatted prompt with ``image_tokens`` / ``video_tokens`` placeholders (Qwen2-VL's layout)."""

        def encode(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        ids = encode(f"<|im_start|>system\n{self.config.system_prompt}<|im_end|>\n<|im_start|>user\n")
        if image_tokens:
            ids += [self.vision_start_id, *[self.image_token_id] * image_tokens, self.vision_end_id]
        ids += [self.vision_start_id, *[self.video_token_id] * video_tokens, self.vision_end_id]
        instruction = self.config.instruction.replace("{prompt}", prompt)
        return ids + encode(f"{instruction}<|im_end|>\n<|im_start|>assistant\n")

    def sample_frames(self, video: torch.Tensor) -> torch.Tensor:
        """``B×3×T×H×W`` → the frames the model sees, ``B×T'×3×frame_height×frame_width`` normalised."""
        b = video.shape[0]
        frames = video[:, :, self.config.frame_indices(video.shape[2])].transpose(1, 2)  # (B, T', 3, H, W)
        pixels = model_pixels(
            frames.flatten(0, 1).float(),
            self.config.frame_height,
            self.config.frame_width,
            self.pixel_mean,
            self.pixel_std,
        )
        return pixels.unflatten(0, (b, -1))

    # ---- scores ------------------------------------------------------------------------------------------

    def dimension_scores(
        self, video: torch.Tensor, first_frame: torch.Tensor | None, prompts: Sequence[str]
    ) -> torch.Tensor:
        """Normalised VQ, MQ, TA scores ``B×3`` (see ``score``)."""
        check_video(video, first_frame, prompts)
        use_image = self.config.use_first_frame
        if use_image and first_frame is None:
            raise ValueError(
                "this video reward takes the first frame as a condition (use_first_frame); pass it"
            )
        device, dtype = self.head.weight.device, self.backbone.dtype
        frames = self.sample_frames(video)
        images = None
        if use_image:
            images = model_pixels(
                first_frame.float(),
                self.config.frame_height,
                self.config.frame_width,
                self.pixel_mean,
                self.pixel_std,
            )
        # 1. patches and token ids per sample
        video_patches, video_grids, image_patches, image_grids, ids = [], [], [], [], []
        window = self.merge**2
        for i, prompt in enumerate(prompts):
            patches, grid = patchify(frames[i], self.patch, self.merge, self.temporal_patch)
            video_patches.append(patches)
            video_grids.append(grid)
            image_tokens = 0
            if images is not None:
                still = images[i : i + 1].expand(self.temporal_patch, -1, -1, -1)
                patches, grid = patchify(still, self.patch, self.merge, self.temporal_patch)
                image_patches.append(patches)
                image_grids.append(grid)
                image_tokens = math.prod(grid) // window
            ids.append(self._token_ids(prompt, image_tokens, math.prod(video_grids[-1]) // window))
        # 2. right-padded batch
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        token_types = (input_ids == self.image_token_id).int() + 2 * (input_ids == self.video_token_id).int()
        # 3. backbone: hidden states of the language model (the LM head is not needed)
        hidden = self.backbone.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.cat(image_patches).to(dtype) if image_patches else None,
            image_grid_thw=torch.tensor(image_grids, device=device) if image_grids else None,
            pixel_values_videos=torch.cat(video_patches).to(dtype),
            video_grid_thw=torch.tensor(video_grids, device=device),
            mm_token_type_ids=token_types,
            use_cache=False,
        ).last_hidden_state  # (B, L, D)
        # 4. the head at the reward tokens, in VQ, MQ, TA order
        positions = torch.stack(
            [(input_ids == token).int().argmax(dim=1) for token in self.reward_token_ids], dim=1
        )  # (B, 3)
        states = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, 3, D)
        raw = self.head(states.float())  # (B, 3, head_outputs)
        raw = raw[..., 0] if self.config.head_outputs == 1 else raw.diagonal(dim1=1, dim2=2)  # (B, 3)
        return (raw - raw.new_tensor(self.config.mean)) / raw.new_tensor(self.config.std)

    def combine(self, dimension_scores: torch.Tensor) -> torch.Tensor:
        """``B×3`` normalised scores → ``B`` weighted sum."""
        return dimension_scores @ dimension_scores.new_tensor(self.config.weights)

    def score(
        self, video: torch.Tensor, first_frame: torch.Tensor | None, prompts: Sequence[str]
    ) -> torch.Tensor:
        """``video`` ``B×3×T×H×W`` (at ``input_fps``), ``first_frame`` ``B×3×H×W``, in [-1, 1]; B prompts → ``B``
        rewards: Σ weights · (raw - mean) / std over VQ, MQ, TA. Differentiable in the pixels."""
        return self.combine(self.dimension_scores(video, first_frame, prompts))


def _processor_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean / std of a folder's ``preprocessor_config.json``; Qwen2-VL's (OpenAI CLIP's) when absent."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
    stats = json.loads(path.read_text())
    return tuple(stats.get("image_mean", OPENAI_CLIP_MEAN)), tuple(stats.get("image_std", OPENAI_CLIP_STD))
