"""Start a decoder variant's finetune from an earlier FSAE (spec §2.2.3).

FSAE-Standard starts from the stage-3 (or VF) autoencoder, FSAE-Lite from FSAE-Standard. The encoder
must copy over whole (it stays frozen); in the decoder every tensor whose name and shape match is
copied and the rest (the new cross-attentions, Lite's narrower outer stages) keeps its fresh
initialisation. The report says which is which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fsvideo.ae.autoencoder import FSAE
from fsvideo.ae.config import FSAEConfig


@dataclass
class VariantImportReport:
    """What :func:`load_decoder_variant` did with each tensor of the target."""

    copied: list[str] = field(default_factory=list)
    """Tensors loaded from the source."""
    reshaped: list[str] = field(default_factory=list)
    """Target tensors whose source has another shape: re-initialised."""
    new: list[str] = field(default_factory=list)
    """Target tensors the source lacks: re-initialised."""
    dropped: list[str] = field(default_factory=list)
    """Source tensors the target has no place for."""

    @property
    def reinitialized(self) -> list[str]:
        return self.reshaped + self.new

    def __str__(self) -> str:
        def show(names: list[str]) -> str:
            return ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")

        lines = [f"decoder-variant import: {len(self.copied)} tensors copied"]
        for label, names in (
            ("re-initialised (shape differs)", self.reshaped),
            ("re-initialised (new)", self.new),
            ("dropped (no place in the target)", self.dropped),
        ):
            if names:
                lines.append(f"  {label}: {len(names)}: {show(names)}")
        return "\n".join(lines)


def load_decoder_variant(
    source: FSAE | Mapping[str, torch.Tensor], config: FSAEConfig
) -> tuple[FSAE, VariantImportReport]:
    """Build ``FSAE(config)`` initialised from ``source`` (a model or its state dict).

    Raises:
        ValueError: when the encoder does not copy over whole (the architectures differ outside the
            decoder; only the decoder may change between the stages).
    """
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    model = FSAE(config)
    model.init_weights()
    own = model.state_dict()
    report = VariantImportReport()
    for name, tensor in own.items():
        if name not in state:
            report.new.append(name)
        elif state[name].shape != tensor.shape:
            report.reshaped.append(name)
        else:
            report.copied.append(name)
    report.dropped = sorted(set(state) - set(own))
    bad_encoder = [n for n in report.reinitialized + report.dropped if n.startswith("encoder.")]
    if bad_encoder:
        raise ValueError(
            f"the source's encoder does not fit this config (e.g. {bad_encoder[:3]}): a decoder variant keeps "
            "the encoder frozen, so every field but decoder_variant, first_frame_injection, noise_weight, "
            "lite_widths and decoder_depths must equal the source's"
        )
    model.load_state_dict({name: state[name] for name in report.copied}, strict=False)
    return model, report
