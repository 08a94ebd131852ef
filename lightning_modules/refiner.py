"""High-resolution refiner training (§2.4.2–2.4.3): the base DiT's recipe on high-resolution clips with the
masked video-to-video condition of ``fsvideo.refiner``.

The refiner is a DiT of the base architecture, initialised from the base DiT (``init_from``) and trained like it
(flow matching, logit-normal σ, Pseudo-Huber, text / image CFG dropout: ``DiTModule``). Per batch of paired
latents (``datamodules.latents.EncodingVideoDataModule`` with ``low_resolution_latents: true``: ``latent`` of the
clip, ``latent_low`` of its bicubic ×½ twin):

1. draft source: the low-resolution latent, or — deviation-based estimation (eqs. 10–13) — z̃0 = ε − v̂ of the
   frozen base DiT at a random σ (its frame 0 is given, so v̂ there is the exact ε₀ − z₀, as in sampling);
2. draft = the frozen latent upsampler's ×2 of it (raw FSAE latents), normalised with the refiner's statistics;
3. dynamic mask from the first frame's upsampling error; then per sample: frame shuffle, random replacement,
   condition dropout (``fsvideo.refiner``);
4. the loss of ``DiTModule`` with that condition: frame 0 given and left out, every other frame counts.

Validation uses the clean draft (no deviation, no augmentation), as inference does. The trained network is saved
as ``refiner`` (checkpoint manifest, ``fsvideo export``), with the dynamic-mask settings in its records so that
the pipeline applies the same rule.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from fsvideo.dit import DiT, FrameCondition, image_to_video
from fsvideo.flow import interpolate, sample_sigma
from fsvideo.latent_space import LATENT_STATS, LatentStats
from fsvideo.pipeline import RefinerChain
from fsvideo.pretrained import load_network, read_records
from fsvideo.refiner import (
    DYNAMIC_MASK,
    RefinerTrainingConfig,
    draw_shuffle_kind,
    dynamic_confidence,
    masked_video_to_video,
    shuffle_draft_frames,
)
from fsvideo.stages import LatentNormalization, SamplingSettings
from fsvideo.upsampler import LatentUpsampler
from lightning_modules.dit import DiTModule


class RefinerModule(DiTModule):
    """Trains the refiner DiT (module docstring).

    Args:
        base_dit: the frozen base DiT (saved-model folder, run or checkpoint) of the deviation estimate and of
            in-training two-stage samples; its recorded latent statistics normalise its input. None (a stage that
            needs neither, such as GRPO) holds no base DiT and needs ``conditioning.deviation: false``.
        upsampler: the frozen latent upsampler (folder, run or checkpoint) that makes the drafts.
        conditioning: dynamic mask, replacement, dropout, shuffle and deviation settings.
        **kwargs: ``DiTModule``'s arguments; ``init_from`` is normally the base DiT, so the refiner starts as it.
    """

    network_name = "refiner"

    def __init__(
        self,
        base_dit: str | None,
        upsampler: str,
        conditioning: RefinerTrainingConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conditioning = conditioning or RefinerTrainingConfig()
        self.frozen.add("upsampler", load_network(upsampler, LatentUpsampler))
        self.base_normalization: LatentNormalization | None = None
        if base_dit is not None:
            self.base_normalization = self.hold_base_dit(base_dit)
        elif self.conditioning.deviation:
            raise ValueError(
                "conditioning.deviation makes drafts from the base DiT's deviation estimate: set base_dit to the "
                "base DiT, or conditioning.deviation: false."
            )

    def hold_base_dit(self, base_dit: str) -> LatentNormalization:
        """Hold the frozen base DiT (``frozen["base_dit"]``); returns the normalisation of its recorded statistics."""
        base = self.frozen.add_saved("base_dit", base_dit, DiT, shard=self.parallel.fsdp)
        if base.config.in_channels != self.dit.config.in_channels:
            raise ValueError(
                f"base_dit {base_dit} takes {base.config.in_channels} input channels but the refiner "
                f"{self.dit.config.in_channels}: both must work on the same FSAE latents."
            )
        stats = read_records(base_dit, expected=DiT).get(LATENT_STATS)
        if stats is None:
            raise ValueError(
                f"base_dit {base_dit} records no latent statistics; pass a base-DiT run or export."
            )
        stats = LatentStats.from_record(stats)
        return LatentNormalization(torch.tensor(stats.mean), torch.tensor(stats.std))

    def dit_records(self) -> dict[str, Any]:
        return {**super().dit_records(), DYNAMIC_MASK: asdict(self.conditioning.mask)}

    def sampling_networks(
        self, refine: SamplingSettings
    ) -> tuple[DiT, torch.Tensor, torch.Tensor, RefinerChain | None]:
        """The two-stage chain: the frozen base DiT, then the upsampler and this refiner (EMA weights)."""
        if self.base_normalization is None:
            raise ValueError("in-training two-stage samples need the base DiT: set model.init_args.base_dit.")
        chain = RefinerChain(
            self.frozen["upsampler"],
            self.inference_dit(),
            self.latent_mean,
            self.latent_std,
            self.conditioning.mask,
            refine,
        )
        return self.frozen["base_dit"], self.base_normalization.mean, self.base_normalization.std, chain

    # ---- condition -----------------------------------------------------------------------------------------

    def normalization(self) -> LatentNormalization:
        return LatentNormalization(self.latent_mean, self.latent_std)

    @torch.no_grad()
    def deviation_estimate(self, latent_low: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """z̃0 = ε − v̂ (eq. 13) of the frozen base DiT at a logit-normal σ, as a raw FSAE latent like the input
        ``latent_low`` ``B×C×t×h×w``."""
        z0 = self.base_normalization.normalize(latent_low)
        noise = torch.randn_like(z0)
        sigma = sample_sigma(
            z0.shape[0],
            self.conditioning.deviation_sigma_mean,
            self.conditioning.deviation_sigma_std,
            device=z0.device,
        )
        condition = image_to_video(z0[:, :, :1], z0.shape[2], self.dit.config.mask_channels)
        text, text_mask, image = self.conditions(batch, True, drop=False)
        velocity = self.frozen["base_dit"](
            condition.model_input(interpolate(z0, noise, sigma)), sigma, text, image, text_mask
        )
        velocity = condition.fix_velocity(velocity.float(), noise)
        return self.base_normalization.denormalize(noise - velocity)

    def build_condition(self, z0: torch.Tensor, batch: dict[str, Any], augment: bool) -> FrameCondition:
        if z0.shape[2] < 2:
            raise ValueError(
                "the refiner trains on clips (video-to-video); set data.init_args.image_fraction: 0."
            )
        if "latent_low" not in batch:
            raise ValueError(
                "the refiner needs paired latents: use datamodules.latents.EncodingVideoDataModule with "
                "low_resolution_latents: true."
            )
        cfg = self.conditioning
        source = batch["latent_low"]
        if augment and cfg.deviation:
            source = self.deviation_estimate(source, batch)
        with torch.no_grad():
            draft = self.normalize(self.frozen["upsampler"](source.float()))
        if draft.shape != z0.shape:
            raise ValueError(
                f"the upsampled draft is {tuple(draft.shape)} but the high-resolution latent {tuple(z0.shape)}; "
                "latent_low must be the latent of the clip downsampled ×2."
            )
        confidence = dynamic_confidence(z0[:, :, :1], draft[:, :, :1], cfg.mask)
        replaced = None
        if augment:
            draft, confidence, replaced = self.augment(draft, confidence)
        return masked_video_to_video(
            z0[:, :, :1], draft, confidence, self.dit.config.mask_channels, replaced, truth=z0
        )

    def augment(
        self, draft: torch.Tensor, confidence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample: frame shuffle, random replacement, condition dropout (``fsvideo.refiner``); returns the
        draft, the confidences and the ``B×t`` replaced frames."""
        cfg = self.conditioning
        batch, frames = draft.shape[0], draft.shape[2]
        draft, confidence = draft.clone(), confidence.clone()
        replaced = torch.zeros(batch, frames, dtype=torch.bool, device=draft.device)
        for i in range(batch):
            if torch.rand(()) < cfg.shuffle_prob:
                draft[i] = shuffle_draft_frames(draft[i], draw_shuffle_kind(cfg.shuffle_weights))
            if frames > 1 and torch.rand(()) < cfg.replace_prob:
                count = max(1, round(cfg.replace_fraction * (frames - 1)))
                replaced[i, 1 + torch.randperm(frames - 1)[:count]] = True
            if torch.rand(()) < cfg.condition_dropout:
                draft[i] = 0.0
                confidence[i] = 0.0
                replaced[i] = False
        return draft, confidence, replaced
