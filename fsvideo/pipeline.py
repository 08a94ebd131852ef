"""Image-to-video inference (DESIGN §3, spec Figure 2): FSAE encoder → text / image encoders → base DiT
sampled with classifier-free guidance → FSAE decoder, as an ordered list of stages (``fsvideo.stages``).

    pipe = FSVideoPipeline.from_config("configs/pipeline/tiny-generate.yaml")
    result = pipe.generate("cat.png", "a cat walks across the garden", num_frames=17, seed=0)
    write_mp4("cat.mp4", result.frames_uint8())

What ``generate`` does:

1. The image is read, made RGB (grayscale / palette are converted; transparency is refused) and brought
   to ``height×width`` (``resize_mode``), then FSAE-encoded on its own: the first-frame latent
   ``1×C×1×h×w`` and the first-frame encoder features of the last 5 stages. The features are returned in
   the result for the decoder's first-frame cross-attention (§2.2.3); the current decoder does not take
   them yet.
2. The text encoder reads ``[prompt, negative_prompt]``; the image encoder reads the prepared image.
3. Latents are normalised with the per-channel mean / std the DiT trained with (recorded with the saved DiT,
   ``fsvideo.pretrained``). The DiT input is ``cat([z_σ, mask, [first-frame latent, zeros]])``
   (``fsvideo.dit.condition.image_to_video``); noise comes from a CPU generator seeded with ``seed``; the flow ODE is
   integrated by ``fsvideo.flow.sample`` ("euler" or "unipc").
   Frame 0 is given: its velocity is set to the exact ``ε₀ − z_first`` (training leaves frame 0 out of the
   loss for this reason), so it lands on the input image's latent.
   Classifier-free guidance: ``v = v_u + s·(v_c − v_u)``; the unconditional branch swaps the prompt for the
   negative prompt and keeps the whole image condition (first-frame latent, mask and image tokens), as
   Wan2.1 I2V does. Guidance thus pushes along the text only; the first frame is fixed by the condition in
   both branches anyway.
4. With the two-stage chain (``PipelineConfig.upsampler`` and ``.refiner``): steps 1–3 run at half the
   requested size, the latent upsampler doubles the latent (the draft), and the refiner samples the final
   latent conditioned on the draft, the image encoded at the final size and the dynamic mask
   (``fsvideo.refiner``), with its own steps, guidance, shift and sampler (``PipelineConfig.refine``). A side
   that is not a multiple of 128 is generated at the next one (the image's borders replicated outwards) and
   the video's centre is cropped back (``GenerationResult.generated_size`` says so).
5. The latent is de-normalised and FSAE-decoded (optionally temporally split / tiled, ``TilingConfig``).

Each step is a stage (``encode``, ``dit``, ``decode``); ``GenerationResult.timings`` has each one's seconds and
``GenerationResult.stages`` what each did (a sampling stage's steps, guidance, shift, sampler and its network
evaluations, NFE).

Precision: "bf16" casts the DiT and the text / image encoders to bfloat16 and runs them under autocast;
the FSAE always runs in float32 (as the latent cache encodes). "auto" is bf16 on CUDA and fp32 on CPU.
Offloading (``offload=True``): every network waits on the CPU and only the one in use (FSAE encoder, text
encoder, image encoder, DiT, FSAE decoder, in that order) sits on the device.

Public API:
    GenerationSettings      per-call settings and their defaults (frames, size, steps, guidance, ...)
    PipelineConfig          what to load and how to run it; ``PipelineConfig.from_yaml(path)``
    FSVideoPipeline(autoencoder, dit, text_encoder, image_encoder, latent_mean, latent_std, ...)
        .from_config(config_or_yaml_path)       networks loaded from saved-model folders, runs, encoder folders
        .parallelize(mesh)                      the DiTs sharded (FSDP) and context-parallel over N processes
        .stages                                 the ordered ``fsvideo.stages`` it runs
        .generate(image, prompt, settings=None, callback=None, **overrides) -> GenerationResult
    GenerationResult        video ``3×T×H×W`` in [-1, 1], latent, first-frame features, timings, stages;
                            .frames_uint8()
    load_image(image) / fit_image(image, height, width, resize_mode)   step 1's image preparation
    read_latent_stats(dit) -> (mean, std)       of a DiT folder / run / checkpoint, from its records
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from fsvideo.ae import FSAE, TilingConfig
from fsvideo.distill import refine_settings
from fsvideo.dit import DiT
from fsvideo.encoders import ImageEncoder, TextEncoder
from fsvideo.flow import StepCallback, resolution_shift
from fsvideo.latent_space import LATENT_STATS, check_fsae_for_dit
from fsvideo.parallel import CONTEXT_PARALLEL, ParallelConfig, parallelize
from fsvideo.pretrained import build_network, load_network, read_records, read_snapshot
from fsvideo.refiner import DYNAMIC_MASK, DynamicMaskConfig
from fsvideo.stages import (
    BaseSamplingStage,
    DecodeStage,
    EncodeStage,
    GenerationState,
    LatentNormalization,
    PipelineStage,
    RefineStage,
    SamplingSettings,
    StageRuntime,
    UpsampleStage,
)
from fsvideo.upsampler import LatentUpsampler, downsample_video
from fsvideo.video_io import to_uint8_frames

RESIZE_MODES = ("error", "resize", "crop")
PRECISIONS = ("auto", "bf16", "bf16-mixed", "fp32")
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# ---- settings --------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Settings of one generation; ``generate(..., **overrides)`` replaces any of them."""

    negative_prompt: str = ""
    """Prompt of the unconditional branch of classifier-free guidance."""
    num_frames: int = 17
    """Frames of the video, ``1 + 4k`` with k ≥ 1 (the FSAE's temporal compression); frame 0 is the image."""
    height: int = 256
    """Video height in pixels, a multiple of 64 (the FSAE's spatial compression)."""
    width: int = 256
    """Video width in pixels, a multiple of 64."""
    steps: int = 30
    """Base-stage sampler steps (each evaluates the DiT twice with guidance, once at guidance_scale 1)."""
    guidance_scale: float = 5.0
    """Base-stage classifier-free guidance scale s in v_u + s·(v_c − v_u); 1 disables guidance."""
    shift: float | None = 3.0
    """Base-stage timestep shift of the sampling schedule (Wan: 3 at 480p, 5 at 720p); None grows it with the
    token count (``fsvideo.flow.resolution_shift``)."""
    seed: int = 0
    """Seed of the initial noise (drawn on the CPU, so a seed gives the same video on every device type)."""
    sampler: str = "unipc"
    """Base-stage flow ODE solver: "unipc" (Wan's default) or "euler"."""
    resize_mode: str = "crop"
    """How the image meets height×width: "crop" scales it to cover and center-crops, "resize" stretches
    it, "error" refuses an image of another size."""

    def __post_init__(self) -> None:
        self.base_sampling()  # checks steps, guidance, shift and sampler
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; choose one of {RESIZE_MODES}")
        if self.num_frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError(
                f"num_frames, height and width must be positive, got {self.num_frames}, "
                f"{self.height}, {self.width}"
            )
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")

    def base_sampling(self) -> SamplingSettings:
        """The base stage's ``SamplingSettings`` (steps, guidance_scale, shift, sampler)."""
        return SamplingSettings(self.steps, self.guidance_scale, self.shift, self.sampler)


