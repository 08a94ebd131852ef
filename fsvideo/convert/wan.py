"""Import a Wan2.1 I2V transformer checkpoint into our DiT (running in Wan's latent space).

Both naming schemes are accepted: the original repository's (``blocks.N.self_attn.q``,
``cross_attn.k_img``, ``ffn.0``, ``modulation``, ``head.head``, ``time_embedding.0``, ``img_emb.proj.1``
…) and diffusers' ``WanTransformer3DModel`` (``blocks.N.attn1.to_q``, ``attn2.add_k_proj``,
``ffn.net.0.proj``, ``scale_shift_table``, ``proj_out``, ``condition_embedder.time_embedder.linear_1`` …).
Note the original calls the cross-attention norm ``norm3`` and the FFN norm ``norm2``; diffusers
swaps them. Wan keeps keys and values in two Linears; ours stacks them in one (``to_kv``, ``to_kv_img``:
the key rows first), so those weights are concatenated copies, every other tensor is passed through
as it is. Layer Memory routers do not exist in Wan: they are reported as new and keep their
initialisation, whose gate g = 0 makes each block the plain Wan block, so the converted model computes
Wan's output (Figure 7(b) fine-tunes from there; ``fsvideo.dit.layer_memory`` explains the gate).

Timesteps: Wan takes ``t = σ·1000``; our DiT takes σ and scales by ``timestep_scale`` (1000).

Public API:
    convert_wan_state_dict(state_dict) -> (our_state_dict, ConversionReport)    names only
    load_wan_i2v(state_dict, config=None) -> (DiT, ConversionReport)   builds DiTConfig.wan_i2v_14b()
        unless a config is given, loads strictly except for the new routers
    ConversionReport: mapped [(source, target)], new [target], ignored [source]; str() summarises
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fsvideo.dit import DiT, DiTConfig

# Per-block names (after "blocks.N."); values are our names, but for the key / value projections
# (``to_k``, ``to_v``, ``to_k_img``, ``to_v_img``), which are then stacked by ``_KV_HALF``.
_BLOCK_ORIGINAL = {
    "modulation": "modulation",
    "self_attn.q": "self_attn.to_q",
    "self_attn.k": "self_attn.to_k",
    "self_attn.v": "self_attn.to_v",
    "self_attn.o": "self_attn.to_out",
    "self_attn.norm_q": "self_attn.norm_q",
    "self_attn.norm_k": "self_attn.norm_k",
    "norm3": "norm_cross",
    "cross_attn.q": "cross_attn.to_q",
    "cross_attn.k": "cross_attn.to_k",
    "cross_attn.v": "cross_attn.to_v",
    "cross_attn.o": "cross_attn.to_out",
    "cross_attn.norm_q": "cross_attn.norm_q",
    "cross_attn.norm_k": "cross_attn.norm_k",
    "cross_attn.k_img": "cross_attn.to_k_img",
    "cross_attn.v_img": "cross_attn.to_v_img",
    "cross_attn.norm_k_img": "cross_attn.norm_k_img",
    "ffn.0": "ffn.fc_in",
    "ffn.2": "ffn.fc_out",
}
_BLOCK_DIFFUSERS = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.to_q",
    "attn1.to_k": "self_attn.to_k",
    "attn1.to_v": "self_attn.to_v",
    "attn1.to_out.0": "self_attn.to_out",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "norm2": "norm_cross",
    "attn2.to_q": "cross_attn.to_q",
    "attn2.to_k": "cross_attn.to_k",
    "attn2.to_v": "cross_attn.to_v",
    "attn2.to_out.0": "cross_attn.to_out",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.to_k_img",
    "attn2.add_v_proj": "cross_attn.to_v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.fc_in",
    "ffn.net.2": "ffn.fc_out",
}
_TOP_ORIGINAL = {
    "patch_embedding": "patch_embed",
    "time_embedding.0": "time_embed.linear_1",
    "time_embedding.2": "time_embed.linear_2",
    "time_projection.1": "time_embed.proj",
    "text_embedding.0": "text_embed.linear_1",
    "text_embedding.2": "text_embed.linear_2",
    "img_emb.proj.0": "image_embed.norm_in",
    "img_emb.proj.1": "image_embed.linear_1",
    "img_emb.proj.3": "image_embed.linear_2",
    "img_emb.proj.4": "image_embed.norm_out",
    "head.head": "head.proj",
    "head.modulation": "head.modulation",
}
_TOP_DIFFUSERS = {
    "patch_embedding": "patch_embed",
    "condition_embedder.time_embedder.linear_1": "time_embed.linear_1",
    "condition_embedder.time_embedder.linear_2": "time_embed.linear_2",
    "condition_embedder.time_proj": "time_embed.proj",
    "condition_embedder.text_embedder.linear_1": "text_embed.linear_1",
    "condition_embedder.text_embedder.linear_2": "text_embed.linear_2",
    "condition_embedder.image_embedder.norm1": "image_embed.norm_in",
    "condition_embedder.image_embedder.ff.net.0.proj": "image_embed.linear_1",
    "condition_embedder.image_embedder.ff.net.2": "image_embed.linear_2",
    "condition_embedder.image_embedder.norm2": "image_embed.norm_out",
    "proj_out": "head.proj",
    "scale_shift_table": "head.modulation",
}
# diffusers lists these as unexpected-but-harmless keys of older exports.
_IGNORED = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.\w+")
# After renaming, Wan's separate key / value projections, which ours stacks into one Linear.
_KV_HALF = re.compile(r"(blocks\.\d+\.(?:self|cross)_attn)\.to_([kv])(_img)?\.(weight|bias)")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_PARAM_SUFFIXES = ("weight", "bias")


@dataclass
class ConversionReport:
    mapped: list[tuple[str, str]] = field(default_factory=list)
    """(source name, our name) of every converted tensor."""
    new: list[str] = field(default_factory=list)
    """Our tensors that have no Wan counterpart (the Layer Memory routers), left at their init."""
    ignored: list[str] = field(default_factory=list)
    """Source tensors deliberately dropped."""
    naming: str = ""
    """Which naming scheme the source used: 'original' or 'diffusers'."""

    def __str__(self) -> str:
        lines = [
            f"Wan2.1 -> FSVideo DiT ({self.naming} names): {len(self.mapped)} tensors mapped, "
            f"{len(self.new)} new, {len(self.ignored)} ignored"
        ]
        if self.new:
            lines.append("new: " + ", ".join(self.new))
        if self.ignored:
            lines.append("ignored: " + ", ".join(self.ignored))
        return "\n".join(lines)


def _detect_naming(keys: list[str]) -> str:
    if any(k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(k.startswith("time_embedding.") for k in keys):
        return "original"
    raise ValueError(
        "not a Wan2.1 transformer state dict: expected 'time_embedding.*' (original) or "
        "'condition_embedder.*' (diffusers) keys"
    )


def _rename(key: str, top: Mapping[str, str], block: Mapping[str, str]) -> str | None:
    match = _BLOCK_KEY.fullmatch(key)
    prefix, rest, table = ("", key, top) if match is None else (f"blocks.{match[1]}.", match[2], block)
    if rest in table:  # a bare parameter such as "modulation"
        return prefix + table[rest]
    module, _, param = rest.rpartition(".")
    if param in _PARAM_SUFFIXES and module in table:
        return f"{prefix}{table[module]}.{param}"
    return None


def convert_wan_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename a Wan2.1 transformer state dict (either scheme) to our DiT's names.

    Raises:
        ValueError: on a key that belongs to neither scheme (e.g. a T2V or Wan2.2 variant's extras).
    """
    naming = _detect_naming(list(state_dict))
    top, block = (
        (_TOP_DIFFUSERS, _BLOCK_DIFFUSERS) if naming == "diffusers" else (_TOP_ORIGINAL, _BLOCK_ORIGINAL)
    )
    report = ConversionReport(naming=naming)
    converted, halves, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        if _IGNORED.fullmatch(key):
            report.ignored.append(key)
            continue
        target = _rename(key, top, block)
        if target is None:
            unknown.append(key)
            continue
        half = _KV_HALF.fullmatch(target)
        if half is None:
            converted[target] = tensor
        else:
            target = f"{half[1]}.to_kv{half[3] or ''}.{half[4]}"
            halves.setdefault(target, {})[half[2]] = tensor
        report.mapped.append((key, target))
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys of the {naming} Wan checkpoint have no mapping: {unknown[:10]}"
        )
    for target, parts in halves.items():
        if parts.keys() != {"k", "v"}:
            raise ValueError(
                f"{target} stacks a key and a value projection; the checkpoint has only '{''.join(parts)}'"
            )
        converted[target] = torch.cat([parts["k"], parts["v"]])
    return converted, report


