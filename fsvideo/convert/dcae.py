"""Import a diffusers ``AutoencoderDC`` (dc-ae-f32c32-sana-1.0 layout) into FSAE (spec §2.2.1).

DC-AE stage ``i`` becomes FSAE stage ``i`` on both sides. Every 2D kernel larger than 1×1 is
inflated to FSAE's causal ``kt×k×k`` kernel with the 2D kernel in the last (current-frame) slot and
zeros before it, which reproduces the 2D conv exactly on a still image; 1×1 convs and linear
layers become ``1×1×1`` convs; q/k/v projections are concatenated into FSAE's fused qkv; norm
weights copy as they are. What DC-AE lacks — the extra stage, the resampling into it, and the
latent in/out convs of a deeper network — keeps FSAE's fresh initialisation.

Usage::

    model, report = import_dcae("/path/to/dc-ae-f32c32-sana-1.0-diffusers", FSAEConfig.paper())
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderDC
from safetensors.torch import load_file

from fsvideo.ae import FSAE, FSAEConfig

# Names inside one DC-AE block (diffusers) → names inside the FSAE block.
_BLOCK_PARTS = {
    "conv1": "conv1",
    "conv2": "conv2",
    "norm": "norm",
    "attn.to_out": "attn.proj",
    "attn.norm_out": "attn.norm",
    "conv_out.conv_inverted": "mlp.inverted",
    "conv_out.conv_depth": "mlp.depthwise",
    "conv_out.conv_point": "mlp.pointwise",
    "conv_out.norm": "mlp.norm",
    "attn.to_q": "attn.qkv",  # with to_k and to_v concatenated after it
}
_MULTISCALE = re.compile(r"attn\.to_qkv_multiscale\.(\d+)\.proj_(in|out)")
_STAGE_KEY = re.compile(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(\d+)\.(.+)\.(weight|bias)")
_LATENT_CONVS = ("encoder.conv_out.", "decoder.conv_in.")


@dataclass
class DCAEImportReport:
    copied: list[str] = field(default_factory=list)
    """FSAE tensors copied from DC-AE (1×1 convs and linears reshaped to 1×1×1, q/k/v fused)."""
    inflated: list[str] = field(default_factory=list)
    """FSAE conv kernels inflated from a 2D kernel (2D kernel in the last temporal slot)."""
    new: list[str] = field(default_factory=list)
    """FSAE tensors with no DC-AE counterpart, left freshly initialised."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """DC-AE tensors not used, each with the reason."""

    def summary(self) -> str:
        lines = [
            f"DC-AE import: {len(self.copied)} copied, {len(self.inflated)} inflated, "
            f"{len(self.new)} new, {len(self.skipped)} source tensors skipped"
        ]
        lines += [f"  new: {name}" for name in _collapse(self.new)]
        lines += [f"  skipped: {name} ({reason})" for name, reason in self.skipped]
        return "\n".join(lines)


def _collapse(names: list[str]) -> list[str]:
    """Group new tensors by module (``encoder.stages.6.*``) so the report stays readable."""
    groups: dict[str, int] = {}
    for name in names:
        stage = re.match(r"((?:en|de)coder\.stages\.\d+(?:\.down|\.up)?)\.", name)
        key = f"{stage.group(1)}.*" if stage else name
        groups[key] = groups.get(key, 0) + 1
    return [f"{key} ({count} tensors)" if count > 1 else key for key, count in groups.items()]


def load_dcae_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderDC`` state dict from a model folder, a weights file, or a mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        return AutoencoderDC.from_pretrained(path, local_files_only=True).state_dict()
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"{path} is neither a diffusers AutoencoderDC folder nor a weights file")


def _target_name(key: str, up_block_stages: set[int]) -> str | None:
    """FSAE name of a DC-AE tensor (``to_q`` stands for the fused qkv); None if it has none."""
    if key.startswith(("encoder.conv_in.", "decoder.conv_out.", "decoder.norm_out.", *_LATENT_CONVS)):
        return key
    match = _STAGE_KEY.fullmatch(key)
    if match is None:
        return None
    side, stage, index, part, kind = match.groups()
    stage, index = int(stage), int(index)
    side = "encoder" if side.startswith("encoder") else "decoder"
    if part == "conv":  # DCDownBlock2d / DCUpBlock2d
        return f"{side}.stages.{stage}.{'down' if side == 'encoder' else 'up'}.conv.{kind}"
    if side == "decoder" and stage in up_block_stages:
        index -= 1  # diffusers puts the decoder's upsampling first in the stage
    if ms := _MULTISCALE.fullmatch(part):
        module = "depthwise" if ms.group(2) == "in" else "pointwise"
        return f"{side}.stages.{stage}.blocks.{index}.attn.multiscale.{ms.group(1)}.{module}.{kind}"
    if part in _BLOCK_PARTS:
        return f"{side}.stages.{stage}.blocks.{index}.{_BLOCK_PARTS[part]}.{kind}"
    return None


def _fit(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``source`` shaped like ``target`` (and whether it was inflated), or None if it cannot be."""
    if source.dim() == 2:  # linear layer → 1×1×1 conv
        source = source[:, :, None, None]
    if source.dim() == 4 and target.dim() == 5:
        if source.shape != target.shape[:2] + target.shape[3:]:
            return None
        inflated = target.shape[2] > 1
        kernel = source.new_zeros(target.shape)
        kernel[:, :, -1] = source  # the current frame: exact on a still image, blind to the past
        return kernel, inflated
    return (source, False) if source.shape == target.shape else None


