"""Layer Memory: the inter-layer dynamic router of §2.3.1 (eq. 6–8).

Block l (1-indexed, l ≥ 2) sees the hidden states X_0 … X_{l−1} (X_0 = patch embeddings). Its
router is a ``Linear(dim → l)`` applied to the time-modulated input X_{l−1,t}; a per-token softmax
over the l sources gives the weights w of eq. 7's mixture Σ_i w_i·X_i. The block takes its
self-attention keys and values from

    X̂_{l−1} = X_{l−1} + g_l·(Σ_i w_i·X_i − X_{l−1})          (eq. 7 exactly at g_l = 1)

with g_l one learned scalar per block (the router's ``gate``), initialised at 0 (``init_gate``; 1 starts
from eq. 7 alone, for a from-scratch run that wants the paper's form from step 1); the query still comes
from X_{l−1}. Equivalently the block mixes with the effective weights w' = (1 − g_l)·e_{l−1} + g_l·w,
which sum to one (a distribution, i.e. a convex combination of the X_i, while 0 ≤ g_l ≤ 1); these are
the weights the router returns and Figure 6's heatmap shows.

Why a gate: a retrofit onto pretrained weights (Wan2.1, Figure 7(b)) must start as the source model,
and a softmax is one-hot only at infinite logits. A large init margin m approximates it, but the
softmax is then saturated: its gradients are scaled by about e^(−m), and AdamW moves a logit by at
most about lr per step, so m = 10 at lr 1e-3 needs thousands of steps before the router moves at all
(the tiny 300-step runs of issue #13 ended on their initial heatmap). A soft start (m ≈ 0–3) learns,
but changes the model at init. The gate does both: at g = 0 the effective weights are exactly one-hot
(also in floating point: ``lerp`` adds 0·(w − e_{l−1})), so every model starts as the plain DiT, while
∂L/∂g = ⟨∂L/∂X̂, Σ w_i·X_i − X_{l−1}⟩ ≠ 0, so g moves on the first optimizer step and the unsaturated
router (logits at ``init_margin`` on X_{l−1}, default 0: uniform) learns from the second, its gradient
being g times an unsaturated softmax Jacobian (AdamW normalises the scale away). g is deliberately
not squashed or clamped: a map that is smooth at 0 and never negative has its minimum, hence a zero
gradient, at 0 (tanh², sigmoid-like gates cannot start exactly at 0 and learn at once), and a clamp
would freeze the gate the first time a step took it below 0. One scalar per block, not per channel,
keeps the mixture eq. 7's: one weight per source and token.

Memory: the mixture is accumulated source by source (in-place ``addcmul_``) from the list of hidden
states the DiT keeps, never by stacking a copy of the history. In training those hidden states are
the block inputs that backward keeps anyway (and exactly what gradient checkpointing keeps), so Layer
Memory adds per block only the mixture and its normalised / modulated copies (about 3·B×N×dim) and
the weights (B×N×l, float32). Without grad (inference), the history itself is the overhead:
(L+1)·B×N×dim activations.

Time: the router's matmul is N·dim·l multiply-adds, negligible. The mixture is memory-bound: each
``addcmul_`` reads a source and the running sum and writes the sum, about 3·l·B·N·dim element
transfers for block l, so O(L²) over the depth (≈ l·B·N·dim once ``torch.compile`` fuses the loop).
Its backward (``_WeightedSum``) is also source by source, with no slice-gradient buffers: per source
one product ``grad·w_i`` and one per-token dot product ``⟨grad, X_i⟩``. ``benchmarks/dit.py`` (c)
measures the whole cost.

Public API:
    LayerMemoryRouter(dim, num_sources, init_margin=0, init_gate=0)   holds ``proj = Linear(dim, num_sources)``
        and ``gate``
        forward(x_modulated, history) -> (mixture ``B×N×dim``, effective weights ``B×N×l`` float32)
        init_weights()
    router_heatmap(router_maxima) -> ``(L−1)×L`` tensor for Figure 6
"""

from __future__ import annotations

import torch
from torch import nn


class _WeightedSum(torch.autograd.Function):
    """``Σ_i weights[..., i]·sources[i]``: weights ``B×N×l``, sources l tensors ``B×N×dim`` (same dtype)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, *sources)
        columns = weights.unsqueeze(-1).unbind(-2)  # l × (B, N, 1)
        mixture = sources[0] * columns[0]
        for source, column in zip(sources[1:], columns[1:]):
            mixture.addcmul_(source, column)
        return mixture

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, *sources = ctx.saved_tensors
        grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_weights = torch.stack([torch.linalg.vecdot(grad, source) for source in sources], dim=-1)
        columns = weights.unsqueeze(-1).unbind(-2)
        grad_sources = [
            grad * column if needed else None for column, needed in zip(columns, ctx.needs_input_grad[1:])
        ]
        return grad_weights, *grad_sources


class LayerMemoryRouter(nn.Module):
    def __init__(self, dim: int, num_sources: int, init_margin: float = 0.0, init_gate: float = 0.0) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError(f"a router needs at least 2 sources to choose from, got {num_sources}")
        self.init_margin = init_margin
        self.init_gate = init_gate
        # init_weights sets the router without random numbers; leaving the global RNG as it was here too
        # gives a DiT with and without Layer Memory, built from one seed, the same other weights.
        with torch.random.fork_rng(devices=[]):
            self.proj = nn.Linear(dim, num_sources)
        self.gate = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 cannot shard a 0-D parameter

    @property
    def num_sources(self) -> int:
        return self.proj.out_features

    def init_weights(self) -> None:
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.zero_()
            self.proj.bias[-1] = self.init_margin
            self.gate.fill_(self.init_gate)

    def forward(
        self, x_modulated: torch.Tensor, history: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_modulated: ``B×N×dim`` time-modulated X_{l−1}; history: [X_0 … X_{l−1}], each ``B×N×dim``.

        Returns the mixture ``B×N×dim`` (dtype of the history) and the effective weights
        ``(1 − g)·e_{l−1} + g·softmax(logits)`` ``B×N×l`` (float32) it was mixed with.
        """
        if len(history) != self.num_sources:
            raise ValueError(f"router expects {self.num_sources} hidden states, got {len(history)}")
        routed = self.proj(x_modulated).float().softmax(dim=-1)  # (B, N, l)
        latest = routed.new_zeros(routed.shape[-1])  # (l,)
        latest[-1] = 1.0
        weights = torch.lerp(latest.expand_as(routed), routed, self.gate.float())
        return _WeightedSum.apply(weights.to(history[0].dtype), *history), weights


def router_heatmap(router_maxima: list[torch.Tensor]) -> torch.Tensor:
    """Figure 6 matrix from the per-layer router maxima a DiT forward returns.

    Args:
        router_maxima: one ``B×l`` tensor per routed block (block l = 2 … L), each the max over
            tokens of the weight of source i = 0 … l−1.

    Returns:
        ``len×L`` float tensor: row r is block r+2, column i is source X_i, the batch mean of the
        maxima; entries with i ≥ l (no such source) are NaN.
    """
    if not router_maxima:
        raise ValueError("no router weights: the DiT was built with layer_memory=False or < 2 blocks")
    num_cols = router_maxima[-1].shape[-1]
    heatmap = torch.full((len(router_maxima), num_cols), float("nan"))
    for row, maxima in enumerate(router_maxima):
        heatmap[row, : maxima.shape[-1]] = maxima.float().mean(0).cpu()
    return heatmap
