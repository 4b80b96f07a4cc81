"""FIASUNet built from real nnU-Net plans (tests/data/plans) as nnU-Net builds it; CPU, small inputs."""
import numpy as np
import pytest
import torch
from conftest import build_network_from_plans, configuration_manager, expected_deep_supervision_shapes
from dynamic_network_architectures.architectures.abstract_arch import test_submodules_loadable as submodules_loadable

from nnunetv2_grcsf.architectures import FIASUNet
from nnunetv2_grcsf.architectures.blocks import (AttentionBlock, ContextAwareFusion, DepthwiseMultiKernelConv,
                                                 MixingAttention, MultiScaleDilatedAttention, RegionCompensationUnit)
from nnunetv2_grcsf.architectures.fias import default_stage_attention
from nnunetv2_grcsf.residual_channels import ResidualChannelError

FIAS = "nnunetv2_grcsf.architectures.fias.FIASUNet"
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
BUSI, BUSI_RESENC, HIPPOCAMPUS = ("Dataset802_BUSI256_nnUNetPlans", "Dataset802_BUSI256_nnUNetResEncUNetMPlans",
                                  "Dataset804_Hippocampus_nnUNetPlans")
# plans, configuration, a cropped input size that is valid: divisible by the product of the strides, and every
# MSDA stage (default: stages 2 and 3) at least 7 wide (kernel 3 at dilation 3)
PLANS = [(BUSI, "2d", (96, 96)), (BUSI_RESENC, "2d", (96, 96)), (HIPPOCAMPUS, "3d_fullres", (40, 40, 40))]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def build(plans=HIPPOCAMPUS, configuration="3d_fullres", input_channels=1, num_classes=3, deep_supervision=True,
          **kwargs):
    torch.manual_seed(0)
    return build_network_from_plans(FIAS, plans, configuration, input_channels, num_classes, deep_supervision,
                                    **kwargs)[0]


@pytest.fixture(scope="module")
def plans_networks():
    return {plans: build(plans, configuration) for plans, configuration, _ in PLANS}


@pytest.mark.parametrize("plans, configuration, input_size", PLANS)
def test_deep_supervision_outputs_have_the_shapes_nnunets_loss_expects(plans_networks, plans, configuration,
                                                                         input_size):
    network = plans_networks[plans]
    assert isinstance(network, FIASUNet)
    with torch.no_grad():
        outputs = network(torch.randn(1, 1, *input_size))
        assert isinstance(outputs, (list, tuple))
        assert [tuple(o.shape) for o in outputs] == expected_deep_supervision_shapes(plans, configuration,
                                                                                     input_size, 1, 3)
        network.decoder.deep_supervision = False  # nnU-Net's set_deep_supervision_enabled does this
        try:
            output = network(torch.randn(1, 1, *input_size))
        finally:
            network.decoder.deep_supervision = True
    assert isinstance(output, torch.Tensor) and output.shape == (1, 3, *input_size)


def test_default_layout_follows_dilateformer_on_the_plans_stages(plans_networks):
    assert default_stage_attention(6) == ["conv", "conv", "msda", "msda", "global", "global"]
    assert default_stage_attention(4) == ["conv", "conv", "msda", "global"]  # the bottleneck is always global
    network = plans_networks[BUSI]
    blocks = [m for m in network.encoder.modules() if isinstance(m, AttentionBlock)]
    assert [b.kind for b in blocks] == ["msda", "msda", "global", "global"]
    assert sum(isinstance(m, DepthwiseMultiKernelConv) for m in network.modules()) == 4
    assert sum(isinstance(m, ContextAwareFusion) for m in network.modules()) == 4
    mixing = [m for m in network.decoder.modules() if isinstance(m, MixingAttention)]
    assert len(mixing) == 5  # one per decoder stage; token mixing where the encoder stage has attention
    assert [m.attention is None for m in mixing] == [False, False, False, True, True]