@torch.no_grad()
def import_dcae(
    source: str | Path | Mapping[str, torch.Tensor],
    config: FSAEConfig | None = None,
    verbose: bool = True,
) -> tuple[FSAE, DCAEImportReport]:
    """Build an FSAE whose first stages carry a DC-AE's weights.

    Args:
        source: diffusers ``AutoencoderDC`` folder (``save_pretrained`` layout), a ``.safetensors`` /
            torch weights file, or a state dict, in diffusers' naming.
        config: the FSAE to build (default ``FSAEConfig.paper()``); its stages must line up with
            DC-AE's (same widths, block types and depths) for the weights to land.
        verbose: print the report.

    Returns:
        The model (fresh initialisation where nothing was imported) and the report.
    """
    state = load_dcae_state_dict(source)
    if not any(key.startswith("encoder.down_blocks.") for key in state):
        raise ValueError(
            "not a diffusers AutoencoderDC state dict (no encoder.down_blocks.*); convert an original "
            "mit-han-lab checkpoint with diffusers' scripts/convert_dcae_to_diffusers.py first"
        )
    config = config or FSAEConfig.paper()
    model = FSAE(config)
    model.init_weights()
    targets = model.state_dict()
    report = DCAEImportReport()
    source_stages = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
    up_block_stages = {
        int(k.split(".")[2]) for k in state if re.fullmatch(r"decoder\.up_blocks\.\d+\.0\.conv\.weight", k)
    }

    def write(name: str, tensor: torch.Tensor, inflated: bool) -> None:
        targets[name].copy_(tensor)
        (report.inflated if inflated else report.copied).append(name)

    for key in sorted(state):
        if key.startswith(_LATENT_CONVS) and source_stages != config.num_stages:
            reason = (
                f"latent conv of a {source_stages}-stage DC-AE; FSAE's ({config.num_stages} stages) is new"
            )
            report.skipped.append((key, reason))
            continue
        if ".attn.to_k." in key or ".attn.to_v." in key:
            continue  # fused with to_q below
        sources = [key]
        tensor = state[key]
        if ".attn.to_q." in key:
            sources = [key.replace(".attn.to_q.", f".attn.to_{c}.") for c in "qkv"]
            tensor = torch.cat([state[s] for s in sources])
        name = _target_name(key, up_block_stages)
        if name is None or name not in targets:
            report.skipped += [(s, f"no FSAE counterpart ({name or 'unknown layer'})") for s in sources]
            continue
        fitted = _fit(tensor, targets[name])
        if fitted is None:
            reason = f"shape {tuple(tensor.shape)} does not fit {name} {tuple(targets[name].shape)}"
            report.skipped += [(s, reason) for s in sources]
            continue
        write(name, *fitted)

    written = set(report.copied) | set(report.inflated)
    report.new = [name for name in targets if name not in written]
    if verbose:
        print(report.summary())
    return model, report
