"""Fine-tuning GRCSF from an nnU-Net model: the start checkpoint of ``nnunetv2_grcsf pretrained-weights``, loaded by
nnU-Net's own ``load_pretrained_weights`` (what ``nnUNetv2_train -pretrained_weights`` runs), on the plans nnU-Net
made for BUSI256 (PlainConvUNet and ResEnc M). The full ``nnUNetv2_train`` run is in
test_pretrained_weights_training.py (slow)."""
import json
import shutil

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import PLANS_DIR, load_plans
from nnunetv2_grcsf.cli import main as cli_main
from nnunetv2_grcsf.pretrained import (PretrainedWeightsError, check_pretrained_weights_argument,
                                       compensation_unit_prefixes, load_network_weights, network_for_training,
                                       save_start_checkpoint, start_weights)
from nnunetv2_grcsf.trainers import FIASTrainer, GRCSFTrainer, GRCSFTrainer_noRCU

PLAIN, RESENC = "Dataset802_BUSI256_nnUNetPlans", "Dataset802_BUSI256_nnUNetResEncUNetMPlans"
IMAGE_DATASET = {"channel_names": {"0": "rgb_to_0_1"}, "labels": {"background": 0, "lesion": 1},
                 "numTraining": 8, "file_ending": ".png"}
RESIDUAL_DATASET = {**IMAGE_DATASET, "channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1"},
                    "nnunetv2_grcsf": {"residual_channels": [1]}}


