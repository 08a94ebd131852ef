"""Refiner distillation (§2.4.3): CFG distillation → progressive distillation to 32 steps → SiDA to 8 steps.

Three stages, each a ``RefinerModule`` (so the data and conditions are those of refiner training: paired latents
encoded on the fly, drafts made by the frozen upsampler — from the frozen base DiT's deviation estimate when
``conditioning.deviation`` is on —, dynamic mask, frame shuffle, replacement and condition dropout) whose
objective is a distillation loss of ``fsvideo.distill``:

- ``RefinerCFGDistillModule``: the student's one evaluation regresses the frozen teacher's guided velocity
  ``v_u + s·(v_c − v_u)`` at the training σ distribution (logit-normal, shifted). The unconditional branch is the
  pipeline's: the empty prompt's tokens (its default negative prompt "") with the whole visual condition kept
  (draft, mask, first frame, image tokens).
- ``RefinerProgressiveDistillModule``: one student Euler step on ``sigma_schedule(teacher_steps / 2, shift)``
  matches two teacher Euler steps on ``sigma_schedule(teacher_steps, shift)``, from data noised to the
  student's grid points. One fit is one round; more rounds chain fits (the next round's ``teacher`` and
  ``init_from`` are this one's export, ``teacher_steps`` halved).
- ``RefinerSiDAModule``: the student is an 8-step Euler sampler trained with SiD's identity loss plus the
  adversarial loss of a discriminator head on a fake-score network's features; the fake-score network (and
  head) is a second trained network with its own optimizer, stepped before each generator step.

In every stage the teacher is a frozen network (``self.frozen["teacher"]``: out of checkpoints and optimizers),
the student starts from ``init_from`` (normally the teacher), text-dropout for CFG is off (the student only ever
runs conditionally), and the trained network is saved as ``refiner`` with its distillation records
(``fsvideo.distill``: ``guidance_distilled``, ``distilled_steps``, ``distilled_shift``), which the pipeline uses
as its refine settings. Validation logs the stage's own loss with seeded noise (``val/loss``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from fsvideo.distill import (
    DISTILLED_GUIDANCE_SCALE,
    DISTILLED_SHIFT,
    DISTILLED_STEPS,
    GUIDANCE_DISTILLED,
    DiscriminatorHead,
    few_step_sample,
    guided_target,
    progressive_target,
    sida_generator_losses,
    student_segments,
)
from fsvideo.dit import DiT, FrameCondition
from fsvideo.flow import VelocityFn, interpolate, pseudo_huber_loss, velocity_target
from fsvideo.losses import discriminator_loss
from fsvideo.pretrained import build_network, load_weights, read_records, read_snapshot
from lightning_modules.base import OptimizerConfig
from lightning_modules.refiner import RefinerModule

TextConditions = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""Text tokens ``B×L×D``, text mask ``B×L``, image tokens ``B×M×D'`` (None without image branch)."""


