"""Parallelism applied to networks from outside their classes (torchtitan's split; DESIGN.md §4a, §6).

A network in ``fsvideo/`` holds no parallelism. A training stage hands ``parallelize`` its networks in two
lists — those it trains (with their EMA twins) and frozen ones (a teacher, the base DiT under a refiner, a
reward model) — and ``parallelize`` transforms them in place, in this fixed order (torchtitan's):

0. context parallel (Ulysses sequence sharding) over the mesh's "context_parallel" dimension, every network:
   the tokens are split across the cp ranks after patchify, each rank takes its rows of the RoPE table, and
   self-attention trades sequence for heads with one all-to-all before the kernel and one after (the
   kernel, flash-attn or SDPA, runs unchanged on all tokens of ``heads / cp`` heads). Cross-attention
   keys/values (text, image) are small and computed whole on every rank; Layer Memory's routers are per
   token, hence local; the head's output is all-gathered before unpatchify, so every cp rank returns the
   whole prediction and computes the loss as one process would. It goes first because it changes what a
   block computes: checkpointing recomputes the all-to-alls and compile traces them.
1. activation checkpointing, trained networks only: each block's activations are recomputed in the backward
   pass instead of kept. It comes before compile (2), which then sees the checkpointed block, and FSDP (3)
   gathers a block's parameters again for its recomputation.
2. ``torch.compile`` per block, every network: blocks of the same structure share one graph (Layer Memory's
   blocks differ: block l routes over l sources, so each gets its own), and the code between blocks
   (embeddings, Layer Memory history, head) stays eager, so no graph spans the whole network.
3. FSDP2 over ``mesh``: ``fully_shard`` on each block, then on the root, which takes the remaining
   parameters (embeddings, head) as one more group. Blocks first, so each block is one all-gather that
   overlaps the previous block's compute. Frozen networks are sharded forward-only (resharded after each
   block's forward; with no parameter needing a gradient, nothing is reduced) or, with
   ``frozen="replicate"``, left whole on every rank.

Mesh: 1-D (the data-parallel ranks) without context parallel; with ``context_parallel`` = cp > 1 a 2-D
``("data_parallel", "context_parallel")`` mesh, cp innermost so that a cp group is cp consecutive ranks (one
node's fast links), built by ``device_mesh``. The cp ranks of one group see the same sample, so data is split
by the data-parallel coordinate only (``data_parallel_rank_and_size``), while FSDP shards over all
ranks of the mesh (flattened dp×cp): ranks that compute together also share the weights' memory.

Gradients under context parallel: the all-gather before unpatchify has a reduce-scatter (sum) as its backward,
so every cp rank sends back the gradient of the loss it computed for the other ranks' tokens, and the
gradients of one cp group sum to cp times those of one process on the whole sample. FSDP's reduce-scatter
averages over dp·cp ranks, which is then the mean over the data-parallel ranks: the one-process gradient
(tests/test_context_parallel.py checks it).

Token count: any. The N = t·h·w tokens after patchify are split into cp contiguous runs whose lengths differ
by at most one (the all-to-alls take uneven split sizes), so attention sees exactly the N tokens, with no
padding and no key mask (which would take flash-attn off); only the final all-gather pads the shorter runs
by one token and drops the padding. A rank may hold no token at all (a still of fewer tokens than cp).

Contract of a network: its repeated blocks are ``network.blocks``, an ``nn.ModuleList`` that ``forward``
calls in turn (``fsvideo.dit.DiT`` does); checkpointing and compile need them, while FSDP shards a network
without ``blocks`` (a small head) as one group. A block may be called again with the same arguments for
recomputation, so an argument that ``forward`` mutates later (the DiT's Layer Memory history) must be
passed as a snapshot.

Everything is applied without wrapping modules: ``state_dict`` and ``named_parameters`` names stay those of
the plain network, so checkpoints and weight loading do not depend on the parallelism. A network built on
the meta device can be parallelized before it is materialised (``to_empty`` + ``init_weights`` or a weight
load); that is how a 14B network is sharded without any process holding all of it.

Public API:
    ParallelConfig             what to apply (field docstrings)
    parallelize(trained, frozen, config, mesh=None)
    device_mesh(device_type, world_size, context_parallel=1) -> DeviceMesh (1-D, or (data_parallel, context_parallel))
    data_parallel_rank_and_size(rank, world_size, context_parallel) -> (data-parallel rank, data-parallel size)
    UlyssesSequenceParallel(mesh)   the hook a network calls to run sequence-sharded (``sequence_parallel``)
    apply_context_parallel(network, mesh),
    apply_activation_checkpointing(network), apply_compile(network, backend="inductor"),
    apply_fsdp(network, mesh, mixed_precision=None, reshard_after_forward=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# Marks a network ``parallelize`` has transformed, with the config it used: Lightning calls a module's
# ``configure_model`` at every trainer entry point, and a block cannot be checkpointed or sharded twice.
_APPLIED = "_fsvideo_parallel_config"
DATA_PARALLEL, CONTEXT_PARALLEL = "data_parallel", "context_parallel"
"""Names of the mesh dimensions (``device_mesh``)."""


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
    ranks (over all ranks, dp × cp, with ``context_parallel``); needs a device mesh (``trainer.strategy:
    ModelParallelStrategy``)."""
    mixed_precision: Literal["bf16"] | None = None
    """With ``fsdp``: "bf16" gathers and computes with bf16 parameters while the sharded parameters, the
    optimizer and the gradient reduction stay float32 (``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)``): half the all-gather traffic. None gathers parameters in their own dtype
    (autocast from ``trainer.precision`` still applies)."""
    reshard_after_forward: bool = True
    """With ``fsdp``: free each trained block's gathered parameters after its forward and gather them again
    for its backward (least memory); False keeps them until the backward (one all-gather less per block,
    one unsharded network more of memory). Frozen networks always reshard."""
    context_parallel: int = 1
    """Ranks that split each sample's tokens between them (Ulysses, module docstring): each holds 1/cp of
    the activations and computes 1/cp of every block. The number of processes must be divisible by it, the
    attention heads too (40 heads: 2, 4, 5, 8); training needs ``fsdp`` (FSDP reduces the gradients).
    1: off."""
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
        if self.context_parallel < 1:
            raise ValueError(
                f"context_parallel must be a positive number of ranks, got {self.context_parallel}."
            )

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


