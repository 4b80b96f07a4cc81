"""README's first command: `nnunetv2_grcsf demo` runs the whole pipeline and reports a useful Dice."""
import re
import subprocess

import pytest

from nnunet_runs import nnunet_env

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    output = tmp_path / "demo"
    env = nnunet_env(tmp_path / "unused_user_folders")
    result = subprocess.run(["nnunetv2_grcsf", "demo", "-o", str(output)], env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dice = re.search(r"Dice per label on the 10 test images: lesion ([0-9.]+)", result.stdout)
    assert dice, result.stdout[-2000:]
    assert float(dice.group(1)) > 0.3, f"the demo's GRCSF model learned too little: {result.stdout[-2000:]}"
    assert (output / "overlays.png").stat().st_size > 10_000
    assert list((output / "nnUNet_raw").glob("Dataset991_*/imagesTs/*_0001.nii.gz")), "no residual channel written"
    assert not any((tmp_path / "unused_user_folders" / "nnUNet_raw").iterdir()), "demo wrote into the user's folders"
    rerun = subprocess.run(["nnunetv2_grcsf", "demo", "-o", str(output)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 2 and "--overwrite" in rerun.stderr
