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


def test_doctor_reports_a_missing_trainer_directory_once_with_a_fix(tmp_path):
    """Opted out of the start-up hook: one line for the variable (export it, no reinstall), one for the trainers."""
    env = _env_without_nnunet_paths(NNUNETV2_GRCSF_NO_AUTOREGISTER="1", nnUNet_raw=str(tmp_path),
                                    nnUNet_preprocessed=str(tmp_path), nnUNet_results=str(tmp_path))
    result = _run("doctor", env=env)
    assert result.returncode == 1
    assert "does not list our shim directory" in result.stdout
    assert "NNUNETV2_GRCSF_NO_AUTOREGISTER keeps the start-up hook from adding it" in result.stdout
    assert "reinstall" not in result.stdout
    from nnunetv2_grcsf.trainers import __all__ as names
    failed = [line for line in result.stdout.splitlines() if "[FAIL]" in line]
    assert len(failed) == 2, failed
    assert f"{len(names)} of {len(names)} trainers not found (GRCSFTrainer," in failed[1]
    assert "2 problem(s) found" in result.stdout


def test_doctor_names_a_broken_module_in_the_users_trainer_directory_once(tmp_path):
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    (mine / "good_trainer.py").write_text("VALUE = 1\n")
    (mine / "broken_trainer.py").write_text("import a_module_that_is_not_installed_anywhere\n")
    env = _env_without_nnunet_paths(nnUNet_extTrainer=str(mine), nnUNet_raw=str(tmp_path),
                                    nnUNet_preprocessed=str(tmp_path), nnUNet_results=str(tmp_path))
    result = _run("doctor", env=env)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if "[FAIL]" in line]
    assert len(failed) == 2, failed
    assert f"{mine / 'broken_trainer.py'} in your trainer directory" in failed[0]
    assert "a_module_that_is_not_installed_anywhere" in failed[0] and "good_trainer" not in result.stdout
    assert "trainers not found" in failed[1]


def test_doctor_names_build_folders_that_killed_runs_left(tmp_path, monkeypatch, capsys):
    """A SIGKILLed `residuals -d` leaves nnUNet_raw/.DatasetNNN_X.incomplete-PID: doctor says to delete it (a
    warning; the folder of a run still going is left alone)."""
    from nnunetv2_grcsf.commands import doctor

    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    left = tmp_path / f".Dataset777_Left.incomplete-{dead.pid}"
    running = tmp_path / f".Dataset778_Running.incomplete-{os.getpid()}"
    left.mkdir()
    running.mkdir()
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path))
    report = doctor.Report()
    doctor._check_paths(report)
    out = capsys.readouterr().out
    assert report.failures == 0 and report.warnings == 1
    assert f"rm -r {left}" in out and running.name not in out


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
