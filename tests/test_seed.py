"""The training seed of our trainers (``NNUNETV2_GRCSF_SEED``), on a real preprocessed data set through
nnU-Net's own initialize() and data loaders (single-threaded augmenter, ``nnUNet_n_proc_DA=0``)."""
import json
from pathlib import Path

import pytest
import torch
from nnunet_runs import nnunet_env, run

from nnunetv2_grcsf.synthetic import write_synthetic_dataset

DATASET_ID = 973
TRAINER = "GRCSFTrainer_noRCU_2epochs_4iters"


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    env = nnunet_env(tmp_path_factory.mktemp("seed"))
    write_synthetic_dataset(env["nnUNet_raw"], DATASET_ID, "Seed", 6, 0, shape=(48, 48), progress=False)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1"], env)
    return env


def initial_weights_and_first_batch(env: dict, seed, monkeypatch, results: Path):
    """A trainer set up as nnUNetv2_train sets it up (initialize, then its data loaders, as on_train_start)."""
    import nnunetv2_grcsf.trainers as trainers

    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    if seed is None:
        monkeypatch.delenv("NNUNETV2_GRCSF_SEED", raising=False)
    else:
        monkeypatch.setenv("NNUNETV2_GRCSF_SEED", str(seed))
    folder = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    plans = {**json.loads((folder / "nnUNetPlans.json").read_text()), "continue_training": False}
    trainer = getattr(trainers, TRAINER)(plans, "2d", 0, json.loads((folder / "dataset.json").read_text()),
                                         torch.device("cpu"))
    trainer.initialize()
    weights = [p.detach().clone() for p in trainer.network.parameters()]
    train_loader, _ = trainer.get_dataloaders()
    batch = next(train_loader)
    log = Path(trainer.log_file).read_text()
    return weights, [batch["data"]] + list(batch["target"]), log


def same(tensors_a, tensors_b) -> bool:
    return all(torch.equal(a, b) for a, b in zip(tensors_a, tensors_b))


@pytest.mark.slow
def test_same_seed_same_start_other_seed_another(preprocessed, monkeypatch, tmp_path):
    weights_a, batch_a, log_a = initial_weights_and_first_batch(preprocessed, 3, monkeypatch, tmp_path / "a")
    weights_b, batch_b, _ = initial_weights_and_first_batch(preprocessed, 3, monkeypatch, tmp_path / "b")
    weights_c, batch_c, _ = initial_weights_and_first_batch(preprocessed, 4, monkeypatch, tmp_path / "c")
    assert "seed: 3 (from NNUNETV2_GRCSF_SEED)" in log_a
    assert same(weights_a, weights_b) and same(batch_a, batch_b)
    assert not same(weights_a, weights_c) and not same(batch_a, batch_c)


def test_a_seed_that_is_no_integer_says_what_to_set(monkeypatch):
    from nnunetv2_grcsf.trainers.base import seed_from_environment

    monkeypatch.setenv("NNUNETV2_GRCSF_SEED", "abc")
    with pytest.raises(SystemExit, match="NNUNETV2_GRCSF_SEED='abc' is not an integer"):
        seed_from_environment()
    monkeypatch.setenv("NNUNETV2_GRCSF_SEED", " 7 ")
    assert seed_from_environment() == 7
    monkeypatch.delenv("NNUNETV2_GRCSF_SEED")
    assert seed_from_environment() is None


def test_benchmark_baseline_trainers_are_nnunet_network_with_our_schedule_and_seed():
    """``nnUNetTrainer_<suffix>`` (benchmarks/trainers) builds exactly nnUNetTrainer's network and inherits the
    schedule and seed from PluginTrainer rather than repeating them."""
    import sys

    from conftest import PROJECT_ROOT, configuration_manager
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_grcsf.trainers.base import PluginTrainer
    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks" / "trainers"))
    import grcsf_benchmark_trainers as baseline

    trainer = baseline.nnUNetTrainer_10epochs_25iters
    assert issubclass(trainer, PluginTrainer) and trainer.schedule["num_iterations_per_epoch"] == 25
    assert not hasattr(baseline, "nnUNetTrainer_10epochs")  # nnU-Net's own variant keeps its name
    plans = json.loads((PROJECT_ROOT / "tests" / "data" / "plans" / "Dataset802_BUSI256_nnUNetPlans.json").read_text())
    arguments = (PlansManager(plans), configuration_manager("Dataset802_BUSI256_nnUNetPlans", "2d"), 1, 2, True)
    torch.manual_seed(0)
    ours = trainer.build_network_architecture(*arguments)
    torch.manual_seed(0)
    theirs = nnUNetTrainer.build_network_architecture(*arguments)
    assert type(ours) is type(theirs)
    assert same(ours.state_dict().values(), theirs.state_dict().values())
