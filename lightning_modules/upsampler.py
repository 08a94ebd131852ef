"""Latent upsampler training (§2.4.1, Figure 8, eq. 9), the three stages 256p → 512p → 1024p in one module.

Per batch (``V_high`` = ``batch["video"]``, ``B×3×T×H×W`` in [-1, 1], H and W multiples of 128):

    V_low  = bicubic ↓2 (antialiased) of V_high                          B×3×T×H/2×W/2
    Z_high = E(V_high), Z_low = E(V_low)        frozen FSAE encoder, no grad
    Ẑ_high = U(Z_low)                           the trained upsampler, raw FSAE latents (fsvideo.upsampler)
    L = α1·L1(Ẑ_high, Z_high) + α2·L1(D(Ẑ_high), V_high) + α3·LPIPS(D(Ẑ_high), V_high)      (eq. 9)

α1 = α2 = 0.1; α3 ramps linearly 0.1 → 1 (``loss``; logged as ``train/alpha3``). D is the frozen FSAE decoder
named by ``autoencoder``: the base (causal) decoder, or a Standard / Lite decoder, which is then given V_high's
first-frame encoder features. Gradients flow through D into U; D's weights never change.

Bounding the decoder's memory (121 frames at 1024², ``decode``):

* causal decoder, ``decode.patch_decode``: the FSAE's own stage-3 patch decoding (``FSAE.decode_patch``):
  the inner decoder stages run on the whole latent, only a random 3D crop goes through the last 3 (pixel)
  stages, and the loss sees the crop's valid region. Exact: equal to the full decode there.
* any decoder, ``decode.latent_frames``: a random window of that many latent frames of Ẑ_high is decoded
  with ``context_frames`` more latent frames before it (and after it for the non-causal Standard decoder,
  the only one that reads the future); only the window's pixel frames enter the loss. A window that starts at
  frame 0 is exact for the causal and Lite decoders; elsewhere the decoder's receptive field reaches past the
  context, so the window's first frames differ slightly from the full decode (a training approximation).
* ``decode.gradient_checkpointing`` recomputes the frozen decoder's blocks in backward.

Validation reports PSNR and LPIPS of three routes against V_high: the upsampler ``D(U(Z_low))``, latent
interpolation ``D(trilinear×2(Z_low))`` and RGB interpolation ``bicubic×2(D(Z_low))``
(``val/psnr_upsampler``, ``val/psnr_latent_trilinear``, ``val/psnr_rgb_bicubic``, ``val/lpips_*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio

from fsvideo.ae import FSAE, CausalCache, TilingConfig
from fsvideo.ae.injection import NoiseSource
from fsvideo.ae.patch import first_frame_aligned
from fsvideo.losses import PerceptualLoss, fold_time
from fsvideo.parallel import ParallelConfig
from fsvideo.pretrained import load_network, load_weights, read_snapshot
from fsvideo.upsampler import (
    LatentUpsampler,
    LatentUpsamplerConfig,
    downsample_video,
    interpolate_latent,
    upsample_video,
)
from lightning_modules.autoencoder import PatchDecodeConfig
from lightning_modules.base import OptimizerConfig, SavedNetwork, TrainingStage
from lightning_modules.ema import make_ema_twin

ROUTES = ("upsampler", "latent_trilinear", "rgb_bicubic")
"""The validation routes from Z_low to a high-resolution video (module docstring)."""


@dataclass
class UpsamplerLossConfig:
    """Weights of eq. 9 and the LPIPS network."""

    latent_l1: float = 0.1
    """α1: weight of the latent L1 between Ẑ_high and Z_high."""
    pixel_l1: float = 0.1
    """α2: weight of the pixel L1 between D(Ẑ_high) and V_high."""
    lpips_start: float = 0.1
    """α3 at step 0."""
    lpips_end: float = 1.0
    """α3 after the ramp."""
    lpips_ramp_steps: int = 10000
    """Optimizer steps over which α3 rises linearly from ``lpips_start`` to ``lpips_end`` (0: ``lpips_end`` at
    once). The paper says only "gradually"; set the ramp per stage."""
    lpips_net: str = "vgg"
    """LPIPS trunk: vgg or alex."""
    lpips_backbone_path: str | None = None
    """Local torchvision vgg16/alexnet state dict; None keeps a random trunk (tests, smoke runs)."""
    lpips_frames_per_slice: int | None = None
    """Frames per LPIPS call (bounds memory at high resolution); None = all at once."""

    def __post_init__(self) -> None:
        if self.lpips_ramp_steps < 0:
            raise ValueError(f"loss.lpips_ramp_steps must be >= 0, got {self.lpips_ramp_steps}")

    def alpha3(self, step: int) -> float:
        """The LPIPS weight at optimizer step ``step``."""
        if self.lpips_ramp_steps == 0:
            return self.lpips_end
        progress = min(max(step, 0) / self.lpips_ramp_steps, 1.0)
        return self.lpips_start + (self.lpips_end - self.lpips_start) * progress


@dataclass
class DecodeConfig:
    """How much of D(Ẑ_high) is decoded for the pixel losses (module docstring: memory at 1024²×121)."""

    latent_frames: int | None = None
    """Latent frames of a random window decoded for the pixel losses; None decodes every frame."""
    context_frames: int = 1
    """Latent frames decoded beside the window and left out of the loss (before it; also after it for the
    non-causal Standard decoder)."""
    patch_decode: PatchDecodeConfig | None = None
    """Causal decoder only: the FSAE's exact stage-3 patch decoding at frames of at least ``min_pixels``
    (takes precedence over ``latent_frames`` there)."""
    gradient_checkpointing: bool = False
    """Recompute the frozen decoder's blocks in backward instead of keeping their activations."""
    val_chunk_latent_frames: int = 0
    """Validation decodes in temporal chunks of this many latent frames (exact for causal and Lite decoders;
    0: one pass)."""

    def __post_init__(self) -> None:
        if self.latent_frames is not None and self.latent_frames < 1:
            raise ValueError(f"decode.latent_frames must be >= 1 or null, got {self.latent_frames}")
        if self.context_frames < 0:
            raise ValueError(f"decode.context_frames must be >= 0, got {self.context_frames}")


