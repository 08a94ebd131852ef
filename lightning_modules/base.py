"""What every training stage shares: optimizer settings, EMA, and the guarded optimizer step.

Stages use manual optimization so that one code path serves a single network (DiT) and
generator/discriminator pairs (FSAE stage 2+). The guarded step skips an update whose loss or
gradients are not finite, counts it, and stops the run after too many in a row.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from fsvideo.parallel import ParallelConfig, device_mesh, parallelize
from fsvideo.pretrained import MANIFEST_KEY, network_manifest_entry, save_snapshot, snapshot_of
from lightning_modules.ema import update_ema
from lightning_modules.frozen import FrozenNetworks


@dataclass
class OptimizerConfig:
    """AdamW settings shared by every stage."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (the paper's stages use 0.9, 0.95)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr`` over this many optimizer steps; constant afterwards."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping (the norm is still checked)."""

    def build(self, parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = torch.optim.AdamW(
            parameters, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        warmup = max(self.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return optimizer, scheduler


@dataclass
class SavedNetwork:
    """A network a stage trains, as checkpoints name it and ``fsvideo export`` writes it."""

    network: nn.Module
    """The trained network (a ``fsvideo.pretrained.PretrainedNetwork``)."""
    ema: nn.Module | None = None
    """Its EMA twin, exported by default when kept."""
    records: dict[str, Any] = field(default_factory=dict)
    """What it must be used with (json types): latent statistics, latent space, distilled step count, …"""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class TrainingStage(L.LightningModule):
    """Base LightningModule of all stages.

    Args:
        ema_decay: decay of the weights' moving average; 0 disables EMA.
        max_nonfinite_in_row: stop with a clear error after this many consecutive skipped steps.
    """

    def __init__(self, ema_decay: float = 0.999, max_nonfinite_in_row: int = 20) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.ema_decay = ema_decay
        self.max_nonfinite_in_row = max_nonfinite_in_row
        self.nonfinite_in_row = 0
        self.register_buffer("skipped_nonfinite", torch.zeros((), dtype=torch.long), persistent=True)
        self.frozen = FrozenNetworks()
        """Networks used but not trained (``lightning_modules.frozen``): out of checkpoints and optimizers."""
        self._context_parallel_mesh: DeviceMesh | None = None
        """The (data_parallel, context_parallel) mesh, built once by the first ``parallelize``."""

    def _apply(self, fn, recurse: bool = True):
        # device moves and casts of the module reach the frozen networks it keeps outside its tree
        super()._apply(fn, recurse)
        self.frozen.apply(fn)
        return self

    def guarded_step(
        self,
        loss: torch.Tensor,
        optimizer,
        parameters: list[nn.Parameter],
        grad_clip_norm: float | None,
        scheduler=None,
        counts_as_step: bool = True,
        accumulated: bool = False,
    ) -> bool:
        """Backward, check, clip and step one optimizer. Returns False when the step was skipped.

        ``accumulated=True``: the caller zeroed the gradients and ran the backward passes itself (several losses
        accumulated, each freeing its graph: GRPO's per-step losses); ``loss`` is their total, for the check.

        ``counts_as_step=False`` steps the raw torch optimizer so that Lightning's ``global_step``
        counts generator updates only (Lightning counts every ``LightningOptimizer.step`` call).
        One host sync per call decides the skip: a non-finite update must never reach the weights.
        """
        if not accumulated:
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            parameters, grad_clip_norm if grad_clip_norm is not None else math.inf
        )
        if isinstance(grad_norm, DTensor):  # parameters sharded with FSDP2: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_nonfinite += 1
            self.nonfinite_in_row += 1
            self.log("train/skipped_nonfinite", self.skipped_nonfinite.float(), on_step=True)
            if self.nonfinite_in_row >= self.max_nonfinite_in_row:
                self._raise_nonfinite(loss)
            return False
        self.nonfinite_in_row = 0
        if counts_as_step:
            optimizer.step()
        else:
            getattr(optimizer, "optimizer", optimizer).step()
        if scheduler is not None:
            scheduler.step()
        self.log("train/grad_norm", grad_norm, on_step=True)
        return True

    def _raise_nonfinite(self, loss: torch.Tensor) -> None:
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise NonFiniteError(
            f"{self.nonfinite_in_row} consecutive steps had a non-finite loss or gradient "
            f"(last loss {loss.detach().float().item()}) at global step {self.global_step}. Likely causes: "
            "a learning rate too high, fp16 overflow (use bf16-mixed or 32-true precision), or corrupt "
            f"input data. Last good checkpoint: {last}. Lower the LR and resume with --ckpt_path."
        )

    def saved_networks(self) -> dict[str, SavedNetwork]:
        """The networks this stage trains, by the name they are exported under (``dit``, ``autoencoder``, …).

        Every checkpoint names them in its manifest (``fsvideo.pretrained``), so a run is read by what it says it
        holds, not by the attribute names of the module that wrote it."""
        return {}

    def network_manifest(self) -> dict[str, Any]:
        prefixes = {id(module): name for name, module in self.named_modules() if name}
        manifest = {}
        for name, saved in self.saved_networks().items():
            ema_prefix = None if saved.ema is None else prefixes[id(saved.ema)]
            manifest[name] = network_manifest_entry(
                saved.network, prefixes[id(saved.network)], ema_prefix, saved.records
            )
        return manifest

    def export_networks(self, out: str | Path, raw: bool = False) -> dict[str, Path]:
        """Write each network of ``saved_networks`` as a saved-model folder ``out/<name>/`` (EMA weights where
        kept, unless ``raw``); call on every rank (sharded weights are gathered), rank 0 writes."""
        written = {}
        for name, saved in self.saved_networks().items():
            network = saved.network if raw or saved.ema is None else saved.ema
            snapshot = snapshot_of(network, saved.records)
            if self.trainer.is_global_zero:
                written[name] = save_snapshot(snapshot, Path(out) / name)
        return written

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # called on every rank; only rank 0's dict is written, so every rank's generators are gathered into it
        checkpoint[MANIFEST_KEY] = self.network_manifest()
        checkpoint["rng_states"] = capture_rng_states()
        rank, world_size = _rank_and_world()
        if world_size > 1:
            per_rank: list[Any] = [None] * world_size
            dist.all_gather_object(per_rank, checkpoint["rng_states"])
            checkpoint["rng_states_per_rank"] = per_rank
        checkpoint["nonfinite_in_row"] = self.nonfinite_in_row

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # each rank its own generators when the run resumes on as many processes; otherwise rank 0's (the data
        # position is re-split then too, so no rank repeats its old stream anyway)
        rank, world_size = _rank_and_world()
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank is not None and len(per_rank) == world_size:
            restore_rng_states(per_rank[rank])
        elif "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
        self.nonfinite_in_row = checkpoint.get("nonfinite_in_row", 0)

    def update_ema(self, ema: nn.Module | None, network: nn.Module) -> None:
        if ema is not None:
            update_ema(ema, network, self.ema_decay)

    def parallelize(self, trained: list[nn.Module], frozen: list[nn.Module], config: ParallelConfig) -> None:
        """``fsvideo.parallel.parallelize`` over this run's ranks (from ``configure_model``): FSDP over the
        data-parallel ranks, or with ``context_parallel`` over a (data_parallel, context_parallel) mesh of all
        ranks built here (Lightning's mesh is (data_parallel, tensor_parallel) with tensor parallel 1). Then the frozen
        networks held on the meta device (``FrozenNetworks.add_saved(shard=True)``) get their own shards' weights."""
        mesh = None
        if config.fsdp or config.context_parallel > 1:
            mesh = self._parallel_mesh(config)
        parallelize(trained, frozen, config, mesh)
        if config.fsdp:
            self.frozen.materialise(self.trainer.strategy.root_device)

    def _parallel_mesh(self, config: ParallelConfig) -> DeviceMesh:
        mesh = self.device_mesh
        if mesh is None:
            raise ValueError(
                "model.init_args.parallel.fsdp: true and context_parallel > 1 need trainer.strategy: "
                "lightning.pytorch.strategies.ModelParallelStrategy (tensor_parallel_size: 1), or fsdp: false "
                "and context_parallel: 1."
            )
        if mesh.ndim > 1:  # ModelParallelStrategy's (data_parallel, tensor_parallel) mesh
            if mesh["tensor_parallel"].size() != 1:
                raise ValueError(
                    f"fsdp shards over data-parallel ranks only, but the mesh is {tuple(mesh.shape)} "
                    f"{mesh.mesh_dim_names}; set trainer.strategy.init_args.tensor_parallel_size: 1 and "
                    "data_parallel_size to the number of GPUs (context parallel takes its ranks from them: "
                    "model.init_args.parallel.context_parallel)."
                )
            mesh = mesh["data_parallel"]
        if config.context_parallel == 1:
            return mesh
        if not config.fsdp:
            raise ValueError(
                "context_parallel > 1 trains with model.init_args.parallel.fsdp: true: FSDP reduces the "
                "gradients over the ranks of the mesh."
            )
        if self._context_parallel_mesh is None:
            self._context_parallel_mesh = device_mesh(
                self.trainer.strategy.root_device.type, mesh.size(), config.context_parallel
            )
        return self._context_parallel_mesh


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types ``torch.load(weights_only=True)`` reads."""
    numpy_state = np.random.get_state()
    version, mt_state, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "python": [*mt_state, version, gauss_next],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    python_state = states["python"]
    random.setstate((python_state[-2], tuple(python_state[:-2]), python_state[-1]))
    np.random.set_state(
        ("MT19937", states["numpy"]["keys"].numpy().astype(np.uint32), states["numpy"]["pos"], 0, 0.0)
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
