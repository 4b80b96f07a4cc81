"""The bump test (issue 13): in a random-initialized network with the RCU, a bump in the residual-map channel
inside a 16 x 16 square changes the logits at least 4x more inside the square than in the ring 8-16 px
around it (mean |delta logits| over classes and pixels inside, against the same over the ring).

Built from the BUSI256 2d plans as nnU-Net builds it (its initialization included), on a 128 x 128 crop to keep
the test fast; the full 224 x 256 patch gives the same picture (see the RCU's report).
"""
import pytest
import torch
from conftest import build_network_from_plans

BUSI = "Dataset802_BUSI256_nnUNetPlans"
NETWORKS = {"GRCSFTrainer": ("nnunetv2_grcsf.architectures.grcsf.GRCSFUNet", {}),
            "GRCSFTrainer_rcuEveryScale": ("nnunetv2_grcsf.architectures.grcsf.GRCSFUNet", {"rcu_stages": "every"}),
            "GRCSF_FIASTrainer": ("nnunetv2_grcsf.architectures.fias.FIASUNet", {})}
SQUARE, INNER, OUTER = 16, 8, 16

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def square_mask(size, top_left, edge, margin=0) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top_left[0] - margin:top_left[0] + edge + margin, top_left[1] - margin:top_left[1] + edge + margin] = True
    return mask


def bump_response_ratio(network, size, top_left, bump=3.0, seed=0) -> float:
    """Mean |delta logits| inside the square / mean |delta logits| in the ring INNER..OUTER px around it, for a
    bump of ``bump`` added to the residual channel (input channel 1) inside the square."""
    torch.manual_seed(seed)
    x = torch.randn(1, 2, *size)
    bumped = x.clone()
    bumped[0, 1][square_mask(size, top_left, SQUARE)] += bump
    with torch.no_grad():
        change = (network(bumped) - network(x)).abs().mean(1)[0]
    ring = square_mask(size, top_left, SQUARE, OUTER) & ~square_mask(size, top_left, SQUARE, INNER)
    return (change[square_mask(size, top_left, SQUARE)].mean() / change[ring].mean()).item()


@pytest.fixture(scope="module")
def networks():
    built = {}
    for trainer, (network_class, kwargs) in NETWORKS.items():
        torch.manual_seed(0)
        built[trainer] = build_network_from_plans(network_class, BUSI, "2d", 2, 2, deep_supervision=False,
                                                  residual_channels=[1], use_rcu=True, **kwargs)[0].eval()
    return built


@pytest.mark.parametrize("trainer", list(NETWORKS))
@pytest.mark.parametrize("top_left", [(56, 60), (24, 88)])  # off the token grid (8 px) and near a border
def test_a_residual_bump_changes_the_logits_mostly_inside_it(networks, trainer, top_left):
    ratio = bump_response_ratio(networks[trainer], (128, 128), top_left)
    assert ratio >= 4.0, f"{trainer}: inside / ring = {ratio:.2f}"