def check_video_size(video: torch.Tensor, spatial_compression: int) -> None:
    """V_high's sides must be multiples of twice the FSAE's spatial compression (128 for f64), so that V_low's
    sides are multiples of the compression and encode too."""
    multiple = 2 * spatial_compression
    height, width = video.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"the latent upsampler trains on videos whose sides are multiples of {multiple} (V_low = V_high / 2 "
            f"must be a multiple of the FSAE's {spatial_compression}), got {height}×{width}; set "
            f"data.init_args.buckets.multiple: {multiple} (and bucket sizes that are multiples of {multiple})."
        )


class UpsamplerModule(TrainingStage):
    """Trains a ``LatentUpsampler`` against a frozen FSAE (Figure 8, eq. 9).

    Args:
        autoencoder: the frozen FSAE (saved-model folder, run directory or checkpoint): its encoder makes Z_low
            and Z_high, its decoder is D. Its latent channels must equal the upsampler's.
        upsampler: network architecture.
        optimizer: AdamW settings.
        loss: α1, α2, the α3 ramp and the LPIPS network.
        decode: how much of D(Ẑ_high) the pixel losses decode (memory).
        init_from: the upsampler to start from (saved-model folder, run directory or checkpoint of an earlier
            stage; EMA weights preferred when kept).
        ema_decay: decay of the EMA weights used for validation and export; 0 disables EMA.
        max_nonfinite_in_row: stop after this many consecutive non-finite steps.
        num_val_videos: videos kept from the first validation batch for the video callback (V_high beside the
            three routes).
        parallel: activation checkpointing (per residual block) and compile of the upsampler and its EMA twin
            (``fsvideo.parallel``); the frozen FSAE's checkpointing is ``decode.gradient_checkpointing``.
    """

    def __init__(
        self,
        autoencoder: str,
        upsampler: LatentUpsamplerConfig,
        optimizer: OptimizerConfig | None = None,
        loss: UpsamplerLossConfig | None = None,
        decode: DecodeConfig | None = None,
        init_from: str | None = None,
        ema_decay: float = 0.999,
        max_nonfinite_in_row: int = 20,
        num_val_videos: int = 2,
        parallel: ParallelConfig | None = None,
    ) -> None:
        super().__init__(ema_decay=ema_decay, max_nonfinite_in_row=max_nonfinite_in_row)
        self.optimizer_config = optimizer or OptimizerConfig()
        self.loss_config = loss or UpsamplerLossConfig()
        self.decode_config = decode or DecodeConfig()
        self.num_val_videos = num_val_videos
        self.parallel = parallel or ParallelConfig()
        fsae = self.frozen.add("autoencoder", load_network(autoencoder, expected=FSAE))
        fsae.decoder.gradient_checkpointing = self.decode_config.gradient_checkpointing
        if fsae.config.latent_channels != upsampler.latent_channels:
            raise ValueError(
                f"upsampler.latent_channels is {upsampler.latent_channels}, but the FSAE at {autoencoder} has "
                f"{fsae.config.latent_channels}; set model.init_args.upsampler.latent_channels to the FSAE's."
            )
        if self.decode_config.patch_decode is not None and fsae.config.improved_decoder:
            raise ValueError(
                f"decode.patch_decode needs the causal FSAE decoder, but {autoencoder} has a §2.2.3 decoder "
                f"(decoder_variant {fsae.config.decoder_variant!r}, first-frame injection or noise); use "
                "decode.latent_frames instead (patch_decode: null)."
            )
        self.upsampler = LatentUpsampler(upsampler)
        self.upsampler.init_weights()
        if init_from is not None:
            init = read_snapshot(init_from, expected=LatentUpsampler)
            load_weights(self.upsampler, init.weights, init.source)
        self.upsampler_ema = make_ema_twin(self.upsampler) if ema_decay > 0 else None
        self.frozen.add(
            "lpips",
            PerceptualLoss(
                net=self.loss_config.lpips_net,
                backbone_path=self.loss_config.lpips_backbone_path,
                frames_per_slice=self.loss_config.lpips_frames_per_slice,
            ),
        )
        metrics: dict[str, nn.Module] = {}
        for route in ROUTES:
            metrics[f"psnr_{route}"] = PeakSignalNoiseRatio(data_range=1.0)
            metrics[f"lpips_{route}"] = MeanMetric()
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.val_examples: tuple[torch.Tensor, ...] | None = None

    @property
    def autoencoder(self) -> FSAE:
        return self.frozen["autoencoder"]

    def configure_model(self) -> None:
        """Apply ``parallel`` to the upsampler and its EMA twin (Lightning calls this at every trainer entry
        point; a second call finds the work done)."""
        networks = [self.upsampler] + ([self.upsampler_ema] if self.upsampler_ema is not None else [])
        self.parallelize(networks, [], self.parallel)

    def configure_optimizers(self):
        optimizer, scheduler = self.optimizer_config.build(self.upsampler.parameters())
        return [optimizer], [scheduler]

    def saved_networks(self) -> dict[str, SavedNetwork]:
        return {"upsampler": SavedNetwork(self.upsampler, self.upsampler_ema)}

    # ---- the objective ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Frozen encoder: ``B×3×T×H×W`` → latent ``B×C×t×h×w`` and, for a decoder with first-frame injection,
        the first frame's features (else None)."""
        if self.autoencoder.config.first_frame_injection:
            return self.autoencoder.encode(video, return_first_frame_features=True)
        return self.autoencoder.encode(video), None

    def decode_for_loss(
        self, latent: torch.Tensor, features: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """D(latent) on what the pixel losses see (``decode``), and the index of that part in V_high."""
        fsae, config = self.autoencoder, self.decode_config
        fsae.check_latent(latent)
        t = latent.shape[2]
        pixels = latent.shape[3] * latent.shape[4] * fsae.config.spatial_compression**2

        # 1. causal decoder at high resolution: exact patch decoding of the last stages
        patch = config.patch_decode
        if patch is not None and pixels >= patch.min_pixels:
            out = fsae.decode_patch(latent, patch.latent_patch_size)
            if out.valid.is_empty:
                raise ValueError(
                    f"decode.patch_decode.latent_patch_size {patch.latent_patch_size} leaves no valid pixels; "
                    "enlarge the patch."
                )
            return out.valid_video(), out.valid.index()

        # 2. a random window of latent frames, with context frames decoded beside it and dropped
        window = t if config.latent_frames is None else min(config.latent_frames, t)
        start = int(torch.randint(t - window + 1, (1,)))
        stop = start + window
        first = max(0, start - config.context_frames)
        reads_future = fsae.config.decoder_variant == "standard"
        last = min(t, stop + config.context_frames) if reads_future else stop
        # a window from mid-video has no single first frame: every latent frame decodes to f_t frames
        cache = None if first == 0 else CausalCache(starts_at_first_frame=False, carry=False)
        noise = NoiseSource(fsae.config.noise_weight) if fsae.config.noise_weight > 0 else None
        decoded = fsae.decoder(latent[:, :, first:last], cache, features, noise)
        f_t = fsae.config.temporal_compression
        t0, t1 = first_frame_aligned(start, f_t), first_frame_aligned(stop, f_t)
        offset = first_frame_aligned(first, f_t)
        index = (slice(None), slice(None), slice(t0, t1))
        return decoded[:, :, t0 - offset : t1 - offset], index

    def compute_loss(self, video: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Eq. 9 on V_high ``B×3×T×H×W``; returns ``loss`` and its terms (``latent_l1``, ``l1``, ``lpips``,
        ``alpha3``)."""
        check_video_size(video, self.autoencoder.config.spatial_compression)
        # 1. V_low and both latents from the frozen encoder
        z_high, features = self.encode(video)
        z_low, _ = self.encode(downsample_video(video))
        # 2. upsample, decode (what the memory budget allows) and compare
        predicted = self.upsampler(z_low)
        decoded, index = self.decode_for_loss(predicted, features)
        target = video[index]
        latent_l1 = F.l1_loss(predicted.float(), z_high.float())
        pixel_l1 = F.l1_loss(decoded.float(), target.float())
        lpips_value = self.frozen["lpips"](decoded, target)
        alpha3 = self.loss_config.alpha3(step)
        loss = (
            self.loss_config.latent_l1 * latent_l1
            + self.loss_config.pixel_l1 * pixel_l1
            + alpha3 * lpips_value
        )
        return {
            "loss": loss,
            "latent_l1": latent_l1,
            "l1": pixel_l1,
            "lpips": lpips_value,
            "alpha3": loss.new_tensor(alpha3),
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.compute_loss(batch["video"], self.global_step)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stepped = self.guarded_step(
            terms["loss"],
            optimizer,
            list(self.upsampler.parameters()),
            self.optimizer_config.grad_clip_norm,
            scheduler,
        )
        if stepped:
            self.update_ema(self.upsampler_ema, self.upsampler)
        self.log_dict({f"train/{name}": value for name, value in terms.items()}, prog_bar=True)
        return terms["loss"]

    # ---- validation ---------------------------------------------------------------------------------

    def inference_upsampler(self) -> LatentUpsampler:
        """The weights to evaluate and export: EMA when kept."""
        return self.upsampler_ema if self.upsampler_ema is not None else self.upsampler

    @torch.no_grad()
    def routes(self, video: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """V_high ``B×3×T×H×W`` → the three routes' reconstructions from Z_low (``ROUTES``), same shape."""
        check_video_size(video, self.autoencoder.config.spatial_compression)
        z_low, low_features = self.encode(downsample_video(video))
        # the decoder's first-frame features for the high-resolution routes: V_high's first frame (causal encoder)
        high_features = self.encode(video[:, :, :1])[1] if low_features is not None else None
        chunk = self.decode_config.val_chunk_latent_frames
        tiling = TilingConfig(chunk_latent_frames=chunk) if chunk else None

        def decode(latent: torch.Tensor, features: list[torch.Tensor] | None) -> torch.Tensor:
            generator = torch.Generator(latent.device).manual_seed(seed)  # the same decoder noise per route
            return self.autoencoder.decode(
                latent, tiling=tiling, first_frame_features=features, generator=generator
            ).clamp(-1, 1)

        return {
            "upsampler": decode(self.inference_upsampler()(z_low), high_features),
            "latent_trilinear": decode(interpolate_latent(z_low), high_features),
            "rgb_bicubic": upsample_video(decode(z_low, low_features)),
        }

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        video = batch["video"]
        routes = self.routes(video, seed=batch_idx)
        for route, out in routes.items():
            self.val_metrics[f"psnr_{route}"].update(fold_time(out + 1) / 2, fold_time(video + 1) / 2)
            self.val_metrics[f"lpips_{route}"].update(self.frozen["lpips"](out, video))
        if batch_idx == 0:
            keep = slice(0, self.num_val_videos)
            self.val_examples = tuple(v[keep].detach().cpu() for v in (video, *routes.values()))

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
