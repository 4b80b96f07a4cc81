"""GRCSFUNet built from real nnU-Net plans (tests/data/plans) as nnU-Net builds it; CPU, small inputs."""
import numpy as np
import pytest
import torch
from conftest import build_network_from_plans, configuration_manager, expected_deep_supervision_shapes
from dynamic_network_architectures.architectures.abstract_arch import test_submodules_loadable as submodules_loadable
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from nnunetv2_grcsf.architectures import GRCSFUNet
from nnunetv2_grcsf.architectures.blocks import GlobalCompensationUnit, RegionCompensationUnit
from nnunetv2_grcsf.residual_channels import ResidualChannelError

GRCSF = "nnunetv2_grcsf.architectures.grcsf.GRCSFUNet"
BUSI, BUSI_RESENC, HIPPOCAMPUS = ("Dataset802_BUSI256_nnUNetPlans", "Dataset802_BUSI256_nnUNetResEncUNetMPlans",
                                  "Dataset804_Hippocampus_nnUNetPlans")
# plans, configuration, a cropped input size that is still divisible by the product of the strides
PLANS = [(BUSI, "2d", (64, 96)), (BUSI_RESENC, "2d", (64, 64)), (HIPPOCAMPUS, "3d_fullres", (16, 24, 16))]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def build(plans=HIPPOCAMPUS, configuration="3d_fullres", input_channels=2, num_classes=3, deep_supervision=True,
          **kwargs):
    torch.manual_seed(0)
    kwargs = {"residual_channels": [1], **kwargs}
    return build_network_from_plans(GRCSF, plans, configuration, input_channels, num_classes, deep_supervision,
                                    **kwargs)[0]


@pytest.fixture(scope="module")
def plans_networks():
    """One GRCSFUNet (deep supervision on, residual channel 1 of 2) per entry of PLANS, built once per module."""
    return {plans: build(plans, configuration) for plans, configuration, _ in PLANS}


@pytest.mark.parametrize("plans, configuration, input_size", PLANS)
def test_deep_supervision_outputs_have_the_shapes_nnunets_loss_expects(plans_networks, plans, configuration,
                                                                         input_size):
    network = plans_networks[plans]
    assert isinstance(network, GRCSFUNet)  # the class the plans name, re-exported by nnunetv2_grcsf.architectures
    with torch.no_grad():
        outputs = network(torch.randn(1, 2, *input_size))
        assert isinstance(outputs, (list, tuple))
        assert [tuple(o.shape) for o in outputs] == expected_deep_supervision_shapes(plans, configuration,
                                                                                     input_size, 1, 3)
        network.decoder.deep_supervision = False  # nnU-Net's set_deep_supervision_enabled does this
        try:
            output = network(torch.randn(1, 2, *input_size))
        finally:
            network.decoder.deep_supervision = True
    assert isinstance(output, torch.Tensor) and output.shape == (1, 3, *input_size)


def test_full_hippocampus_patch_without_deep_supervision():
    network = build(deep_supervision=False)
    patch_size = configuration_manager(HIPPOCAMPUS, "3d_fullres").patch_size
    with torch.no_grad():
        assert network(torch.randn(1, 2, *patch_size)).shape == (1, 3, *patch_size)


@pytest.mark.parametrize("configuration, input_size", [("2d", (16, 24)), ("3d_fullres", (8, 16, 8))])
def test_every_gcu_and_rcu_parameter_gets_a_gradient_within_two_steps(configuration, input_size):
    """The RCUs get gradients from the first step; the GCUs, which start as the identity (zero output scale),
    from the second."""
    network = build(HIPPOCAMPUS, configuration)
    units = [m for m in network.modules() if isinstance(m, (GlobalCompensationUnit, RegionCompensationUnit))]
    assert len(units) == 3 + 2
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)  # nnU-Net's
    x = torch.randn(2, 2, *input_size)
    for step in range(2):
        optimizer.zero_grad()
        sum(o.square().mean() for o in network(x)).backward()
        for unit in units:
            for name, parameter in unit.named_parameters():
                has_gradient = parameter.grad is not None and parameter.grad.abs().sum() > 0
                assert has_gradient or (step == 0 and isinstance(unit, GlobalCompensationUnit) and name != "scale"), \
                    f"step {step}: {type(unit).__name__}.{name}"
        optimizer.step()


