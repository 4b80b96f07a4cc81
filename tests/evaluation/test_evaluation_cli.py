"""The `evaluate` subcommand module (nnunetv2_grcsf.commands.evaluate): parser, run, errors."""
import argparse
import json

import pytest

from nnunetv2_grcsf.commands import evaluate as command
from nnunetv2_grcsf.evaluation import EvaluationError


def _sibling(name):
    """A test module of this folder, loaded by path (works under any pytest import mode)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"_grcsf_eval_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_dataset = _sibling("test_evaluation_folder").make_dataset


def parser():
    p = argparse.ArgumentParser(prog="nnunetv2_grcsf")
    sub = p.add_subparsers(dest="command")
    sub_parser = command.add_parser(sub)
    assert isinstance(sub_parser, argparse.ArgumentParser)
    return p


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["evaluate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("-ref", "-pred", "-djfile", "-l", "-o", "--png", "--images", "--iou-threshold",
                   "--connectivity", "--min-lesion-voxels", "--empty", "--chill", "--overwrite", "-np"):
        assert option in out


def test_run_writes_results_and_prints_a_table(tmp_path, capsys):
    ref, pred, images = make_dataset(tmp_path)
    out = tmp_path / "r.json"
    args = parser().parse_args(["evaluate", "-ref", str(ref), "-pred", str(pred), "-l", "1", "-o", str(out),
                                "--images", str(images), "--iou-threshold", "0.1"])
    assert args.func is command.run
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed and "1 lesion" in printed and str(out) in printed
    summary = json.loads(out.read_text())
    assert summary["settings"]["iou_threshold"] == 0.1
    assert (tmp_path / "r.csv").is_file() and (tmp_path / "r_worst.png").is_file()
    with pytest.raises(EvaluationError, match="--overwrite"):
        args.func(args)
    args = parser().parse_args(["evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(out), "--overwrite",
                                "-q"])
    assert args.func(args) == 0
    assert set(json.loads(out.read_text())["mean"]) == {"1", "2"}


def test_main_cli_runs_evaluate_and_reports_bad_input(tmp_path, capsys):
    cli = pytest.importorskip("nnunetv2_grcsf.cli")
    if "evaluate" not in getattr(cli, "COMMAND_MODULES", ()):
        pytest.skip("nnunetv2_grcsf.cli does not list the evaluate command yet (COMMAND_MODULES)")
    ref, pred, _ = make_dataset(tmp_path)
    assert cli.main(["evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "e.json"), "-q"]) == 0
    (pred / "c2.nii.gz").unlink()
    assert cli.main(["evaluate", "-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "c2" in err