@contextmanager
def frozen_weights(*modules: nn.Module) -> Iterator[None]:
    """No weight gradients for ``modules`` inside (gradients still flow through them to their inputs)."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class RefinerDistillModule(RefinerModule):
    """What the three distillation stages share: the frozen teacher, the student's inputs, the records, the
    guarded step and seeded validation. Subclasses define ``distill_loss``.

    Args:
        teacher: the frozen teacher (saved-model folder, run or checkpoint): the refiner for CFG distillation,
            the previous stage's export after it. Its distillation records carry over to the student.
        **kwargs: ``RefinerModule``'s (``init_from`` normally the teacher; ``base_dit`` and ``upsampler`` make
            the drafts as in refiner training).
    """

    def __init__(self, teacher: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        network = self.frozen.add_saved("teacher", teacher, DiT, shard=self.parallel.fsdp)
        if network.config != self.dit.config:
            raise ValueError(
                f"teacher {teacher} is a DiT of another architecture than the student (model.init_args.dit): "
                "distillation copies the teacher, so set dit to the teacher's config."
            )
        records = read_records(teacher, expected=DiT)
        self.teacher_source = teacher
        self.teacher_records = {
            k: records[k]
            for k in (GUIDANCE_DISTILLED, DISTILLED_GUIDANCE_SCALE, DISTILLED_STEPS, DISTILLED_SHIFT)
            if k in records
        }

    def distill_records(self) -> dict[str, Any]:
        """What this stage distils, recorded on the student (over the teacher's records)."""
        return {}

    def dit_records(self) -> dict[str, Any]:
        return {**super().dit_records(), **self.teacher_records, **self.distill_records()}

    # ---- inputs ------------------------------------------------------------------------------------------

    def distill_inputs(
        self, batch: dict[str, Any], augment: bool
    ) -> tuple[torch.Tensor, FrameCondition, TextConditions]:
        """The normalised high-resolution latent ``B×C×t×h×w``, its refiner condition and the prompt's
        conditions (no CFG dropout)."""
        z0 = self.normalize(batch["latent"])
        return z0, self.build_condition(z0, batch, augment), self.conditions(batch, True, drop=False)

    def unconditional(self, text: TextConditions) -> TextConditions:
        """The pipeline's unconditional branch: the empty prompt (its default negative prompt) with the image
        tokens kept (the visual condition is in the latent input, also kept)."""
        if self.empty_text_tokens is None:
            raise ValueError(
                "CFG distillation needs the empty prompt's tokens, which the DataModule provides "
                "(datamodules.latents)."
            )
        batch = text[0].shape[0]
        return (
            self.empty_text_tokens.expand(batch, -1, -1),
            self.empty_text_mask.expand(batch, -1),
            text[2],
        )

    @staticmethod
    def velocity_fn(
        network: nn.Module, condition: FrameCondition, text: TextConditions, noise: torch.Tensor
    ) -> VelocityFn:
        """``network``'s velocity under ``condition``, the given frames' velocity fixed to ``noise − latent``."""
        tokens, mask, image = text

        def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            out = network(condition.model_input(z), sigma.float(), tokens, image, mask)
            return condition.fix_velocity(out.float(), noise)

        return velocity

    def velocity_loss(
        self, pred: torch.Tensor, target: torch.Tensor, condition: FrameCondition
    ) -> torch.Tensor:
        """Pseudo-Huber distance of velocities ``B×C×t×h×w`` on the generated frames (as the flow loss)."""
        return pseudo_huber_loss(*condition.loss_pair(pred.float(), target.float()), c=self.flow.huber_c)

    # ---- objective ---------------------------------------------------------------------------------------

    def distill_loss(self, student: nn.Module, batch: dict[str, Any], augment: bool) -> torch.Tensor:
        """The stage's loss of ``student`` on ``batch`` (``augment``: the training conditions' augmentations)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.distill_loss(self.dit, batch, augment=True)
        self.step_dit(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["latent"].shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(
            devices=devices
        ):  # the same noise at every validation, training's untouched
            torch.manual_seed(self.val_seed + batch_idx)
            loss = self.distill_loss(self.inference_dit(), batch, augment=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["latent"].shape[0])


class RefinerCFGDistillModule(RefinerDistillModule):
    """Stage A, CFG distillation (module docstring).

    Args:
        teacher: the refiner to distil (frozen).
        guidance_scale: the guidance scale s the student's single evaluation reproduces.
        **kwargs: ``RefinerDistillModule``'s.
    """

    def __init__(self, teacher: str, guidance_scale: float = 5.0, **kwargs: Any) -> None:
        super().__init__(teacher, **kwargs)
        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}.")
        if self.teacher_records.get(GUIDANCE_DISTILLED):
            raise ValueError(
                f"teacher {teacher} is already guidance-distilled; CFG distillation needs the refiner before it."
            )
        self.guidance_scale = guidance_scale

    def distill_records(self) -> dict[str, Any]:
        return {GUIDANCE_DISTILLED: True, DISTILLED_GUIDANCE_SCALE: self.guidance_scale}

    def distill_loss(self, student: nn.Module, batch: dict[str, Any], augment: bool) -> torch.Tensor:
        z0, condition, text = self.distill_inputs(batch, augment)
        noise = torch.randn_like(z0)
        sigma = self.sample_sigma(z0)
        z = interpolate(z0, noise, sigma)
        teacher = self.frozen["teacher"]
        target = guided_target(
            self.velocity_fn(teacher, condition, text, noise),
            self.velocity_fn(teacher, condition, self.unconditional(text), noise),
            self.guidance_scale,
            z,
            sigma,
        )
        return self.velocity_loss(
            self.velocity_fn(student, condition, text, noise)(z, sigma), target, condition
        )


class RefinerProgressiveDistillModule(RefinerDistillModule):
    """Stage B, one round of progressive distillation (module docstring): ``teacher_steps`` → half.

    Args:
        teacher: the guidance-distilled refiner (stage A's export), or the previous round's student.
        teacher_steps: Euler steps of the teacher's grid (32·2^k; the student is distilled for half).
        shift: timestep shift of both grids (the refine stage's shift in the pipeline).
        **kwargs: ``RefinerDistillModule``'s.
    """

    def __init__(self, teacher: str, teacher_steps: int = 64, shift: float = 3.0, **kwargs: Any) -> None:
        super().__init__(teacher, **kwargs)
        if teacher_steps < 2 or teacher_steps % 2:
            raise ValueError(f"teacher_steps must be an even number >= 2, got {teacher_steps}.")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}.")
        recorded = self.teacher_records.get(DISTILLED_STEPS)
        if recorded is not None and (recorded, self.teacher_records[DISTILLED_SHIFT]) != (
            teacher_steps,
            shift,
        ):
            raise ValueError(
                f"teacher {teacher} was distilled for {recorded} steps at shift "
                f"{self.teacher_records[DISTILLED_SHIFT]}; set teacher_steps: {recorded} and shift: "
                f"{self.teacher_records[DISTILLED_SHIFT]} for the next round."
            )
        if not self.teacher_records.get(GUIDANCE_DISTILLED):
            rank_zero_warn(
                f"teacher {teacher} is not guidance-distilled: its velocities are used without guidance. "
                "Progressive distillation normally follows CFG distillation (refiner/distill-cfg)."
            )
        self.teacher_steps = teacher_steps
        self.shift = shift

    def distill_records(self) -> dict[str, Any]:
        return {DISTILLED_STEPS: self.teacher_steps // 2, DISTILLED_SHIFT: self.shift}

    def distill_loss(self, student: nn.Module, batch: dict[str, Any], augment: bool) -> torch.Tensor:
        z0, condition, text = self.distill_inputs(batch, augment)
        noise = torch.randn_like(z0)
        sigma_from, sigma_to = student_segments(
            z0.shape[0], self.teacher_steps // 2, self.shift, device=z0.device
        )
        z = interpolate(z0, noise, sigma_from)
        teacher = self.velocity_fn(self.frozen["teacher"], condition, text, noise)
        target = progressive_target(teacher, z, sigma_from, sigma_to, self.shift, teacher_steps=2)
        pred = self.velocity_fn(student, condition, text, noise)(z, sigma_from)
        return self.velocity_loss(pred, target, condition)


@dataclass
class SiDAConfig:
    """SiDA (score identity distillation with an adversarial loss) to a few-step Euler sampler."""

    steps: int = 8
    """Euler steps of the distilled sampler (the pipeline's refine steps)."""
    shift: float = 3.0
    """Timestep shift of its grid."""
    alpha: float = 1.2
    """SiD's α in L2 − α·L1 (SiD's and SiDA's default 1.2)."""
    sid_weight: float = 1.0
    """Weight of the SiD loss in the generator's loss."""
    adversarial_weight: float = 1.0
    """Weight of the non-saturating adversarial loss in the generator's loss (both divided per sample by SiD's
    normaliser, as SiDA weighs them)."""
    discriminator_weight: float = 1.0
    """Weight of the discriminator's loss beside the fake-score network's flow-matching loss."""
    feature_block: int | None = None
    """Index of the fake-score DiT block whose output tokens feed the discriminator head; None: the middle."""
    fake_score_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW of the fake-score network and the discriminator head."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.shift <= 0:
            raise ValueError(f"steps ({self.steps}) must be >= 1 and shift ({self.shift}) positive.")
        if min(self.sid_weight, self.adversarial_weight, self.discriminator_weight) < 0:
            raise ValueError("the SiDA loss weights must be >= 0.")
        if isinstance(self.fake_score_optimizer, dict):
            self.fake_score_optimizer = OptimizerConfig(**self.fake_score_optimizer)


class RefinerSiDAModule(RefinerDistillModule):
    """Stage C, SiDA to ``sida.steps`` Euler steps (module docstring).

    Per training step, both on the batch's condition:

    1. fake score + discriminator (their own optimizer; not a ``global_step``): a generator sample ``x_g``
       without gradient; the fake-score network's flow-matching loss on ``x_g`` at a training σ, plus the
       logistic loss of the discriminator head on its features of the real latent vs ``x_g``, noised alike (one
       forward of the fake score on both).
    2. generator: a slot k is drawn uniformly from the ``steps`` Euler steps; the sampler runs steps < k
       without gradient and steps ≥ k with it, so ``x_g`` carries the gradient of the last ``steps − k``
       evaluations (slot j trains in a fraction (j+1)/steps of the steps, the last always); then
       ``sid_weight·L_SiD + adversarial_weight·L_adv`` at a training σ with the frozen teacher as the real score
       and the fake-score network (weights held) as the fake score and discriminator body.

    Args:
        teacher: the progressively distilled refiner (stage B's export): the real score; the fake-score
            network starts as a copy of it.
        sida: steps, shift, α, loss weights, feature block, the fake score's optimizer.
        **kwargs: ``RefinerDistillModule``'s (``init_from`` normally the teacher: the generator starts as it).
    """

    def __init__(self, teacher: str, sida: SiDAConfig | None = None, **kwargs: Any) -> None:
        super().__init__(teacher, **kwargs)
        self.sida = sida or SiDAConfig()
        blocks = self.dit.config.num_layers
        self.feature_block = blocks // 2 if self.sida.feature_block is None else self.sida.feature_block
        if not 0 <= self.feature_block < blocks:
            raise ValueError(
                f"sida.feature_block must index one of the {blocks} blocks, got {self.feature_block}."
            )
        self.fake_score_init = read_snapshot(teacher, expected=DiT)
        """The teacher's weights (memory-mapped) the fake score starts from; sharded, it reads them in
        ``configure_model``, each rank its own rows."""
        device = "meta" if self.parallel.fsdp else "cpu"
        self.fake_score = build_network(self.fake_score_init, DiT, device).train().requires_grad_(True)
        """The fake-score network: trained, checkpointed with the run, not exported."""
        self.discriminator = DiscriminatorHead(self.dit.config.dim)

    def configure_model(self) -> None:
        super().configure_model()
        self.parallelize([self.fake_score], [], self.parallel)
        if any(param.is_meta for param in self.fake_score.parameters()):
            self.fake_score.to_empty(device=self.trainer.strategy.root_device)
            load_weights(self.fake_score, self.fake_score_init.weights, self.fake_score_init.source)
        # the head is one small group: sharded whole (FSDP then averages its gradients as the fake score's), in
        # float32, never checkpointed or compiled; under context parallel its logits are gathered
        # (fake_score_features)
        head = replace(self.parallel, activation_checkpointing=False, compile=False, mixed_precision=None)
        self.parallelize([self.discriminator], [], head)

    def distill_records(self) -> dict[str, Any]:
        return {DISTILLED_STEPS: self.sida.steps, DISTILLED_SHIFT: self.sida.shift}

    def configure_optimizers(self):
        generator, generator_schedule = self.optimizer_config.build(self.dit.parameters())
        fake, fake_schedule = self.sida.fake_score_optimizer.build(
            [*self.fake_score.parameters(), *self.discriminator.parameters()]
        )
        return [generator, fake], [generator_schedule, fake_schedule]

    def generate(
        self, student: nn.Module, condition: FrameCondition, text: TextConditions, grad_from: int = 0
    ) -> torch.Tensor:
        """A sample ``B×C×t×h×w`` of the few-step sampler under ``condition`` (the given frames exact)."""
        noise = torch.randn_like(condition.latent, dtype=torch.float32)
        velocity = self.velocity_fn(student, condition, text, noise)
        return condition.fix_sample(
            few_step_sample(velocity, noise, self.sida.steps, self.sida.shift, grad_from)
        )

    def fake_score_features(
        self,
        latents: list[torch.Tensor],
        sigma: torch.Tensor,
        condition: FrameCondition,
        text: TextConditions,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The fake-score network's raw velocities ``B×C×t×h×w`` and the discriminator's logits ``B×N`` of each
        noisy latent of ``latents`` (``B×C×t×h×w``, all at ``sigma``), in one forward of them all.

        One forward, because FSDP gathers a block's weights for the backward from a hook on that forward's
        output: a second forward whose velocity no loss uses would leave its embeddings' weights freed when its
        features' gradient reaches them. Under context parallel the head (per token) runs on this rank's tokens
        and its logits are gathered, as the network gathers its output, so every cp rank computes the losses of
        one process on all N tokens (and FSDP's average over the cp ranks gives one process's gradients)."""
        count = len(latents)
        tokens, mask, image = text
        captured: list[torch.Tensor] = []
        hook = self.fake_score.blocks[self.feature_block].register_forward_hook(
            lambda module, inputs, output: captured.append(output[0])
        )
        try:
            velocity = self.fake_score(
                torch.cat([condition.model_input(z) for z in latents]),  # (count·B, ·, t, h, w)
                sigma.float().repeat(count),
                tokens.repeat(count, 1, 1),
                None if image is None else image.repeat(count, 1, 1),
                None if mask is None else mask.repeat(count, 1),
            )
        finally:
            hook.remove()
        logits = self.discriminator(captured[-1])  # (count·B, N_r): this rank's tokens under context parallel
        sequence_parallel = self.fake_score.sequence_parallel
        if sequence_parallel is not None:  # as the network gathers its output: every cp rank then has all N
            total = latents[0][0, 0].numel() // self.dit.config.patch_volume
            logits = sequence_parallel.gather_tokens(logits.unsqueeze(-1), total).squeeze(-1)  # (count·B, N)
        return list(velocity.float().chunk(count)), list(logits.chunk(count))

    def fake_score_losses(
        self, x_g: torch.Tensor, z0: torch.Tensor, condition: FrameCondition, text: TextConditions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow matching of the fake score on generator samples, and the discriminator's loss (real ``z0``)."""
        sigma, noise = self.sample_sigma(x_g), torch.randn_like(x_g)
        (velocity, _), (fake_logits, real_logits) = self.fake_score_features(
            [interpolate(x_g, noise, sigma), interpolate(z0, noise, sigma)], sigma, condition, text
        )
        flow = self.velocity_loss(velocity, velocity_target(x_g, noise), condition)
        return flow, discriminator_loss([real_logits], [fake_logits])

    def generator_losses(
        self, x_g: torch.Tensor, condition: FrameCondition, text: TextConditions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SiD and adversarial losses of generator samples ``x_g`` (graphs through the two score networks)."""
        sigma, noise = self.sample_sigma(x_g), torch.randn_like(x_g)
        z = interpolate(x_g, noise, sigma)
        v_real = self.velocity_fn(self.frozen["teacher"], condition, text, noise)(z, sigma)
        (v_fake,), (logits,) = self.fake_score_features([z], sigma, condition, text)
        v_fake = condition.fix_velocity(v_fake, noise)
        return sida_generator_losses(x_g, z, sigma, v_real, v_fake, logits, self.sida.alpha)

    def distill_loss(self, student: nn.Module, batch: dict[str, Any], augment: bool) -> torch.Tensor:
        """The generator's loss (validation; training steps in ``training_step``)."""
        _, condition, text = self.distill_inputs(batch, augment)
        sid, adversarial = self.generator_losses(self.generate(student, condition, text), condition, text)
        return self.sida.sid_weight * sid + self.sida.adversarial_weight * adversarial

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        cfg = self.sida
        generator_optimizer, fake_optimizer = self.optimizers()
        generator_schedule, fake_schedule = self.lr_schedulers()
        z0, condition, text = self.distill_inputs(batch, augment=True)
        size = z0.shape[0]

        with torch.no_grad():
            x_g = self.generate(self.dit, condition, text)
        flow, discriminator = self.fake_score_losses(x_g, z0, condition, text)
        self.guarded_step(
            flow + cfg.discriminator_weight * discriminator,
            fake_optimizer,
            [*self.fake_score.parameters(), *self.discriminator.parameters()],
            cfg.fake_score_optimizer.grad_clip_norm,
            fake_schedule,
            counts_as_step=False,
        )

        slot = int(torch.randint(cfg.steps, ()))
        with frozen_weights(self.fake_score, self.discriminator):
            x_g = self.generate(self.dit, condition, text, grad_from=slot)
            sid, adversarial = self.generator_losses(x_g, condition, text)
            loss = cfg.sid_weight * sid + cfg.adversarial_weight * adversarial
            stepped = self.guarded_step(
                loss,
                generator_optimizer,
                list(self.dit.parameters()),
                self.optimizer_config.grad_clip_norm,
                generator_schedule,
            )
        if stepped:
            self.update_ema(self.dit_ema, self.dit)
        self.log_dict(
            {
                "train/loss": loss,
                "train/sid": sid,
                "train/adversarial": adversarial,
                "train/fake_score_flow": flow,
                "train/discriminator": discriminator,
            },
            batch_size=size,
        )
        return loss