def device_mesh(device_type: str, world_size: int, context_parallel: int = 1) -> DeviceMesh:
    """The mesh ``parallelize`` takes over all ``world_size`` ranks: 1-D ("data_parallel") at
    ``context_parallel`` 1, else 2-D ``(world_size / cp, cp)`` ("data_parallel", "context_parallel"), cp
    innermost. Call on every rank (it creates process groups)."""
    if world_size % context_parallel:
        raise ValueError(
            f"context_parallel={context_parallel} must divide the number of processes ({world_size}); "
            "set trainer.devices (× num_nodes) to a multiple of it."
        )
    if context_parallel == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=(DATA_PARALLEL,))
    return init_device_mesh(
        device_type,
        (world_size // context_parallel, context_parallel),
        mesh_dim_names=(DATA_PARALLEL, CONTEXT_PARALLEL),
    )


def data_parallel_rank_and_size(rank: int, world_size: int, context_parallel: int) -> tuple[int, int]:
    """The data-parallel coordinate of global ``rank`` on ``device_mesh``'s layout: the cp ranks of one group
    (consecutive ranks) share it, and with it their data."""
    return rank // context_parallel, world_size // context_parallel


class UlyssesSequenceParallel:
    """The hook through which a network runs with its tokens split over the ranks of a 1-D ``mesh``.

    ``apply_context_parallel`` sets it as the ``sequence_parallel`` attribute of a network and of its
    attention modules, which call it at the points where one rank's share of the tokens is not enough
    (module docstring). Rank r holds the r-th of cp contiguous runs of the N tokens, the first N mod cp
    runs one token longer (``token_counts``), so any N works and no token is padded in attention. The
    hook keeps no state between calls: the callers pass N (a block recomputed by activation checkpointing
    repeats the same calls). Every collective is a functional collective with autograd, so the backward
    pass runs the transposed exchange (all-to-all ↔ all-to-all, all-gather ↔ reduce-scatter).
    """

    def __init__(self, mesh: DeviceMesh) -> None:
        if mesh.ndim != 1:
            raise ValueError(f"a context-parallel mesh is 1-D (the cp ranks), got {mesh.ndim} dims")
        self.group = mesh.get_group()
        self.degree = mesh.size()
        self.rank = mesh.get_local_rank()

    def token_counts(self, total: int) -> list[int]:
        """Tokens held by each rank, in rank order, of a sequence of ``total``."""
        base, longer = divmod(total, self.degree)
        return [base + (rank < longer) for rank in range(self.degree)]

    def shard_tokens(self, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's run of ``tokens`` along ``dim`` (``B×N×dim`` → ``B×N_r×dim``; a RoPE table
        ``N×d/2`` with ``dim=0``)."""
        counts = self.token_counts(tokens.shape[dim])
        return tokens.narrow(dim, sum(counts[: self.rank]), counts[self.rank])

    def gather_tokens(self, tokens: torch.Tensor, total: int) -> torch.Tensor:
        """``B×N_r×F`` of every rank → ``B×N×F`` (``N = total``) in token order (backward: reduce-scatter,
        summed over the ranks)."""
        counts = self.token_counts(total)
        longest = counts[0]
        padded = F.pad(tokens, (0, 0, 0, longest - tokens.shape[1]))  # all-gather takes equal shares
        gathered = funcol.all_gather_single(padded.contiguous(), 1, self.group)  # (B, cp·longest, F)
        if longest * self.degree == total:
            return gathered
        return torch.cat([run[:, :count] for run, count in zip(gathered.split(longest, 1), counts)], dim=1)

    def heads_to_sequence(self, *tensors: torch.Tensor, total: int) -> list[torch.Tensor]:
        """Each ``B×heads×N_r×d`` (all heads, this rank's tokens) → ``B×heads/cp×N×d`` (this rank's heads,
        all ``total`` tokens); one all-to-all for all of them."""
        batch, heads, count, head_dim = tensors[0].shape
        # (cp·N_r, n, B, heads/cp, d): rows [j·N_r, (j+1)·N_r) go to rank j, which computes heads group j
        stacked = torch.stack(tensors).unflatten(2, (self.degree, heads // self.degree))
        outgoing = stacked.permute(2, 4, 0, 1, 3, 5).flatten(0, 1).contiguous()
        received = funcol.all_to_all_single(
            outgoing, self.token_counts(total), [count] * self.degree, self.group
        )  # (N, n, B, heads/cp, d): every rank's run of tokens, in rank order = token order
        return list(received.permute(1, 2, 3, 0, 4).unbind(0))

    def sequence_to_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``B×heads/cp×N×d`` → ``B×heads×N_r×d``: the inverse of ``heads_to_sequence``."""
        counts = self.token_counts(tensor.shape[2])
        outgoing = tensor.permute(2, 0, 1, 3).contiguous()  # (N, B, heads/cp, d): rank j's run goes to j
        mine = counts[self.rank]
        received = funcol.all_to_all_single(outgoing, [mine] * self.degree, counts, self.group)
        # (cp·N_r, B, heads/cp, d), rows of rank j holding head group j → (B, heads, N_r, d)
        return received.unflatten(0, (self.degree, mine)).permute(2, 0, 3, 1, 4).flatten(1, 2)

    def max_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the cp ranks (no gradient: for the router maxima of ``router_heatmap``)."""
        return funcol.all_reduce(tensor.detach().contiguous(), "max", self.group)


def _has_sequence_hook(network: nn.Module) -> bool:
    return any(hasattr(module, "sequence_parallel") for module in network.modules())


def apply_context_parallel(network: nn.Module, mesh: DeviceMesh) -> None:
    """Run ``network`` sequence-sharded over the ranks of ``mesh`` (1-D): set one
    ``UlyssesSequenceParallel`` as the ``sequence_parallel`` attribute of every module that declares one
    (``fsvideo.dit.DiT`` and its self-attention layers). Attention modules also declare ``num_heads``,
    which the mesh size must divide."""
    hook = UlyssesSequenceParallel(mesh)
    hooked = [module for module in network.modules() if hasattr(module, "sequence_parallel")]
    if not hooked:
        raise TypeError(
            f"{type(network).__name__} cannot run context-parallel: none of its modules has a "
            "`sequence_parallel` attribute (fsvideo.dit.DiT has)."
        )
    for module in hooked:
        heads = getattr(module, "num_heads", None)
        if heads is not None and heads % hook.degree:
            raise ValueError(
                f"context_parallel={hook.degree} must divide the attention heads ({heads}) of "
                f"{type(network).__name__}: Ulysses gives each rank heads/cp whole heads."
            )
    for module in hooked:
        module.sequence_parallel = hook


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
    """``fully_shard`` each of ``network.blocks``, then ``network`` (its remaining parameters; all of them
    for a network without ``blocks``, such as a small head), over ``mesh`` (1-D: FSDP; 2-D (replicate,
    shard): HSDP)."""
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision
    for block in getattr(network, "blocks", ()):
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
            through them to their inputs (a reward model). One that gets no per-block step (``compile`` off)
            needs no ``blocks``. Under context parallel, a network without a
            ``sequence_parallel`` hook (a reward model, an upsampler) runs whole on every cp rank.
        config: what to apply.
        mesh: the devices (``device_mesh``); required with ``config.fsdp`` or ``context_parallel`` > 1. 1-D: FSDP
            shards over it; 2-D (replicate, shard) without context parallel: HSDP; 2-D ("data_parallel",
            "context_parallel") with it: sequences split over the second dimension, FSDP over both.

    A network this function has already transformed with the same config is left as it is (Lightning calls
    ``configure_model`` once per trainer entry point); with another config it is an error.
    """
    if config.fsdp and mesh is None:
        raise ValueError(
            "ParallelConfig.fsdp needs a device mesh to shard over: run with trainer.strategy: "
            "lightning.pytorch.strategies.ModelParallelStrategy, or set fsdp: false."
        )
    context_mesh, shard_mesh = None, mesh
    if config.context_parallel > 1:
        if mesh is None or mesh.mesh_dim_names != (DATA_PARALLEL, CONTEXT_PARALLEL):
            raise ValueError(
                f"context_parallel={config.context_parallel} needs a ({DATA_PARALLEL}, {CONTEXT_PARALLEL}) "
                "device mesh (fsvideo.parallel.device_mesh; in training: trainer.strategy: "
                "lightning.pytorch.strategies.ModelParallelStrategy)."
            )
        if mesh[CONTEXT_PARALLEL].size() != config.context_parallel:
            raise ValueError(
                f"context_parallel={config.context_parallel} but the mesh's {CONTEXT_PARALLEL} dimension has "
                f"{mesh[CONTEXT_PARALLEL].size()} ranks."
            )
        context_mesh, shard_mesh = mesh[CONTEXT_PARALLEL], mesh._flatten()
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
        if checkpoints or config.compile:
            _blocks(network)  # every network's contract is checked before any is changed
        plans.append((network, trains, checkpoints, shards))
    for network, trains, checkpoints, shards in plans:
        if not trains:
            network.requires_grad_(False).eval()
        if context_mesh is not None and _has_sequence_hook(network):
            apply_context_parallel(network, context_mesh)
        if checkpoints:
            apply_activation_checkpointing(network)
        if config.compile:
            apply_compile(network)
        if shards:
            apply_fsdp(
                network,
                shard_mesh,
                config.mixed_precision_policy(),
                reshard_after_forward=config.reshard_after_forward or not trains,
            )
        setattr(network, _APPLIED, config)
