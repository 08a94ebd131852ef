"""Watching a DiT run: image-to-video samples of a fixed held-out set, generated at the end of validation with
the EMA weights through the same ``fsvideo.pipeline.FSVideoPipeline`` a user calls.

The held-out set is the first ``num_samples`` clips of video shards (by default the source shards of the
validation latent cache), cut as validation cuts them (start 0, centred crop) to one ``num_frames×height×width``
bucket and read once. Each sample's first frame and caption go through the pipeline, which is built around the
networks the module names (``DiTModule.sampling_networks``): a base-DiT run's own inference DiT (the EMA twin,
no copy of its weights) and its ``latent_mean`` / ``latent_std``; a refiner run's whole two-stage chain — its
frozen base DiT at half the size, its frozen latent upsampler and the refiner's EMA weights. The FSAE and the text / image encoders are loaded once, on first use, from
the local paths that made the DiT's data. Sample i uses seed ``seed + i``, so every evaluation of a run draws
the same noise and videos differ only where the weights do.

Output: ``<default_root_dir>/samples/step-XXXXXXX/NN.mp4`` (ground truth | generated, side by side) and
``prompts.json`` there; ``val/samples_seconds`` to every logger and, with a WandbLogger, the videos as
``val/samples`` (prompt as caption).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.tensor import DTensor

from callbacks.videos import save_videos
from datamodules.buckets import Bucket, BucketSet, check_num_frames
from datamodules.latent_encoder import EncoderPaths, LatentEncoder
from datamodules.latents import LatentData
from datamodules.pipeline import normalize_video
from datamodules.samples import SampleDecoder, media_kind
from datamodules.shards import expand_shards, read_shard
from datamodules.skips import SkipCounter, SkipSample
from fsvideo.ae import TilingConfig
from fsvideo.pipeline import FSVideoPipeline, GenerationSettings
from fsvideo.video_io import side_by_side


@dataclass
class HeldOutClip:
    """One clip of the held-out set."""

    video: torch.Tensor
    """Ground truth ``3×T×H×W`` float32 in [-1, 1]; frame 0 is the input image."""
    prompt: str
    key: str
    url: str


@dataclass
class DiTSample:
    """One generated sample."""

    clip: HeldOutClip
    video: torch.Tensor
    """Generated ``3×T×H×W`` float32 in [-1, 1] on the CPU."""
    seed: int


def read_held_out_clips(
    shards: str | list[str], num_samples: int, num_frames: int, height: int, width: int, fps: float
) -> list[HeldOutClip]:
    """The first ``num_samples`` usable video clips of ``shards``, in order, cut as validation cuts them (start
    0, centred crop after scaling to cover) to ``num_frames×height×width``; stills are passed over.
    Returns fewer (with a warning) when the shards hold fewer."""
    bucket = Bucket(num_frames, height, width)
    decoder = SampleDecoder(BucketSet(video=[[bucket]], weights=[1.0], image=[]), fps, train=False)
    counter = SkipCounter(" (DiT samples)", warn=False)
    clips: list[HeldOutClip] = []
    urls = expand_shards(shards)
    for url in urls:
        with closing(read_shard(url, counter)) as samples:
            for raw in samples:
                if media_kind(raw) != "video":
                    continue
                key = raw.get("__key__", "")
                try:
                    # validation mode draws nothing that matters from this generator (one bucket, start 0)
                    clip = decoder(raw, np.random.default_rng(0))
                except SkipSample as skip:
                    counter.record(skip, key, url)
                    continue
                video = normalize_video(clip.frames.transpose(0, 1))  # (3, T, H, W)
                clips.append(HeldOutClip(video, clip.caption, key, url))
                if len(clips) == num_samples:
                    return clips
    skipped = {reason: n for reason, n in counter.snapshot().items() if n}
    if not clips:
        raise ValueError(
            f"DiTSamples: no usable video clip of {num_frames}×{height}×{width} at {fps} fps in {len(urls)} "
            f"shard(s) {urls[:3]} (skipped: {skipped}); give other `shards`, or a smaller height / width / "
            "num_frames."
        )
    rank_zero_warn(
        f"DiTSamples: only {len(clips)} of num_samples={num_samples} usable clips in {urls[:3]} (skipped: {skipped})."
    )
    return clips


@contextmanager
def preserved_modes(module: torch.nn.Module) -> Iterator[None]:
    """Restores every submodule's train / eval mode and every parameter's ``requires_grad`` on exit (the
    pipeline freezes and evaluates the DiT it is given, which is the training network when EMA is off)."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


