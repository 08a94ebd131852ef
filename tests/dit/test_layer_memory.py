"""Layer Memory (§2.3.1): exact plain-DiT start through the gate, gradients at init, softmax routing,
memory-light mixture (activation checkpointing of its history: tests/test_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from fsvideo.dit import DiT, DiTConfig, LayerMemoryRouter, router_heatmap


def _pair(randomize, **overrides):
    """A randomised plain DiT and a Layer Memory DiT with the same weights (routers at init)."""
    plain = randomize(DiT(DiTConfig.tiny(layer_memory=False, **overrides)))
    memory = DiT(DiTConfig.tiny(layer_memory=True, **overrides))
    missing, unexpected = memory.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(".router." in name for name in missing) and len(missing) == 3 * 3
    return plain, memory


@pytest.mark.parametrize("margin", [0.0, 3.0])
def test_starts_as_the_plain_dit(inputs, randomize, margin):
    # the gate at 0 makes every block the plain block, whatever the routers' logits
    plain, memory = _pair(randomize, router_init_margin=margin)
    with torch.no_grad():
        torch.testing.assert_close(memory(*inputs), plain(*inputs), rtol=1e-6, atol=1e-6)


def test_same_seed_same_weights_with_and_without_layer_memory(inputs):
    """On / off runs of one seed start from the same function and draw the same training noise after."""
    states = {}
    for layer_memory in (False, True):
        torch.manual_seed(3)
        states[layer_memory] = DiT(DiTConfig.tiny(layer_memory=layer_memory)), torch.get_rng_state()
    (plain, rng_plain), (memory, rng_memory) = states[False], states[True]
    assert torch.equal(rng_plain, rng_memory)
    routed = memory.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(routed[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(memory(*inputs), plain(*inputs), rtol=0, atol=0)


def test_router_weights_are_a_distribution(inputs, randomize):
    model = randomize(DiT(DiTConfig.tiny()))
    with torch.no_grad():
        for router in model.routers:  # routers away from init so the weights spread
            router.proj.weight.normal_(0, 0.1)
            router.proj.bias.zero_()
            router.gate.fill_(0.6)
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
        router.gate.fill_(0.7)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    history = [torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    leaves = [x, *history, router.proj.weight, router.proj.bias, router.gate]
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
    for row in range(3):  # block l = row + 2 puts all weight on X_{l-1}
        assert heatmap[row, row + 1] == 1
        assert heatmap[row, : row + 1].max() == 0


def test_gate_init_one_starts_from_the_paper_mixture():
    model = DiT(DiTConfig.tiny(router_gate_init=1.0, router_init_margin=0.0))
    history = [torch.randn(2, 7, 64) for _ in range(4)]
    mixture, weights = model.routers[-1](torch.randn(2, 7, 64), history)
    # eq. 7 alone; with the logits at margin 0 the softmax starts uniform
    torch.testing.assert_close(weights, torch.full((2, 7, 4), 0.25))
    torch.testing.assert_close(mixture, torch.stack(history).mean(0))


def test_gate_learns_at_init_and_then_the_router(inputs, randomize):
    _, model = _pair(randomize)
    model(*inputs).square().mean().backward()
    for router in model.routers:
        # the gate has a full-size gradient at 0; the softmax is unsaturated, but scaled by g = 0 so far
        assert router.gate.grad.abs() > 1e-6
        assert router.proj.weight.grad.abs().max() == 0
    # once a step has moved the gates (AdamW: by about lr), the routers get gradients, in proportion to g
    grads = []
    for gate in (1e-3, 2e-3):
        model.zero_grad()
        with torch.no_grad():
            for router in model.routers:
                router.gate.fill_(gate)
        model(*inputs).square().mean().backward()
        grads.append([router.proj.weight.grad.clone() for router in model.routers])
    for small, double in zip(*grads):
        assert small.abs().max() > 1e-7
        torch.testing.assert_close(double, 2 * small, rtol=0.05, atol=1e-9)


def test_router_rejects_wrong_history_and_tiny_source_count():
    router = LayerMemoryRouter(8, 3)
    with pytest.raises(ValueError, match="expects 3 hidden states"):
        router(torch.randn(1, 2, 8), [torch.randn(1, 2, 8)] * 2)
    with pytest.raises(ValueError, match="at least 2 sources"):
        LayerMemoryRouter(8, 1)
    with pytest.raises(ValueError, match="no router weights"):
        router_heatmap([])