@pytest.mark.parametrize("configuration, input_size", [("2d", (24, 24)), ("3d_fullres", (24, 24, 24))])
def test_gradients_reach_both_encoder_paths_and_the_fusion(configuration, input_size):
    network = build(HIPPOCAMPUS, configuration, stage_attention=["conv", "msda", "msda", "global"],
                    msda_dilations=(1, 2))
    outputs = network(torch.randn(2, 1, *input_size))
    sum(o.square().mean() for o in outputs).backward()
    paths = [m for m in network.modules() if isinstance(m, (AttentionBlock, DepthwiseMultiKernelConv,
                                                             ContextAwareFusion))]
    assert len(paths) == 3 * 3
    for module in paths:
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{type(module).__name__}.{name}"


@pytest.mark.parametrize("configuration, input_size", [("2d", (24, 24)), ("3d_fullres", (24, 24, 24))])
def test_deep_supervision_state_dict_loads_without_deep_supervision(configuration, input_size):
    trained = build(HIPPOCAMPUS, configuration, deep_supervision=True, msda_dilations=(1, 2))
    inference = build(HIPPOCAMPUS, configuration, deep_supervision=False, msda_dilations=(1, 2))
    torch.manual_seed(1)
    trained.apply(lambda m: [p.data.normal_(0, 0.05) for p in m.parameters(recurse=False)])
    inference.load_state_dict(trained.state_dict())  # strict
    x = torch.randn(1, 1, *input_size)
    with torch.no_grad():
        assert torch.allclose(inference.eval()(x), trained.eval()(x)[0], atol=1e-5)


def test_with_rcu_the_residual_channel_is_split_off_and_changes_the_output():
    network = build(input_channels=2, residual_channels=[1], use_rcu=True, msda_dilations=(1, 2)).eval()
    assert network.image_channels == [0] and network.residual_channels == [1]
    assert network.get_submodule(network.keys_to_in_proj[0]).weight.shape[1] == 1  # encoder sees image channels
    units = [m for m in network.modules() if isinstance(m, RegionCompensationUnit)]
    assert len(units) == len(network.decoder.region_compensation) >= 1
    x = torch.randn(1, 2, 24, 24, 24)
    changed = x.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    with torch.no_grad():
        assert not torch.allclose(network(x)[0], network(changed)[0], atol=1e-6)
        for unit in units:  # the residual reaches the output via the RCUs only: bypassed, it changes nothing
            unit.forward = lambda features, *args: features
        assert torch.allclose(network(x)[0], network(changed)[0])


def test_with_rcu_the_network_starts_as_fias_without_it_from_the_same_seed():
    """The RCUs draw their random numbers from a stream of their own (helpers.AddedUnits): FIASTrainer's and
    GRCSF_FIASTrainer's runs of one seed start from the same FIAS weights and draw the same numbers afterwards."""
    with_rcu = build(input_channels=2, residual_channels=[1], use_rcu=True).state_dict()
    after_with_rcu = torch.rand(8)
    without = build(input_channels=1).state_dict()
    assert torch.equal(after_with_rcu, torch.rand(8))
    added = {key for key in with_rcu if key not in without}
    assert added == {key for key in with_rcu if ".region_compensation." in key}
    assert all(torch.equal(value, with_rcu[key]) for key, value in without.items())


def test_without_rcu_every_channel_is_an_image_channel():
    network = build(input_channels=2, residual_channels=[1])
    assert network.image_channels == [0, 1] and network.residual_channels == []
    assert not any(isinstance(m, RegionCompensationUnit) for m in network.modules())


@pytest.mark.parametrize("plans, configuration, input_size", PLANS)
def test_weight_transfer_keys_name_the_encoder_and_its_first_conv(plans_networks, plans, configuration, input_size):
    network = plans_networks[plans]
    submodules_loadable(network)
    assert network.get_submodule(network.key_to_encoder) is network.encoder
    assert network.get_submodule(network.keys_to_in_proj[0]).weight.shape[1] == 1


