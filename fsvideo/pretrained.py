"""Saved-model folders: the one file format of every network, and the one loader that reads it.

A saved-model folder is the Hugging Face layout users know from diffusers::

    config.json                      {"class_name": "DiT", "format": 1, "config": {…DiTConfig fields…},
                                      "records": {"latent_stats": …, "latent_space": …}}
    model.safetensors                the weights, when they fit in one shard, or
    model-00001-of-00004.safetensors … + model.safetensors.index.json   ({"metadata": {"total_size": …},
                                      "weight_map": {tensor name: shard file}}), above ``max_shard_bytes``

``records`` carries what a network needs beside its weights to be used correctly: a DiT's latent
statistics and the latent space it trained in, a distilled refiner's step count and shift, … (json types).

Training runs hold their networks in Lightning checkpoints (one file, or a distributed checkpoint folder whose
``meta.pt`` holds the manifest: ``fsvideo.checkpoints``). Each checkpoint names them in a *manifest*
(``checkpoint["networks"]``, written by ``lightning_modules.base.TrainingStage``): per network its class,
config, records and the state-dict prefixes of its trained and EMA weights. ``read_snapshot`` turns a
folder, a run directory (its ``checkpoints/last.ckpt``) or a checkpoint into the same in-memory
``NetworkSnapshot``, so ``load_network`` — used by ``init_from``, the pipeline, the latent cache,
teachers and reward models alike — is the one loader, and ``fsvideo export`` writes snapshots to folders.

Weights are never read whole when they need not be: safetensors shards and checkpoints are memory-mapped,
a network is built on the meta device and materialised tensor by tensor, and a network whose parameters
are FSDP2 ``DTensor`` shards reads only its own rows of each tensor (``load_weights``).

Public API:
    PretrainedNetwork          mixin: ``save_pretrained(folder, records=None)``, ``from_pretrained(folder)``
    NetworkSnapshot            class name, config, weights (lazy), records, source
    snapshot_of(network, records=None) -> NetworkSnapshot      a network in memory (FSDP shards gathered)
    read_snapshot(path, name=None, ema=True) -> NetworkSnapshot
    read_records(path, name=None) -> dict             records only (no weights read)
    snapshot_names(path) -> list[str]                 the networks a folder / run / checkpoint holds
    save_snapshot(snapshot, folder, max_shard_bytes) -> Path
    load_network(path, expected=None, name=None, ema=True, device="cpu") -> nn.Module (eval, frozen)
    load_weights(network, weights, source)            copy weights into a network (DTensor shards too)
    network_manifest_entry(network, prefix, ema_prefix, records) -> dict   for checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from fsvideo.checkpoints import (
    WEIGHTS_PREFIX,
    DistributedCheckpointWeights,
    find_run_checkpoint,
    is_distributed_checkpoint,
    load_checkpoint_metadata,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
FORMAT = 1
"""Version of the folder layout written in ``config.json``."""
MANIFEST_KEY = "networks"
"""Checkpoint entry naming the networks of a run (see the module docstring)."""
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
"""Shard size above which weights are split (diffusers' default, 5 GiB): a 14B DiT in bf16 is ~6 shards."""

_NETWORK_CLASSES: dict[str, type[nn.Module]] = {}
Network = TypeVar("Network", bound=nn.Module)


class PretrainedNetwork:
    """Mixin of every network class: a ``config`` dataclass attribute, built by ``cls(config)``.

    Subclasses name their config class (``config_class = DiTConfig``) and are registered by class name, so a
    folder's ``config.json`` says which class to build.
    """

    config_class: ClassVar[type]
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # FSDP2's fully_shard swaps a module's class for a generated subclass: only classes that name their own
        # config are network classes
        if "config_class" in cls.__dict__:
            _NETWORK_CLASSES[cls.__name__] = cls

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        records: Mapping[str, Any] | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> Path:
        """Write ``folder`` (config.json + safetensors, sharded above ``max_shard_bytes``); returns it."""
        assert isinstance(self, nn.Module)
        return save_snapshot(snapshot_of(self, records), folder, max_shard_bytes)

    @classmethod
    def from_pretrained(
        cls: type[Network],
        path: str | os.PathLike,
        name: str | None = None,
        ema: bool = True,
        device: str | torch.device = "cpu",
    ) -> Network:
        """A network of this class from a saved-model folder, a run directory or a checkpoint (``load_network``)."""
        return load_network(path, expected=cls, name=name, ema=ema, device=device)


def snapshot_of(network: nn.Module, records: Mapping[str, Any] | None = None) -> NetworkSnapshot:
    """A network in memory as a snapshot. FSDP2-sharded tensors are gathered (a collective: call it on every
    rank, then save on one)."""
    weights = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in network.state_dict().items()}
    name = network_class_name(network)
    return NetworkSnapshot(
        name, config_to_json(network.config), weights, dict(records or {}), f"a {name} in memory"
    )


