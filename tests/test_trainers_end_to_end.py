"""Every base trainer through the real `nnUNetv2_train` and `nnUNetv2_predict` console scripts.

The subprocesses get a fresh shell's environment (PATH, HOME and the three nnU-Net folders, no
nnUNet_extTrainer): the trainers must be found through the installed start-up hook alone. One
trainer runs with exactly that environment; the others also get nnU-Net's own switches for fewer
worker processes (nnUNet_n_proc_DA=0, nnUNet_def_n_proc=1), which saves about a minute each on CI.
"""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_runs import nnunet_env, run, tiny_residual_dataset
from nnunetv2_grcsf.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

DATASET_ID = 971
FRESH_SHELL_TRAINER = "GRCSFTrainer"
FEW_WORKERS = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return tiny_residual_dataset(tmp_path_factory.mktemp("e2e"), DATASET_ID)


@pytest.mark.parametrize("trainer", ["GRCSFTrainer", "GRCSFTrainer_noRCU", "GRCSFTrainer_noGCU",
                                     "GRCSFTrainer_residualInEncoder", "FIASTrainer",
                                     "GRCSF_FIASTrainer", "FIASTrainerAdamW"])
def test_train_and_predict_through_nnunet_commands(tiny_dataset, tmp_path, trainer):
    env, dataset = tiny_dataset
    env = env if trainer == FRESH_SHELL_TRAINER else {**env, **FEW_WORKERS}
    short = f"{trainer}_2epochs_4iters"
    run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", short, "-device", "cpu"], env)
    if trainer.endswith("AdamW"):  # the recipe's optimizer, not nnUNetTrainer's SGD, is what trained
        logs = list(Path(env["nnUNet_results"]).glob(f"Dataset{DATASET_ID}_*/{short}__nnUNetPlans__2d/fold_0/"
                                                        "training_log_*.txt"))
        assert "AdamW lr 0.0003, weight decay 0.05, linear warm-up over 1 of 2 epochs" in logs[-1].read_text()
    output = tmp_path / "predictions"
    run(["nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(output), "-d", str(DATASET_ID), "-c", "2d",
         "-f", "0", "-tr", short, "-device", "cpu", "--disable_progress_bar"], env)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (dataset / "imagesTs").glob("*_0000.nii.gz"))
    assert sorted(p.name[: -len(".nii.gz")] for p in output.glob("*.nii.gz")) == cases
    for case in cases:
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{case}.nii.gz")))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "imagesTs" / f"{case}_0000.nii.gz")))
        assert prediction.shape == image.shape
        assert set(np.unique(prediction)) <= {0, 1}


def test_user_trainer_directories_keep_working_beside_ours(tiny_dataset, tmp_path):
    env, _ = tiny_dataset
    own = tmp_path / "my_trainers"
    own.mkdir()
    (own / "my_trainer.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class MyOwnTrainer(nnUNetTrainer):\n    pass\n")
    lookup = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              "import os\nprint('EXT=' + os.environ['nnUNet_extTrainer'])\n"
              "print('FOUND=', find('MyOwnTrainer').__module__, find('GRCSFTrainer_5epochs').__module__)")
    lines = run(["python", "-c", lookup], {**env, "nnUNet_extTrainer": str(own)}).stdout.splitlines()
    ext = next(line for line in lines if line.startswith("EXT="))[len("EXT="):]
    assert ext.split(os.pathsep)[0] == str(own)
    assert next(line for line in lines if line.startswith("FOUND=")) == "FOUND= my_trainer nnunetv2_grcsf.trainers"


def test_grcsf_trainer_on_a_dataset_without_residual_channel_says_what_to_run(tmp_path):
    env = nnunet_env(tmp_path)
    write_synthetic_dataset(env["nnUNet_raw"], 972, "NoResidual", 4, 0, shape=(32, 32), progress=False)
    run(["nnUNetv2_plan_and_preprocess", "-d", "972", "-c", "2d", "-np", "1"], env)
    result = subprocess.run(["nnUNetv2_train", "972", "2d", "0", "-tr", "GRCSFTrainer", "-device", "cpu"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "has no MAE residual channel" in result.stderr
    assert "nnunetv2_grcsf residuals -d SRC -o NEW_ID" in result.stderr
