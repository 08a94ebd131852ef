"""Sizing before running: GPU memory of a training stage or of the pipeline, and the DiT's FLOPs.

    fsvideo estimate --config configs/dit/pretrain-video512.yaml --gpus 1 2 8 64
    fsvideo estimate --config configs/dit/pretrain-video512.yaml --gpus 8 --context-parallel 4
    fsvideo estimate --config configs/pipeline/generate.yaml --frames 121 --height 720 --width 1280 --json
    fsvideo estimate --config configs/pipeline/generate.yaml --gpus 1 2     # 2: torchrun … fsvideo generate

Nothing is allocated: networks are built on the meta device from the configs (their parameter counts are
exact), and the rest is counted from the shapes a step or a sampler call makes.

**Training** (a DiT-family stage: ``model.init_args.dit``), per GPU, FSDP over all ``n`` GPUs when the config
has ``parallel.fsdp`` (else every GPU holds everything):

- parameters: float32, ``4·P/n`` bytes (FSDP keeps float32 shards; bf16 is the compute dtype);
- gradients: float32 shards, ``4·P/n``; AdamW: ``exp_avg`` + ``exp_avg_sq``, ``8·P/n``; EMA twin ``4·P/n``;
- autocast's bf16 weight copies: under ``bf16-mixed`` autocast casts every float32 weight it multiplies and
  caches the copy for the rest of the step (manual optimization runs the backward inside it), ``2·P``
  bytes of *unsharded* weights even with FSDP, unless ``parallel.mixed_precision: bf16`` makes FSDP gather
  bf16 weights, which autocast then uses as they are;
- FSDP gather buffers: two blocks unsharded at a time (the one running and the prefetched one), their
  parameters in the gather dtype (bf16 with ``mixed_precision``, else float32) and in backward their float32
  gradients before the reduce-scatter;
- frozen networks of the stage (a refiner's base DiT, its upsampler) in float32, sharded or replicated as
  ``parallel.frozen`` says, and the data pipeline's encoders (FSAE, UMT5, CLIP) where the DataModule
  encodes on the fly, in their configured dtype;
- activations: bf16 (``trainer.precision: bf16-mixed``), ``B`` clips of ``N = t·h·w`` latent tokens split over the
  ``cp`` context-parallel ranks (``parallel.context_parallel``, default 1, or ``--context-parallel``): the
  longest run, ``ceil(N/cp)`` tokens, as ``fsvideo.parallel`` splits them. Per block autograd keeps about
  ``ACT_BYTES_PER_TOKEN_WIDTH·dim + ACT_BYTES_PER_TOKEN_FFN·ffn_dim`` bytes a token (``block_activation_bytes``
  lists the tensors). Without activation checkpointing every block's are kept; with it, each block's bf16
  input (which is also Layer Memory's history) plus one block's activations while it is recomputed.

Not counted: the CUDA context and allocator fragmentation (budget 2–4 GiB a GPU), NCCL buffers, the
attention kernel's workspace (flash / memory-efficient attention keep O(tokens); the math fallback would add
``heads·N²``), compile caches, and the samples a validation callback generates.

**Inference** (a pipeline config): each network's weights in the pipeline's precision (bf16, the FSAE float32)
and the peak of its stage: the DiT's no-grad working set (Layer Memory keeps every block's output: ``(L+1)·B·N·dim``
plus the largest block-internal tensors), the upsampler's and the FSAE's traced on fake tensors
(``torch.distributed._tools.mem_tracker.MemTracker`` under ``FakeTensorMode``: what a real call would
allocate, without allocating it). With ``offload`` a GPU holds only the running stage's networks. On ``n``
GPUs (``--gpus n``: ``fsvideo generate`` under torchrun, ``FSVideoPipeline.parallelize``) the DiTs are sharded
with FSDP over the ``n`` processes (bf16 weights ``/n`` plus two gathered blocks) and run context-parallel over
all of them (dp 1 × cp n: ``ceil(N/n)`` tokens a process); the encoders, the upsampler and the FSAE stay whole
on every process, and offloading does not apply (``parallelize`` refuses it).

**FLOPs** (``dit_forward_flops``): the multiply-adds of every matmul, convolution and attention product of one
DiT call, ×2; norms, RoPE, modulation and softmax are not counted (what ``torch.utils.flop_counter`` counts).

Public API:
    dit_forward_flops(config, grid, text_len, image_len, batch=1) -> int
    block_activation_bytes(config, tokens, batch, text_len, image_len) -> int
    training_activation_bytes(config, tokens, batch, text_len, image_len, checkpointing) -> int
    dit_inference_bytes(config, tokens, batch) -> int
    estimate_training(config_path, gpus, frames=None, height=None, width=None, context_parallel=None) -> Estimate
    estimate_pipeline(config_path, frames=None, height=None, width=None, gpus=1) -> Estimate
    PEAK_BF16_TFLOPS, device_peak_tflops(device_name)
    estimate_main(argv)        ``fsvideo estimate``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from fsvideo.ae import FSAE, FSAEConfig
from fsvideo.dit import DiT, DiTConfig
from fsvideo.pretrained import read_snapshot
from fsvideo.upsampler import LatentUpsampler, LatentUpsamplerConfig

GIB = 1024**3
IMAGE_TOKENS = 257
"""CLIP ViT-H/14 tokens of one image (256 patches + class token): the image condition's length."""
DEFAULT_TEXT_LEN = 512
"""UMT5 tokens per prompt when the config does not say (Wan's text_len)."""
ACT_BYTES_PER_TOKEN_WIDTH = 76
"""Bytes per token and channel of ``dim`` that a block keeps for backward in bf16 autocast (see
``block_activation_bytes``; measured: ``benchmarks/estimate_vs_measured.py``)."""
ACT_BYTES_PER_TOKEN_FFN = 4
"""Bytes per token and channel of ``ffn_dim``: the FFN's bf16 hidden state before and after the GELU."""

PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.5,
    "H100": 989.4,
    "A100": 312.0,
}
"""Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from NVIDIA's data sheets (SXM parts; H100 PCIe
apart). Looked up by the first key contained in ``torch.cuda.get_device_name()``, so the order matters."""

# Sizes of the frozen encoders when only a path to their folder is given and it is not on this machine:
# UMT5-XXL's encoder and CLIP ViT-H/14's vision tower (their published configs).
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}
CLIP_VIT_H14 = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}


def device_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU named ``device_name`` (``torch.cuda.get_device_name()``), or None."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops
    return None


# ---- FLOPs --------------------------------------------------------------------------------------------------


def dit_forward_flops(
    config: DiTConfig, grid: tuple[int, int, int], text_len: int, image_len: int, batch: int = 1
) -> int:
    """FLOPs (2 per multiply-add) of one DiT forward on ``batch`` latents of ``grid = (t, h, w)`` latent frames
    and sizes, with ``text_len`` text tokens and ``image_len`` image tokens (0 without image branch).

    Counted: patchify conv, time / text / image embeddings, per block q/kv/out projections and attention
    products of the self-attention (``4·N²·dim``) and of both cross-attentions, the FFN, the Layer Memory
    router's linear (block l: ``dim → l``), and the head."""
    d, f = config.dim, config.ffn_dim
    n = math.prod(s // p for s, p in zip(grid, config.patch_size))
    l_text = text_len
    l_image = image_len if config.image_dim is not None else 0
    patch_in = config.in_channels * config.patch_volume
    embed = n * patch_in * d  # patchify conv, multiply-adds
    embed += config.freq_dim * d + d * d + d * 6 * d  # time embedding and its 6-way projection
    embed += l_text * (config.text_dim * d + d * d)
    if l_image:
        embed += l_image * (config.image_dim * config.image_dim + config.image_dim * d)
    per_block = (
        n * d * d * 4  # self-attention q, k, v, out
        + 2 * n * n * d  # q·kᵀ and weights·v
        + n * d * d * 2  # cross-attention q and out
        + l_text * d * 2 * d  # text k, v
        + 2 * n * l_text * d
        + (l_image * d * 2 * d + 2 * n * l_image * d if l_image else 0)
        + 2 * n * d * f  # FFN
    )
    routers = n * d * sum(range(2, config.num_layers + 1)) if config.layer_memory else 0
    head = n * d * config.out_channels * config.patch_volume
    return 2 * batch * (embed + config.num_layers * per_block + routers + head)


# ---- memory of the pieces -----------------------------------------------------------------------------------


def block_activation_bytes(config: DiTConfig, tokens: int, batch: int, text_len: int, image_len: int) -> int:
    """Bytes one DiT block keeps for its backward pass under bf16 autocast, ``batch × tokens`` tokens.

    Per token, in channels of ``dim``: float32 inputs and outputs of the three LayerNorms, which the float32
    modulation keeps (6×4 B), the bf16 modulated inputs of self-attention and FFN and the cross-attention's
    normed input (3×2 B), q, k, v before and after the q/k RMSNorm and RoPE (6×2 B; the norms' float32 inputs
    2×4 B), the attention outputs of self- and both cross-attentions (3×2 B), the gated updates kept for the
    gates' gradients (2×2 B), Layer Memory's mixture and its normalised and modulated copies (4 + 2×2 B): about
    72 B, ``ACT_BYTES_PER_TOKEN_WIDTH`` = 76 as measured on small DiTs (``benchmarks/estimate_vs_measured.py``:
    75.8 and 74.5 at width 256) — plus the FFN's hidden state before and after the GELU (2×2 B a channel of
    ``ffn_dim``; measured 4.0). The cross-attention's text and image keys / values (``(L + M)·2·dim`` bf16 a
    clip) are added; the router weights (``l`` floats a token) are negligible."""
    per_token = ACT_BYTES_PER_TOKEN_WIDTH * config.dim + ACT_BYTES_PER_TOKEN_FFN * config.ffn_dim
    context = (text_len + (image_len if config.image_dim is not None else 0)) * 2 * config.dim * 2
    return batch * (tokens * per_token + context)


def training_activation_bytes(
    config: DiTConfig, tokens: int, batch: int, text_len: int, image_len: int, checkpointing: bool
) -> int:
    """Peak activation bytes of one bf16 training step of the DiT: every block's ``block_activation_bytes``,
    or with activation checkpointing each block's bf16 input (kept for the recomputation, and the Layer Memory
    history) plus one block's activations while it is recomputed."""
    block = block_activation_bytes(config, tokens, batch, text_len, image_len)
    if checkpointing:
        return config.num_layers * 2 * batch * tokens * config.dim + block
    return config.num_layers * block


def dit_inference_bytes(config: DiTConfig, tokens: int, batch: int) -> int:
    """Peak bytes of one no-grad DiT call with bf16 weights besides the weights: Layer Memory's history of every
    block's output (``(L+1)·B·N·dim`` bf16; without Layer Memory two hidden states) plus a block's largest
    moment, about ``16·dim + 4·ffn_dim`` bytes a token (float32 norm input and output and the modulated input
    beside q, k, v; the FFN's hidden state before and after the GELU)."""
    width = 2 * batch * tokens * config.dim
    history = (config.num_layers + 1 if config.layer_memory else 2) * width
    return history + batch * tokens * (16 * config.dim + 4 * config.ffn_dim)


def meta_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def build_on_meta(cls: type[nn.Module], config: Any) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def _block_parameters(network: nn.Module) -> int:
    blocks = getattr(network, "blocks", None)
    return max((meta_parameters(b) for b in blocks), default=0) if blocks is not None else 0


# ---- results ------------------------------------------------------------------------------------------------


@dataclass
class MemoryRow:
    """One line of an estimate: what it is, how many bytes per GPU, how it was counted."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    """Memory per GPU of a run, by part."""

    config: str
    kind: str
    """"training" or "inference"."""
    gpus: int
    settings: dict[str, Any]
    """What was assumed: tokens, batch, cp, dtypes, … (printed with the table)."""
    rows: list[MemoryRow] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    """Total bytes per GPU by scenario ("with activation checkpointing", "offload", …)."""

    def as_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "rows"},
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "totals_gib": {k: round(v / GIB, 2) for k, v in self.totals.items()},
        }

    def table(self) -> str:
        lines = [f"{self.config} — {self.kind}, per GPU of {self.gpus}"]
        lines += [f"  {k}: {v}" for k, v in self.settings.items()]
        width = max(len(r.name) for r in self.rows + [MemoryRow("total", 0)])
        lines.append(f"  {'part':<{width}}  {'GiB':>8}  counted as")
        for row in self.rows:
            lines.append(f"  {row.name:<{width}}  {row.bytes / GIB:8.2f}  {row.note}")
        for name, total in self.totals.items():
            lines.append(f"  {'total, ' + name:<{width}}  {total / GIB:8.2f}")
        return "\n".join(lines)


# ---- reading configs ----------------------------------------------------------------------------------------


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file.")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must be a mapping, got {type(loaded).__name__}.")
    return loaded


def _network_config(path: str | None, preset: Any, what: str) -> tuple[Any, str]:
    """The architecture saved at ``path`` when it is on this machine (its config only: no weight is read), else
    ``preset`` (the paper's)."""
    if path is not None and Path(path).exists():
        config = read_snapshot(path).build_config()
        if not isinstance(config, type(preset)):
            raise ValueError(
                f"{path} holds a {type(config).__name__}, not the {what} ({type(preset).__name__})."
            )
        return config, f"{what} from {path}"
    return preset, f"{what}: paper preset ({path or 'no path'} not here)"


def _text_encoder_parameters(path: str | None) -> tuple[int, str]:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config.from_pretrained(path) if path and Path(path).is_dir() else UMT5Config(**UMT5_XXL)
    where = f"from {path}" if path and Path(path).is_dir() else "UMT5-XXL preset"
    with torch.device("meta"):
        return meta_parameters(UMT5EncoderModel(config)), where


def _image_encoder_parameters(path: str | None) -> tuple[int, str]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    here = bool(path) and Path(path).is_dir()
    config = CLIPVisionConfig.from_pretrained(path) if here else CLIPVisionConfig(**CLIP_VIT_H14)
    with torch.device("meta"):
        return meta_parameters(CLIPVisionModel(config)), f"from {path}" if here else "CLIP ViT-H/14 preset"


def _video_size(
    config: dict[str, Any], frames: int | None, height: int | None, width: int | None, source: str
) -> tuple[int, int, int]:
    """Frames and size of a training config's clips: the arguments, else the DataModule's, else the sample
    callback's (a latent-cache DataModule does not state them)."""
    data = (config.get("data") or {}).get("init_args") or {}
    found = {
        "frames": data.get("num_frames"),
        "height": (data.get("buckets") or {}).get("size"),
        "width": (data.get("buckets") or {}).get("size"),
    }
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        args = (callback.get("init_args") or {}) if isinstance(callback, dict) else {}
        if "num_frames" in args and "height" in args:  # a sample callback: the stage's clip size
            sample = {"frames": args["num_frames"], "height": args["height"], "width": args.get("width")}
            found = {k: found[k] or sample[k] for k in found}
    given = {"frames": frames, "height": height, "width": width}
    size = {k: given[k] or found[k] for k in found}
    missing = [k for k, v in size.items() if not v]
    if missing:
        raise ValueError(
            f"{source} does not state the clips' {', '.join(missing)}; pass --frames, --height and --width."
        )
    return size["frames"], size["height"], size["width"]


def _latent_grid(frames: int, height: int, width: int, ae: FSAEConfig) -> tuple[int, int, int]:
    s, c = ae.spatial_compression, ae.temporal_compression
    if (frames - 1) % c or height % s or width % s:
        raise ValueError(
            f"{frames}×{height}×{width} is not a valid FSAE video size (frames 1 + {c}k, sides multiples of {s})."
        )
    return ae.latent_shape(frames, height, width)[1:]


def _check_context_parallel(config: DiTConfig, cp: int) -> None:
    if config.num_heads % cp:
        raise ValueError(
            f"context_parallel={cp} must divide the DiT's {config.num_heads} attention heads (Ulysses gives each "
            "GPU heads/cp whole heads)."
        )


# ---- training -----------------------------------------------------------------------------------------------


def estimate_training(
    config_path: str | Path,
    gpus: int,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    context_parallel: int | None = None,
) -> Estimate:
    """Memory per GPU of the training config at ``config_path`` on ``gpus`` GPUs (module docstring);
    ``context_parallel`` overrides the config's ``model.init_args.parallel.context_parallel``."""
    config = _read_yaml(config_path)
    model = config.get("model") or {}
    args = model.get("init_args") or {}
    if "dit" not in args:
        raise ValueError(
            f"{config_path}: fsvideo estimate sizes DiT-family training stages (model.init_args.dit) and pipeline "
            f"configs; its model {model.get('class_path', '?')} has no dit."
        )
    if gpus < 1:
        raise ValueError(f"--gpus must be positive, got {gpus}")
    dit_config = DiTConfig(**(args.get("dit") or {}))
    parallel = args.get("parallel") or {}
    fsdp = bool(parallel.get("fsdp", False))
    cp = context_parallel if context_parallel is not None else int(parallel.get("context_parallel", 1) or 1)
    if cp < 1:
        raise ValueError(f"context_parallel must be a positive number of GPUs, got {cp}")
    if cp > 1 and not fsdp:
        raise ValueError(
            f"{config_path}: context_parallel={cp} needs model.init_args.parallel.fsdp: true (FSDP reduces the "
            "gradients of a context-parallel run)."
        )
    _check_context_parallel(dit_config, cp)
    if gpus % cp:
        raise ValueError(f"{gpus} GPUs cannot hold context_parallel={cp} groups; use a multiple of {cp}.")
    checkpointing = bool(parallel.get("activation_checkpointing", False))
    gather_bytes = 2 if parallel.get("mixed_precision") == "bf16" else 4
    shards = gpus if fsdp else 1
    data = (config.get("data") or {}).get("init_args") or {}
    encoders = data.get("encoders") or {}
    batch = int(data.get("batch_size", 1))
    text_len = int(encoders.get("text_len", DEFAULT_TEXT_LEN))
    ae_config, ae_note = _network_config(encoders.get("autoencoder"), FSAEConfig.paper(), "FSAE")
    grid = _latent_grid(*_video_size(config, frames, height, width, str(config_path)), ae_config)
    tokens = math.ceil(math.prod(grid) // dit_config.patch_volume / cp)

    dit = build_on_meta(DiT, dit_config)
    trained = meta_parameters(dit)
    ema = float(args.get("ema_decay", 0.999)) > 0
    rows = [
        MemoryRow("parameters", 4 * trained // shards, f"{trained / 1e9:.2f}B float32 / {shards}"),
        MemoryRow("gradients", 4 * trained // shards, f"float32 / {shards}"),
        MemoryRow("AdamW state", 8 * trained // shards, f"exp_avg + exp_avg_sq float32 / {shards}"),
    ]
    if ema:
        rows.append(MemoryRow("EMA twin", 4 * trained // shards, f"float32 / {shards}"))
    if not (fsdp and parallel.get("mixed_precision") == "bf16"):
        rows.append(
            MemoryRow(
                "autocast bf16 weight copies",
                2 * trained,
                "bf16-mixed casts each float32 weight once a step and keeps the copy until the step ends",
            )
        )
    if fsdp:
        block = _block_parameters(dit)
        rows.append(
            MemoryRow(
                "FSDP gather buffers",
                2 * block * (gather_bytes + 4),
                f"2 blocks × {block / 1e6:.0f}M: params {gather_bytes} B + float32 grads",
            )
        )
    frozen_shards = gpus if fsdp and parallel.get("frozen", "shard") == "shard" else 1
    if args.get("base_dit"):
        base_config, note = _network_config(args["base_dit"], dit_config, "base DiT")
        count = meta_parameters(build_on_meta(DiT, base_config))
        rows.append(
            MemoryRow("frozen base DiT", 4 * count // frozen_shards, f"{note}, float32 / {frozen_shards}")
        )
    if args.get("upsampler"):
        up_config, note = _network_config(args["upsampler"], LatentUpsamplerConfig.paper(), "upsampler")
        count = meta_parameters(build_on_meta(LatentUpsampler, up_config))
        rows.append(MemoryRow("frozen upsampler", 4 * count, f"{note}, float32, replicated"))
    if encoders:
        dtype_bytes = 2 if "16" in str(encoders.get("dtype", "float32")) else 4
        count = meta_parameters(build_on_meta(FSAE, ae_config))
        rows.append(MemoryRow("data: FSAE", 4 * count, f"{ae_note}, float32"))
        count, note = _text_encoder_parameters(encoders.get("text_encoder"))
        rows.append(MemoryRow("data: text encoder", dtype_bytes * count, f"{count / 1e9:.2f}B, {note}"))
        if encoders.get("image_encoder"):
            count, note = _image_encoder_parameters(encoders.get("image_encoder"))
            rows.append(MemoryRow("data: image encoder", dtype_bytes * count, f"{count / 1e9:.2f}B, {note}"))
    block_bytes = block_activation_bytes(dit_config, tokens, batch, text_len, IMAGE_TOKENS)
    sizes = (dit_config, tokens, batch, text_len, IMAGE_TOKENS)
    without = training_activation_bytes(*sizes, checkpointing=False)
    with_checkpointing = training_activation_bytes(*sizes, checkpointing=True)
    rows.append(
        MemoryRow(
            "activations, no checkpointing",
            without,
            f"{dit_config.num_layers} blocks × {block_bytes / GIB:.2f} GiB",
        )
    )
    rows.append(
        MemoryRow(
            "activations, checkpointing", with_checkpointing, "block inputs (bf16) + one block recomputed"
        )
    )
    states = sum(r.bytes for r in rows if not r.name.startswith("activations"))
    estimate = Estimate(
        str(config_path),
        "training",
        gpus,
        {
            "network": f"DiT {trained / 1e9:.2f}B (dim {dit_config.dim}, {dit_config.num_layers} layers)",
            "clips": f"batch {batch} × latent {grid[0]}×{grid[1]}×{grid[2]} = {math.prod(grid)} tokens",
            "context parallel": f"{cp} → {tokens} tokens per GPU",
            "sharding": f"FSDP over {gpus}" if fsdp else "none (each GPU holds everything)",
            "activation checkpointing in config": checkpointing,
        },
        rows,
    )
    estimate.totals = {
        "with activation checkpointing": states + with_checkpointing,
        "without activation checkpointing": states + without,
    }
    return estimate


# ---- inference ----------------------------------------------------------------------------------------------


def traced_peak_bytes(fn, *shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes (activations and temporaries, not parameters) that ``fn(*inputs)`` allocates, traced on
    fake tensors of ``shapes`` under ``FakeTensorMode``: nothing is computed or allocated. ``fn`` builds its
    network itself, inside the mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        inputs = [torch.empty(s, dtype=dtype) for s in shapes]
        network, call = fn()
        tracker = MemTracker()
        tracker.track_external(network)
        with tracker, torch.no_grad():
            call(*inputs)
        peak = tracker.get_tracker_snapshot("peak")
    return sum(
        v for stats in peak.values() for k, v in stats.items() if str(k).endswith(("ACT", "TEMP", "OTH"))
    )


def estimate_pipeline(
    config_path: str | Path,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    gpus: int = 1,
) -> Estimate:
    """Memory of one GPU running the pipeline config at ``config_path`` on ``gpus`` processes, one GPU each
    (module docstring)."""
    from fsvideo.pipeline import PipelineConfig

    config = PipelineConfig.from_yaml(config_path)
    generation = config.generation
    frames, height, width = (
        frames or generation.num_frames,
        height or generation.height,
        width or generation.width,
    )
    ae_config, ae_note = _network_config(config.autoencoder, FSAEConfig.paper(), "FSAE")
    dit_config, dit_note = _network_config(config.dit, DiTConfig.paper(), "DiT")
    if gpus < 1:
        raise ValueError(f"--gpus must be positive, got {gpus}")
    _check_context_parallel(dit_config, gpus)
    s = ae_config.spatial_compression * (2 if config.refiner is not None else 1)
    # the pipeline generates the next size up that it can, and crops (FSVideoPipeline.generated_size)
    size = (math.ceil(height / s) * s, math.ceil(width / s) * s)
    grid = _latent_grid(frames, *size, ae_config)
    base_grid = grid if config.refiner is None else (grid[0], grid[1] // 2, grid[2] // 2)
    bf16 = 2 if config.precision in ("bf16", "auto") else 4
    cfg_batch = 2 if generation.guidance_scale != 1.0 else 1

    def weights(network: nn.Module, dtype_bytes: int) -> int:
        return meta_parameters(network) * dtype_bytes

    def dit_rows(what: str, config: DiTConfig, note: str, latent: tuple[int, int, int], batch: int) -> list:
        """Weights (sharded over the processes), FSDP's gathered blocks and the no-grad working set of one
        DiT stage; ``latent`` is the stage's ``(t, h, w)``."""
        network = build_on_meta(DiT, config)
        tokens = math.prod(latent) // config.patch_volume
        local = math.ceil(tokens / gpus)
        split = f", context parallel {gpus} → {local} a GPU" if gpus > 1 else ""
        rows = [
            MemoryRow(
                f"{what} weights", weights(network, bf16) // gpus, f"{note}, / {gpus}" if gpus > 1 else note
            )
        ]
        if gpus > 1:
            block = _block_parameters(network)
            rows.append(
                MemoryRow(f"{what} FSDP gather buffers", 2 * block * bf16, f"2 blocks × {block / 1e6:.0f}M")
            )
        rows.append(
            MemoryRow(
                f"{what} activations",
                dit_inference_bytes(config, local, batch),
                f"{tokens} tokens{split} × batch {batch}{' (CFG)' if batch == 2 else ''}, no grad",
            )
        )
        return rows

    ae = build_on_meta(FSAE, ae_config)
    stages: dict[str, list[MemoryRow]] = {}
    text_count, text_note = _text_encoder_parameters(config.text_encoder)
    encode = [
        MemoryRow("FSAE weights", weights(ae, 4), f"{ae_note}, float32"),
        MemoryRow("text encoder weights", text_count * bf16, f"{text_count / 1e9:.2f}B, {text_note}"),
    ]
    if config.image_encoder:
        count, note = _image_encoder_parameters(config.image_encoder)
        encode.append(MemoryRow("image encoder weights", count * bf16, f"{count / 1e9:.2f}B, {note}"))
    stages["encode"] = encode
    stages["base DiT"] = dit_rows("DiT", dit_config, dit_note, base_grid, cfg_batch)
    if config.refiner is not None:
        up_config, up_note = _network_config(config.upsampler, LatentUpsamplerConfig.paper(), "upsampler")
        ref_config, ref_note = _network_config(config.refiner, dit_config, "refiner")
        up_shape = (1, up_config.latent_channels, *base_grid)
        stages["upsample"] = [
            MemoryRow("upsampler weights", weights(build_on_meta(LatentUpsampler, up_config), bf16), up_note),
            MemoryRow(
                "upsampler activations",
                traced_peak_bytes(
                    lambda: _traced(LatentUpsampler, up_config, bf16), up_shape, dtype=_dtype(bf16)
                ),
                "traced on fake tensors",
            ),
        ]
        refine_batch = 2 if (config.refine is None or config.refine.guidance_scale != 1.0) else 1
        _check_context_parallel(ref_config, gpus)
        stages["refine"] = dit_rows("refiner", ref_config, ref_note, grid, refine_batch)
    stages["decode"] = [
        MemoryRow("FSAE weights", weights(ae, 4), "float32"),
        MemoryRow(
            "decode activations",
            _decode_peak(ae_config, grid, config.tiling),
            "one chunk traced on fake tensors + the frames",
        ),
    ]
    rows = []
    for stage, stage_rows in stages.items():
        rows += [MemoryRow(f"{stage}: {r.name}", r.bytes, r.note) for r in stage_rows]
    all_weights = sum(
        r.bytes for n, rs in stages.items() for r in rs if "weights" in r.name and n != "decode"
    )
    # a stage's transient memory: its activations, and on several GPUs its DiT's gathered blocks
    peak_activation = max(
        sum(r.bytes for r in rs if "activations" in r.name or "gather" in r.name) for rs in stages.values()
    )
    estimate = Estimate(
        str(config_path),
        "inference",
        gpus,
        {
            "video": f"{frames}×{height}×{width} (generated at {size[0]}×{size[1]})",
            "latent": f"{grid[0]}×{grid[1]}×{grid[2]}" + (f", base {base_grid}" if config.refiner else ""),
            "precision": "bf16 (FSAE float32)" if bf16 == 2 else "float32",
            "offload in config": config.offload,
            "processes": "1"
            if gpus == 1
            else f"{gpus}: DiTs FSDP-sharded, context parallel {gpus} (no offload)",
        },
        rows,
    )
    estimate.totals = {"everything on the GPU": all_weights + peak_activation}
    if gpus == 1:  # FSVideoPipeline.parallelize refuses offloading
        estimate.totals["offload (one stage's networks at a time)"] = max(
            sum(r.bytes for r in rs) for rs in stages.values()
        )
    return estimate


def _dtype(nbytes: int) -> torch.dtype:
    return torch.bfloat16 if nbytes == 2 else torch.float32


def _traced(cls: type[nn.Module], config: Any, nbytes: int):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_dtype(nbytes))  # fake parameters cannot be cast after they are built
    try:
        network = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return network, network


def _decode_peak(ae_config: FSAEConfig, grid: tuple[int, int, int], tiling) -> int:
    """The FSAE decoder's peak: one pass over the latent frames it decodes at once (``tiling``'s chunk; spatial
    tiles are not modelled), traced, plus the float32 frames of the whole video twice (the chunks and their
    concatenation)."""
    chunk = grid[0] if tiling is None or not tiling.chunk_latent_frames else tiling.chunk_latent_frames
    chunk = min(chunk, grid[0])

    def build():
        network = FSAE(ae_config)
        return network, lambda latent: network.decode(latent)

    frames = 1 + (grid[0] - 1) * ae_config.temporal_compression
    s = ae_config.spatial_compression
    output = 2 * 4 * 3 * frames * grid[1] * s * grid[2] * s
    return traced_peak_bytes(build, (1, ae_config.latent_channels, chunk, *grid[1:])) + output


# ---- command ------------------------------------------------------------------------------------------------


def estimate_main(argv: list[str] | None = None) -> None:
    """Entry point of ``fsvideo estimate`` (``argv`` excludes ``estimate`` itself)."""
    parser = argparse.ArgumentParser(
        prog="fsvideo estimate",
        description="GPU memory per GPU of a DiT training config or a pipeline config; nothing is allocated.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a training config (configs/dit, configs/refiner) or configs/pipeline/*.yaml",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        nargs="+",
        default=[1],
        help="GPU counts to size a training run for, or a generation (torchrun: DiTs sharded, context parallel)",
    )
    parser.add_argument(
        "--context-parallel",
        type=int,
        help="training: GPUs that split each clip's tokens (default: the config's parallel.context_parallel)",
    )
    parser.add_argument("--frames", type=int, help="video frames (default: the config's)")
    parser.add_argument("--height", type=int, help="video height (default: the config's)")
    parser.add_argument("--width", type=int, help="video width (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    config = _read_yaml(args.config)
    if "model" in config:
        estimates = [
            estimate_training(args.config, n, args.frames, args.height, args.width, args.context_parallel)
            for n in args.gpus
        ]
    elif "dit" in config and "autoencoder" in config:
        if args.context_parallel is not None:
            raise ValueError(
                "--context-parallel sizes training; a generation on --gpus N runs context parallel N."
            )
        estimates = [
            estimate_pipeline(args.config, args.frames, args.height, args.width, n) for n in args.gpus
        ]
    else:
        raise ValueError(
            f"{args.config} is neither a training config (model:) nor a pipeline config (autoencoder:, dit:)."
        )
    if args.json:
        print(json.dumps([e.as_json() for e in estimates], indent=1))
    else:
        print("\n\n".join(e.table() for e in estimates))
