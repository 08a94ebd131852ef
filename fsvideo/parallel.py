"""Parallelism applied to networks from outside their classes (torchtitan's split; DESIGN.md §4a, §6).

A network in ``fsvideo/`` holds no parallelism. A training stage hands ``parallelize`` its networks in two
lists — those it trains (with their EMA twins) and frozen ones (a teacher, the base DiT under a refiner, a
reward model) — and ``parallelize`` transforms them in place, in this fixed order (torchtitan's):

1. activation checkpointing, trained networks only: each block's activations are recomputed in the backward
   pass instead of kept. It goes first so that compile (2) sees the checkpointed block and FSDP (3) gathers
   a block's parameters again for its recomputation.
2. ``torch.compile`` per block, every network: blocks of the same structure share one graph (Layer Memory's
   blocks differ: block l routes over l sources, so each gets its own), and the code between blocks
   (embeddings, Layer Memory history, head) stays eager, so no graph spans the whole network.
3. FSDP2 over ``mesh``: ``fully_shard`` on each block, then on the root, which takes the remaining
   parameters (embeddings, head) as one more group. Blocks first, so each block is one all-gather that
   overlaps the previous block's compute. Frozen networks are sharded forward-only (resharded after each
   block's forward; with no parameter needing a gradient, nothing is reduced) or, with
   ``frozen="replicate"``, left whole on every rank.

Context parallel (Ulysses sequence sharding) will come first, before 1: it changes what a block computes,
so checkpointing and compile must see it, and it will take its own dimension of the same ``mesh``.

Contract of a network: its repeated blocks are ``network.blocks``, an ``nn.ModuleList`` that ``forward``
calls in turn (``fsvideo.dit.DiT`` does). A block may be called again with the same arguments for
recomputation, so an argument that ``forward`` mutates later (the DiT's Layer Memory history) must be
passed as a snapshot.

Everything is applied without wrapping modules: ``state_dict`` and ``named_parameters`` names stay those of
the plain network, so checkpoints and weight loading do not depend on the parallelism. A network built on
the meta device can be parallelized before it is materialised (``to_empty`` + ``init_weights`` or a weight
load); that is how a 14B network is sharded without any process holding all of it.

Public API:
    ParallelConfig             what to apply (field docstrings)
    parallelize(trained, frozen, config, mesh=None)
    apply_activation_checkpointing(network), apply_compile(network, backend="inductor"),
    apply_fsdp(network, mesh, mixed_precision=None, reshard_after_forward=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# Marks a network ``parallelize`` has transformed, with the config it used: Lightning calls a module's
# ``configure_model`` at every trainer entry point, and a block cannot be checkpointed or sharded twice.
_APPLIED = "_fsvideo_parallel_config"


@dataclass
class ParallelConfig:
    """How a stage's networks are checkpointed, compiled and sharded (``parallelize``)."""

    activation_checkpointing: bool = False
    """Recompute each block of the trained networks in the backward pass instead of keeping its
    activations: about one more forward of compute for activation memory of one block per network."""
    compile: bool = False
    """Compile each block of every network with ``torch.compile`` (inductor); the first steps are slower
    while it compiles."""
    fsdp: bool = False
    """Shard every network with FSDP2 (``fully_shard`` per block, then the root) over the data-parallel
    ranks; needs a device mesh (``trainer.strategy: ModelParallelStrategy``)."""
    mixed_precision: Literal["bf16"] | None = None
    """With ``fsdp``: "bf16" gathers and computes with bf16 parameters while the sharded parameters, the
    optimizer and the gradient reduction stay float32 (``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)``): half the all-gather traffic. None gathers parameters in their own dtype
    (autocast from ``trainer.precision`` still applies)."""
    reshard_after_forward: bool = True
    """With ``fsdp``: free each trained block's gathered parameters after its forward and gather them again
    for its backward (least memory); False keeps them until the backward (one all-gather less per block,
    one unsharded network more of memory). Frozen networks always reshard."""
    frozen: Literal["shard", "replicate"] = "shard"
    """With ``fsdp``, frozen networks are: "shard" — sharded like the trained ones and gathered block by
    block in forward; "replicate" — left whole on every rank (no all-gathers; for networks small enough)."""

    def __post_init__(self) -> None:
        if self.mixed_precision not in (None, "bf16"):
            raise ValueError(f'mixed_precision must be "bf16" or None, got {self.mixed_precision!r}.')
        if self.mixed_precision is not None and not self.fsdp:
            raise ValueError(
                "mixed_precision sets FSDP's parameter dtype and needs fsdp: true; without FSDP use "
                "trainer.precision: bf16-mixed."
            )
        if self.frozen not in ("shard", "replicate"):
            raise ValueError(f'frozen must be "shard" or "replicate", got {self.frozen!r}.')

    def mixed_precision_policy(self) -> MixedPrecisionPolicy | None:
        if self.mixed_precision is None:
            return None
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _blocks(network: nn.Module) -> nn.ModuleList:
    blocks = getattr(network, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"{type(network).__name__} does not expose its repeated blocks as `blocks` (a non-empty "
            "nn.ModuleList called in turn by forward), which fsvideo.parallel checkpoints, compiles and "
            "shards one by one; give the network such an attribute."
        )
    return blocks


