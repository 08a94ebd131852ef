"""FSAE training, all three stages of §2.2.1 in one module (the config picks what is on).

stage 1: L1 + 0.1·LPIPS
stage 2: + 0.1·GAN (3D multiscale discriminator, non-saturating loss, lazy R1), from ``gan.start_step``
stage 3: + patch decoding of the last decoder blocks at high resolution, LPIPS sliced in time
decoder finetune (§2.2.3, FSAE-Standard / FSAE-Lite): ``freeze_encoder`` and ``init_from_variant``
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from fsvideo.ae import FSAE, FSAEConfig, load_decoder_variant
from fsvideo.convert.dcae import import_dcae
from fsvideo.discriminator import DiscriminatorConfig, MultiscaleDiscriminator3D
from fsvideo.encoders import FrameFeatureEncoder
from fsvideo.fvd import FeatureStatistics, frechet_distance, load_video_feature_extractor
from fsvideo.losses import (
    PerceptualLoss,
    VideoVFConfig,
    VideoVFLoss,
    discriminator_loss,
    downscale_regularization,
    fold_time,
    generator_loss,
    r1_penalty,
    upscale_regularization,
)
from fsvideo.pretrained import load_weights, read_snapshot
from lightning_modules.base import OptimizerConfig, SavedNetwork, TrainingStage
from lightning_modules.ema import make_ema_twin


@dataclass
class PerceptualConfig:
    """LPIPS term of the reconstruction loss."""

    weight: float = 0.1
    """Weight of LPIPS in the loss (0.1 in the paper)."""
    net: str = "vgg"
    """LPIPS trunk: vgg or alex."""
    backbone_path: str | None = None
    """Local torchvision vgg16/alexnet state dict; None keeps a random trunk (tests, smoke runs)."""
    frames_per_slice: int | None = None
    """Frames per LPIPS call (stage 3 slices in time to bound memory); None = all at once."""


@dataclass
class GANConfig:
    """Adversarial term (stage 2 on)."""

    weight: float = 0.1
    """Weight of the generator's adversarial loss (0.1 in the paper)."""
    start_step: int = 0
    """Generator step at which the GAN loss and discriminator updates begin."""
    r1_gamma: float = 1.0
    """R1 penalty weight γ."""
    r1_every: int = 16
    """Lazy R1: apply the penalty every N discriminator steps, scaled by N."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """3D multiscale discriminator architecture."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Discriminator optimizer."""


@dataclass
class PatchDecodeConfig:
    """Stage 3: decode a random 3D patch of the last decoder blocks' input (§2.2.1, footnote 3)."""

    min_pixels: int = 512 * 512
    """Use patch decoding when a frame has at least this many pixels."""
    latent_patch_size: tuple[int, int, int] = (4, 16, 16)
    """(t, y, x) size of the crop of the feature map entering the last 3 decoder stages."""


REGULARIZATIONS = ("video_vf", "downscale", "upscale")


@dataclass
class LatentRegularizationConfig:
    """Latent-space regularization (§2.2.2, Table 1): one config field selects the row to re-run."""

    method: str = "video_vf"
    """video_vf (eq. 2–4, DINOv2 targets), downscale ([65]) or upscale (the upscale variant of Table 1)."""
    dino_path: str | None = None
    """Local DINOv2 folder (transformers ``Dinov2Model``); required for video_vf."""
    frames_per_batch: int = 16
    """Frames per DINOv2 call."""
    vf: VideoVFConfig = field(default_factory=VideoVFConfig)
    """Margins, α and the pairwise-term chunking of the Video VF loss; its channel counts are set from
    the autoencoder and the DINOv2 model."""
    scale_weight: float = 0.5
    """Weight of the scale-equivariance baselines."""
    scale_factor: float | None = None
    """Latent resize factor of the baselines; None = 0.5 (downscale) or 2.0 (upscale)."""

    def __post_init__(self) -> None:
        if self.method not in REGULARIZATIONS:
            raise ValueError(f"regularization.method must be one of {REGULARIZATIONS}, got {self.method!r}.")
        if self.method == "video_vf" and self.dino_path is None:
            raise ValueError(
                "regularization.method video_vf needs regularization.dino_path: a local DINOv2 folder "
                "(`fsvideo data tiny-encoders --out DIR` writes a tiny random one for CPU runs)."
            )