def network_class_name(network: nn.Module) -> str:
    """The registered class of a network, also when FSDP2 or compile wrapped its class."""
    for cls in type(network).__mro__:
        if "config_class" in cls.__dict__:
            return cls.__name__
    raise ValueError(f"{type(network).__name__} is not a saved-model network (it defines no config_class).")


def config_to_json(config: Any) -> dict[str, Any]:
    """A config dataclass as json types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


@dataclass
class NetworkSnapshot:
    """One network as data: what a saved-model folder holds, and what a run's checkpoint holds per network."""

    class_name: str
    """Name of a ``PretrainedNetwork`` class (``DiT``, ``FSAE``, …)."""
    config: dict[str, Any]
    """Fields of the class's config dataclass, json types."""
    weights: Mapping[str, torch.Tensor]
    """Tensor name → tensor; read lazily (memory-mapped) when the snapshot comes from a file."""
    records: dict[str, Any] = field(default_factory=dict)
    """Metadata the network is used with (latent statistics, latent space, distillation steps, …)."""
    source: str = ""
    """Where it was read from, for error messages."""

    def network_class(self) -> type[nn.Module]:
        if self.class_name not in _NETWORK_CLASSES:
            _import_network_classes()
        if self.class_name not in _NETWORK_CLASSES:
            raise ValueError(
                f"{self.source} holds a {self.class_name!r}, which this version of fsvideo cannot build "
                f"(it knows {sorted(_NETWORK_CLASSES)})."
            )
        return _NETWORK_CLASSES[self.class_name]

    def build_config(self) -> Any:
        config_class = self.network_class().config_class
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(self.config) - known)
        if unknown:
            raise ValueError(
                f"{self.source}: config fields {unknown} are unknown to {config_class.__name__}; the network was "
                "saved by another version of fsvideo."
            )
        try:
            return config_class(**self.config)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{self.source}: its config does not build a {self.class_name} ({error})."
            ) from None


def _import_network_classes() -> None:
    """Import the modules that define network classes, so that they register themselves."""
    import fsvideo.ae  # noqa: F401
    import fsvideo.dit  # noqa: F401
    import fsvideo.rewards  # noqa: F401
    import fsvideo.upsampler  # noqa: F401


# ---- reading ------------------------------------------------------------------------------------------------


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """The tensors of one or more safetensors files, each read (memory-mapped) when asked for."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self._files = dict(files)  # tensor name → file

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, reading only those bytes."""
        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_slice(key)[start:stop]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} could not be read as {what} ({error}); re-export the network.") from None


def _read_folder(folder: Path) -> NetworkSnapshot:
    meta = _read_json(folder / CONFIG_FILE, "a saved-model config")
    if not isinstance(meta, dict) or "class_name" not in meta or "config" not in meta:
        raise ValueError(
            f"{folder / CONFIG_FILE} is not an fsvideo saved-model config (no class_name / config); it may be a "
            "diffusers or transformers folder: convert such weights first (fsvideo.convert)."
        )
    if meta.get("format", FORMAT) > FORMAT:
        raise ValueError(f"{folder} was saved in format {meta['format']}; this fsvideo reads up to {FORMAT}.")
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "a safetensors index").get("weight_map", {})
        files = {name: folder / file for name, file in weight_map.items()}
    elif (folder / WEIGHTS_FILE).is_file():
        files = {name: folder / WEIGHTS_FILE for name in _safetensors_keys(folder / WEIGHTS_FILE)}
    else:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}; the folder is incomplete.")
    for file in sorted(set(files.values())):
        _safetensors_keys(file)  # a torn or missing shard fails here, naming the file
    return NetworkSnapshot(
        meta["class_name"], meta["config"], SafetensorsWeights(files), meta.get("records", {}), str(folder)
    )


def _safetensors_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file; the saved-model folder is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} could not be read as safetensors ({error}); the file is truncated or not a weight file: "
            "export the network again."
        ) from None