def apply_activation_checkpointing(network: nn.Module) -> None:
    """Recompute each of ``network.blocks`` in the backward pass (non-reentrant ``torch.utils.checkpoint``
    installed as hooks, so parameter names are unchanged; without grad mode a block runs as usual)."""
    for block in _blocks(network):
        checkpoint(block)


def apply_compile(network: nn.Module, backend: str = "inductor") -> None:
    """Compile each of ``network.blocks`` in place (``nn.Module.compile``: no wrapper module, names
    unchanged); ``backend`` "aot_eager" or "eager" helps to tell an inductor fault from a tracing one."""
    blocks = _blocks(network)
    # Every block runs the same ``forward`` code, whose graphs dynamo caps at ``recompile_limit`` (8). Blocks
    # that differ (Layer Memory: block l routes over l sources) each need a graph, and one more once a new
    # bucket makes shapes dynamic; without the room, the blocks past the cap would silently run eagerly.
    torch._dynamo.config.recompile_limit += 2 * len(blocks)
    for block in blocks:
        block.compile(backend=backend)


def apply_fsdp(
    network: nn.Module,
    mesh: DeviceMesh,
    mixed_precision: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """``fully_shard`` each of ``network.blocks``, then ``network`` (its remaining parameters), over
    ``mesh`` (1-D: FSDP; 2-D (replicate, shard): HSDP)."""
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision
    for block in _blocks(network):
        fully_shard(block, **kwargs)
    fully_shard(network, **kwargs)


def parallelize(
    trained: Sequence[nn.Module],
    frozen: Sequence[nn.Module],
    config: ParallelConfig,
    mesh: DeviceMesh | None = None,
) -> None:
    """Apply ``config`` to a stage's networks in place, in the module docstring's order.

    Args:
        trained: the networks the stage trains, and those that must be laid out exactly like them: an EMA
            twin, whose weights are averaged shard by shard into its network's (checkpointing a twin costs
            nothing, as it never runs a backward).
        frozen: networks that never train: set to eval with ``requires_grad`` off; gradients may still flow
            through them to their inputs (a reward model). One that gets no per-block step (``compile`` off,
            and not sharded) needs no ``blocks``.
        config: what to apply.
        mesh: the devices FSDP shards over; required with ``config.fsdp``.

    A network this function has already transformed with the same config is left as it is (Lightning calls
    ``configure_model`` once per trainer entry point); with another config it is an error.
    """
    if config.fsdp and mesh is None:
        raise ValueError(
            "ParallelConfig.fsdp needs a device mesh to shard over: run with trainer.strategy: "
            "lightning.pytorch.strategies.ModelParallelStrategy, or set fsdp: false."
        )
    plans = []
    for network, trains in [(n, True) for n in trained] + [(n, False) for n in frozen]:
        applied = getattr(network, _APPLIED, None)
        if applied is not None:
            if applied != config:
                raise ValueError(
                    f"{type(network).__name__} was already parallelized with {applied}; it cannot be "
                    f"parallelized again with {config}."
                )
            continue
        checkpoints = config.activation_checkpointing and trains
        shards = config.fsdp and (trains or config.frozen == "shard")
        if checkpoints or config.compile or shards:
            _blocks(network)  # every network's contract is checked before any is changed
        plans.append((network, trains, checkpoints, shards))
    for network, trains, checkpoints, shards in plans:
        if not trains:
            network.requires_grad_(False).eval()
        if checkpoints:
            apply_activation_checkpointing(network)
        if config.compile:
            apply_compile(network)
        if shards:
            apply_fsdp(
                network,
                mesh,
                config.mixed_precision_policy(),
                reshard_after_forward=config.reshard_after_forward or not trains,
            )
        setattr(network, _APPLIED, config)
