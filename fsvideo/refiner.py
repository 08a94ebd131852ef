"""The high-resolution refiner's conditioning (spec §2.4.2, Figure 9): masked video-to-video.

The refiner is a DiT of the base architecture whose condition is no longer ``[first frame, zeros]`` but

    latent frame 0      the true high-resolution first-frame latent, mask 1 (given exactly, as in I2V)
    latent frames 1…    the *draft*: the base DiT's low-resolution latent video upsampled ×2 by the latent
                        upsampler, mask = a confidence in (0, 1)

Dynamic mask (train and inference, ``dynamic_confidence``): the upsampling error of the first frame — the mean
|z − ẑ| between the true high-resolution first-frame latent z and the upsampler's output ẑ for it (frame 0 of
the draft) — is mapped linearly onto ``[low, high] ⊂ (0, 1)``: no error gives ``high``, an error of
``error_scale`` or more gives ``low``. One scalar per sample, used for every draft frame: the first frame is the
only one whose truth is known at inference, and a scalar keeps the cue the same for every token (a per-token
map would carry the first frame's spatial error pattern into frames where objects have moved). Errors are
measured on the DiT's normalised latents, so ``error_scale`` is in units of the latent standard deviation.

Training-only augmentations (``RefinerTrainingConfig``; the module applies them per sample):
    random replacement   some draft frames become their true high-resolution latents with mask 1. They count
                         in the loss: the target there equals the condition, so the refiner learns that mask 1
                         means "keep this", which is the cue it must honour at frame 0.
    condition dropout    the draft is dropped (zeros, mask 0) and the first frame kept, so the refiner keeps
                         its image-to-video (and text) generation ability.
    frame shuffle        with probability 0.5 the draft's frames 1… are permuted, in the ratio 6:3:1: a
                         *local* swap of two adjacent draft frames, a swap of two non-adjacent ones, or a random
                         permutation of the whole draft. With two draft frames a non-adjacent swap is impossible
                         and a local swap is made instead; a single draft frame is left as it is.
    deviation estimate   (eqs. 10–13) the draft is made from z̃0 = ε − v̂ of the frozen base DiT at a random σ
                         instead of the clean low-resolution latent (``lightning_modules.refiner``).

Public API:
    DYNAMIC_MASK, DynamicMaskConfig, dynamic_confidence(first_true, first_draft, config) -> ``B``
    masked_video_to_video(first_frame_latent, draft, confidence, temporal_compression, replaced=None,
                          truth=None) -> FrameCondition
    RefinerTrainingConfig
    SHUFFLE_KINDS, draw_shuffle_kind(weights, generator=None) -> str
    shuffle_draft_frames(draft, kind, generator=None) -> draft with frames 1… permuted
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fsvideo.dit.condition import FrameCondition, fold_frame_mask

SHUFFLE_KINDS = ("local", "non_adjacent", "whole")
DYNAMIC_MASK = "dynamic_mask"
"""Record name of a saved refiner's ``DynamicMaskConfig``: the pipeline applies the rule it trained with."""


@dataclass
class DynamicMaskConfig:
    """How the first frame's upsampling error becomes the draft's mask value."""

    low: float = 0.3
    """Confidence given to the draft when the first frame's upsampling error is ``error_scale`` or more. The spec
    asks for a range narrower than [0, 1] and gives none: 0.3–0.9 is our choice."""
    high: float = 0.9
    """Confidence given to the draft when the first frame is upsampled without error (below 1: a draft is
    never as trustworthy as a given frame)."""
    error_scale: float = 1.0
    """Mean absolute error (normalised latent units, i.e. latent standard deviations) at which the confidence
    reaches ``low``."""

    def __post_init__(self) -> None:
        if not 0.0 < self.low < self.high < 1.0:
            raise ValueError(
                f"the mask range must satisfy 0 < low < high < 1, got low={self.low}, high={self.high}."
            )
        if self.error_scale <= 0:
            raise ValueError(f"error_scale must be positive, got {self.error_scale}.")


def dynamic_confidence(
    first_true: torch.Tensor, first_draft: torch.Tensor, config: DynamicMaskConfig
) -> torch.Tensor:
    """``B`` mask values of the draft frames from the first frame's upsampling error (module docstring).

    Args:
        first_true: ``B×C×1×h×w`` true high-resolution first-frame latent (normalised).
        first_draft: ``B×C×1×h×w`` the upsampler's output for it (frame 0 of the draft, normalised).
    """
    error = (first_true.float() - first_draft.float()).abs().flatten(1).mean(1)
    scaled = (error / config.error_scale).clamp(0.0, 1.0)
    return config.high - (config.high - config.low) * scaled