def test_with_rcu_the_residual_channel_is_split_off_and_changes_the_output():
    network = build(input_channels=3, residual_channels=[0]).eval()
    assert network.image_channels == [1, 2] and network.residual_channels == [0]
    assert network.get_submodule(network.keys_to_in_proj[0]).weight.shape[1] == 2  # encoder sees image channels
    x = torch.randn(1, 3, 16, 16, 16)
    changed = x.clone()
    changed[:, 0] = torch.randn_like(changed[:, 0])
    with torch.no_grad():
        assert not torch.allclose(network(x)[0], network(changed)[0], atol=1e-6)
        network.decoder.region_compensation = torch.nn.ModuleDict()  # the residual reaches the output via RCUs only
        assert torch.equal(network(x)[0], network(changed)[0])


def test_residual_in_encoder_feeds_the_residual_to_the_encoder_and_the_rcus():
    network = build(input_channels=3, residual_channels=[0], residual_in_encoder=True).eval()
    assert network.encoder_channels == [0, 1, 2] and network.residual_channels == [0]
    assert network.get_submodule(network.keys_to_in_proj[0]).weight.shape[1] == 3
    x = torch.randn(1, 3, 16, 16, 16)
    changed = x.clone()
    changed[:, 0] = torch.randn_like(changed[:, 0])
    with torch.no_grad():
        assert not torch.allclose(network.encoder(x)[-1], network.encoder(changed)[-1], atol=1e-6)
        residual_maps = []
        rcu = network.decoder.region_compensation["0"]
        hook = rcu.register_forward_hook(lambda module, args, out: residual_maps.append(args[1]))
        network(changed)
        hook.remove()
        assert torch.equal(residual_maps[0], changed[:, [0]])


def test_without_rcu_every_channel_is_an_image_channel():
    network = build(use_rcu=False, residual_channels=[1])
    assert network.image_channels == [0, 1] and network.residual_channels == []
    assert network.get_submodule(network.keys_to_in_proj[0]).weight.shape[1] == 2
    assert not any(isinstance(m, RegionCompensationUnit) for m in network.modules())


@pytest.mark.parametrize("kwargs, n_gcu, n_rcu", [
    (dict(), 3, 2),  # RCUs at the two finest decoder stages by default
    (dict(use_gcu=False), 0, 2),
    (dict(use_rcu=False), 3, 0),
    (dict(use_gcu=False, use_rcu=False), 0, 0),
    (dict(rcu_stages=(0, 1, 2)), 3, 3),
])
def test_switches_change_the_module_set(kwargs, n_gcu, n_rcu):
    network = build(**kwargs)
    assert sum(isinstance(m, GlobalCompensationUnit) for m in network.modules()) == n_gcu  # stages with stride > 1
    assert sum(isinstance(m, RegionCompensationUnit) for m in network.modules()) == n_rcu


@pytest.mark.parametrize("plans, configuration, input_size, patch, stages", [
    (BUSI, "2d", (64, 96), None, ["0", "1", "2", "3"]),  # strides' products 1, 2, 4, 8 divide the 8-px patch; 16 not
    (BUSI, "2d", (64, 96), 4, ["0", "1", "2"]),
    (HIPPOCAMPUS, "3d_fullres", (16, 24, 16), None, ["0", "1", "2"]),  # every decoder stage (strides 1, 2, 4)
])
def test_rcu_at_every_token_scale(plans, configuration, input_size, patch, stages):
    network = build(plans, configuration, rcu_stages="every", rcu_patch_size=patch)
    assert list(network.decoder.region_compensation) == stages
    outputs = network(torch.randn(1, 2, *input_size))
    assert outputs[0].shape == (1, 3, *input_size)


