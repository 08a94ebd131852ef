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

Latent space: checkpoints record the ``LatentSpace`` of the data the DiT trained on (FSAE encoder, text and
image encoders, text length; ``checkpoint["latent_space"]``). Training on data of another latent space is
refused, both from an ``init_from`` checkpoint and when resuming (``--ckpt_path``); a checkpoint without the
record (converted Wan2.1 weights, older runs) is accepted with a warning.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard

from datamodules.latent_cache import LatentSpace, LatentStats
from fsvideo.checkpoints import load_module_weights, pick_module_weights, read_state_dict
from fsvideo.dit import DiT, DiTConfig, build_i2v_condition, router_heatmap
from fsvideo.encoders import drop_conditions
from fsvideo.flow import (
    interpolate,
    pseudo_huber_loss,
    resolution_shift,
    sample_sigma,
    shift_sigma,
    velocity_target,
)
from fsvideo.latent_space import LATENT_SPACE_KEY, read_latent_space_record
from lightning_modules.base import OptimizerConfig, TrainingStage
from lightning_modules.ema import make_ema_twin


def latent_stats_of_checkpoint(path: str | Path) -> LatentStats | None:
    """The ``latent_mean`` / ``latent_std`` a DiT checkpoint was trained with, or None when it holds none.

    Memory-maps the file, so only these two tensors are read, whatever the size of the checkpoint.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            state = {k: f.get_tensor(k) for k in ("latent_mean", "latent_std") if k in keys}
    else:
        state = read_state_dict(path)
    mean, std = state.get("latent_mean"), state.get("latent_std")
    if mean is None or std is None or torch.isnan(mean).any():
        return None
    return LatentStats(mean.tolist(), std.tolist(), elements_per_channel=0)


def latent_space_of_checkpoint(path: str | Path) -> LatentSpace | None:
    """The latent space a DiT checkpoint records, or None when it records none (converted weights, old runs)."""
    record = read_latent_space_record(path)
    return None if record is None else LatentSpace.from_record(record, f"checkpoint {path}")


def _is_router(name: str) -> bool:
    """Layer Memory router tensors, which a checkpoint of a plain DiT lacks."""
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
        dit: network architecture (``latent_channels`` must equal the FSAE's; ``gradient_checkpointing`` here).
        optimizer: AdamW settings (betas 0.9, 0.95 in the paper).
        flow: noise levels and loss.
        text_drop_prob: probability that a sample's prompt is replaced by the empty prompt (CFG).
        image_drop_prob: probability that a sample's image tokens are zeroed (CFG).
        latent_stats: ``stats.json`` or latent cache directory with the per-channel mean / std to normalise
            latents with. None keeps the normalisation of the ``init_from`` checkpoint (so a chain of stages
            shares the first stage's), or else takes the DataModule's (its cache's). Stored in checkpoints
            (``latent_mean``, ``latent_std``) for inference.
        init_from: checkpoint of the previous stage (EMA weights preferred when present). A checkpoint of a DiT
            without Layer Memory may start one with it: the routers it lacks keep their init (gate 0), so the
            model starts as the checkpoint's (the Figure 7(b) retrofit).
        val_sigmas: noise levels at which validation measures the loss.
        val_seed: seed of the validation noise (the generator of batch i is seeded with ``val_seed + i``).
        fsdp: shard the DiT and its EMA twin with FSDP2 (``fully_shard`` per block, then the whole network)
            over every rank; needs ``trainer.strategy: lightning.pytorch.strategies.ModelParallelStrategy``
            (``tensor_parallel_size: 1``). Both networks are then built on the meta device and materialised
            shard by shard in ``configure_model``, and ``init_from`` is read memory-mapped, each rank taking its
            shard, so no process ever holds a whole copy of a 14B model.
        ema_decay: decay of the EMA weights used for validation and export; 0 disables EMA.
        max_nonfinite_in_row: stop after this many consecutive non-finite steps.
    """

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
        fsdp: bool = False,
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

        self.fsdp = fsdp
        self.init_from = init_from
        with torch.device("meta") if fsdp else nullcontext():
            self.dit = DiT(dit)
        channels = dit.latent_channels
        self.register_buffer("latent_mean", torch.full((channels,), math.nan))
        self.register_buffer("latent_std", torch.full((channels,), math.nan))
        self.register_buffer("empty_text_tokens", None, persistent=False)
        self.register_buffer("empty_text_mask", None, persistent=False)
        if init_from is not None:
            if not fsdp:  # sharded networks load in configure_model, once they exist
                load_module_weights(self.dit, init_from, prefix="dit", may_add=_is_router)
            inherited = latent_stats_of_checkpoint(init_from)
            if inherited is not None:
                self.set_latent_stats(inherited)
        self.init_latent_space = None if init_from is None else latent_space_of_checkpoint(init_from)
        self.latent_space = self.init_latent_space
        """The latent space of the training data, recorded in checkpoints (None while unknown)."""
        self.dit_ema = make_ema_twin(self.dit) if ema_decay > 0 else None
        self.val_router_heatmap: torch.Tensor | None = None

    def configure_model(self) -> None:
        """With ``fsdp``: shard, materialise and initialise the DiT and its EMA twin (Lightning calls this on
        every rank once the device mesh exists; a second call finds them done)."""
        if not self.fsdp or not any(p.is_meta for p in self.dit.parameters()):
            return
        mesh = self.device_mesh
        if mesh is None:
            raise ValueError(
                "model.init_args.fsdp: true needs trainer.strategy: "
                "lightning.pytorch.strategies.ModelParallelStrategy (tensor_parallel_size: 1), or fsdp: false."
            )
        if mesh.ndim > 1:  # ModelParallelStrategy's (data_parallel, tensor_parallel) mesh
            if mesh["tensor_parallel"].size() != 1:
                raise ValueError(
                    f"fsdp shards over data-parallel ranks only, but the mesh is {tuple(mesh.shape)} "
                    f"{mesh.mesh_dim_names}; set trainer.strategy.init_args.tensor_parallel_size: 1 and "
                    "data_parallel_size to the number of GPUs."
                )
            mesh = mesh["data_parallel"]
        device = self.trainer.strategy.root_device
        networks = [self.dit] + ([self.dit_ema] if self.dit_ema is not None else [])
        for network in networks:
            for block in network.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(network, mesh=mesh)
            network.to_empty(device=device)
        self.dit.init_weights()  # what init_from lacks (a retrofit's routers) keeps this
        if self.init_from is not None:
            weights, _ = pick_module_weights(self.dit, self.init_from, prefix="dit", may_add=_is_router)
            set_model_state_dict(
                self.dit, weights, options=StateDictOptions(full_state_dict=True, strict=False)
            )
        if self.dit_ema is not None:
            with torch.no_grad():
                for ema, own in zip(self.dit_ema.parameters(), self.dit.parameters()):
                    ema.copy_(own)

    # ---- inputs ------------------------------------------------------------------------------------------

    def _data_latent_space(self) -> LatentSpace | None:
        """The DataModule's ``latent_space`` (set by its ``setup``), or None when it offers none."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return getattr(datamodule, "latent_space", None)

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
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        offered = getattr(datamodule, "latent_stats", None)
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
        empty_text = getattr(datamodule, "empty_text", None)
        if empty_text is not None:
            self.set_empty_text(*empty_text)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.latent_space is not None:
            checkpoint[LATENT_SPACE_KEY] = self.latent_space.record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (called after ``setup``): the checkpoint's latent space must be the data's."""
        super().on_load_checkpoint(checkpoint)
        path = getattr(self._trainer, "ckpt_path", None) or "being loaded"
        record = checkpoint.get(LATENT_SPACE_KEY)
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
        batch_size, channels, frames, height, width = z0.shape
        is_video = frames > 1
        mask_channels = self.dit.config.mask_channels
        if is_video:
            condition = build_i2v_condition(z0[:, :, :1], frames, mask_channels)
        else:
            condition = z0.new_zeros(batch_size, mask_channels + channels, frames, height, width)
        text, text_mask, image = self.conditions(batch, is_video, drop)
        latent_in = torch.cat([interpolate(z0, noise, sigma), condition], dim=1)  # (B, 2C + k, t, h, w)
        out = network(latent_in, sigma, text, image, text_mask, return_router_weights=return_router_weights)
        pred, router_maxima = out if return_router_weights else (out, None)
        target = velocity_target(z0, noise)
        if is_video:  # latent frame 0 is given (module docstring)
            pred, target = pred[:, :, 1:], target[:, :, 1:]
        return pseudo_huber_loss(pred, target, c=self.flow.huber_c), router_maxima

    # ---- training ----------------------------------------------------------------------------------------

    def configure_optimizers(self):
        optimizer, scheduler = self.optimizer_config.build(self.dit.parameters())
        return [optimizer], [scheduler]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z0 = self.normalize(batch["latent"])
        loss, _ = self.flow_loss(self.dit, z0, batch, self.sample_sigma(z0), torch.randn_like(z0), drop=True)
        stepped = self.guarded_step(
            loss,
            self.optimizers(),
            list(self.dit.parameters()),
            self.optimizer_config.grad_clip_norm,
            self.lr_schedulers(),
        )
        if stepped:
            self.update_ema(self.dit_ema, self.dit)
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        datamodule = self._trainer.datamodule
        if hasattr(datamodule, "skipped_counts") and self.global_step % self._trainer.log_every_n_steps == 0:
            self.log_dict(datamodule.skipped_counts(), sync_dist=True, reduce_fx="sum")
        return loss

    # ---- validation --------------------------------------------------------------------------------------

    def inference_dit(self) -> DiT:
        """The weights to evaluate and export: EMA when kept."""
        return self.dit_ema if self.dit_ema is not None else self.dit

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