class DiTSamples(L.Callback):
    """Fixed-seed image-to-video samples of a held-out set with the EMA weights, at the end of validation
    (module docstring). Runs at the first validation of a fit and every ``every_n_validations``-th after it
    (never in the sanity check), and at every ``fsvideo validate``. Rank 0 generates and writes; when the DiT
    is sharded (FSDP) every rank generates with it, as a sharded forward needs all ranks. The global
    torch / numpy / python random states are left untouched, so a resumed run stays bit-exact.

    Args:
        every_n_validations: generate at validations 0, N, 2N, … of a fit.
        num_samples: clips of the held-out set (fewer when the shards hold fewer usable clips).
        shards: video shards of the held-out set (paths, brace patterns or a list); None: the source shards of
            the DataModule's validation latent cache, or its ``val_shards``.
        num_frames: frames of each sample, ``1 + 4k``.
        height: pixel height, a multiple of the FSAE's spatial compression (64).
        width: pixel width, a multiple of 64.
        fps: frame rate the clips are cut at and the mp4 files play at.
        steps: sampler steps.
        guidance_scale: classifier-free guidance scale (1 disables guidance).
        shift: timestep shift of the sampling schedule; None grows it with the token count.
        sampler: "unipc" or "euler".
        seed: sample i draws its noise from ``seed + i``.
        encoders: the FSAE run and text / image encoder folders; None: those that made the DataModule's data
            (``LatentDataModule``'s training cache fingerprint, ``EncodingVideoDataModule.encoders``).
        tiling: temporal splitting / tiling of the FSAE decoder, to bound its memory beside training's.
        folder: sub-folder of the run directory.
    """

    def __init__(
        self,
        every_n_validations: int = 1,
        num_samples: int = 2,
        shards: str | list[str] | None = None,
        num_frames: int = 17,
        height: int = 128,
        width: int = 128,
        fps: float = 24.0,
        steps: int = 10,
        guidance_scale: float = 5.0,
        shift: float | None = 3.0,
        sampler: str = "unipc",
        seed: int = 0,
        encoders: EncoderPaths | None = None,
        tiling: TilingConfig | None = None,
        folder: str = "samples",
    ) -> None:
        if every_n_validations < 1 or num_samples < 1:
            raise ValueError(
                f"every_n_validations={every_n_validations} and num_samples={num_samples} must be at least 1."
            )
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}.")
        check_num_frames(num_frames)
        self.settings = GenerationSettings(
            num_frames=num_frames,
            height=height,
            width=width,
            steps=steps,
            guidance_scale=guidance_scale,
            shift=shift,
            seed=seed,
            sampler=sampler,
            resize_mode="error",  # the held-out clips are cut to exactly height×width
        )
        self.every_n_validations = every_n_validations
        self.num_samples = num_samples
        self.shards = shards
        self.fps = fps
        self.encoders = encoders
        self.tiling = tiling
        self.folder = folder
        self.validations = 0
        self._clips: list[HeldOutClip] | None = None
        self._networks: LatentEncoder | None = None

    # ---- schedule --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict["validations"]

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        due = self.validations % self.every_n_validations == 0
        self.validations += 1
        return due

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        sharded = any(isinstance(p, DTensor) for p in pl_module.inference_dit().parameters())
        if not (trainer.is_global_zero or sharded):
            return
        start = time.perf_counter()
        samples = self.generate(trainer, pl_module)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            folder = self.save(trainer, samples)
            rank_zero_info(f"DiTSamples: {len(samples)} samples in {seconds:.1f} s → {folder}")
            for logger in trainer.loggers:
                logger.log_metrics({"val/samples_seconds": seconds}, step=trainer.global_step)

    # ---- inputs ----------------------------------------------------------------------------------------------

    def held_out_clips(self, trainer: L.Trainer) -> list[HeldOutClip]:
        """The held-out set, read on first use."""
        if self._clips is None:
            data = trainer.datamodule if isinstance(trainer.datamodule, LatentData) else None
            shards = self.shards or (data.held_out_shards() if data is not None else None)
            if not shards:
                raise ValueError(
                    "DiTSamples: no held-out shards; set the callback's init_args.shards to video shards (e.g. "
                    "the validation shards), or use a validation latent cache, whose fingerprint names them."
                )
            s = self.settings
            self._clips = read_held_out_clips(
                shards, self.num_samples, s.num_frames, s.height, s.width, self.fps
            )
        return self._clips

    def networks(self, trainer: L.Trainer) -> LatentEncoder:
        """The FSAE and text / image encoders, loaded on the CPU on first use."""
        if self._networks is None:
            data = trainer.datamodule if isinstance(trainer.datamodule, LatentData) else None
            paths = self.encoders or (data.encoder_paths() if data is not None else None)
            if paths is None or not paths.has_conditions:
                raise ValueError(
                    "DiTSamples: no FSAE / text / image encoder paths; set the callback's init_args.encoders "
                    "(autoencoder, text_encoder, image_encoder, text_len), or train on a latent cache encoded "
                    "with --text-encoder and --image-encoder, whose fingerprint names them."
                )
            try:
                self._networks = LatentEncoder.from_paths(paths)  # built on the meta device: no RNG drawn
            except FileNotFoundError as error:
                where = "init_args.encoders" if self.encoders else "the paths that made the DataModule's data"
                raise ValueError(
                    f"DiTSamples: cannot load the FSAE / encoders from {where} ({error}); set the callback's "
                    "init_args.encoders to where they are on this machine."
                ) from error
        return self._networks

    # ---- generation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[DiTSample]:
        """One sample per held-out clip with ``pl_module.inference_dit()``; leaves the module's modes,
        ``requires_grad`` flags and the global random states as they were."""
        clips = self.held_out_clips(trainer)
        networks = self.networks(trainer)
        samples = []
        try:
            with preserved_modes(pl_module):
                base_dit, base_mean, base_std, chain = pl_module.sampling_networks(
                    self.settings.base_sampling()
                )
                pipeline = FSVideoPipeline(
                    networks.autoencoder,
                    base_dit,
                    networks.text_encoder,
                    networks.image_encoder,
                    base_mean,
                    base_std,
                    device=pl_module.device,
                    # autocast as training does; never "bf16", which would cast the module's own EMA weights
                    precision="bf16-mixed" if str(trainer.precision).startswith("bf16") else "fp32",
                    tiling=self.tiling,
                    defaults=self.settings,
                    chain=chain,
                )
                for index, clip in enumerate(clips):
                    seed = self.settings.seed + index
                    result = pipeline.generate(clip.video[:, 0], clip.prompt, seed=seed)
                    samples.append(DiTSample(clip, result.video, seed))
        finally:
            networks.to("cpu")  # training gets the device memory back
        return samples

    def save(self, trainer: L.Trainer, samples: list[DiTSample]) -> Path:
        """Writes the side-by-side mp4s and ``prompts.json`` (and logs to wandb); returns their folder."""
        folder = Path(trainer.default_root_dir) / self.folder / f"step-{trainer.global_step:07d}"
        videos = [side_by_side(s.clip.video, s.video) for s in samples]
        prompts = [s.clip.prompt for s in samples]
        paths = save_videos(trainer, videos, folder, "val/samples", captions=prompts, fps=self.fps)
        record = {
            "global_step": trainer.global_step,
            "layout": "ground truth | generated",
            "settings": dataclasses.asdict(self.settings),
            "samples": [
                {
                    "file": p.name,
                    "prompt": s.clip.prompt,
                    "seed": s.seed,
                    "key": s.clip.key,
                    "url": s.clip.url,
                }
                for p, s in zip(paths, samples)
            ],
        }
        (folder / "prompts.json").write_text(json.dumps(record, indent=1) + "\n")
        return folder