def test_without_both_units_it_is_the_plain_unet_of_the_plans():
    kwargs = dict(plans=HIPPOCAMPUS, configuration="3d_fullres", input_channels=2, num_classes=3)
    network = build(**kwargs, use_gcu=False, use_rcu=False)
    torch.manual_seed(0)
    plain, _ = build_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                        HIPPOCAMPUS, "3d_fullres", 2, 3, deep_supervision=True)
    network.load_state_dict(plain.state_dict())  # strict: the same keys
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(network(x), plain(x)))


@pytest.mark.parametrize("use_rcu, gcu_start", [(False, "zero_scale"), (True, "zero_scale"),
                                                (False, "zero_projection")])
def test_plain_unet_weights_load_and_at_initialization_only_the_rcu_changes_its_output(use_rcu, gcu_start):
    """A PlainConvUNet of the same plans (on the image channels) loads with only GCU/RCU keys missing; then,
    GCUs being the identity at initialization, the network without RCUs gives exactly PlainConvUNet's output
    (with either way of starting as the identity: nnU-Net's He initialization of every conv must not undo it)."""
    network = build(use_rcu=use_rcu, input_channels=2, residual_channels=[1], gcu_start=gcu_start).eval()
    plain, _ = build_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                        HIPPOCAMPUS, "3d_fullres", len(network.image_channels), 3)
    missing, unexpected = network.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".global_compensation." in key or ".region_compensation." in key for key in missing)
    assert any(".global_compensation." in key for key in missing)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        expected = plain.eval()(x[:, network.image_channels])
        if use_rcu:
            assert not torch.allclose(network(x)[0], expected[0], atol=1e-4)
            network.decoder.region_compensation = torch.nn.ModuleDict()
        assert all(torch.equal(a, b) for a, b in zip(network(x), expected))


def test_empty_residual_channels_with_rcu_name_the_residuals_command():
    with pytest.raises(ResidualChannelError, match="nnunetv2_grcsf residuals.*use_rcu=False"):
        build(residual_channels=[])


def test_residual_channel_out_of_range_is_a_named_error():
    with pytest.raises(ResidualChannelError, match=r"residual channel index \[2\] is out of range"):
        build(residual_channels=[2])


@pytest.mark.parametrize("use_rcu", [True, False])
def test_input_not_divisible_by_the_strides_product_names_the_plans_entry(use_rcu):
    network = build(use_rcu=use_rcu)
    with pytest.raises(ValueError, match=r"not divisible by \[8, 8, 8\].*'strides'.*'patch_size'"):
        network(torch.randn(1, 2, 16, 20, 16))


@pytest.mark.parametrize("kwargs, match", [(dict(rcu_stages=(3,)), "rcu_stages"),
                                           (dict(rcu_stages="coarse"), "rcu_stages 'coarse' is neither 'every'"),
                                           (dict(plans=BUSI, configuration="2d", rcu_stages=(4,)),
                                            r"stage 4, whose stride \[16, 16\] does not divide"),
                                           (dict(n_blocks_per_stage=[1, 1, 1, 1]), "exactly one of"),
                                           (dict(rcu_attention_layout="flash"), "rcu_attention_layout 'flash'")])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


@pytest.mark.parametrize("configuration, input_size", [("2d", (16, 24)), ("3d_fullres", (16, 16, 16))])
def test_deep_supervision_state_dict_loads_without_deep_supervision(configuration, input_size):
    trained = build(HIPPOCAMPUS, configuration, deep_supervision=True)
    inference = build(HIPPOCAMPUS, configuration, deep_supervision=False)
    inference.load_state_dict(trained.state_dict())
    x = torch.randn(1, 2, *input_size)
    with torch.no_grad():
        assert torch.allclose(inference.eval()(x), trained.eval()(x)[0], atol=1e-5)


