"""`nnunetv2_grcsf predict`: which input folders get residual channels, the errors for those that cannot,
and the command line that hands nnUNetv2_predict's arguments to nnU-Net's own parser.

The full path (a trained model, its stored MAE, nnU-Net's predictor) runs in tests/test_model_export.py.
"""
import pytest
import torch

from nnunetv2_grcsf.cli import main
from nnunetv2_grcsf.prediction import ResidualChannelPredictor
from nnunetv2_grcsf.residual_channels import ResidualChannelError


def predictor(tmp_path, residual_channels=(1,)):
    """A predictor as initialize_from_trained_model_folder leaves it for a model with image channel 0 (+ residual 1)."""
    p = ResidualChannelPredictor(device=torch.device("cpu"))
    p.dataset_json = {"channel_names": {"0": "grey", "1": "rgb_to_0_1"}, "file_ending": ".nii.gz"}
    p.residual_channels = list(residual_channels)
    p.model_folder = tmp_path / "Dataset501_X" / "GRCSFTrainer__nnUNetPlans__2d"
    return p


def folder(tmp_path, files):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in files:
        (inputs / name).touch()
    return str(inputs)


def test_cases_with_the_residual_channel_are_predicted_as_they_are(tmp_path, capsys):
    source = folder(tmp_path, ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"])
    with predictor(tmp_path).inputs_with_residual_channels(source) as inputs:
        assert inputs == source
    assert "already have the residual channel(s) [1]" in capsys.readouterr().out


def test_image_only_cases_without_a_stored_mae_say_what_to_run(tmp_path):
    source = folder(tmp_path, ["a_0000.nii.gz", "b_0000.nii.gz"])
    with pytest.raises(ResidualChannelError, match="carries no MAE") as error:
        with predictor(tmp_path).inputs_with_residual_channels(source):
            pass
    assert f"nnunetv2_grcsf residuals -i {source} -o NEW_FOLDER -m MAE_CHECKPOINT" in str(error.value)


@pytest.mark.parametrize("files, message", [
    (["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz"], r"mixes cases with the residual channel\(s\) \(a...\) and "
                                                          r"without \(b...\)"),
    (["a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz"], r"case\(s\) a \(3\) in .* have another number of channel"),
])
def test_folders_that_are_neither_say_what_is_wrong(tmp_path, files, message):
    with pytest.raises(ResidualChannelError, match=message):
        with predictor(tmp_path).inputs_with_residual_channels(folder(tmp_path, files)):
            pass


def test_models_without_residual_channels_take_the_folder_as_it_is(tmp_path):
    source = folder(tmp_path, ["a_0000.nii.gz"])
    with predictor(tmp_path, residual_channels=()).inputs_with_residual_channels(source) as inputs:
        assert inputs == source


def test_the_command_takes_nnunet_predicts_arguments_and_help(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["predict", "-h"])
    assert exit_code.value.code == 0
    out = capsys.readouterr().out
    assert "usage: nnunetv2_grcsf predict" in out and "-step_size STEP_SIZE" in out and "--disable_tta" in out
    assert "made with the MAE stored in the model's checkpoint" in out
    with pytest.raises(SystemExit) as exit_code:  # other commands still refuse unknown arguments
        main(["evaluate", "-step_size", "0.5"])
    assert exit_code.value.code == 2


@pytest.mark.parametrize("channels, message", [
    (1, r"GRCSFUNet needs 2 input channels \(image channel\(s\) \[0\] \+ MAE residual channel\(s\) \[1\]\), the images "
        r"have 1: predict with `nnunetv2_grcsf predict`"),
    (3, r"the images have 3: give every case the files _0000.._0001"),
])
def test_a_network_given_the_wrong_channel_count_says_what_to_run(channels, message):
    """What plain nnUNetv2_predict shows (as the last line of its traceback) for images without the residual map."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from conftest import load_plans
    from nnunetv2_grcsf.residual_channels import plans_with_residual_channels
    from nnunetv2_grcsf.trainers import GRCSFTrainer

    plans = PlansManager(plans_with_residual_channels(load_plans("Dataset804_Hippocampus_nnUNetPlans"), [1]))
    configuration = plans.get_configuration("2d")
    network = GRCSFTrainer.build_network_architecture(plans, configuration, 2, 3, enable_deep_supervision=False)
    with pytest.raises(ResidualChannelError, match=message), torch.no_grad():
        network(torch.zeros(1, channels, *configuration.patch_size))
