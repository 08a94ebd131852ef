"""Image-to-video inference (DESIGN §3, spec Figure 2): FSAE encoder → text / image encoders → base DiT
sampled with classifier-free guidance → FSAE decoder.

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
3. Latents are normalised with the per-channel mean / std the DiT trained with (stored in its checkpoint by
   ``lightning_modules.dit.DiTModule``). The DiT input is ``cat([z_σ, mask, [first-frame latent, zeros]])``
   (``build_i2v_condition``); noise comes from a CPU generator seeded with ``seed``; the flow ODE is
   integrated by ``fsvideo.flow.sample`` ("euler" or "unipc").
   Frame 0 is given: its velocity is set to the exact ``ε₀ − z_first`` (training leaves frame 0 out of the
   loss for this reason), so it lands on the input image's latent.
   Classifier-free guidance: ``v = v_u + s·(v_c − v_u)``; the unconditional branch swaps the prompt for the
   negative prompt and keeps the whole image condition (first-frame latent, mask and image tokens), as
   Wan2.1 I2V does. Guidance thus pushes along the text only; the first frame is fixed by the condition in
   both branches anyway.
4. The latent is de-normalised and FSAE-decoded (optionally temporally split / tiled, ``TilingConfig``).
   The latent upsampler and refiner (§2.4) come later: ``PipelineConfig.upsampler`` / ``.refiner`` must
   stay unset until they exist.

Precision: "bf16" casts the DiT and the text / image encoders to bfloat16 and runs them under autocast;
the FSAE always runs in float32 (as the latent cache encodes). "auto" is bf16 on CUDA and fp32 on CPU.
Offloading (``offload=True``): every network waits on the CPU and only the one in use (FSAE encoder, text
encoder, image encoder, DiT, FSAE decoder, in that order) sits on the device.

Public API:
    GenerationSettings      per-call settings and their defaults (frames, size, steps, guidance, ...)
    PipelineConfig          what to load and how to run it; ``PipelineConfig.from_yaml(path)``
    FSVideoPipeline(autoencoder, dit, text_encoder, image_encoder, latent_mean, latent_std, ...)
        .from_config(config_or_yaml_path)       networks loaded from run directories / encoder folders
        .generate(image, prompt, settings=None, callback=None, **overrides) -> GenerationResult
    GenerationResult        video ``3×T×H×W`` in [-1, 1], latent, first-frame features, timings; .frames_uint8()
    sample_i2v_latent(dit, first_frame_latent, ...)   step 3 alone (used by benchmarks/pipeline.py)
    load_image(image) / fit_image(image, height, width, resize_mode)   step 1's image preparation
    read_latent_stats(dit_run) -> (mean, std)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from fsvideo.ae import FSAE, FSAEConfig, TilingConfig
from fsvideo.checkpoints import find_run_files, load_network_from_run, read_state_dict
from fsvideo.dit import DiT, DiTConfig, build_i2v_condition
from fsvideo.encoders import ImageEncoder, TextEncoder
from fsvideo.flow import SAMPLERS, StepCallback, classifier_free_guidance, resolution_shift, sample
from fsvideo.latent_space import check_fsae_for_dit
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
    """Sampler steps (each evaluates the DiT twice with guidance, once at guidance_scale 1)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale s in v_u + s·(v_c − v_u); 1 disables guidance."""
    shift: float | None = 3.0
    """Timestep shift of the sampling schedule (Wan: 3 at 480p, 5 at 720p); None grows it with the token
    count (``fsvideo.flow.resolution_shift``)."""
    seed: int = 0
    """Seed of the initial noise (drawn on the CPU, so a seed gives the same video on every device type)."""
    sampler: str = "unipc"
    """Flow ODE solver: "unipc" (Wan's default) or "euler"."""
    resize_mode: str = "crop"
    """How the image meets height×width: "crop" scales it to cover and center-crops, "resize" stretches
    it, "error" refuses an image of another size."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; choose one of {RESIZE_MODES}")
        if self.num_frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError(
                f"num_frames, height and width must be positive, got {self.num_frames}, "
                f"{self.height}, {self.width}"
            )
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be positive (or None for the resolution rule), got {self.shift}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")


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
    """Latent upsampler run (§2.4.1). Not available yet: must stay null."""
    refiner: str | None = None
    """Refiner DiT run (§2.4.2). Not available yet: must stay null."""
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
        for name in ("upsampler", "refiner"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}: the latent upsampler (§2.4.1) and the refiner DiT (§2.4.2) are not available "
                    f"yet; set {name} to null. The pipeline generates at the base DiT's resolution."
                )
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


def read_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean and std ``C`` stored in a base-DiT run's checkpoint (``latent_mean``,
    ``latent_std``): the normalisation the DiT trained with. ``path``: run directory or checkpoint."""
    _, checkpoint = find_run_files(path)
    # memory-mapped: only the two small buffers are read, not the whole (possibly 14B-parameter) checkpoint
    state = read_state_dict(checkpoint)
    mean, std = state.get("latent_mean"), state.get("latent_std")
    if mean is None or std is None:
        raise ValueError(
            f"{checkpoint} holds no latent_mean / latent_std; the pipeline needs the latent statistics the DiT "
            "trained with, which lightning_modules.dit.DiTModule stores in its checkpoints. Pass a base-DiT run."
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(
            f"{checkpoint}: latent_mean / latent_std are unset (NaN) or std is not positive; the run never "
            "received its statistics (model.init_args.latent_stats or the latent cache's stats.json)."
        )
    return mean.float().clone(), std.float().clone()


# ---- sampling ---------------------------------------------------------------------------------------------


def sample_i2v_latent(
    dit: DiT,
    first_frame_latent: torch.Tensor,
    num_latent_frames: int,
    text: tuple[torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor],
    image_tokens: torch.Tensor | None,
    steps: int,
    guidance_scale: float,
    shift: float,
    sampler: str,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample a normalised latent video whose frame 0 is ``first_frame_latent`` (module docstring, step 3).

    Args:
        first_frame_latent: ``B×C×1×h×w`` normalised latent of the input image, on the DiT's device.
        text, negative_text: ``(tokens B×L×D, mask B×L)`` of the prompt and of the negative prompt.
        image_tokens: ``B×M×D'`` (kept in both guidance branches), None for a DiT without image branch.
        generator: CPU generator of the initial noise.
        autocast_dtype: run the DiT under autocast in this dtype (None: the parameters' dtype).
        callback: ``callback(step, steps, sigma, z)`` after every sampler step.

    Returns:
        ``B×C×t×h×w`` float32, ``t = num_latent_frames``.
    """
    batch, channels, _, height, width = first_frame_latent.shape
    device = first_frame_latent.device
    noise = torch.randn((batch, channels, num_latent_frames, height, width), generator=generator).to(device)
    condition = build_i2v_condition(first_frame_latent, num_latent_frames, dit.config.mask_channels)

    def branch(tokens: torch.Tensor, mask: torch.Tensor):
        def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            latent_in = torch.cat([z, condition], dim=1)  # (B, 2C + k, t, h, w)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                return dit(latent_in, sigma, tokens, image_tokens, mask).float()

        return velocity

    guided = classifier_free_guidance(branch(*text), branch(*negative_text), guidance_scale)
    first_velocity = noise[:, :, :1] - first_frame_latent  # exact: frame 0's clean value is given

    def velocity(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.cat([first_velocity, guided(z, sigma)[:, :, 1:]], dim=2)

    z0 = sample(velocity, noise, steps, shift, sampler, callback)
    return torch.cat([first_frame_latent.float(), z0[:, :, 1:]], dim=2)


# ---- the pipeline -----------------------------------------------------------------------------------------


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
    """The timestep shift used (resolved when ``settings.shift`` is None)."""
    timings: dict[str, float]
    """Seconds spent in each stage: ``encode`` (image, FSAE encoder, text and image encoders), ``dit``
    (sampling) and ``decode``; with offloading each includes moving its networks."""

    def frames_uint8(self) -> np.ndarray:
        """``T×H×W×3`` uint8, ready for ``fsvideo.video_io.write_mp4``."""
        return to_uint8_frames(self.video)


class FSVideoPipeline:
    """Image-to-video pipeline over networks already built (see the module docstring for the steps).

    Args:
        autoencoder: the FSAE whose latents the DiT trained on.
        dit: the base DiT (``latent_channels`` = the FSAE's, ``mask_channels`` = its temporal compression).
        text_encoder: text encoder of ``dit.config.text_dim`` width.
        image_encoder: image encoder of ``dit.config.image_dim`` width; None iff the DiT has no image branch.
        latent_mean, latent_std: ``C`` per-channel statistics the DiT's latents were normalised with.
        device: "auto", "cpu", "cuda", …; offload, precision, tiling: as in ``PipelineConfig``.
        defaults: the settings ``generate`` starts from.
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
            self.device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use device cpu")
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.offload = offload
        self.tiling = tiling
        self.defaults = defaults or GenerationSettings()
        self.autoencoder = autoencoder.float().eval().requires_grad_(False)
        self.dit = dit.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.latent_mean = latent_mean.float()
        self.latent_std = latent_std.float()
        if precision == "bf16":
            for network in self._networks()[1:]:
                network.to(torch.bfloat16)
        for network in self._networks():
            network.to("cpu" if offload else self.device)

    def _networks(self) -> list[nn.Module]:
        """Every network, the FSAE first."""
        networks = [self.autoencoder, self.dit, self.text_encoder]
        return networks + ([self.image_encoder] if self.image_encoder is not None else [])

    @classmethod
    def from_config(cls, config: PipelineConfig | str | Path) -> FSVideoPipeline:
        """Load every network named by a ``PipelineConfig`` (or the YAML file of one) on the CPU, then place it."""
        if not isinstance(config, PipelineConfig):
            config = PipelineConfig.from_yaml(config)
        autoencoder = load_network_from_run(
            config.autoencoder, "autoencoder", lambda fields: FSAE(FSAEConfig(**fields))
        )
        dit = load_network_from_run(config.dit, "dit", lambda fields: DiT(DiTConfig(**fields)))
        check_fsae_for_dit(config.dit, autoencoder, config.text_len)  # before the slow encoder loads
        latent_mean, latent_std = read_latent_stats(config.dit)
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
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision.startswith("bf16") else None

    @contextmanager
    def _on_device(self, network: nn.Module) -> Iterator[None]:
        """With offloading, ``network`` sits on the device only inside this block."""
        if self.offload:
            network.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                network.to("cpu")

    @contextmanager
    def _timed(self, stage: str, timings: dict[str, float]) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[stage] = time.perf_counter() - start

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
        for name, size, multiple in (
            ("height", settings.height, f_s * ph),
            ("width", settings.width, f_s * pw),
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
        _, t, h, w = self.autoencoder.config.latent_shape(
            settings.num_frames, settings.height, settings.width
        )
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
        shift = self.resolve_shift(settings)
        timings: dict[str, float] = {}
        mean = self.latent_mean.to(self.device).view(1, -1, 1, 1, 1)
        std = self.latent_std.to(self.device).view(1, -1, 1, 1, 1)
        autocast = dict(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast_dtype is not None
        )

        # 1. image → first-frame latent and features; 2. prompts and image → tokens
        with self._timed("encode", timings):
            pixels = fit_image(load_image(image), settings.height, settings.width, settings.resize_mode)
            pixels = pixels.to(self.device)[None]  # (1, 3, H, W)
            with self._on_device(self.autoencoder.encoder):
                first_latent, features = self.autoencoder.encode(
                    pixels[:, :, None], return_first_frame_features=True
                )
            with self._on_device(self.text_encoder), torch.autocast(**autocast):
                tokens, mask = self.text_encoder([prompt, settings.negative_prompt])
            tokens = tokens.float()
            image_tokens = None
            if self.image_encoder is not None:
                with self._on_device(self.image_encoder), torch.autocast(**autocast):
                    image_tokens = self.image_encoder(pixels).float()

        # 3. base DiT: flow sampling with classifier-free guidance on normalised latents
        with self._timed("dit", timings), self._on_device(self.dit):
            num_latent_frames = 1 + (settings.num_frames - 1) // self.autoencoder.config.temporal_compression
            z0 = sample_i2v_latent(
                self.dit,
                (first_latent.float() - mean) / std,
                num_latent_frames,
                (tokens[:1], mask[:1]),
                (tokens[1:], mask[1:]),
                image_tokens,
                settings.steps,
                settings.guidance_scale,
                shift,
                settings.sampler,
                torch.Generator().manual_seed(settings.seed),
                self.autocast_dtype,
                callback,
            )
            latent = z0 * std + mean

        # 4. FSAE decoder (FSAE-Standard / Lite also take the first frame's encoder features, §2.2.3,
        # and inject seeded noise)
        with self._timed("decode", timings), self._on_device(self.autoencoder.decoder):
            injected = features if self.autoencoder.config.first_frame_injection else None
            video = self.autoencoder.decode(
                latent,
                tiling=self.tiling,
                first_frame_features=injected,
                generator=torch.Generator(latent.device).manual_seed(settings.seed),
            ).clamp(-1, 1)

        return GenerationResult(
            video=video[0].float().cpu(),
            latent=latent[0].float().cpu(),
            first_frame_features=[f.float().cpu() for f in features],
            settings=settings,
            shift=shift,
            timings=timings,
        )