@dataclass
class PipelineConfig:
    """Networks of the pipeline and how to run them: the ``configs/pipeline/*.yaml`` files."""

    autoencoder: str
    """FSAE run directory (``config.yaml`` + ``checkpoints/last.ckpt``) or a checkpoint inside one; EMA
    weights are used when the checkpoint holds them. Use the FSAE whose latents the DiT trained on."""
    dit: str
    """Base-DiT run directory (``lightning_modules.dit.DiTModule``) or a checkpoint inside one; the
    checkpoint also holds the latent mean / std the DiT trained with."""
    text_encoder: str
    """UMT5 encoder folder with its tokenizer (``save_pretrained`` layout), as the latent cache used."""
    image_encoder: str | None = None
    """CLIP vision folder (``save_pretrained`` layout); None only for a DiT without image branch."""
    text_len: int = 512
    """Text tokens per prompt: the ``--text-len`` the DiT's latent cache was encoded with (Wan: 512)."""
    upsampler: str | None = None
    """Latent upsampler (§2.4.1): saved-model folder, run or checkpoint; set together with ``refiner`` for the
    two-stage chain (base at half the size → upsample ×2 → refine), or null to generate at the base size."""
    refiner: str | None = None
    """Refiner DiT (§2.4.2): saved-model folder, run or checkpoint (it records its latent statistics and
    dynamic-mask rule); null without the two-stage chain."""
    refine: SamplingSettings | None = None
    """The refiner stage's sampler settings (steps, guidance, shift — None: the base stage's —, sampler). None:
    those a distilled refiner records (its step count and shift, Euler, guidance 1), else 16 steps at guidance 5
    (``fsvideo.distill.refine_settings``; explicit settings that differ from a distilled refiner's warn)."""
    device: str = "auto"
    """Where the networks run: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", …"""
    offload: bool = False
    """Keep every network on the CPU and move only the one in use to the device (less memory, slower)."""
    precision: str = "auto"
    """"bf16" (DiT and encoders cast to bfloat16, run under autocast; the FSAE stays float32), "bf16-mixed"
    (autocast only, the weights keep their dtype: how in-training samples run on a training module's weights),
    "fp32", or "auto" (bf16 on CUDA, fp32 on CPU)."""
    tiling: TilingConfig | None = None
    """Temporal splitting / 3D tiling of the FSAE decoder to bound memory; None decodes in one pass."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Default settings of ``generate`` (each can be overridden per call)."""

    def __post_init__(self) -> None:
        if (self.upsampler is None) != (self.refiner is None):
            raise ValueError(
                "set both upsampler and refiner (the two-stage chain of Figure 2) or neither; got "
                f"upsampler={self.upsampler!r}, refiner={self.refiner!r}"
            )
        if isinstance(self.refine, dict):
            self.refine = _from_fields(SamplingSettings, self.refine, "refine")
        if self.text_len < 1:
            raise ValueError(f"text_len must be positive, got {self.text_len}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if isinstance(self.tiling, dict):
            self.tiling = _from_fields(TilingConfig, self.tiling, "tiling")
        if isinstance(self.generation, dict):
            self.generation = _from_fields(GenerationSettings, self.generation, "generation")

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        """Read a pipeline config (plain YAML with this class's fields; relative paths from the cwd)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"pipeline config {path}: no such file; the bundled ones are configs/pipeline/generate.yaml "
                "(paper) and configs/pipeline/tiny-generate.yaml (CPU), relative to the repository root."
            )
        try:
            fields = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"pipeline config {path} is not valid YAML: {error}") from error
        if not isinstance(fields, dict):
            raise ValueError(
                f"pipeline config {path} must be a mapping of fields, got {type(fields).__name__}"
            )
        return _from_fields(cls, fields, str(path))


def _from_fields(cls: type, fields: dict[str, Any], where: str) -> Any:
    """``cls(**fields)`` with an error that names unknown or missing fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {sorted(known)}")
    try:
        return cls(**fields)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None


# ---- image preparation ------------------------------------------------------------------------------------


def _check_alpha(alpha: torch.Tensor, opaque: float, source: str) -> None:
    if bool((alpha < opaque).any()):
        raise ValueError(
            f"{source} has transparent pixels; flatten it onto a background first "
            "(e.g. PIL's Image.alpha_composite onto a white image) and pass an RGB image"
        )


def _pil_to_tensor(image: Image.Image, source: str) -> torch.Tensor:
    """PIL image → ``3×H×W`` float32 in [-1, 1]; grayscale / palette / CMYK become RGB, alpha must be opaque."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        raise ValueError(
            f"{source} has {image.mode!r} pixels (16-bit or float); convert it to 8-bit RGB first"
        )
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if "A" in image.getbands():
        rgba = image.convert("RGBA")
        _check_alpha(torch.from_numpy(np.asarray(rgba)[..., 3].copy()), 255, source)
        image = rgba
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())  # (H, W, 3) uint8
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_image(image: str | Path | Image.Image | torch.Tensor) -> torch.Tensor:
    """An image file, PIL image or tensor → ``3×H×W`` float32 in [-1, 1].

    Files are read with Pillow (EXIF rotation applied). Grayscale and palette images are converted to RGB;
    an alpha channel is dropped when fully opaque and refused otherwise. A tensor is ``C×H×W`` in [-1, 1]
    with C = 3, 1 (grayscale, repeated) or 4 (RGBA, alpha as above).
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4) or not image.is_floating_point():
            raise ValueError(
                f"an image tensor must be float C×H×W in [-1, 1] with C in (1, 3, 4), got "
                f"{tuple(image.shape)} {image.dtype}"
            )
        image = image.detach().float().cpu()
        if image.shape[0] == 4:
            _check_alpha(image[3], 1.0, "the image tensor")
        return image[:3] if image.shape[0] != 1 else image.expand(3, -1, -1).clone()
    if isinstance(image, Image.Image):
        return _pil_to_tensor(image, "the image")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path}: no such file")
    try:
        with Image.open(path) as opened:
            opened.load()
            pil = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"input image {path} could not be read as an image ({error}); pass a PNG, JPEG or WebP file"
        ) from None
    return _pil_to_tensor(pil, f"input image {path}")