def load_wan_i2v(
    state_dict: Mapping[str, torch.Tensor], config: DiTConfig | None = None
) -> tuple[DiT, ConversionReport]:
    """Build our DiT for a Wan2.1 I2V checkpoint and load it.

    Args:
        state_dict: Wan2.1 I2V transformer weights, original or diffusers names.
        config: defaults to ``DiTConfig.wan_i2v_14b()``; it must describe the checkpoint
            (16 latent channels, patch 1×2×2, the checkpoint's widths and depth).

    Returns:
        The DiT (Layer Memory routers at their init, gate 0, when ``config.layer_memory``) and the report.
    """
    config = DiTConfig.wan_i2v_14b() if config is None else config
    converted, report = convert_wan_state_dict(state_dict)
    # Built on the meta device and filled by assignment: besides the stacked key / value weights,
    # nothing of a 14B checkpoint is held twice.
    with torch.device("meta"):
        model = DiT(config)
    expected = model.state_dict()
    for name, tensor in converted.items():
        if name not in expected:
            raise ValueError(f"checkpoint tensor {name} does not exist in a DiT built from {config}")
        if expected[name].shape != tensor.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[name].shape)}; "
                "the DiTConfig does not describe this checkpoint"
            )
    report.new = [name for name in expected if name not in converted]
    missing = [name for name in report.new if ".router." not in name]
    if missing:
        raise ValueError(f"checkpoint lacks tensors the DiT needs: {missing[:10]}")
    model.load_state_dict(converted, strict=False, assign=True)
    reference = converted["patch_embed.weight"]
    for router in model.routers:
        router.to_empty(device=reference.device).to(reference.dtype)
        router.init_weights()
    return model, report
