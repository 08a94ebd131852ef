"""The latent space a DiT was trained in, its latent statistics, and the checks that keep a DiT with the FSAE and
encoders it knows.

A DiT only makes sense on latents of the FSAE *encoder* it was trained with (the Standard / Lite decoders of
§2.2.3 keep that encoder frozen, so they share its latent space) and on tokens of the same text / image
encoders and text length: a ``LatentSpace``. It normalises latents with per-channel ``LatentStats``. Latent
caches write both (``fingerprint.json``, ``stats.json``); a saved DiT records both (``records["latent_space"]``,
``records["latent_stats"]``, ``fsvideo.pretrained``), and ``check_fsae_for_dit`` compares an FSAE with it.

Public API:
    LatentStats                 per-channel mean / std; .read(path), .write(directory), .record(), .from_record()
    LatentSpace                 .of(autoencoder, text_encoder, image_encoder, text_len, source), .from_record(),
                                .record(), .differences(other), .check_same(other, fix)
    FSAE_ENCODER_FIELDS, STATS_FILE
    weights_sha256(module) -> str
    folder_sha256(path) -> str
    fsae_latent_space(autoencoder) -> dict      what fixes an FSAE's latents (its encoder), in json types
    check_fsae_for_dit(records, autoencoder, text_len, dit)   refuse an FSAE / text length a DiT was not trained with
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsvideo.ae import FSAE

STATS_FILE = "stats.json"
LATENT_STATS = "latent_stats"
"""Record name of a saved DiT's latent statistics."""
LATENT_SPACE = "latent_space"
"""Record name of a saved DiT's latent space."""


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


def check_fsae_for_dit(records: Mapping[str, Any], autoencoder: FSAE, text_len: int, dit: str | Path) -> None:
    """Raise a ValueError unless ``autoencoder`` and ``text_len`` are those the DiT saved at ``dit`` (whose
    ``records`` are given) trained with; a DiT without a latent-space record is not checked."""
    record = records.get(LATENT_SPACE)
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
            "to the FSAE that encoded the DiT's training data (or one of its Standard / Lite decoders) "
            "and text_len to the length that data was encoded with."
        )


def folder_sha256(path: str | Path) -> str:
    """Hash of every file's relative path and bytes under ``path``."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---- statistics ----------------------------------------------------------------------------------------


@dataclass
class LatentStats:
    """Per-channel mean and standard deviation of a cache's latents; the DiT trains on ``(z − mean) / std``."""

    mean: list[float]
    std: list[float]
    elements_per_channel: int
    """Latent values per channel the statistics were computed over."""

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean ({len(self.mean)}) and std ({len(self.std)}) need one value per channel.")
        if min(self.std) <= 0:
            raise ValueError(f"latent std must be positive in every channel, got min {min(self.std)}.")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def read(cls, path: str | Path) -> LatentStats:
        """From a ``stats.json`` or a cache directory holding one."""
        path = Path(path)
        path = path / STATS_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no latent statistics; `fsvideo data encode` writes {STATS_FILE} into its --out directory."
            )
        return cls(**json.loads(path.read_text()))

    def record(self) -> dict[str, Any]:
        """What a saved DiT records (``records["latent_stats"]``)."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LatentStats:
        return cls(list(record["mean"]), list(record["std"]), elements_per_channel=0)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / STATS_FILE
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


# ---- latent space ---------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Tuples become lists, as they do in the json file, so a fresh fingerprint compares equal to a read one."""
    return json.loads(json.dumps(value))


def differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            out += differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(f"{prefix}{key}")
    return out


@dataclass
class LatentSpace:
    """What gives latents and condition tokens their meaning, so that a DiT trained on one set of them works
    with another: the FSAE *encoder* (its weights' hash and the config fields that shape the latent; not the
    decoder, so the Standard / Lite decoders that keep the encoder frozen share their FSAE's latent space),
    the text and image encoders (hashes of their folders) and the text length. Caches hold it in their
    fingerprint, saved DiTs record it (``record()``), and both are compared on it alone."""

    fields: dict[str, Any]
    """json-able identity: ``autoencoder`` (``fsvideo.latent_space.fsae_latent_space``), ``text_encoder`` and
    ``image_encoder`` (``{"sha256": …}`` or None for a latents-only cache) and ``text_len``."""
    source: str = field(default="", compare=False)
    """Where it comes from (a cache directory, encoders, a checkpoint), for error messages."""

    @classmethod
    def of(
        cls,
        autoencoder: FSAE,
        text_encoder: str | Path | None,
        image_encoder: str | Path | None,
        text_len: int,
        source: str,
    ) -> LatentSpace:
        """The latent space of an FSAE and the text / image encoder folders (None for a latents-only cache): the
        one way caches and on-the-fly encoding describe theirs. Hashes the FSAE encoder's weights (~1.5 s for
        the paper FSAE) and the encoder folders."""
        fields = {
            "autoencoder": fsae_latent_space(autoencoder),
            "text_encoder": None if text_encoder is None else {"sha256": folder_sha256(text_encoder)},
            "image_encoder": None if image_encoder is None else {"sha256": folder_sha256(image_encoder)},
            "text_len": text_len,
        }
        return cls(jsonable(fields), source)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str) -> LatentSpace:
        """From a saved DiT's ``record()``; ``where`` names the folder or checkpoint."""
        return cls(dict(record["fields"]), f"{where} (trained on {record['source']})")

    def record(self) -> dict[str, Any]:
        """What a saved DiT records (``records["latent_space"]``)."""
        return {"fields": self.fields, "source": self.source}

    def differences(self, other: LatentSpace) -> list[str]:
        """Dotted names of the fields that differ (``autoencoder.encoder_sha256``, ``text_len``, …)."""
        return differences(self.fields, other.fields)

    def check_same(self, other: LatentSpace, fix: str) -> None:
        """Raise a ValueError naming both sources, the differing fields and ``fix`` unless they are equal."""
        differing = self.differences(other)
        if differing:
            raise ValueError(
                f"{self.source} and {other.source} are in different latent spaces ({differing} differ: another "
                f"FSAE encoder, text / image encoder or text length); {fix}"
            )