def _manifest(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    manifest = checkpoint.get(MANIFEST_KEY) if isinstance(checkpoint, Mapping) else None
    if not manifest:
        raise ValueError(
            f"{path} names no networks (no '{MANIFEST_KEY}' entry): it is not a checkpoint written by "
            "`fsvideo fit` of this version. Pass a saved-model folder, or a run directory / checkpoint of a run."
        )
    return manifest


def _pick_name(
    names: list[str], name: str | None, path: Path, expected: type | None = None, classes=None
) -> str:
    if name is not None:
        if name not in names:
            raise ValueError(f"{path} holds no network {name!r}; it holds {names}.")
        return name
    if len(names) == 1:
        return names[0]
    if expected is not None and classes is not None:
        matching = [n for n in names if classes[n] == expected.__name__]
        if len(matching) == 1:
            return matching[0]
    raise ValueError(
        f"{path} holds several networks {names}; say which one (name=…, or --name in fsvideo export)."
    )


def is_saved_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def snapshot_names(path: str | os.PathLike) -> list[str]:
    """The networks a saved-model folder (one, named after the folder), run or checkpoint holds."""
    path = Path(path)
    if is_saved_model_folder(path):
        return [path.name]
    checkpoint_path = find_run_checkpoint(path)
    return list(_manifest(load_checkpoint_metadata(checkpoint_path), checkpoint_path))


def read_snapshot(
    path: str | os.PathLike, name: str | None = None, ema: bool = True, expected: type | None = None
) -> NetworkSnapshot:
    """The network saved at ``path``: a saved-model folder, a run directory or a checkpoint.

    Args:
        name: which network of a run (``dit``, ``autoencoder``, …); needed only when the run holds several and
            ``expected`` does not tell them apart.
        ema: from a run, take the EMA weights when it keeps them (what validation and export use).
        expected: the class wanted; picks the network of a run by class.
    """
    path = Path(path)
    if is_saved_model_folder(path):
        return _read_folder(path)
    checkpoint_path = find_run_checkpoint(path)
    checkpoint = load_checkpoint_metadata(checkpoint_path, expected="a checkpoint of a run")
    manifest = _manifest(checkpoint, checkpoint_path)
    classes = {n: entry["class_name"] for n, entry in manifest.items()}
    name = _pick_name(list(manifest), name, checkpoint_path, expected, classes)
    entry = manifest[name]
    prefix = entry["ema_weights"] if ema and entry.get("ema_weights") else entry["weights"]
    prefix = prefix + "."
    if is_distributed_checkpoint(checkpoint_path):  # read tensor by tensor from every rank's shard files
        weights = DistributedCheckpointWeights(checkpoint_path, WEIGHTS_PREFIX + prefix)
    else:
        state = checkpoint.get("state_dict", {})
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return NetworkSnapshot(
        entry["class_name"],
        entry["config"],
        weights,
        dict(entry.get("records", {})),
        f"{checkpoint_path} [{name}]",
    )


def read_records(
    path: str | os.PathLike, name: str | None = None, expected: type | None = None
) -> dict[str, Any]:
    """The records of a saved network (latent statistics, latent space, …) without reading its weights."""
    return read_snapshot(path, name=name, expected=expected).records


# ---- writing ------------------------------------------------------------------------------------------------


def save_snapshot(
    snapshot: NetworkSnapshot, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write ``snapshot`` as a saved-model folder. Files are written under temporary names and renamed, the
    config last, so a folder with a ``config.json`` is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in snapshot.weights:
        tensor = snapshot.weights[key].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.clone() if _shares_storage(tensor, shards[-1]) else tensor
        size += nbytes
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE, folder / CONFIG_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(shards[0], str(tmp)))
    else:
        weight_map, total = {}, 0
        for index, shard in enumerate(shards, start=1):
            file = SHARD_FILE.format(index=index, count=len(shards))
            _write_atomic(folder / file, lambda tmp, shard=shard: save_file(shard, str(tmp)))
            weight_map.update(dict.fromkeys(shard, file))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        index_text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        _write_atomic(folder / INDEX_FILE, lambda tmp: tmp.write_text(index_text + "\n"))
    meta = {
        "class_name": snapshot.class_name,
        "format": FORMAT,
        "config": snapshot.config,
        "records": snapshot.records,
    }
    text = json.dumps(meta, indent=1) + "\n"
    _write_atomic(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return folder


def _shares_storage(tensor: torch.Tensor, shard: Mapping[str, torch.Tensor]) -> bool:
    """safetensors refuses tensors that share memory (tied or viewed weights): those are cloned."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == pointer for t in shard.values())


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- building -----------------------------------------------------------------------------------------------


def load_weights(
    network: nn.Module,
    weights: Mapping[str, torch.Tensor],
    source: str,
    may_add: Callable[[str], bool] | None = None,
) -> None:
    """Copy ``weights`` into ``network``'s parameters and buffers, names and shapes checked.

    ``may_add(name)`` marks the network's tensors that ``weights`` may lack (parts the network adds to the saved
    architecture, such as Layer Memory routers on a plain DiT); they keep the network's values.

    A parameter that is an FSDP2 ``DTensor`` sharded on dim 0 takes only its own rows, read with
    ``weights.rows(name, start, stop)`` when the weights offer it (safetensors), so each rank reads its part.
    """
    own = network.state_dict()
    mismatched = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    missing = sorted(k for k in set(own) - set(weights) if may_add is None or not may_add(k))
    unexpected = sorted(set(weights) - set(own))
    if mismatched or missing or unexpected:
        raise ValueError(
            f"{source} does not fit this {type(network).__name__}: shape mismatch {mismatched[:5]}, missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}. The architecture in the config must equal the one the "
            "weights were trained with."
        )
    with torch.no_grad():
        for key, target in own.items():
            if key not in weights:
                continue
            if isinstance(target, DTensor):
                local = target.to_local()
                placement = target.placements[0] if len(target.placements) == 1 else None
                if not (isinstance(placement, Shard) and placement.dim == 0):
                    raise ValueError(f"{key}: only FSDP2 dim-0 shards can be loaded, got {target.placements}")
                rows = -(-target.shape[0] // target.device_mesh.size())  # torch.chunk's split
                start = min(target.device_mesh.get_local_rank() * rows, target.shape[0])
                stop = start + local.shape[0]
                reader = getattr(weights, "rows", None)
                value = reader(key, start, stop) if reader is not None else weights[key][start:stop]
                local.copy_(value)
            else:
                target.copy_(weights[key])


def load_network(
    path: str | os.PathLike,
    expected: type[Network] | None = None,
    name: str | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
) -> Network:
    """Build the network saved at ``path`` (folder, run directory or checkpoint; see ``read_snapshot``), in eval
    mode with ``requires_grad`` off: built on the meta device, materialised on ``device`` and filled tensor by
    tensor. ``expected`` refuses a network of another class with a one-line error."""
    snapshot = read_snapshot(path, name=name, ema=ema, expected=expected)
    # a class whose folders keep part of the weights in another library's format (reward models: a transformers
    # backbone in a subfolder) reads its own folders; None leaves the folder to the generic path
    cls = snapshot.network_class()
    if expected is not None and not issubclass(cls, expected):
        raise ValueError(f"{snapshot.source} holds a {snapshot.class_name}, not a {expected.__name__}.")
    folder_loader = getattr(cls, "load_saved_folder", None)
    if folder_loader is not None and is_saved_model_folder(path):
        network = folder_loader(Path(path), snapshot, device)
        if network is not None:
            return network.eval().requires_grad_(False)
    return build_network(snapshot, expected, device)


def build_network(
    snapshot: NetworkSnapshot, expected: type[Network] | None = None, device: str | torch.device = "cpu"
) -> Network:
    """The network of ``snapshot`` in eval mode with ``requires_grad`` off, on ``device`` and filled from the
    snapshot. ``device="meta"`` leaves it without storage: ``to_empty`` and ``load_weights(network,
    snapshot.weights, snapshot.source)`` fill it later — after the parallelize layer has sharded it, each rank
    reads only its own rows (``FrozenNetworks.add_saved``)."""
    cls = snapshot.network_class()
    if expected is not None and not issubclass(cls, expected):
        raise ValueError(f"{snapshot.source} holds a {snapshot.class_name}, not a {expected.__name__}.")
    config = snapshot.build_config()
    with torch.device("meta"):  # no initialisation to waste: every tensor comes from the snapshot
        network = cls(config)
    if torch.device(device).type != "meta":
        network.to_empty(device=device)
        load_weights(network, snapshot.weights, snapshot.source)
    return network.eval().requires_grad_(False)


def network_manifest_entry(
    network: PretrainedNetwork,
    prefix: str,
    ema_prefix: str | None = None,
    records: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a checkpoint's manifest says of one network: class, config, records and weight prefixes."""
    return {
        "class_name": network_class_name(network),
        "config": config_to_json(network.config),
        "weights": prefix,
        "ema_weights": ema_prefix,
        "records": dict(records or {}),
    }