def fit_image(image: torch.Tensor, height: int, width: int, resize_mode: str = "crop") -> torch.Tensor:
    """``3×h×w`` → ``3×height×width`` in [-1, 1].

    Args:
        resize_mode: "crop" scales the image (bicubic, antialiased) to cover height×width and center-crops
            the excess; "resize" scales it to exactly height×width (the aspect ratio may change); "error"
            refuses an image of another size.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; choose one of {RESIZE_MODES}")
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    if resize_mode == "error":
        raise ValueError(
            f"the image is {h}×{w} (H×W) but the video is {height}×{width}; pass height/width matching the "
            "image, or resize_mode 'crop' (cover, then center-crop) or 'resize' (stretch)"
        )
    if resize_mode == "resize":
        size = (height, width)
    else:
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
    resized = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return resized[:, top : top + height, left : left + width].clamp(-1, 1)


# ---- latent statistics ------------------------------------------------------------------------------------


def latent_stats_of(records: dict[str, Any], source: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean and std ``C`` a saved DiT records: the normalisation it trained with."""
    stats = records.get(LATENT_STATS)
    if stats is None:
        raise ValueError(
            f"{source} records no latent statistics (latent_mean / latent_std); the pipeline needs the normalisation the DiT trained with, "
            "which DiT training runs record. Pass a base-DiT run or a folder `fsvideo export` wrote from one (for "
            "converted weights, save_pretrained(folder, records={'latent_stats': LatentStats(...).record()}))."
        )
    mean, std = torch.tensor(stats["mean"]).float(), torch.tensor(stats["std"]).float()
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"{source}: the recorded latent mean / std are not finite or std is not positive.")
    return mean, std