def test_feature_map_size_tracks_the_memory_kept_for_backward(plans_networks):
    """nnU-Net's planners size patches and batches by compute_conv_feature_map_size relative to PlainConvUNet's:
    FIAS's estimate, relative to PlainConvUNet's, is within 25 % of the ratio of the bytes the two networks really
    keep for their backward pass, and the estimate is an integer proportional to the patch volume."""
    patch_size = list(configuration_manager(HIPPOCAMPUS, "3d_fullres").patch_size)
    network = plans_networks[HIPPOCAMPUS].train()
    torch.manual_seed(0)
    plain = build_network_from_plans(PLAIN_CONV_UNET, HIPPOCAMPUS, "3d_fullres", 1, 3, True)[0].train()
    x = torch.randn(1, 1, *patch_size)
    measured = saved_for_backward_bytes(network, x)[0] / saved_for_backward_bytes(plain, x)[0]
    estimate = network.compute_conv_feature_map_size(patch_size) / plain.compute_conv_feature_map_size(patch_size)
    assert 0.8 < estimate / measured < 1.25
    size = network.compute_conv_feature_map_size(patch_size)
    assert isinstance(size, np.integer)
    assert network.compute_conv_feature_map_size([2 * patch_size[0], *patch_size[1:]]) == 2 * size


def test_feature_map_size_counts_what_checkpointing_saves(plans_networks):
    patch_size = configuration_manager(HIPPOCAMPUS, "3d_fullres").patch_size
    without_checkpointing = build(activation_checkpointing=False)
    assert (plans_networks[HIPPOCAMPUS].compute_conv_feature_map_size(patch_size) <
            without_checkpointing.compute_conv_feature_map_size(patch_size))


def test_checkpointing_recomputes_the_msda_stages_only(plans_networks):
    """High-resolution 'msda' units are recomputed; 'global' units (few positions: little memory saved for a full
    forward pass more) keep their activations."""
    network = plans_networks[BUSI]
    assert network.encoder.stage_attention == ["conv", "conv", "msda", "msda", "global", "global"]
    for stage, kind in zip(network.encoder.stages, network.encoder.stage_attention):
        if kind != "conv":
            assert [unit.checkpointing for unit in stage.units] == [kind == "msda"] * len(stage.units)