def masked_video_to_video(
    first_frame_latent: torch.Tensor,
    draft: torch.Tensor,
    confidence: torch.Tensor,
    temporal_compression: int = 4,
    replaced: torch.Tensor | None = None,
    truth: torch.Tensor | None = None,
) -> FrameCondition:
    """The refiner's condition: frame 0 given, the draft's later frames at ``confidence``.

    Args:
        first_frame_latent: ``B×C×1×h×w`` high-resolution first-frame latent.
        draft: ``B×C×t×h×w`` upsampled draft (its frame 0 is replaced by ``first_frame_latent``).
        confidence: ``B`` mask value of each sample's draft frames (0 with a dropped draft).
        replaced: ``B×t`` bool, draft frames replaced by ``truth`` with mask 1 (training only).
        truth: ``B×C×t×h×w`` the true high-resolution latents, needed with ``replaced``.
    """
    if draft.ndim != 5 or first_frame_latent.shape[:2] != draft.shape[:2] or first_frame_latent.shape[2] != 1:
        raise ValueError(
            f"draft must be B×C×t×h×w and the first-frame latent B×C×1×h×w of the same B, C; got "
            f"{tuple(draft.shape)} and {tuple(first_frame_latent.shape)}"
        )
    b, _, t, h, w = draft.shape
    frame_mask = confidence.to(draft.dtype).view(b, 1).expand(b, t).clone()  # (B, t) per latent frame
    latent = draft.clone()
    if replaced is not None:
        if truth is None or replaced.shape != (b, t):
            raise ValueError("replaced must be B×t bool and comes with the true latents (truth)")
        frame_mask[replaced] = 1.0
        latent = torch.where(replaced.view(b, 1, t, 1, 1), truth.to(latent.dtype), latent)
    frame_mask[:, 0] = 1.0
    latent[:, :, :1] = first_frame_latent
    # latent frame 0 stands for pixel frame 0 alone; every later latent frame for its group of pixel frames
    pixel_mask = torch.cat(
        [frame_mask[:, :1], frame_mask[:, 1:].repeat_interleave(temporal_compression, 1)], 1
    )
    pixel_mask = pixel_mask[:, :, None, None].expand(-1, -1, h, w)
    given = torch.zeros(t, dtype=torch.bool)
    given[0] = True
    return FrameCondition(fold_frame_mask(pixel_mask, temporal_compression), latent, given)


@dataclass
class RefinerTrainingConfig:
    """The refiner's training-only conditioning (module docstring)."""

    mask: DynamicMaskConfig = field(default_factory=DynamicMaskConfig)
    """Dynamic mask range and scale (also used at inference: the pipeline reads them from the saved refiner)."""
    replace_prob: float = 0.2
    """Probability that a sample has some draft frames replaced by their true latents (mask 1). The spec gives
    none: our choice."""
    replace_fraction: float = 0.25
    """Fraction of a chosen sample's draft frames (at least one) that are replaced."""
    condition_dropout: float = 0.1
    """Probability that a sample's draft is dropped (zeros, mask 0; the first frame is kept). The spec gives no
    value: 0.1, as the text / image CFG dropout."""
    shuffle_prob: float = 0.5
    """Probability that a sample's draft frames are shuffled (spec: 50 %)."""
    shuffle_weights: tuple[float, float, float] = (6.0, 3.0, 1.0)
    """Relative odds of a local adjacent swap, a swap of two non-adjacent frames and a whole-clip permutation
    (spec: 6:3:1)."""
    deviation: bool = True
    """Make the draft from the frozen base DiT's deviation estimate z̃0 = ε − v̂ (eq. 13); False uses the clean
    low-resolution latent (the ablation)."""
    deviation_sigma_mean: float = 0.0
    """Mean of the logit-normal σ at which the base DiT predicts v̂ (the spec gives no distribution: SD3's)."""
    deviation_sigma_std: float = 1.0
    """Standard deviation of that logit-normal."""

    def __post_init__(self) -> None:
        if isinstance(self.mask, dict):
            self.mask = DynamicMaskConfig(**self.mask)
        for name in ("replace_prob", "replace_fraction", "condition_dropout", "shuffle_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        self.shuffle_weights = tuple(float(w) for w in self.shuffle_weights)
        if len(self.shuffle_weights) != 3 or min(self.shuffle_weights) < 0 or sum(self.shuffle_weights) <= 0:
            raise ValueError(f"shuffle_weights must be 3 non-negative odds, got {self.shuffle_weights}.")
        if self.deviation_sigma_std <= 0:
            raise ValueError(f"deviation_sigma_std must be positive, got {self.deviation_sigma_std}.")


def draw_shuffle_kind(weights: tuple[float, float, float], generator: torch.Generator | None = None) -> str:
    """One of ``SHUFFLE_KINDS`` drawn with the given odds."""
    index = torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator).item()
    return SHUFFLE_KINDS[index]


def shuffle_draft_frames(
    draft: torch.Tensor, kind: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``C×t×h×w`` (one sample) with its frames 1… permuted by ``kind`` (module docstring); frame 0 stays."""
    if kind not in SHUFFLE_KINDS:
        raise ValueError(f"unknown shuffle kind {kind!r}; choose one of {SHUFFLE_KINDS}")
    n = draft.shape[1] - 1  # draft frames after the first
    if n < 2:
        return draft
    order = list(range(n))
    if kind == "non_adjacent" and n < 3:
        kind = "local"
    if kind == "local":
        i = int(torch.randint(n - 1, (1,), generator=generator))
        order[i], order[i + 1] = order[i + 1], order[i]
    elif kind == "non_adjacent":
        pairs = [(i, j) for i in range(n) for j in range(i + 2, n)]
        i, j = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
        order[i], order[j] = order[j], order[i]
    else:
        order = torch.randperm(n, generator=generator).tolist()
    index = torch.tensor([0] + [k + 1 for k in order], device=draft.device)
    return draft.index_select(1, index)