def read_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_stats_of`` a DiT saved-model folder, run directory or checkpoint (no weights are read)."""
    return latent_stats_of(read_records(path, expected=DiT), path)


# ---- the pipeline -----------------------------------------------------------------------------------------


@dataclass
class RefinerChain:
    """The second half of Figure 2: latent upsampler ×2, then the refiner at twice the base size."""

    upsampler: LatentUpsampler
    refiner: DiT
    latent_mean: torch.Tensor
    """``C`` statistics the refiner's latents are normalised with (its records)."""
    latent_std: torch.Tensor
    mask: DynamicMaskConfig
    """The dynamic-mask rule the refiner trained with (its records)."""
    settings: SamplingSettings
    """The refine stage's sampler settings."""


@dataclass
class GenerationResult:
    """What ``FSVideoPipeline.generate`` returns."""

    video: torch.Tensor
    """``3×T×H×W`` float32 in [-1, 1], on the CPU."""
    latent: torch.Tensor
    """``C×t×h×w`` FSAE latent (de-normalised) the video was decoded from, float32 on the CPU."""
    first_frame_features: list[torch.Tensor]
    """First-frame encoder features of the last 5 FSAE stages (outer first), each ``1×C_i×1×H_i×W_i`` on
    the CPU, for the decoder's first-frame cross-attention (§2.2.3)."""
    settings: GenerationSettings
    """The settings used."""
    shift: float
    """The timestep shift of the base stage (resolved when ``settings.shift`` is None)."""
    timings: dict[str, float]
    """Seconds spent in each stage, by stage name: ``encode`` (image, FSAE encoder, text and image encoders),
    ``dit`` (base sampling) and ``decode``; with offloading each includes moving its networks."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Per stage in order: ``name``, ``seconds``, and for a sampling stage its settings, shift and network
    evaluations (``nfe``)."""
    generated_size: tuple[int, int] | None = None
    """``(H, W)`` the video was generated at when that differs from the settings' size: the two-stage chain
    needs sides that are multiples of 128 and crops the centre of a larger video."""

    def frames_uint8(self) -> np.ndarray:
        """``T×H×W×3`` uint8, ready for ``fsvideo.video_io.write_mp4``."""
        return to_uint8_frames(self.video)


