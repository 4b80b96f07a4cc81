"""The nnunetv2_grcsf console script: help for every subcommand, doctor's advice, dataset errors."""
import os
import subprocess

import pytest

from nnunetv2_grcsf.cli import COMMAND_MODULES


def _run(*args, env=None):
    return subprocess.run(["nnunetv2_grcsf", *args], capture_output=True, text=True, env=env)


def _env_without_nnunet_paths(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(extra)
    return env


@pytest.mark.parametrize("command", [c.replace("_", "-") for c in COMMAND_MODULES])
def test_every_subcommand_has_help(command):
    result = _run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: nnunetv2_grcsf " + command in result.stdout


def test_doctor_names_unset_paths_and_finds_every_trainer():
    result = _run("doctor", env=_env_without_nnunet_paths())
    assert result.returncode == 1
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert f"{variable} is not set" in result.stdout
        assert f"export {variable}=" in result.stdout
    from nnunetv2_grcsf.trainers import __all__ as names
    assert f"{len(names)} of {len(names)} trainers found" in result.stdout


def test_doctor_reports_a_missing_trainer_directory_with_a_fix(tmp_path):
    env = _env_without_nnunet_paths(NNUNETV2_GRCSF_NO_AUTOREGISTER="1", nnUNet_raw=str(tmp_path),
                                    nnUNet_preprocessed=str(tmp_path), nnUNet_results=str(tmp_path))
    result = _run("doctor", env=env)
    assert result.returncode == 1
    assert "does not list our shim directory" in result.stdout
    assert "GRCSFTrainer not found" in result.stdout


def test_doctor_names_a_missing_dataset_id_and_the_folder_searched(tmp_path):
    env = _env_without_nnunet_paths(nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path),
                                    nnUNet_results=str(tmp_path))
    result = _run("doctor", "-d", "123", env=env)
    assert result.returncode == 2
    assert "'123' not found" in result.stderr and f"nnUNet_raw={tmp_path}" in result.stderr


def test_dataset_without_dataset_json_is_named(tmp_path):
    (tmp_path / "Dataset124_NoJson" / "imagesTr").mkdir(parents=True)
    env = _env_without_nnunet_paths(nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path),
                                    nnUNet_results=str(tmp_path))
    result = _run("doctor", "-d", "124", env=env)
    assert result.returncode == 2 and "has no dataset.json" in result.stderr
