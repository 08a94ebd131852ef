"""Base-DiT training (§2.3.2): flow matching on normalised FSAE latents with image-to-video conditioning.

One module serves the three pretraining stages (image 256², video 256², video 512²) and SFT; stages differ
only in their data and ``init_from``. Per batch (one bucket; ``z0`` the normalised latent ``B×C×t×h×w``):

    σ ~ logit-normal(sigma_mean, sigma_std), then the timestep shift (fixed, or growing with the token count)
    z_σ = (1 − σ)·z0 + σ·ε,   target v = ε − z0
    clip  (t > 1): DiT input ``cat([z_σ, mask, [z0 frame 0, zeros]])`` (image to video). The loss leaves out
                   latent frame 0: it is given by the condition, and its velocity ε₀ − z0[:, :, :1] is known
                   exactly at sampling time, so a sampler sets that frame itself instead of learning it;
                   the network spends its capacity on the frames it has to generate.
    still (t = 1): mask, condition latent and image tokens are zero (text to image): a still's only frame
                   would otherwise be given, and the image stage is there to learn text-visual alignment.
    loss = Pseudo-Huber(v̂, v) with the norm over each sample's loss elements, mean over the batch.

Classifier-free guidance: per sample, the text is replaced by the empty prompt's tokens and the image tokens
by zeros, independently (``fsvideo.encoders.drop_conditions``), as the sampler's unconditional branch does.
Validation: the EMA weights' loss at fixed σ values with noise from a seeded generator, so curves compare
across steps and runs, plus the Figure 6 router heatmap of the first batch (``val_router_heatmap``).

Latent space: a saved DiT records the ``LatentSpace`` of the data it trained on (FSAE encoder, text and
image encoders, text length) and its latent statistics (``records`` of its saved-model folder and of the
checkpoint's network manifest, ``fsvideo.pretrained``). Training on data of another latent space is
refused, both from an ``init_from`` checkpoint and when resuming (``--ckpt_path``); a checkpoint without the
record (converted Wan2.1 weights, older runs) is accepted with a warning.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from datamodules.latents import LatentData
from fsvideo.ae import FSAE
from fsvideo.dit import DiT, DiTConfig, FrameCondition, image_to_video, router_heatmap, text_to_image
from fsvideo.encoders import drop_conditions
from fsvideo.flow import (
    interpolate,
    pseudo_huber_loss,
    resolution_shift,
    sample_sigma,
    shift_sigma,
    velocity_target,
)
from fsvideo.latent_space import LATENT_SPACE, LATENT_STATS, LatentSpace, LatentStats
from fsvideo.parallel import ParallelConfig
from fsvideo.pipeline import RefinerChain
from fsvideo.pretrained import MANIFEST_KEY, NetworkSnapshot, load_network, load_weights, read_snapshot
from fsvideo.stages import SamplingSettings
from lightning_modules.base import OptimizerConfig, SavedNetwork, TrainingStage
from lightning_modules.ema import make_ema_twin


def _is_router(name: str) -> bool:
    """Layer Memory router tensors, which a plain DiT lacks: a plain DiT may start one with Layer Memory."""
    return ".router." in name


@dataclass
class FlowMatchingConfig:
    """Noise levels and loss of the flow-matching objective."""

    sigma_mean: float = 0.0
    """Mean of the logit-normal noise-level distribution, σ = sigmoid(n), n ~ N(mean, std²) (SD3: 0)."""
    sigma_std: float = 1.0
    """Standard deviation of that normal (SD3: 1)."""
    shift: float = 1.0
    """Timestep shift s applied to every sampled σ: s·σ / (1 + (s − 1)·σ); 1 leaves σ as drawn."""
    resolution_shift: bool = False
    """Use the shift of ``fsvideo.flow.resolution_shift`` instead of ``shift``: log(s) linear in the batch's
    token count, e^0.5 at ``shift_base_tokens`` and e^1.15 at ``shift_max_tokens`` (Flux's rule), so longer
    and larger latents train at higher noise."""
    shift_base_tokens: int = 256
    """Token count at which the resolution-dependent shift is e^0.5."""
    shift_max_tokens: int = 4096
    """Token count at which the resolution-dependent shift is e^1.15."""
    huber_c: float | None = None
    """Pseudo-Huber constant c in sqrt(‖v̂ − v‖² + c²) − c (the norm over a sample's loss elements): the
    loss is quadratic for errors much smaller than c and linear above. None uses 0.00054·sqrt(d), d the
    sample's loss elements (iCT's rule), which keeps the transition at the same per-element error for
    every bucket size."""

    def __post_init__(self) -> None:
        if self.sigma_std <= 0 or self.shift <= 0:
            raise ValueError(f"sigma_std ({self.sigma_std}) and shift ({self.shift}) must be positive.")
        if self.shift_max_tokens <= self.shift_base_tokens:
            raise ValueError(
                f"shift_max_tokens ({self.shift_max_tokens}) must exceed shift_base_tokens ({self.shift_base_tokens})."
            )
        if self.huber_c is not None and self.huber_c < 0:
            raise ValueError(f"huber_c must be >= 0 (or None for 0.00054·sqrt(d)), got {self.huber_c}.")

    def shift_for(self, num_tokens: int) -> float:
        """The timestep shift for a latent of ``num_tokens`` DiT tokens."""
        if self.resolution_shift:
            return resolution_shift(num_tokens, self.shift_base_tokens, self.shift_max_tokens)
        return self.shift


class DiTModule(TrainingStage):
    """Trains the base DiT on batches of ``datamodules.latents`` (``latent``, ``text_tokens``, ``text_mask``,
    ``image_tokens``, ``is_image``).

    Args:
        dit: network architecture (``latent_channels`` must equal the FSAE's).
        optimizer: AdamW settings (betas 0.9, 0.95 in the paper).
        flow: noise levels and loss.
        text_drop_prob: probability that a sample's prompt is replaced by the empty prompt (CFG).
        image_drop_prob: probability that a sample's image tokens are zeroed (CFG).
        latent_stats: ``stats.json`` or latent cache directory with the per-channel mean / std to normalise
            latents with. None keeps the normalisation of the ``init_from`` checkpoint (so a chain of stages
            shares the first stage's), or else takes the DataModule's (its cache's). Stored in checkpoints
            (``latent_mean``, ``latent_std``) for inference.
        init_from: the DiT to start from: a saved-model folder (``fsvideo export``, ``DiT.save_pretrained``,
            converted Wan2.1 weights), or a run directory / checkpoint of the previous stage (EMA weights
            preferred when kept). Its latent statistics and latent space come with it. A plain DiT (without Layer Memory) may start one with it: the
            routers it lacks keep their init (gate 0), so the model starts as the plain one (the Figure 7(b)
            retrofit).
        val_sigmas: noise levels at which validation measures the loss.
        val_seed: seed of the validation noise (the generator of batch i is seeded with ``val_seed + i``).
        parallel: activation checkpointing, compile and FSDP2 of the DiT and its EMA twin
            (``fsvideo.parallel``). With ``fsdp`` (needs ``trainer.strategy:
            lightning.pytorch.strategies.ModelParallelStrategy``, ``tensor_parallel_size: 1``) both networks
            are built on the meta device and materialised shard by shard in ``configure_model``, and
            ``init_from`` is read memory-mapped, each rank taking its shard, so no process ever holds a whole
            copy of a 14B model. ``context_parallel`` cp > 1 (with ``fsdp``) splits each sample's tokens over cp
            ranks that read the same batches (README "Scaling out").
        ema_decay: decay of the EMA weights used for validation and export; 0 disables EMA.
        max_nonfinite_in_row: stop after this many consecutive non-finite steps.
    """

    network_name = "dit"
    """Name of the trained DiT in checkpoints' manifests and in ``fsvideo export`` (``OUT/dit/``)."""

    def __init__(
        self,
        dit: DiTConfig,
        optimizer: OptimizerConfig | None = None,
        flow: FlowMatchingConfig | None = None,
        text_drop_prob: float = 0.1,
        image_drop_prob: float = 0.1,
        latent_stats: str | None = None,
        init_from: str | None = None,
        val_sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
        val_seed: int = 0,
        parallel: ParallelConfig | None = None,
        ema_decay: float = 0.999,
        max_nonfinite_in_row: int = 20,
    ) -> None:
        super().__init__(ema_decay=ema_decay, max_nonfinite_in_row=max_nonfinite_in_row)
        for name, p in (("text_drop_prob", text_drop_prob), ("image_drop_prob", image_drop_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}.")
        if not val_sigmas or not all(0.0 < s <= 1.0 for s in val_sigmas):
            raise ValueError(f"val_sigmas must be noise levels in (0, 1], got {val_sigmas}.")
        self.optimizer_config = optimizer or OptimizerConfig()
        self.flow = flow or FlowMatchingConfig()
        self.text_drop_prob = text_drop_prob
        self.image_drop_prob = image_drop_prob
        self.latent_stats_path = latent_stats
        self.val_sigmas = tuple(val_sigmas)
        self.val_seed = val_seed

        self.parallel = parallel or ParallelConfig()
        self.init_from = init_from
        with torch.device("meta") if self.parallel.fsdp else nullcontext():
            self.dit = DiT(dit)
        channels = dit.latent_channels
        self.register_buffer("latent_mean", torch.full((channels,), math.nan))
        self.register_buffer("latent_std", torch.full((channels,), math.nan))
        self.register_buffer("empty_text_tokens", None, persistent=False)
        self.register_buffer("empty_text_mask", None, persistent=False)
        self.init_snapshot: NetworkSnapshot | None = None
        """The ``init_from`` network (weights memory-mapped); sharded networks load it in ``configure_model``."""
        self.init_latent_space: LatentSpace | None = None
        if init_from is not None:
            self.init_snapshot = read_snapshot(init_from, expected=DiT)
            if not self.parallel.fsdp:
                load_weights(
                    self.dit, self.init_snapshot.weights, self.init_snapshot.source, may_add=_is_router
                )
            records = self.init_snapshot.records
            if records.get(LATENT_STATS) is not None:
                self.set_latent_stats(LatentStats.from_record(records[LATENT_STATS]))
            if records.get(LATENT_SPACE) is not None:
                self.init_latent_space = LatentSpace.from_record(
                    records[LATENT_SPACE], self.init_snapshot.source
                )
        self.latent_space = self.init_latent_space
        """The latent space of the training data, recorded in checkpoints (None while unknown)."""
        self.dit_ema = make_ema_twin(self.dit) if ema_decay > 0 else None
        self.val_router_heatmap: torch.Tensor | None = None

    def configure_model(self) -> None:
        """Apply ``parallel`` to the DiT and its EMA twin; with ``fsdp``, then materialise and initialise
        their shards. Lightning calls this on every rank (once the device mesh exists) at each trainer entry
        point; a second call finds the work done."""
        networks = [self.dit] + ([self.dit_ema] if self.dit_ema is not None else [])
        self.parallelize(networks, self.frozen.parallelizable(), self.parallel)
        if not any(p.is_meta for p in self.dit.parameters()):
            return
        device = self.trainer.strategy.root_device
        for network in networks:
            network.to_empty(device=device)
        self.dit.init_weights()  # what init_from lacks (a retrofit's routers) keeps this
        if self.init_snapshot is not None:  # each rank reads its own rows of every tensor
            load_weights(self.dit, self.init_snapshot.weights, self.init_snapshot.source, may_add=_is_router)
        if self.dit_ema is not None:
            with torch.no_grad():
                for ema, own in zip(self.dit_ema.parameters(), self.dit.parameters()):
                    ema.copy_(own)

    # ---- inputs ------------------------------------------------------------------------------------------

    def _latent_data(self) -> LatentData | None:
        """The DataModule when it offers latent-space information (``datamodules.latents.LatentData``)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return datamodule if isinstance(datamodule, LatentData) else None

    def _data_latent_space(self) -> LatentSpace | None:
        """The DataModule's latent space (set by its ``setup``), or None when it offers none."""
        data = self._latent_data()
        return None if data is None else data.latent_space

    def setup(self, stage: str) -> None:
        data_space = self._data_latent_space()
        if data_space is not None:
            if self.init_latent_space is not None:
                self.init_latent_space.check_same(
                    data_space,
                    fix="the DiT of model.init_args.init_from would train on latents it cannot read. Encode the "
                    "data with the FSAE run and text / image encoders (and --text-len) the init_from checkpoint "
                    "was trained with, or start from a checkpoint trained in this data's latent space.",
                )
            elif self.init_from is not None:
                rank_zero_warn(
                    f"init_from {self.init_from} records no latent space (converted weights or an older run), so "
                    f"whether it was trained on latents like those of {data_space.source} is not checked."
                )
            self.latent_space = data_space
        data = self._latent_data()
        offered = None if data is None else data.latent_stats
        if self.latent_stats_path is not None:
            self.set_latent_stats(LatentStats.read(self.latent_stats_path))
        elif torch.isnan(self.latent_mean).any():
            if offered is None:
                raise ValueError(
                    "no latent statistics: set model.init_args.latent_stats to a stats.json written by "
                    "`fsvideo data encode`, or use datamodules.latents.LatentDataModule, which reads its cache's."
                )
            self.set_latent_stats(offered)
        elif offered is not None:
            deviation = (torch.tensor(offered.mean) - self.latent_mean.cpu()).abs() / self.latent_std.cpu()
            if deviation.max() > 0.1:
                rank_zero_warn(
                    f"the data's latent statistics differ from the normalisation this DiT was trained with "
                    f"(means apart by up to {deviation.max():.2f} std); the DiT keeps its own (from init_from). "
                    "Set model.init_args.latent_stats to choose explicitly."
                )
        if data is not None and data.empty_text is not None:
            self.set_empty_text(*data.empty_text)

    def hold_data_autoencoder(self, purpose: str) -> None:
        """Hold the FSAE that encoded the DataModule's latents as the frozen ``autoencoder`` (decoding samples for
        rewards), unless one is held already (``model.init_args.autoencoder``)."""
        if "autoencoder" in self.frozen:
            return
        data = self._latent_data()
        paths = None if data is None else data.encoder_paths()
        if paths is None:
            raise ValueError(
                f"no FSAE to decode {purpose} samples with: set model.init_args.autoencoder to the FSAE run that "
                "encoded the latents."
            )
        autoencoder = load_network(paths.autoencoder, expected=FSAE).to(self.device)
        self.frozen.add("autoencoder", autoencoder, replicate=True)

    def saved_networks(self) -> dict[str, SavedNetwork]:
        return {self.network_name: SavedNetwork(self.dit, self.dit_ema, self.dit_records())}

    def dit_records(self) -> dict[str, Any]:
        """What a saved DiT is used with: its latent statistics and the latent space it trained in."""
        records: dict[str, Any] = {}
        if not torch.isnan(self.latent_mean).any():
            stats = LatentStats(self.latent_mean.tolist(), self.latent_std.tolist(), elements_per_channel=0)
            records[LATENT_STATS] = stats.record()
        if self.latent_space is not None:
            records[LATENT_SPACE] = self.latent_space.record()
        return records

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (called after ``setup``): the checkpoint's latent space must be the data's."""
        super().on_load_checkpoint(checkpoint)
        path = getattr(self._trainer, "ckpt_path", None) or "being loaded"
        entry = checkpoint.get(MANIFEST_KEY, {}).get(self.network_name, {})
        record = entry.get("records", {}).get(LATENT_SPACE)
        recorded = None if record is None else LatentSpace.from_record(record, f"checkpoint {path}")
        data_space = self._data_latent_space()
        if data_space is None:
            self.latent_space = recorded or self.latent_space
        elif recorded is None:
            rank_zero_warn(
                f"checkpoint {path} records no latent space (an older run), so whether it was trained on latents "
                f"like those of {data_space.source} is not checked."
            )
        else:
            recorded.check_same(
                data_space,
                fix="resume on the data this run was trained on, or encode this data with the FSAE run and "
                "text / image encoders (and --text-len) the checkpoint was trained with.",
            )

    def set_latent_stats(self, stats: LatentStats) -> None:
        if stats.channels != self.dit.config.latent_channels:
            raise ValueError(
                f"latent statistics have {stats.channels} channels but the DiT has latent_channels="
                f"{self.dit.config.latent_channels}; set model.init_args.dit.latent_channels to the FSAE's."
            )
        self.latent_mean.copy_(torch.tensor(stats.mean))
        self.latent_std.copy_(torch.tensor(stats.std))

    def set_empty_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """The empty prompt (tokens ``1×L×D``, mask ``1×L``) that dropped prompts become."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.dit.config.text_dim:
            raise ValueError(
                f"empty-prompt tokens {tuple(tokens.shape)} do not fit the DiT's text_dim "
                f"{self.dit.config.text_dim}; the text encoder of the data must match model.init_args.dit.text_dim."
            )
        self.empty_text_tokens = tokens.to(self.latent_mean.device)
        self.empty_text_mask = mask.to(self.latent_mean.device)

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """``(latent − mean) / std`` per channel; latent ``B×C×t×h×w``."""
        shape = (1, -1, 1, 1, 1)
        return (latent.float() - self.latent_mean.view(shape)) / self.latent_std.view(shape)

    def conditions(
        self, batch: dict[str, Any], is_video: bool, drop: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Text tokens, text mask and image tokens for the DiT (see the module docstring)."""
        if "text_tokens" not in batch:
            raise ValueError(
                "the batch has no text / image tokens; train the DiT on a cache encoded with --text-encoder and "
                "--image-encoder (or datamodules.latents.EncodingVideoDataModule)."
            )
        text, mask = batch["text_tokens"].float(), batch["text_mask"].bool()
        image = batch["image_tokens"].float()
        if not is_video:
            image = torch.zeros_like(image)
        if drop and (self.text_drop_prob > 0 or self.image_drop_prob > 0):
            if self.empty_text_tokens is None:
                raise ValueError(
                    "CFG dropout needs the empty prompt's tokens, which the DataModule provides "
                    "(datamodules.latents); or set text_drop_prob and image_drop_prob to 0."
                )
            dropped = drop_conditions(
                text,
                mask,
                image,
                self.text_drop_prob,
                self.image_drop_prob,
                empty_text=(self.empty_text_tokens, self.empty_text_mask),
            )
            text, mask, image = dropped.text_tokens, dropped.text_mask, dropped.image_tokens
        return text, mask, image if self.dit.config.image_dim is not None else None

    # ---- objective ---------------------------------------------------------------------------------------

    def sample_sigma(self, z0: torch.Tensor) -> torch.Tensor:
        """Logit-normal σ per sample, shifted for this latent size; z0 ``B×C×t×h×w`` → ``B``."""
        sigma = sample_sigma(z0.shape[0], self.flow.sigma_mean, self.flow.sigma_std, device=z0.device)
        shift = self.flow.shift_for(z0[0, 0].numel() // self.dit.config.patch_volume)
        return sigma if shift == 1.0 else shift_sigma(sigma, shift)

    def build_condition(self, z0: torch.Tensor, batch: dict[str, Any], augment: bool) -> FrameCondition:
        """The conditioning task of a batch: image to video for clips (frame 0 given), none for stills (text to
        image: a still's only frame would otherwise be given, and the image stage learns text-visual alignment).
        ``augment`` is True in training steps (random condition augmentations of subclasses), False in
        validation."""
        mask_channels = self.dit.config.mask_channels
        if z0.shape[2] > 1:
            return image_to_video(z0[:, :, :1], z0.shape[2], mask_channels)
        return text_to_image(z0, mask_channels)

    def flow_loss(
        self,
        network: nn.Module,
        z0: torch.Tensor,
        batch: dict[str, Any],
        sigma: torch.Tensor,
        noise: torch.Tensor,
        drop: bool,
        return_router_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Pseudo-Huber flow-matching loss of ``network`` at noise levels ``sigma`` ``B`` with ``noise``
        (shaped like the normalised latent ``z0`` ``B×C×t×h×w``); also the router maxima when asked."""
        condition = self.build_condition(z0, batch, augment=drop)
        text, text_mask, image = self.conditions(batch, z0.shape[2] > 1, drop)
        latent_in = condition.model_input(interpolate(z0, noise, sigma))  # (B, 2C + k, t, h, w)
        out = network(latent_in, sigma, text, image, text_mask, return_router_weights=return_router_weights)
        pred, router_maxima = out if return_router_weights else (out, None)
        pred, target = condition.loss_pair(pred, velocity_target(z0, noise))
        return pseudo_huber_loss(pred, target, c=self.flow.huber_c), router_maxima

    # ---- training ----------------------------------------------------------------------------------------

    def configure_optimizers(self):
        optimizer, scheduler = self.optimizer_config.build(self.dit.parameters())
        return [optimizer], [scheduler]

    def step_dit(self, loss: torch.Tensor, counts_as_step: bool = True, accumulated: bool = False) -> bool:
        """Backward, the guarded optimizer step of the DiT and its EMA update; False when the step was skipped
        (``counts_as_step``, ``accumulated``: as ``guarded_step``)."""
        stepped = self.guarded_step(
            loss,
            self.optimizers(),
            list(self.dit.parameters()),
            self.optimizer_config.grad_clip_norm,
            self.lr_schedulers(),
            counts_as_step=counts_as_step,
            accumulated=accumulated,
        )
        if stepped:
            self.update_ema(self.dit_ema, self.dit)
        return stepped

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z0 = self.normalize(batch["latent"])
        loss, _ = self.flow_loss(self.dit, z0, batch, self.sample_sigma(z0), torch.randn_like(z0), drop=True)
        self.step_dit(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        data = self._latent_data()
        if data is not None and self.global_step % self._trainer.log_every_n_steps == 0:
            self.log_dict(data.skipped_counts(), sync_dist=True, reduce_fx="sum")
        return loss

    # ---- validation --------------------------------------------------------------------------------------

    def inference_dit(self) -> DiT:
        """The weights to evaluate and export: EMA when kept."""
        return self.dit_ema if self.dit_ema is not None else self.dit

    def sampling_networks(
        self, refine: SamplingSettings
    ) -> tuple[DiT, torch.Tensor, torch.Tensor, RefinerChain | None]:
        """What in-training samples generate with: the base DiT, its latent mean / std, and the refiner chain
        (None here: a base-DiT run samples at the base size; ``refine`` sets a refiner run's stage)."""
        return self.inference_dit(), self.latent_mean, self.latent_std, None

    def on_validation_epoch_start(self) -> None:
        self.val_router_heatmap = None

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        z0 = self.normalize(batch["latent"])
        generator = torch.Generator().manual_seed(self.val_seed + batch_idx)
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        want_routers = batch_idx == 0 and bool(self.dit.routers)
        losses, heatmaps = [], []
        for value in self.val_sigmas:
            sigma = torch.full((z0.shape[0],), value, device=z0.device)
            loss, maxima = self.flow_loss(
                self.inference_dit(), z0, batch, sigma, noise, drop=False, return_router_weights=want_routers
            )
            self.log(f"val/loss_sigma_{value:.2f}", loss, sync_dist=True, batch_size=z0.shape[0])
            losses.append(loss)
            if maxima is not None:
                heatmaps.append(router_heatmap(maxima))
        self.log(
            "val/loss", torch.stack(losses).mean(), prog_bar=True, sync_dist=True, batch_size=z0.shape[0]
        )
        if heatmaps:
            self.val_router_heatmap = torch.stack(heatmaps).mean(0)
