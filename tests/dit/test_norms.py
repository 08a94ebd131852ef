"""Float32 norms: the CPU RMSNorm kernel chain computes PyTorch's ``rms_norm`` and its gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsvideo.dit.norms import FP32RMSNorm


def test_cpu_rms_norm_matches_pytorch_forward_and_backward():
    torch.manual_seed(0)
    norm = FP32RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = (3 * torch.randn(2, 7, 16)).requires_grad_()
    grad = torch.randn(2, 7, 16)
    out = norm(x)
    got = torch.autograd.grad(out, (x, norm.weight), grad)
    expected_out = F.rms_norm(x, (16,), norm.weight, 1e-6)
    expected = torch.autograd.grad(expected_out, (x, norm.weight), grad)
    torch.testing.assert_close(out, expected_out)
    for g, e in zip(got, expected):
        assert e.abs().max() > 1e-2
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # frozen weight: only the input gradient; bf16 in, bf16 out (computed in float32)
    norm.weight.requires_grad_(False)
    (only_x,) = torch.autograd.grad(norm(x), (x,), grad)
    torch.testing.assert_close(only_x, expected[0], rtol=1e-5, atol=1e-5)
    low = norm(x.detach().bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected_out.detach(), rtol=2e-2, atol=2e-2)
