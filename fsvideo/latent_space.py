"""The latent space a DiT was trained in, and the checks that keep a DiT with the FSAE and encoders it knows.

A DiT only makes sense on latents of the FSAE *encoder* it was trained with (the Standard / Lite decoders of
§2.2.3 keep that encoder frozen, so they share its latent space) and on tokens of the same text / image
encoders and text length. ``datamodules.latent_cache.LatentSpace`` builds the full record from a cache's
encoders; DiT checkpoints store it under ``LATENT_SPACE_KEY``; ``check_fsae_for_dit`` compares an FSAE with it.

Public API:
    LATENT_SPACE_KEY, FSAE_ENCODER_FIELDS
    weights_sha256(module) -> str
    fsae_latent_space(autoencoder) -> dict      what fixes an FSAE's latents (its encoder), in json types
    read_latent_space_record(dit_run_or_checkpoint) -> dict | None
    check_fsae_for_dit(dit_run, autoencoder, text_len)   refuse an FSAE / text length the DiT was not trained with
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsvideo.ae import FSAE
from fsvideo.checkpoints import find_run_files, safe_torch_load

LATENT_SPACE_KEY = "latent_space"
"""Checkpoint entry in which ``lightning_modules.dit.DiTModule`` records the latent space of its training data:
``{"fields": {"autoencoder": fsae_latent_space(...), "text_encoder", "image_encoder", "text_len"}, "source"}``."""
FSAE_ENCODER_FIELDS = (
    "latent_channels",
    "widths",
    "encoder_depths",
    "num_conv_stages",
    "time_resample_stages",
    "attention_head_dim",
    "multiscale_kernel_sizes",
    "mlp_expand_ratio",
    "temporal_kernel_size",
    "norm_eps",
    "encoder_out_shortcut",
)
"""The ``FSAEConfig`` fields the encoder is built from; the decoder's fields do not change the latent."""


def weights_sha256(module: nn.Module) -> str:
    """Hash of every tensor's name, dtype, shape and bytes: the weights' identity, whatever file held them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def fsae_latent_space(autoencoder: FSAE) -> dict[str, Any]:
    """What fixes the meaning of an FSAE's latents: the hash of its encoder's weights and the config fields the
    encoder is built from (json types). The decoder does not enter, so the Standard / Lite decoders (§2.2.3),
    which keep the encoder frozen, share the latent space of the FSAE they were finetuned from."""
    config = autoencoder.config
    space = {
        "encoder_sha256": weights_sha256(autoencoder.encoder),
        **{name: getattr(config, name) for name in FSAE_ENCODER_FIELDS},
        "spatial_compression": config.spatial_compression,
        "temporal_compression": config.temporal_compression,
    }
    return json.loads(json.dumps(space))  # tuples become lists, as in a json file or a checkpoint record


def read_latent_space_record(path: str | Path) -> dict[str, Any] | None:
    """The latent space a DiT checkpoint (a run directory or a checkpoint file) records, or None when it
    records none (converted weights, safetensors files, runs older than the record)."""
    path = Path(path)
    checkpoint = path if path.is_file() else find_run_files(path)[1]
    if checkpoint.suffix == ".safetensors":
        return None
    # memory-mapped: only the small record is read, not the whole (possibly 14B-parameter) checkpoint
    record = safe_torch_load(checkpoint, expected="a DiT checkpoint").get(LATENT_SPACE_KEY)
    return None if record is None else dict(record)


def check_fsae_for_dit(dit: str | Path, autoencoder: FSAE, text_len: int) -> None:
    """Raise a ValueError unless ``autoencoder`` and ``text_len`` are those the DiT run / checkpoint ``dit``
    trained with, by the latent space its checkpoint records; a DiT without a record is not checked."""
    record = read_latent_space_record(dit)
    if record is None:
        return
    trained = record["fields"]
    own = fsae_latent_space(autoencoder)
    differing = [
        f"autoencoder.{k}"
        for k in sorted(set(own) | set(trained["autoencoder"]))
        if own.get(k) != trained["autoencoder"].get(k)
    ]
    if trained["text_len"] != text_len:
        differing.append("text_len")
    if differing:
        raise ValueError(
            f"the DiT {dit} was trained on latents of another FSAE encoder or text length ({differing} differ "
            f"from its record; it trained on {record['source']}, text_len {trained['text_len']}). Set autoencoder "
            "to the FSAE run that encoded the DiT's training data (or one of its Standard / Lite decoder runs) "
            "and text_len to the length that data was encoded with."
        )
