"""float16 AMP as nnU-Net trains on CUDA, on the CPU: nnUNetTrainer.train_step (deep-supervision loss, backward,
GradScaler unscale + clip + step) of every shipped network under float16 autocast.

On CUDA nnU-Net wraps the forward pass and loss in ``torch.autocast("cuda")`` (float16) and scales the loss with a
``GradScaler``; on the CPU it does neither. Here the real train_step runs inside ``torch.autocast("cpu",
dtype=torch.float16)`` with a CPU ``GradScaler`` given to the trainer, so the same code path runs in float16.
"""
from pathlib import Path

import pytest
import torch
from gpu_path import CASES, TRAINERS, synthetic_batch, tiny_trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_installed_torch_runs_cpu_autocast_in_float16():
    """The premise of this module: CPU autocast casts convolutions to float16 (torch >= 2.4 supports it)."""
    with torch.autocast("cpu", dtype=torch.float16):
        out = torch.nn.functional.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3))
    assert out.dtype == torch.float16


@pytest.mark.parametrize("dimension", list(CASES))
@pytest.mark.parametrize("name", TRAINERS)
def test_float16_train_step_has_finite_loss_and_gradients(name, dimension, tmp_path):
    trainer = tiny_trainer(name, dimension, tmp_path)
    trainer.grad_scaler = torch.amp.GradScaler("cpu")
    initial_scale = trainer.grad_scaler.get_scale()
    weights_before = [p.detach().clone() for p in trainer.network.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = trainer.train_step(synthetic_batch(trainer))["loss"]
    assert torch.isfinite(torch.as_tensor(loss)), loss
    gradients = {n: p.grad for n, p in trainer.network.named_parameters() if p.grad is not None}
    assert gradients
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gradients.values()), \
        [n for n, g in gradients.items() if not torch.isfinite(g).all()]
    # the scaler found no inf/NaN at the full loss scale (it would have halved it and skipped the step)
    assert trainer.grad_scaler.get_scale() == initial_scale
    assert any(not torch.equal(a, b) for a, b in zip(weights_before, trainer.network.parameters()))


def failing_backend(graph_module, example_inputs):
    raise NotImplementedError("no kernel for this op")


def test_a_network_torch_compile_cannot_compile_trains_uncompiled_and_says_so_once(tmp_path):
    """A compiler backend that fails (as inductor failed for FIAS on an H200): the train step runs again without
    nnU-Net's compile wrapper, with the weights it would have had (no optimizer step before the failure), and the
    console and the log say so once, naming nnUNet_compile=f; the log keeps the end of the compiler's error."""
    trainer = tiny_trainer("GRCSFTrainer", "2d", tmp_path)
    reference = tiny_trainer("GRCSFTrainer", "2d", tmp_path / "reference")
    reference.network.load_state_dict(trainer.network.state_dict())
    original = trainer.network
    torch._dynamo.reset()
    trainer.network = torch.compile(trainer.network, backend=failing_backend)
    batch = synthetic_batch(trainer)
    torch.manual_seed(3)  # the same random draws in both steps
    loss = trainer.train_step(batch)["loss"]
    torch.manual_seed(3)
    assert loss == pytest.approx(reference.train_step(batch)["loss"], rel=1e-6)
    assert trainer.network is original
    assert trainer.compile_failure["message"].endswith("NotImplementedError: no kernel for this op")
    assert "failing_backend" in trainer.compile_failure["traceback"]
    for a, b in zip(trainer.network.parameters(), reference.network.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    trainer.validation_step(batch)
    trainer.train_step(batch)
    log = Path(trainer.log_file).read_text()
    assert log.count("GRCSFTrainer: torch.compile could not compile this network on cpu (torch ") == 1
    assert "NotImplementedError: no kernel for this op\nTraining continues uncompiled (slower). " \
           "`nnUNet_compile=f nnUNetv2_train ...`" in log
    assert "the compiler's error, its last lines:" in log
    torch._dynamo.reset()


def test_drop_torch_compile_keeps_a_ddp_wrapper_on_the_same_parameters(tmp_path):
    """nnU-Net compiles, then wraps in DDP: the DDP wrapper is kept and runs the uncompiled module."""
    from torch.nn.parallel import DistributedDataParallel

    from nnunetv2_grcsf.trainers.base import drop_torch_compile

    module = torch.nn.Linear(3, 2)
    assert drop_torch_compile(module) is None
    assert drop_torch_compile(torch.compile(module)) is module
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        torch._dynamo.reset()
        ddp = DistributedDataParallel(torch.compile(module, backend=failing_backend))
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
            ddp(torch.randn(4, 3))
        assert drop_torch_compile(ddp) is ddp and ddp.module is module
        ddp(torch.randn(4, 3)).sum().backward()
        assert module.weight.grad is not None
    finally:
        torch.distributed.destroy_process_group()
        torch._dynamo.reset()


def test_a_kernel_the_network_compiles_itself_stops_with_what_to_do(tmp_path, monkeypatch):
    """FIAS compiles flex_attention itself (CUDA); when that fails the error names NNUNETV2_GRCSF_MSDA=loop."""
    from nnunetv2_grcsf.architectures.blocks import msda

    trainer = tiny_trainer("FIASTrainer", "2d", tmp_path)

    torch._dynamo.reset()
    monkeypatch.setattr(msda, "loop_neighbourhood_attention",
                        torch.compile(msda.loop_neighbourhood_attention, backend=failing_backend))
    with pytest.raises(RuntimeError, match=r"FIASTrainer: torch.compile could not compile a kernel of this network "
                                           r"on cpu \(torch .*\): NotImplementedError: no kernel for this op\n"
                                           r".*NNUNETV2_GRCSF_MSDA=loop") as raised:
        trainer.train_step(synthetic_batch(trainer))
    assert "continues uncompiled" not in str(raised.value)
    assert "NNUNETV2_GRCSF_MSDA=loop" in Path(trainer.log_file).read_text()
    torch._dynamo.reset()


def test_fias_msda_implementation_follows_its_environment_variable(tmp_path, monkeypatch):
    """NNUNETV2_GRCSF_MSDA chooses every MSDA's implementation (the predictor builds with the same call); a wrong
    value stops with the variable's name; a failed compile of FIAS names it as the other way out."""
    from nnunetv2_grcsf.architectures.blocks import MultiScaleDilatedAttention

    def implementations(trainer):
        return {m.implementation for m in trainer.network.modules() if isinstance(m, MultiScaleDilatedAttention)}

    assert implementations(tiny_trainer("FIASTrainer", "2d", tmp_path)) == {"auto"}
    monkeypatch.setenv("NNUNETV2_GRCSF_MSDA", "loop")
    trainer = tiny_trainer("GRCSF_FIASTrainer", "2d", tmp_path)
    assert implementations(trainer) == {"loop"}
    assert "NNUNETV2_GRCSF_MSDA=loop" in trainer.compile_failure_advice
    monkeypatch.setenv("NNUNETV2_GRCSF_MSDA", "fast")
    with pytest.raises(SystemExit, match=r"NNUNETV2_GRCSF_MSDA='fast' is not one of auto, flex, loop"):
        tiny_trainer("FIASTrainer", "2d", tmp_path)
