"""A data set written by `residuals -d` passes nnU-Net's own integrity check and planning (subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_grcsf.mae.residuals import make_residual_dataset

from mae_testutils import blob_free_mae, make_raw_dataset, nnunet_env, one_thread  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_written_dataset_passes_nnunet_plan_and_preprocess(nnunet_env, blob_free_mae):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 60, "Plan", num_cases=6, shape=(48, 56), seed=3)
    make_residual_dataset(60, 61, checkpoint=blob_free_mae["checkpoint"], progress=False, num_threads=1,
                          log=lambda *a: None)
    command = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    env = {**os.environ, **{k: str(v) for k, v in nnunet_env.items()}}
    env.pop("nnUNet_n_proc_DA", None)  # planning calls torch.set_num_threads(nnUNet_n_proc_DA): 0 would crash
    proc = subprocess.run([str(command), "-d", "61", "--verify_dataset_integrity", "-c", "2d", "-np", "1",
                           "-npfp", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pre = nnunet_env["nnUNet_preprocessed"] / "Dataset061_Plan"
    dataset_json = json.loads((pre / "dataset.json").read_text())
    assert dataset_json["nnunetv2_grcsf"]["residual_channels"] == [1]  # nnU-Net carries our key on
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["normalization_schemes"] == ["ZScoreNormalization", "RGBTo01Normalization"]
    assert len(list((pre / "nnUNetPlans_2d").glob("*.b2nd"))) + len(list((pre / "nnUNetPlans_2d").glob("*.npz"))) >= 6
