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


def test_a_network_torch_compile_cannot_compile_stops_with_what_to_do(tmp_path):
    """A compiler backend that fails (as inductor failed for FIAS on an H200): the train step raises one error
    naming nnUNet_compile=f, written to the training log too; the compiler's error stays chained."""
    trainer = tiny_trainer("GRCSFTrainer", "2d", tmp_path)

    def failing_backend(graph_module, example_inputs):
        raise NotImplementedError("no kernel for this op")

    torch._dynamo.reset()
    trainer.network = torch.compile(trainer.network, backend=failing_backend)
    trainer._do_i_compile = lambda: True  # as on CUDA (nnU-Net never compiles on the CPU)
    with pytest.raises(RuntimeError, match=r"GRCSFTrainer: torch.compile could not compile this network on cpu "
                                           r"\(torch .*\): NotImplementedError: no kernel for this op\n"
                                           r"Train it without compiling.*`nnUNet_compile=f nnUNetv2_train") as raised:
        trainer.train_step(synthetic_batch(trainer))
    assert isinstance(raised.value.__cause__, torch._dynamo.exc.BackendCompilerFailed)
    assert "nnUNet_compile=f" in Path(trainer.log_file).read_text()
    trainer._do_i_compile = lambda: False  # a kernel the network compiles itself, nnU-Net not compiling
    with pytest.raises(RuntimeError, match=r"could not compile a kernel of this network") as raised:
        trainer.train_step(synthetic_batch(trainer))
    assert "nnUNet_compile=f" not in str(raised.value)
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
