"""Layer Memory: the inter-layer dynamic router of §2.3.1 (eq. 6–8).

Block l (1-indexed, l ≥ 2) sees the hidden states X_0 … X_{l−1} (X_0 = patch embeddings). Its
router is a ``Linear(dim → l)`` applied to the time-modulated input X_{l−1,t}; a per-token softmax
over the l sources gives the weights of the mixture X̂_{l−1} = Σ_i w_i·X_i, from which the block takes
its self-attention keys and values (the query still comes from X_{l−1}).

Initialisation: weight 0 and bias ``margin`` on X_{l−1} (0 elsewhere), so at init the weight left on
older states is (l−1)·e^(−margin) / (1 + (l−1)·e^(−margin)) — see ``residual_weight``; the mixture
then differs from X_{l−1} by at most that fraction of max_i ‖X_i − X_{l−1}‖.

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
    LayerMemoryRouter(dim, num_sources, init_margin)   holds ``proj = Linear(dim, num_sources)``
        forward(x_modulated, history) -> (mixture ``B×N×dim``, weights ``B×N×l`` float32)
        init_weights()
    residual_weight(num_sources, margin) -> float
    router_heatmap(router_maxima) -> ``(L−1)×L`` tensor for Figure 6
"""

from __future__ import annotations

import math

import torch
from torch import nn


def residual_weight(num_sources: int, margin: float) -> float:
    """Total softmax weight left on the older sources by the initial router."""
    others = (num_sources - 1) * math.exp(-margin)
    return others / (1.0 + others)


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
    def __init__(self, dim: int, num_sources: int, init_margin: float = 10.0) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError(f"a router needs at least 2 sources to choose from, got {num_sources}")
        self.init_margin = init_margin
        self.proj = nn.Linear(dim, num_sources)

    @property
    def num_sources(self) -> int:
        return self.proj.out_features

    def init_weights(self) -> None:
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.zero_()
            self.proj.bias[-1] = self.init_margin

    def forward(
        self, x_modulated: torch.Tensor, history: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_modulated: ``B×N×dim`` time-modulated X_{l−1}; history: [X_0 … X_{l−1}], each ``B×N×dim``.

        Returns the mixture ``B×N×dim`` (dtype of the history) and the weights ``B×N×l`` (float32).
        """
        if len(history) != self.num_sources:
            raise ValueError(f"router expects {self.num_sources} hidden states, got {len(history)}")
        weights = self.proj(x_modulated).float().softmax(dim=-1)
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
