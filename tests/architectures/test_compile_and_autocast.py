"""torch.compile as nnU-Net runs it on CUDA (``torch.compile(network)``, the inductor backend), checked on the CPU.

Every shipped network, built by its trainer from shrunk real plans (tests/gpu_path.py):
- TorchDynamo captures its forward pass in one graph (``torch._dynamo.explain``: no graph break), so inductor
  compiles the whole network and nothing falls back to eager Python;
- inductor's C++ code (a C compiler is needed: ``cc``) gives the eager loss and gradients of nnU-Net's
  deep-supervision loss, and a compiled nnUNetTrainer.train_step runs.

float16 autocast is tested in tests/test_gpu_path_fp16.py, DDP in tests/test_ddp.py.
"""
import sys
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_path import CASES, TRAINERS, synthetic_batch, tiny_trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: graph breaks a network may have, with the reason a fused attention kernel needs each (none so far)
ALLOWED_GRAPH_BREAKS = {name: 0 for name in TRAINERS}


@pytest.mark.slow
@pytest.mark.parametrize("dimension", list(CASES))
@pytest.mark.parametrize("name", TRAINERS)
def test_dynamo_captures_the_network_without_graph_breaks(name, dimension, tmp_path):
    torch._dynamo.reset()
    trainer = tiny_trainer(name, dimension, tmp_path)
    explanation = torch._dynamo.explain(trainer.network)(synthetic_batch(trainer)["data"])
    reasons = [f"{reason.reason} at {reason.user_stack[-1] if reason.user_stack else '?'}"
               for reason in explanation.break_reasons]
    assert explanation.graph_break_count <= ALLOWED_GRAPH_BREAKS[name], reasons


def loss_and_gradients(trainer, network, batch):
    torch.manual_seed(1)  # the same Monte Carlo draws (FIAS's MixAtt) in both runs (with fallback_random)
    loss = trainer.loss(network(batch["data"]), batch["target"])
    gradients = torch.autograd.grad(loss, list(trainer.network.parameters()), allow_unused=True)
    return loss, gradients


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_inductor_compiled_train_step_matches_eager(name, tmp_path):
    """2D only: inductor compiles a network's forward and backward in minutes on 2 CPU cores; 3D runs the same
    modules through conv_op = Conv3d and is captured without graph breaks above."""
    torch._dynamo.reset()
    trainer = tiny_trainer(name, "2d", tmp_path)
    batch = synthetic_batch(trainer)
    eager_loss, eager_gradients = loss_and_gradients(trainer, trainer.network, batch)
    compiled = torch.compile(trainer.network, backend="inductor")
    with torch._inductor.config.patch(fallback_random=True):  # eager's random draws (FIAS's Monte Carlo attention)
        loss, gradients = loss_and_gradients(trainer, compiled, batch)
    # float32 throughout; inductor fuses and reorders reductions (instance norm, softmax), so results differ by
    # rounding, amplified through the backward pass (measured: up to 2 % of a tensor's largest entry in the first
    # encoder conv): relative 1e-4 on the loss, 5 % relative L2 error per gradient tensor, and an absolute floor of
    # 1e-4 of the network's largest gradient for the gradients that are zero in exact arithmetic (conv biases
    # followed by instance norm: rounding noise of 1e-8 there)
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-4)
    pairs = [(name, *(torch.zeros_like(weight) if g is None else g for g in (a, b)))  # loss weight 0: None vs 0
             for (name, weight), a, b in zip(trainer.network.named_parameters(), eager_gradients, gradients)]
    floor = 1e-4 * max(a.abs().max() for _, a, _ in pairs)
    for parameter, a, b in pairs:
        assert (a - b).norm() <= 5e-2 * a.norm() + floor * a.numel() ** 0.5, parameter
    trainer.network = compiled  # nnUNetTrainer.initialize does the same on CUDA
    assert torch.isfinite(torch.as_tensor(trainer.train_step(batch)["loss"]))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fias_flex_path_compiles_around_its_attention_with_the_loop_gradients(backend, tmp_path, monkeypatch):
    """FIAS as on CUDA (every MSDA on flex_attention, checkpointed units): flex_attention runs outside the compiled
    graphs, and the MSDA stages and MixAtt blocks that hold it run eagerly (helpers.maybe_eager: one break each,
    not one inside an activation checkpoint); everything else is compiled, with static shapes as
    FIASTrainer asks when nnU-Net compiles (the frames around the eager stages run at several sizes; recompiled
    with dynamic shapes, inductor failed here), and loss and gradients are those of the eager loop. flex_attention
    has no backward on the CPU: its dense equivalent (the same mask, through SDPA) stands in for the kernel."""
    from test_msda import dense_flex_attention
    from torch._dynamo.utils import counters

    from nnunetv2_grcsf.architectures.blocks import msda

    monkeypatch.setattr(msda, "fused_flex_attention", dense_flex_attention)
    trainer = tiny_trainer("FIASTrainer", "2d", tmp_path)
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)  # as nnU-Net decides on CUDA
    with torch._dynamo.config.patch(automatic_dynamic_shapes=True):  # restored after the test
        assert trainer._do_i_compile() and not torch._dynamo.config.automatic_dynamic_shapes  # static shapes
        results = compiled_and_eager_loop_results(trainer, backend)
    assert counters["stats"]["unique_graphs"] >= 4 and counters["stats"]["calls_captured"] >= 100
    assert all("compile" in reason for reason in counters["graph_break"])  # only our torch.compiler.disable
    assert any("runs eagerly" in reason for reason in counters["graph_break"])  # helpers.run_eagerly's reason
    (eager_loss, eager_gradients), (loss, gradients) = results
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-4)
    floor = 1e-4 * max(g.abs().max() for g in eager_gradients if g is not None)
    for (name, _), a, b in zip(trainer.network.named_parameters(), eager_gradients, gradients):
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).norm() <= 5e-2 * a.norm() + floor * a.numel() ** 0.5, name
    torch._dynamo.reset()


def compiled_and_eager_loop_results(trainer, backend):
    """[(loss, gradients)] of the network with every MSDA on the loop, eager, and on flex, compiled by backend."""
    from torch._dynamo.utils import counters

    from nnunetv2_grcsf.architectures.blocks import msda

    batch = synthetic_batch(trainer)
    attentions = [m for m in trainer.network.modules() if isinstance(m, msda.MultiScaleDilatedAttention)]
    assert attentions and any(getattr(m, "checkpointing", False) for m in trainer.network.modules())
    results = []
    for implementation, network in (("loop", trainer.network), ("flex", torch.compile(trainer.network,
                                                                                      backend=backend))):
        for attention in attentions:
            attention.implementation = implementation
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fallback_random=True):
            results.append(loss_and_gradients(trainer, network, batch))
    return results