class FSVideoPipeline:
    """Image-to-video pipeline over networks already built: an ordered list of stages (``fsvideo.stages``:
    encode → base sampling → decode), each timed and placed on the device while it runs.

    Args:
        autoencoder: the FSAE whose latents the DiT trained on.
        dit: the base DiT (``latent_channels`` = the FSAE's, ``mask_channels`` = its temporal compression).
        text_encoder: text encoder of ``dit.config.text_dim`` width.
        image_encoder: image encoder of ``dit.config.image_dim`` width; None iff the DiT has no image branch.
        latent_mean, latent_std: ``C`` per-channel statistics the DiT's latents were normalised with.
        device: "auto", "cpu", "cuda", …; offload, precision, tiling: as in ``PipelineConfig``.
        defaults: the settings ``generate`` starts from.
        chain: the latent upsampler and refiner; with it the base DiT samples at half the requested size.
    """

    def __init__(
        self,
        autoencoder: FSAE,
        dit: DiT,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder | None,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        device: str | torch.device = "auto",
        offload: bool = False,
        precision: str = "auto",
        tiling: TilingConfig | None = None,
        defaults: GenerationSettings | None = None,
        chain: RefinerChain | None = None,
    ) -> None:
        ae_config, dit_config = autoencoder.config, dit.config
        channels = ae_config.latent_channels
        if dit_config.latent_channels != channels:
            raise ValueError(
                f"the DiT has latent_channels={dit_config.latent_channels} but the FSAE's latent has {channels}; "
                "use the FSAE the DiT's latent cache was encoded with"
            )
        if dit_config.mask_channels != ae_config.temporal_compression:
            raise ValueError(
                f"the DiT's mask_channels ({dit_config.mask_channels}) must equal the FSAE's temporal "
                f"compression ({ae_config.temporal_compression})"
            )
        if text_encoder.dim != dit_config.text_dim:
            raise ValueError(
                f"the text encoder is {text_encoder.dim} wide but the DiT expects text_dim={dit_config.text_dim}; "
                "use the text encoder the DiT's latent cache was encoded with"
            )
        if (image_encoder is None) != (dit_config.image_dim is None):
            raise ValueError(
                f"the DiT has image_dim={dit_config.image_dim}: give an image encoder exactly when it is set"
            )
        if image_encoder is not None and image_encoder.dim != dit_config.image_dim:
            raise ValueError(
                f"the image encoder is {image_encoder.dim} wide but the DiT expects image_dim={dit_config.image_dim}"
            )
        for name, stat in (("latent_mean", latent_mean), ("latent_std", latent_std)):
            if stat.shape != (channels,) or not torch.isfinite(stat).all():
                raise ValueError(f"{name} must be {channels} finite values, got shape {tuple(stat.shape)}")
        if not (latent_std > 0).all():
            raise ValueError("latent_std must be positive in every channel")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use device cpu")
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        self.runtime = StageRuntime(device, offload, torch.bfloat16 if precision.startswith("bf16") else None)
        self.precision = precision
        self.tiling = tiling
        self.defaults = defaults or GenerationSettings()
        self.autoencoder = autoencoder.float().eval().requires_grad_(False)
        self.dit = dit.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.latent_mean, self.latent_std = latent_mean.float(), latent_std.float()
        self.chain = chain
        self.stages: list[PipelineStage] = [
            EncodeStage(self.autoencoder, text_encoder, image_encoder),
            BaseSamplingStage(
                self.dit,
                LatentNormalization(self.latent_mean, self.latent_std),
                ae_config.temporal_compression,
            ),
        ]
        if chain is not None:
            if chain.refiner.config.in_channels != dit_config.in_channels:
                raise ValueError(
                    "the refiner must work on the base DiT's latents (same latent and mask channels)"
                )
            chain.upsampler.eval().requires_grad_(False)
            chain.refiner.eval().requires_grad_(False)
            normalization = LatentNormalization(chain.latent_mean.float(), chain.latent_std.float())
            self.stages += [
                UpsampleStage(chain.upsampler),
                RefineStage(chain.refiner, self.autoencoder, normalization, chain.mask, chain.settings),
            ]
        self.stages.append(DecodeStage(self.autoencoder, tiling))
        if precision == "bf16":
            for network in self._networks()[1:]:
                network.to(torch.bfloat16)
        for network in self._networks():
            network.to("cpu" if offload else device)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def offload(self) -> bool:
        return self.runtime.offload

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.runtime.autocast_dtype

    def _networks(self) -> list[nn.Module]:
        """Every network, the FSAE first."""
        networks = [self.autoencoder, self.dit, self.text_encoder]
        networks += [self.image_encoder] if self.image_encoder is not None else []
        return networks + ([self.chain.upsampler, self.chain.refiner] if self.chain is not None else [])

    @classmethod
    def from_config(cls, config: PipelineConfig | str | Path) -> FSVideoPipeline:
        """Load every network named by a ``PipelineConfig`` (or the YAML file of one) on the CPU, then place it."""
        if not isinstance(config, PipelineConfig):
            config = PipelineConfig.from_yaml(config)
        autoencoder = load_network(config.autoencoder, FSAE)
        dit_snapshot = read_snapshot(config.dit, expected=DiT)
        check_fsae_for_dit(
            dit_snapshot.records, autoencoder, config.text_len, config.dit
        )  # before slow loads
        latent_mean, latent_std = latent_stats_of(dit_snapshot.records, config.dit)
        dit = build_network(dit_snapshot, DiT)
        chain = None
        if config.refiner is not None:
            refiner_snapshot = read_snapshot(config.refiner, expected=DiT)
            check_fsae_for_dit(refiner_snapshot.records, autoencoder, config.text_len, config.refiner)
            refiner_mean, refiner_std = latent_stats_of(refiner_snapshot.records, config.refiner)
            chain = RefinerChain(
                load_network(config.upsampler, LatentUpsampler),
                build_network(refiner_snapshot, DiT),
                refiner_mean,
                refiner_std,
                DynamicMaskConfig(**refiner_snapshot.records.get(DYNAMIC_MASK, {})),
                refine_settings(refiner_snapshot.records, config.refine, config.refiner),
            )
        text_encoder = TextEncoder.from_pretrained(config.text_encoder, text_len=config.text_len)
        image_encoder = ImageEncoder.from_pretrained(config.image_encoder) if config.image_encoder else None
        return cls(
            autoencoder,
            dit,
            text_encoder,
            image_encoder,
            latent_mean,
            latent_std,
            device=config.device,
            offload=config.offload,
            precision=config.precision,
            tiling=config.tiling,
            defaults=config.generation,
            chain=chain,
        )

    def parallelize(self, mesh: DeviceMesh) -> None:
        """Run the DiTs (base and refiner) over the processes of ``mesh`` (``fsvideo.parallel.device_mesh``):
        sharded with FSDP over all of them and context-parallel over its "context_parallel" dimension. The
        encoders, the upsampler and the FSAE stay whole on every process (a small share of the time and
        memory next to the DiTs). Every process then calls ``generate`` with the same arguments and gets the
        same video (the noise comes from a CPU generator seeded alike)."""
        if self.offload:
            raise ValueError(
                "offload moves whole networks to the device one at a time; over several processes the DiTs "
                "are sharded instead: set offload: false (--no-offload)."
            )
        dits = [self.dit] + ([self.chain.refiner] if self.chain is not None else [])
        config = ParallelConfig(fsdp=True, context_parallel=mesh[CONTEXT_PARALLEL].size())
        parallelize([], dits, config, mesh)

    def generated_size(self, settings: GenerationSettings) -> tuple[int, int]:
        """``(H, W)`` the video is generated at: the settings' size, or with the two-stage chain each side rounded
        up to a multiple of twice the base DiT's (128 for the FSAE), the base stage running at half of it."""
        if self.chain is None:
            return settings.height, settings.width
        multiple = 2 * self.autoencoder.config.spatial_compression * self.dit.config.patch_size[1]
        return tuple(-(-side // multiple) * multiple for side in (settings.height, settings.width))

    def base_size(self, settings: GenerationSettings) -> tuple[int, int]:
        """``(H, W)`` of the base stage."""
        height, width = self.generated_size(settings)
        return (height, width) if self.chain is None else (height // 2, width // 2)

    def check_settings(self, settings: GenerationSettings) -> None:
        """Raise a ValueError naming the problem if these networks cannot generate ``settings``' video."""
        f_t = self.autoencoder.config.temporal_compression
        f_s = self.autoencoder.config.spatial_compression
        frames = settings.num_frames
        if frames < 1 + f_t or (frames - 1) % f_t:
            k = max(1, round((frames - 1) / f_t))
            raise ValueError(
                f"num_frames must be 1 + {f_t}·k with k >= 1 ({1 + f_t}, {1 + 2 * f_t}, …), got {frames}; "
                f"use {1 + f_t * k}"
            )
        _, ph, pw = self.dit.config.patch_size
        base_height, base_width = self.base_size(settings)
        for name, size, multiple in (
            ("height", base_height, f_s * ph),
            ("width", base_width, f_s * pw),
        ):
            if size % multiple:
                lower = max(multiple, size // multiple * multiple)
                raise ValueError(
                    f"{name} must be a multiple of {multiple}, got {size}; use {lower} or {lower + multiple}"
                )
        if self.dit.config.patch_size[0] != 1:
            raise ValueError(f"the DiT's temporal patch {self.dit.config.patch_size[0]} must be 1 for I2V")

    def resolve_shift(self, settings: GenerationSettings) -> float:
        """``settings.shift``, or the resolution rule for this video's DiT token count when it is None."""
        if settings.shift is not None:
            return settings.shift
        _, t, h, w = self.autoencoder.config.latent_shape(settings.num_frames, *self.base_size(settings))
        return resolution_shift(t * h * w // self.dit.config.patch_volume)

    @torch.no_grad()
    def generate(
        self,
        image: str | Path | Image.Image | torch.Tensor,
        prompt: str,
        settings: GenerationSettings | None = None,
        callback: StepCallback | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate a video that starts with ``image`` and follows ``prompt``.

        Args:
            image: image file, PIL image or ``C×H×W`` tensor in [-1, 1] (see ``load_image``).
            prompt: the text condition.
            settings: starting settings (default: the pipeline's ``defaults``).
            callback: ``callback(step, steps, sigma, z)`` after every sampler step (progress bars).
            **overrides: any ``GenerationSettings`` field: negative_prompt, num_frames, height, width,
                steps, guidance_scale, shift, seed, sampler, resize_mode.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GenerationSettings)})
        if unknown:
            raise ValueError(f"unknown generation setting(s) {unknown}; see GenerationSettings")
        settings = dataclasses.replace(settings or self.defaults, **overrides)
        self.check_settings(settings)
        requested = (settings.height, settings.width)
        size = self.generated_size(settings)
        pixels = fit_image(load_image(image), *requested, settings.resize_mode)
        if (
            size != requested
        ):  # replicate the borders out to the generated size; the video's centre is the image
            top, left = (size[0] - requested[0]) // 2, (size[1] - requested[1]) // 2
            pad = (left, size[1] - requested[1] - left, top, size[0] - requested[0] - top)
            pixels = F.pad(pixels[None], pad, mode="replicate")[0]
        base_pixels = pixels if self.chain is None else downsample_video(pixels[None, :, None])[0, :, 0]
        state = GenerationState(
            settings=settings,
            prompt=prompt,
            pixels=pixels,
            base_pixels=base_pixels,
            base_shift=self.resolve_shift(settings),
        )
        records = []
        for stage in self.stages:
            start = time.perf_counter()
            record = stage.run(state, self.runtime, callback)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            records.append({"name": stage.name, "seconds": time.perf_counter() - start, **record})
        video = state.video[0]
        if size != requested:
            top, left = (size[0] - requested[0]) // 2, (size[1] - requested[1]) // 2
            video = video[:, :, top : top + requested[0], left : left + requested[1]]
        return GenerationResult(
            video=video.float().cpu(),
            latent=state.latent[0].float().cpu(),
            first_frame_features=[f.float().cpu() for f in state.first_frame_features],
            settings=settings,
            shift=state.base_shift,
            timings={r["name"]: r["seconds"] for r in records},
            stages=records,
            generated_size=None if size == requested else size,
        )