def saved_for_backward_bytes(network, x) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one training forward (parameters
    excluded; activation checkpointing keeps only the inputs of what it recomputes)."""
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = network(x)
    return sum(saved.values()), outputs


@pytest.mark.parametrize("configuration, input_size, extra", [
    ("2d", (24, 24), {}),
    ("3d_fullres", (24, 24, 24), {}),
    ("3d_fullres", (24, 24, 24), dict(input_channels=2, residual_channels=[1], use_rcu=True)),
])
def test_activation_checkpointing_changes_memory_not_the_network(configuration, input_size, extra):
    """Checkpointed dual-path units, decoder token mixing and decoder outputs recomputed by their consumers: the
    same outputs and gradients as without checkpointing, and less kept for the backward pass."""
    kwargs = dict(stage_attention=["conv", "msda", "msda", "global"], msda_dilations=(1, 2), **extra)
    networks = [build(HIPPOCAMPUS, configuration, activation_checkpointing=flag, **kwargs).train()
                for flag in (False, True)]
    networks[1].load_state_dict(networks[0].state_dict())
    x = torch.randn(2, extra.get("input_channels", 1), *input_size)
    saved, outputs = [], []
    for network in networks:
        torch.manual_seed(1)  # the same Monte Carlo draws
        nbytes, out = saved_for_backward_bytes(network, x)
        saved.append(nbytes)
        outputs.append(out)
        sum(o.square().mean() for o in out).backward()
    for a, b in zip(*outputs):
        assert torch.allclose(a, b, atol=1e-6)
    for (name, a), b in zip(networks[0].named_parameters(), networks[1].parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    assert saved[1] < 0.75 * saved[0]


def test_msda_implementation_reaches_every_msda_and_keeps_the_function():
    """'flex' (flex_attention; on the CPU its eager dense reference, forward only) against 'loop', encoder and
    decoder MSDA alike."""
    kwargs = dict(stage_attention=["conv", "msda", "msda", "global"], msda_dilations=(1, 2))
    networks = [build(HIPPOCAMPUS, "3d_fullres", msda_implementation=implementation, **kwargs).eval()
                for implementation in ("loop", "flex")]
    for network, implementation in zip(networks, ("loop", "flex")):
        kinds = {m.implementation for m in network.modules() if isinstance(m, MultiScaleDilatedAttention)}
        assert kinds == {implementation}
    assert any(isinstance(m, MultiScaleDilatedAttention) for m in networks[0].decoder.modules())
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        for a, b in zip(networks[0](x), networks[1](x)):
            assert torch.allclose(a, b, atol=1e-5)


def test_full_hippocampus_patch_passes_the_size_check(plans_networks):
    plans_networks[HIPPOCAMPUS].check_input_size(configuration_manager(HIPPOCAMPUS, "3d_fullres").patch_size)
    plans_networks[BUSI].check_input_size(configuration_manager(BUSI, "2d").patch_size)


@pytest.mark.parametrize("input_size, match", [
    ((40, 44, 40), r"input size \[40, 44, 40\] is not divisible by \[8, 8, 8\].*'strides'"),
    ((24, 40, 40), r"encoder stage 2 has feature map \[6, 10, 10\].*smaller than its MSDA window \[7, 7, 7\] "
                   r"\(kernel 3 at dilation 3.*stage_attention 'global' or 'conv' for stage 2"),
])
def test_input_the_network_cannot_process_is_a_named_error(plans_networks, input_size, match):
    with pytest.raises(ValueError, match=match):
        plans_networks[HIPPOCAMPUS](torch.randn(1, 1, *input_size))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=8), r"encoder stage 2 \(128 features, stage_attention 'msda', num_heads 8\), "
                        r"msda_dilations \[1, 2, 3\]: num_heads=8 is not divisible by the number of dilations 3"),
    (dict(msda_dilations=(1, 2), num_heads=[2, 2, 3, 8]), r"encoder stage 2 .*num_heads=3 is not divisible by the "
                                                          r"number of dilations 2"),
    (dict(stage_attention=["msda", "conv", "msda", "global"], num_heads=[2, 2, 9, 8]),
     r"encoder stage 0 \(32 features.*num_heads=2 is not divisible by the number of dilations 3"),
    (dict(stage_attention=["conv", "msda", "global"]), r"stage_attention \['conv', 'msda', 'global'\] must have "
                                                       r"one entry per stage \(4\)"),
    (dict(stage_attention=["conv", "conv", "local", "global"]), r"each one of \('conv', 'msda', 'global'\)"),
    (dict(n_blocks_per_stage=[1, 1, 1, 1]), "exactly one of"),
    (dict(use_rcu=True, input_channels=2, residual_channels=[1], rcu_stages=(3,)), "rcu_stages"),
    (dict(msda_implementation="natten"), r"msda_implementation 'natten' is not one of \('auto', 'flex', 'loop'\)"),
])
def test_bad_arguments_are_named_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


def test_rcu_without_residual_channels_names_the_residuals_command():
    with pytest.raises(ResidualChannelError, match="nnunetv2_grcsf residuals.*use_rcu=False"):
        build(use_rcu=True)


@pytest.mark.slow
@pytest.mark.parametrize("configuration, input_size, extra", [
    ("2d", (64, 64), {}),
    ("2d", (64, 64), dict(input_channels=2, residual_channels=[1], use_rcu=True)),
    ("3d_fullres", (32, 32, 32), {}),
    ("3d_fullres", (32, 32, 32), dict(input_channels=2, residual_channels=[1], use_rcu=True)),
])
def test_training_network_traces_as_one_graph_without_breaks(configuration, input_size, extra):
    """torch.compile sees FIASUNet (2D and 3D, with and without the RCU) whole: one graph, no graph break (about
    half a minute of TorchDynamo tracing per case on the CPU)."""
    network = build(HIPPOCAMPUS, configuration, stage_attention=["conv", "msda", "msda", "global"], **extra).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(network)(torch.randn(2, extra.get("input_channels", 1), *input_size))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
