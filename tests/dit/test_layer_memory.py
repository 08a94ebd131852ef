"""Layer Memory (§2.3.1): plain-DiT start, softmax routing, memory-light mixture (activation checkpointing
of its history: tests/test_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from fsvideo.dit import DiT, DiTConfig, LayerMemoryRouter, residual_weight, router_heatmap


def _pair(randomize, **overrides):
    """A randomised plain DiT and a Layer Memory DiT with the same weights (routers at init)."""
    plain = randomize(DiT(DiTConfig.tiny(layer_memory=False, **overrides)))
    memory = DiT(DiTConfig.tiny(layer_memory=True, **overrides))
    missing, unexpected = memory.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(".router." in name for name in missing) and len(missing) == 2 * 3
    return plain, memory


def test_starts_as_the_plain_dit(inputs, randomize):
    plain, memory = _pair(randomize)
    with torch.no_grad():
        expected = plain(*inputs)
        out = memory(*inputs)
    bound = residual_weight(4, memory.config.router_init_margin)
    error = ((out - expected).abs().max() / expected.abs().max()).item()
    print(f"relative change at init: {error:.2e}, residual router weight {bound:.2e}")
    assert 0 < error < 10 * bound
    # with a huge margin the softmax is one-hot in float32: exactly the plain DiT
    plain, exact = _pair(randomize, router_init_margin=40.0)
    with torch.no_grad():
        torch.testing.assert_close(exact(*inputs), plain(*inputs), rtol=1e-6, atol=1e-6)


def test_router_weights_are_a_distribution(inputs, randomize):
    model = randomize(DiT(DiTConfig.tiny()))
    with torch.no_grad():
        for router in model.routers:  # routers away from init so the weights spread
            router.proj.weight.normal_(0, 0.1)
            router.proj.bias.zero_()
    history = [torch.randn(2, 7, 64) for _ in range(3)]
    mixture, weights = model.routers[1](torch.randn(2, 7, 64), history)
    assert weights.shape == (2, 7, 3) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7))
    assert weights.min() >= 0 and weights.max() < 0.999
    torch.testing.assert_close(mixture, torch.einsum("bnl,lbnd->bnd", weights, torch.stack(history)))

    out, maxima = model(*inputs, return_router_weights=True)
    assert [m.shape for m in maxima] == [(2, 2), (2, 3), (2, 4)]
    assert all(((m > 0) & (m <= 1)).all() for m in maxima)
    heatmap = router_heatmap(maxima)
    assert heatmap.shape == (3, 4)
    assert (
        torch.isnan(heatmap[0, 2:]).all() and torch.isnan(heatmap[1, 3]) and not torch.isnan(heatmap[2]).any()
    )
    torch.testing.assert_close(heatmap[1, :3], maxima[1].mean(0))


def test_mixture_gradients_match_the_stacked_reference():
    router = LayerMemoryRouter(8, 3).double()
    with torch.no_grad():
        router.proj.weight.normal_(0, 0.5)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    history = [torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    leaves = [x, *history, router.proj.weight, router.proj.bias]
    grad = torch.randn(2, 5, 8, dtype=torch.float64)
    mixture, weights = router(x, history)
    grads = torch.autograd.grad(mixture, leaves, grad, retain_graph=True)  # weights are reused below
    reference = torch.einsum("bnl,lbnd->bnd", weights.double(), torch.stack(history))
    torch.testing.assert_close(mixture, reference)
    for got, expected in zip(grads, torch.autograd.grad(reference, leaves, grad)):
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected)


def test_init_heatmap_is_diagonal(inputs):
    _, maxima = DiT(DiTConfig.tiny())(*inputs, return_router_weights=True)
    heatmap = router_heatmap(maxima)
    for row in range(3):  # block l = row + 2 puts ~all weight on X_{l-1}
        assert heatmap[row, row + 1] > 0.999
        assert heatmap[row, : row + 1].max() < 1e-4


def test_router_learns_from_init(inputs, randomize):
    _, model = _pair(randomize)
    model(*inputs).square().mean().backward()
    for router in model.routers:
        assert router.proj.weight.grad.abs().max() > 1e-9  # the margin leaves a usable gradient


def test_router_rejects_wrong_history_and_tiny_source_count():
    router = LayerMemoryRouter(8, 3)
    with pytest.raises(ValueError, match="expects 3 hidden states"):
        router(torch.randn(1, 2, 8), [torch.randn(1, 2, 8)] * 2)
    with pytest.raises(ValueError, match="at least 2 sources"):
        LayerMemoryRouter(8, 1)
    with pytest.raises(ValueError, match="no router weights"):
        router_heatmap([])