class AutoencoderModule(TrainingStage):
    """Trains an FSAE.

    Args:
        autoencoder: network architecture.
        optimizer: generator (autoencoder) optimizer.
        perceptual: LPIPS settings.
        gan: adversarial settings; None for stage 1.
        patch_decode: stage-3 patch decoding; None to always decode whole frames.
        regularization: latent regularization (Video VF loss or a Table-1 baseline); None for none.
        init_from: the FSAE to start from: a saved-model folder (``fsvideo export``) or a run directory /
            checkpoint of an earlier stage (EMA weights preferred when kept).
        dcae_weights: local diffusers ``AutoencoderDC`` folder to start from (the paper's initialisation).
        ema_decay: decay of the EMA weights used for validation and export; 0 disables EMA.
        max_nonfinite_in_row: stop after this many consecutive non-finite steps.
        num_val_videos: reconstructions kept from the first validation batch for the video callback.
        fvd_extractor: local TorchScript I3D (``i3d_torchscript.pt``) for ``val/fvd``; None skips FVD.
            Statistics are per process: run evaluation on one device for the Table-2 number.
        freeze_encoder: train the decoder only (§2.2.3): the encoder gets no gradient, stays in eval mode
            and is left out of the optimizer.
        init_from_variant: ``init_from`` holds another decoder variant (stage 3 → Standard → Lite): copy
            what fits and re-initialise (and print) the rest instead of requiring an exact match.
    """

    def __init__(
        self,
        autoencoder: FSAEConfig,
        optimizer: OptimizerConfig | None = None,
        perceptual: PerceptualConfig | None = None,
        gan: GANConfig | None = None,
        patch_decode: PatchDecodeConfig | None = None,
        regularization: LatentRegularizationConfig | None = None,
        init_from: str | None = None,
        dcae_weights: str | None = None,
        ema_decay: float = 0.999,
        max_nonfinite_in_row: int = 20,
        num_val_videos: int = 2,
        fvd_extractor: str | None = None,
        freeze_encoder: bool = False,
        init_from_variant: bool = False,
    ) -> None:
        super().__init__(ema_decay=ema_decay, max_nonfinite_in_row=max_nonfinite_in_row)
        self.optimizer_config = optimizer or OptimizerConfig()
        self.perceptual_config = perceptual or PerceptualConfig()
        self.gan_config = gan
        self.patch_decode = patch_decode
        self.num_val_videos = num_val_videos
        if patch_decode is not None and autoencoder.improved_decoder:
            raise ValueError(
                "patch_decode is the stage-3 training of the plain causal decoder; set patch_decode: null "
                "for a §2.2.3 decoder (decoder_variant, first_frame_injection, noise_weight)"
            )
        if init_from_variant and init_from is None:
            raise ValueError("init_from_variant needs init_from: the checkpoint of the variant to start from")
        init = None if init_from is None else read_snapshot(init_from, expected=FSAE)
        if init_from_variant:
            self.autoencoder, report = load_decoder_variant(dict(init.weights), autoencoder)
            print(report)
        elif dcae_weights is not None:
            self.autoencoder, _ = import_dcae(dcae_weights, config=autoencoder)
        else:
            self.autoencoder = FSAE(autoencoder)
            self.autoencoder.init_weights()
        if init is not None and not init_from_variant:
            load_weights(self.autoencoder, init.weights, init.source)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.autoencoder.encoder.requires_grad_(False).eval()
        self.autoencoder_ema = make_ema_twin(self.autoencoder) if ema_decay > 0 else None
        self.regularization = regularization
        self.vf_loss = None
        self.frozen.add(
            "lpips",
            PerceptualLoss(
                net=self.perceptual_config.net,
                backbone_path=self.perceptual_config.backbone_path,
                frames_per_slice=self.perceptual_config.frames_per_slice,
            ),
        )
        if regularization is not None and regularization.method == "video_vf":
            dino = FrameFeatureEncoder.from_pretrained(
                regularization.dino_path, regularization.frames_per_batch
            )
            self.frozen.add("dino", dino)
            self.vf_loss = VideoVFLoss(
                dataclasses.replace(
                    regularization.vf, latent_channels=autoencoder.latent_channels, feature_channels=dino.dim
                )
            )
        self.discriminator = MultiscaleDiscriminator3D(gan.discriminator) if gan is not None else None
        if self.discriminator is not None:
            self.discriminator.init_weights()

        self.val_metrics = MetricCollection(
            {
                "psnr": PeakSignalNoiseRatio(data_range=1.0),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
                "lpips": MeanMetric(),
            },
            prefix="val/",
        )
        self.val_examples: tuple[torch.Tensor, torch.Tensor] | None = None
        if fvd_extractor:
            self.frozen.add("fvd", load_video_feature_extractor(fvd_extractor))
        self.fvd_statistics: dict[str, FeatureStatistics] = {}
        """Real and generated I3D feature statistics of the current validation."""

    # ---- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self):
        optimizer, scheduler = self.optimizer_config.build(self.generator_parameters())
        optimizers, schedulers = [optimizer], [scheduler]
        if self.discriminator is not None:
            d_optimizer, d_scheduler = self.gan_config.optimizer.build(self.discriminator.parameters())
            optimizers.append(d_optimizer)
            schedulers.append(d_scheduler)
        return optimizers, schedulers

    def generator_parameters(self) -> list[nn.Parameter]:
        """What the generator optimizer trains: the autoencoder and the VF projection W (§2.2.2)."""
        extra = list(self.vf_loss.parameters()) if self.vf_loss is not None else []
        trained = self.autoencoder.decoder if self.freeze_encoder else self.autoencoder
        return [*trained.parameters(), *extra]

    def train(self, mode: bool = True) -> AutoencoderModule:
        super().train(mode)
        if self.freeze_encoder:
            self.autoencoder.encoder.eval()
        return self

    def perceptual(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS between two ``B×3×T×H×W`` videos in [-1, 1], averaged over frames and batch."""
        return self.frozen["lpips"](recon, target)

    def gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.gan_config.start_step

    def reconstruct_for_loss(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, the target it is compared with, and the latent.

        In stage 3, at high resolution, only a random patch goes through the last 3 decoder stages and
        the loss sees only the part of it whose boundary conditions are valid (§2.2.1, footnote 3).
        """
        injection = self.autoencoder.config.first_frame_injection
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
            if injection:
                latent, features = self.autoencoder.encode(video, return_first_frame_features=True)
            else:
                latent = self.autoencoder.encode(video)
        height, width = video.shape[-2:]
        if injection:
            return self.autoencoder.decode(latent, first_frame_features=features), video, latent
        if self.patch_decode is None or height * width < self.patch_decode.min_pixels:
            return self.autoencoder.decode(latent), video, latent
        out = self.autoencoder.decode_patch(latent, self.patch_decode.latent_patch_size)
        if out.valid.is_empty:
            raise ValueError(
                f"patch_decode.latent_patch_size {self.patch_decode.latent_patch_size} leaves no valid pixels: "
                "the last decoder stages' receptive field is wider than the patch; enlarge the patch."
            )
        return out.valid_video(), video[out.valid.index()], latent

    def regularization_loss(self, latent: torch.Tensor, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted latent-regularization term (key ``reg``) and its parts, for logging."""
        config = self.regularization
        if config.method == "video_vf":
            features = self.frozen["dino"](video)
            out = self.vf_loss(latent, features)
            return {"reg": out.loss, "vf_mcos": out.mcos, "vf_mdms": out.mdms}
        regularize = downscale_regularization if config.method == "downscale" else upscale_regularization
        factor = config.scale_factor or (0.5 if config.method == "downscale" else 2.0)
        scale = regularize(self.autoencoder.decode, latent, video, factor=factor)
        return {"reg": config.scale_weight * scale, config.method: scale}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        video = batch["video"]
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        gan_on = self.gan_active()

        # 1. generator (autoencoder) step
        recon, target, latent = self.reconstruct_for_loss(video)
        l1 = F.l1_loss(recon, target)
        lpips_value = self.perceptual(recon, target)
        loss = l1 + self.perceptual_config.weight * lpips_value
        if self.regularization is not None:
            parts = self.regularization_loss(latent, video)
            loss = loss + parts["reg"]
            self.log_dict({f"train/{name}": value for name, value in parts.items()})
        if gan_on:
            self.discriminator.requires_grad_(False)
            adversarial = generator_loss(self.discriminator(recon))
            self.discriminator.requires_grad_(True)
            loss = loss + self.gan_config.weight * adversarial
            self.log("train/g_adv", adversarial)
        stepped = self.guarded_step(
            loss,
            optimizers[0],
            self.generator_parameters(),
            self.optimizer_config.grad_clip_norm,
            schedulers[0],
        )
        if stepped:
            self.update_ema(self.autoencoder_ema, self.autoencoder)

        # 2. discriminator step (does not advance global_step)
        if gan_on:
            d_loss = discriminator_loss(self.discriminator(target), self.discriminator(recon.detach()))
            if self.d_step_count() % self.gan_config.r1_every == 0:
                r1 = r1_penalty(self.discriminator, target, self.gan_config.r1_gamma)
                d_loss = d_loss + self.gan_config.r1_every * r1
                self.log("train/r1", r1)
            self.guarded_step(
                d_loss,
                optimizers[1],
                list(self.discriminator.parameters()),
                self.gan_config.optimizer.grad_clip_norm,
                schedulers[1],
                counts_as_step=False,
            )
            self.log("train/d_loss", d_loss)

        self.log_dict({"train/loss": loss, "train/l1": l1, "train/lpips": lpips_value}, prog_bar=True)
        return loss

    def d_step_count(self) -> int:
        return self.global_step - self.gan_config.start_step

    # ---- validation ------------------------------------------------------------------------------

    def saved_networks(self) -> dict[str, SavedNetwork]:
        return {"autoencoder": SavedNetwork(self.autoencoder, self.autoencoder_ema)}

    def inference_autoencoder(self) -> nn.Module:
        """The weights to evaluate and export: EMA when kept."""
        return self.autoencoder_ema if self.autoencoder_ema is not None else self.autoencoder

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
        return self.inference_autoencoder()(video).clamp(-1, 1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        video = batch["video"]
        recon = self.reconstruct(video)
        frames, recon_frames = fold_time(video), fold_time(recon)
        self.val_metrics["psnr"].update((recon_frames + 1) / 2, (frames + 1) / 2)
        self.val_metrics["ssim"].update((recon_frames + 1) / 2, (frames + 1) / 2)
        self.val_metrics["lpips"].update(self.perceptual(recon, video))
        if "fvd" in self.frozen:
            self.update_fvd(video, recon)
        if batch_idx == 0:
            keep = slice(0, self.num_val_videos)
            self.val_examples = (video[keep].detach().cpu(), recon[keep].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        if self.fvd_statistics:
            real, fake = self.fvd_statistics.pop("real"), self.fvd_statistics.pop("fake")
            if real.count < 2:
                raise ValueError(
                    f"FVD needs at least 2 validation videos, got {real.count}; raise data.val_batches."
                )
            self.log("val/fvd", frechet_distance(*real.compute(), *fake.compute()))

    def update_fvd(self, video: torch.Tensor, recon: torch.Tensor) -> None:
        extractor = self.frozen["fvd"]
        real_features, fake_features = extractor(video), extractor(recon)
        if not self.fvd_statistics:
            self.fvd_statistics["real"] = FeatureStatistics(real_features.shape[1])
            self.fvd_statistics["fake"] = FeatureStatistics(real_features.shape[1])
        self.fvd_statistics["real"].update(real_features)
        self.fvd_statistics["fake"].update(fake_features)
