"""fsvideo.parallel: activation checkpointing from outside keeps outputs, gradients and parameter names
(Layer Memory's history included); compiled blocks match eager ones on the CPU; FSDP2 over two gloo processes
gives the unsharded outputs for a frozen network, the unsharded gradients for a trained, checkpointed one,
and a bf16 copy's outputs under bf16 mixed precision."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from two_process import spawn_two

from fsvideo.dit import DiT, DiTConfig
from fsvideo.parallel import ParallelConfig, apply_compile, parallelize


def random_dit(config: DiTConfig, seed: int = 0) -> DiT:
    """A DiT with every parameter off its initialisation (the head starts at zero, routers one-hot), so
    outputs and gradients are informative."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for router in model.routers:
            router.proj.weight.normal_(0, 0.1)
    return model


def dit_inputs(config: DiTConfig, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """latent_in ``2×C×3×4×4``, sigma, text tokens ``2×6×text_dim``, image tokens ``2×5×image_dim``."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, config.in_channels, 3, 4, 4, generator=g),
        torch.tensor([0.2, 0.9]),
        torch.randn(2, 6, config.text_dim, generator=g),
        torch.randn(2, 5, config.image_dim, generator=g),
    )


def output_and_grads(model: nn.Module, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(*inputs)
    out.square().mean().backward()
    grads = {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for n, p in model.named_parameters()
    }
    return out.detach(), grads


@pytest.mark.parametrize("layer_memory", [True, False])
def test_activation_checkpointing_keeps_outputs_gradients_and_names(layer_memory):
    config = DiTConfig.tiny(layer_memory=layer_memory)
    plain = random_dit(config)
    checkpointed = copy.deepcopy(plain)
    parallelize([checkpointed], [], ParallelConfig(activation_checkpointing=True))
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    calls = []
    checkpointed.blocks[-1].register_forward_pre_hook(lambda *_: calls.append(1))

    inputs = dit_inputs(config)
    out_plain, grads_plain = output_and_grads(plain, inputs)
    out_ckpt, grads_ckpt = output_and_grads(checkpointed, inputs)
    assert len(calls) == 2, "the backward pass must run the checkpointed block again"
    # the recomputation repeats the same float32 operations on the same inputs: bit-identical outputs
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert any(".router." in n for n in grads_plain) == layer_memory


def test_parallelize_checks_networks_and_runs_once():
    model = DiT(DiTConfig.tiny())
    config = ParallelConfig(activation_checkpointing=True)
    parallelize([model], [], config)
    parallelize([model], [], ParallelConfig(activation_checkpointing=True))  # equal config: nothing to do
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize([model], [], ParallelConfig())
    with pytest.raises(TypeError, match="Linear does not expose its repeated blocks as `blocks`"):
        parallelize([nn.Linear(2, 2)], [], config)
    linear = nn.Linear(2, 2)
    parallelize([], [linear], config)  # frozen networks are not checkpointed: no blocks needed
    assert not linear.weight.requires_grad
    with pytest.raises(ValueError, match="needs a device mesh"):
        parallelize([DiT(DiTConfig.tiny())], [], ParallelConfig(fsdp=True))
    with pytest.raises(ValueError, match="needs fsdp: true"):
        ParallelConfig(mixed_precision="bf16")
    frozen = DiT(DiTConfig.tiny())
    parallelize([], [frozen], ParallelConfig())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="torch.compile's inductor backend compiles C++ on the CPU and finds no g++ or clang++ here",
)
def test_compiled_blocks_match_eager():
    """Two blocks keep compile time down (each block is compiled on its own: Layer Memory gives block 2 a
    router that block 1 lacks); checkpointing is on too, as compile must trace the checkpointed block."""
    config = DiTConfig.tiny(num_layers=2)
    eager = random_dit(config)
    compiled = copy.deepcopy(eager)
    parallelize([compiled], [], ParallelConfig(activation_checkpointing=True, compile=True))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    inputs = dit_inputs(config)
    out_eager, grads_eager = output_and_grads(eager, inputs)
    out_compiled, grads_compiled = output_and_grads(compiled, inputs)
    # inductor fuses and reorders float32 sums: agreement to float32 rounding, not bit for bit
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # about 20 s of dynamo tracing on a 2-core CPU
def test_every_block_is_compiled_past_dynamos_recompile_limit(monkeypatch):
    """Nine Layer Memory blocks need nine graphs of the one block ``forward``, more than dynamo's default
    cap of 8 per code object (the "eager" backend traces without generating code, so this stays quick)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # restored after the test
    torch._dynamo.reset()
    counters.clear()  # statistics of earlier compiles in this process
    config = DiTConfig.tiny(num_layers=9)
    model = random_dit(config)
    apply_compile(model, backend="eager")
    model(*dit_inputs(config))  # with grad: Layer Memory's autograd.Function traces whole (no graph break)
    frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert frames == graphs == 9


def _sharded_matches_unsharded(mesh: DeviceMesh) -> None:
    """Both ranks build the same DiT and feed it the same batch, so FSDP's averaged gradients are the
    single-process ones; with bf16 mixed precision, the outputs are those of a bf16 copy."""
    config = DiTConfig.tiny()
    reference = random_dit(config)
    inputs = dit_inputs(config)

    frozen = copy.deepcopy(reference)
    parallelize([], [frozen], ParallelConfig(fsdp=True), mesh)
    assert all(isinstance(p, DTensor) and not p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        # gathering shards is exact and the computation is the same: equal to float32 rounding at most
        torch.testing.assert_close(frozen(*inputs), reference(*inputs), rtol=1e-6, atol=1e-6)

    replicated = copy.deepcopy(reference)
    parallelize([], [replicated], ParallelConfig(fsdp=True, frozen="replicate"), mesh)
    assert not any(isinstance(p, DTensor) for p in replicated.parameters())

    trained = copy.deepcopy(reference)
    parallelize([trained], [], ParallelConfig(fsdp=True, activation_checkpointing=True), mesh)
    out_sharded, grads_sharded = output_and_grads(trained, inputs)
    out_plain, grads_plain = output_and_grads(reference, inputs)
    torch.testing.assert_close(out_sharded, out_plain, rtol=1e-6, atol=1e-6)
    for name, grad in grads_plain.items():  # reduce-scatter averages two equal float32 gradients
        torch.testing.assert_close(grads_sharded[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    mixed = copy.deepcopy(reference)
    parallelize([mixed], [], ParallelConfig(fsdp=True, mixed_precision="bf16"), mesh)
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    with torch.no_grad():
        out_mixed = mixed(*inputs)
        # the root casts float inputs to bf16, the blocks compute with gathered bf16 parameters: a bf16 copy
        expected = bf16(*(x.to(torch.bfloat16) for x in inputs))
    torch.testing.assert_close(out_mixed, expected, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in mixed.parameters()), "the shards stay float32"


@pytest.mark.slow
def test_sharded_networks_match_unsharded_over_two_processes(tmp_path):
    spawn_two(_sharded_matches_unsharded, tmp_path)