@pytest.mark.parametrize("plans, configuration, input_size", PLANS)
def test_weight_transfer_keys_and_feature_map_size(plans_networks, plans, configuration, input_size):
    network = plans_networks[plans]
    submodules_loadable(network)
    assert network.get_submodule(network.key_to_encoder) is network.encoder
    patch_size = configuration_manager(plans, configuration).patch_size
    backbone_encoder_class = type(network.encoder).__mro__[2]  # PlainConvEncoder or ResidualEncoder
    backbone_size = (backbone_encoder_class.compute_conv_feature_map_size(network.encoder, patch_size) +
                     UNetDecoder.compute_conv_feature_map_size(network.decoder, patch_size))
    size = network.compute_conv_feature_map_size(patch_size)
    assert isinstance(size, np.integer) and size > backbone_size


def test_rcu_attention_layout_reaches_every_rcu_and_keeps_the_function():
    """The networks' rcu_attention_layout (FIASUNet's too, through the same routing class) sets every RCU's layout;
    the layouts give the same logits, so weights trained with one predict with another."""
    from nnunetv2_grcsf.architectures.blocks.rcu import ATTENTION_LAYOUTS

    x = torch.randn(1, 2, 16, 16, 16)
    outputs = []
    for layout in ATTENTION_LAYOUTS:
        network = build(rcu_attention_layout=layout).eval()
        units = [m for m in network.modules() if isinstance(m, RegionCompensationUnit)]
        assert len(units) == 2 and {unit.attention_layout for unit in units} == {layout}
        with torch.no_grad():
            outputs.append(network(x)[0])
    assert all(torch.allclose(outputs[0], other, atol=1e-5) for other in outputs[1:])


@pytest.mark.parametrize("plans, arch", [(HIPPOCAMPUS, "unet.PlainConvUNet"), (BUSI, "unet.PlainConvUNet"),
                                         (BUSI_RESENC, "unet.ResidualEncoderUNet")])
@pytest.mark.parametrize("units", [dict(use_rcu=False, input_channels=1, residual_channels=[]), dict(use_gcu=False),
                                   dict(), dict(rcu_stages="every")])
def test_the_backbone_starts_as_nnunets_network_of_the_same_seed(plans, arch, units):
    """GCUs and RCUs draw their random numbers from streams of their own (helpers.AddedUnits): built and initialized
    as nnU-Net does after the same torch.manual_seed, the backbone's weights are those of nnU-Net's network, and so
    is every random number drawn afterwards (nnU-Net's batch sampling); the units shared by two variants start
    equal too (GCU only: trained on the image channel alone, as GRCSFTrainer_noRCU on the source data set)."""
    configuration = "3d_fullres" if plans == HIPPOCAMPUS else "2d"
    network = build(plans, configuration, **units)
    after_network = torch.rand(8)
    torch.manual_seed(0)
    plain, _ = build_network_from_plans(f"dynamic_network_architectures.architectures.{arch}", plans, configuration,
                                        len(network.encoder_channels), 3)
    after_plain = torch.rand(8)
    assert torch.equal(after_network, after_plain)
    backbone = plain.state_dict()
    units_state = {}
    for key, value in network.state_dict().items():
        if ".global_compensation." in key or ".region_compensation." in key:
            units_state[key] = value
        else:
            assert torch.equal(value, backbone.pop(key)), key
    assert not backbone
    full = build(plans, configuration).state_dict()  # GCUs and RCUs (at every scale: RCUs 0 and 1 are shared)
    shared = [key for key in units_state if key in full]
    assert shared and all(torch.equal(units_state[key], full[key]) for key in shared)


def test_separate_random_streams_differ_by_name_and_leave_the_global_generator():
    from nnunetv2_grcsf.architectures.helpers import separate_random_stream

    torch.manual_seed(3)
    with separate_random_stream("a"):
        a = torch.rand(4)
    with separate_random_stream("a"):
        a_again = torch.rand(4)
    with separate_random_stream("b"):
        b = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(a, a_again) and not torch.equal(a, b) and torch.equal(after, torch.rand(4))
    assert not torch.equal(a, after)