def nnunet_model_weights(plans_name: str, seed: int = 1) -> dict:
    """The network_weights an nnUNetTrainer run on these plans saves (its own network, initialized with a seed
    other than the start checkpoint's), with every weight moved off its initialization."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(seed)
    plans_manager = PlansManager(load_plans(plans_name))
    network = nnUNetTrainer.build_network_architecture(plans_manager, plans_manager.get_configuration("2d"), 1, 2)
    with torch.no_grad():
        for value in network.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value) * 0.1)
    return network, network.state_dict()


@pytest.mark.parametrize("plans_name", [PLAIN, RESENC])
def test_backbone_comes_from_the_nnunet_model_and_units_keep_their_initialization(plans_name, tmp_path,
                                                                                 one_cpu_thread):
    _, source = nnunet_model_weights(plans_name)
    torch.manual_seed(0)
    fresh = network_for_training(GRCSFTrainer, load_plans(plans_name), "2d", RESIDUAL_DATASET)
    initial = {k: v.clone() for k, v in fresh.state_dict().items()}
    weights, units = start_weights(source, fresh, "model.pth")
    assert units == ["decoder.region_compensation.0", "decoder.region_compensation.1"] + [
        f"encoder.global_compensation.{s}" for s in range(1, 6)]
    prefixes = compensation_unit_prefixes(fresh)
    for key, value in weights.items():
        expected = initial[key] if key.startswith(prefixes) or ".seg_layers." in key else source[key]
        assert torch.equal(value, expected), key

    save_start_checkpoint(tmp_path / "start.pth", weights, {"source": "model.pth"})
    torch.manual_seed(5)  # nnUNetv2_train builds its own network, then loads the file with nnU-Net's loader
    trained = network_for_training(GRCSFTrainer, load_plans(plans_name), "2d", RESIDUAL_DATASET)
    load_pretrained_weights(trained, str(tmp_path / "start.pth"))
    for key, value in trained.state_dict().items():
        if ".seg_layers." not in key:  # nnU-Net keeps its own segmentation layers
            assert torch.equal(value, weights[key]), key


def test_gcu_only_start_computes_the_nnunet_models_function(tmp_path, one_cpu_thread):
    """The GCU starts as the identity: GRCSF without RCU, started from an nnU-Net model, predicts exactly as it."""
    nnunet_network, source = nnunet_model_weights(PLAIN)
    torch.manual_seed(0)
    grcsf = network_for_training(GRCSFTrainer_noRCU, load_plans(PLAIN), "2d", IMAGE_DATASET)
    weights, _ = start_weights(source, grcsf, "model.pth")
    save_start_checkpoint(tmp_path / "start.pth", weights, {})
    load_pretrained_weights(grcsf, str(tmp_path / "start.pth"))
    grcsf.load_state_dict({**grcsf.state_dict(), **{k: v for k, v in source.items() if ".seg_layers." in k}})
    image = torch.randn(1, 1, 224, 256)
    with torch.no_grad():
        expected, got = nnunet_network.eval()(image), grcsf.eval()(image)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_a_model_of_other_plans_or_a_fias_network_is_refused_with_the_reason(one_cpu_thread):
    _, hippocampus = nnunet_model_weights("Dataset804_Hippocampus_nnUNetPlans")
    network = network_for_training(GRCSFTrainer, load_plans(PLAIN), "2d", RESIDUAL_DATASET)
    with pytest.raises(PretrainedWeightsError, match=r"does not hold the backbone of GRCSFUNet .*same plans \(-p\)"):
        start_weights(hippocampus, network, "hippo.pth")
    _, source = nnunet_model_weights(PLAIN)
    fias = network_for_training(FIASTrainer, load_plans(PLAIN), "2d", IMAGE_DATASET)
    with pytest.raises(PretrainedWeightsError, match="has no Global or Region Compensation Unit"):
        start_weights(source, fias, "model.pth")


def test_files_that_are_not_nnunet_checkpoints_are_named(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_network_weights(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="cannot be read as a PyTorch checkpoint"):
        load_network_weights(tmp_path / "text.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(PretrainedWeightsError, match="has no 'network_weights'"):
        load_network_weights(tmp_path / "other.pth")


def test_the_trainer_names_the_command_when_given_a_plain_nnunet_model(tmp_path, one_cpu_thread):
    _, source = nnunet_model_weights(PLAIN)
    torch.save({"network_weights": source}, tmp_path / "plain.pth")
    network = network_for_training(GRCSFTrainer, load_plans(PLAIN), "2d", RESIDUAL_DATASET)
    argv = ["nnUNetv2_train", "803", "2d", "0", "-tr", "GRCSFTrainer", "-pretrained_weights",
            str(tmp_path / "plain.pth")]
    with pytest.raises(PretrainedWeightsError) as error:
        check_pretrained_weights_argument(network, "GRCSFTrainer", "Dataset803_X", "2d", "nnUNetPlans", argv)
    assert (f"nnunetv2_grcsf pretrained-weights -i {tmp_path / 'plain.pth'} -o "
            f"{tmp_path / 'plain_for_GRCSFTrainer.pth'} -d Dataset803_X -c 2d -tr GRCSFTrainer") in str(error.value)
    weights, _ = start_weights(source, network, "plain.pth")
    save_start_checkpoint(tmp_path / "start.pth", weights, {})
    argv[-1] = str(tmp_path / "start.pth")
    check_pretrained_weights_argument(network, "GRCSFTrainer", "Dataset803_X", "2d", "nnUNetPlans", argv)
    check_pretrained_weights_argument(network, "GRCSFTrainer", "Dataset803_X", "2d", "nnUNetPlans", argv[:5])
    _, hippocampus = nnunet_model_weights("Dataset804_Hippocampus_nnUNetPlans")  # other plans: nnU-Net's error
    torch.save({"network_weights": hippocampus}, tmp_path / "other_plans.pth")
    argv[-1] = str(tmp_path / "other_plans.pth")
    check_pretrained_weights_argument(network, "GRCSFTrainer", "Dataset803_X", "2d", "nnUNetPlans", argv)


def test_command_writes_a_new_file_only(tmp_path, monkeypatch, capsys, one_cpu_thread):
    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset803_BUSI256"
    preprocessed.mkdir(parents=True)
    shutil.copy(PLANS_DIR / f"{PLAIN}.json", preprocessed / "nnUNetPlans.json")
    (preprocessed / "dataset.json").write_text(json.dumps(RESIDUAL_DATASET))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    _, source = nnunet_model_weights(PLAIN)
    torch.save({"network_weights": source, "trainer_name": "nnUNetTrainer"}, tmp_path / "model.pth")
    arguments = ["pretrained-weights", "-i", str(tmp_path / "model.pth"), "-o", str(tmp_path / "start.pth"),
                 "-d", "Dataset803_BUSI256", "-c", "2d", "-tr", "GRCSFTrainer"]
    assert cli_main(arguments) == 0
    assert "nnUNetv2_train Dataset803_BUSI256 2d FOLD -tr GRCSFTrainer -pretrained_weights" in capsys.readouterr().out
    written = torch.load(tmp_path / "start.pth", weights_only=False)
    assert written["pretrained_from"]["initialized_units"][0] == "decoder.region_compensation.0"
    assert all(torch.equal(written["network_weights"][k], v) for k, v in source.items() if ".seg_layers." not in k)
    before = (tmp_path / "start.pth").read_bytes()
    assert cli_main(arguments) == 2
    assert "exists already" in capsys.readouterr().err
    assert (tmp_path / "start.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "nnUNet_preprocessed", "start.pth"]
