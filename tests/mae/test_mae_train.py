"""MAE training: where it writes, checkpoints, resume, seeds, and its errors."""
import json

import numpy as np
import pytest
import torch

from nnunetv2_grcsf.datasets import DatasetNotFoundError
from nnunetv2_grcsf.mae import (CHANNEL_TOKEN_TRAINING, DEFAULT_STEPS, MAECheckpointError, MAEDatasetError,
                                MAEImageReadError, MAEOutputExistsError)
from nnunetv2_grcsf.mae.train import (FINAL, LATEST, TrainConfig, find_latest_checkpoint, learning_rate,
                                      load_checkpoint, model_from_checkpoint, random_flips, random_shifts,
                                      train_mae)

from mae_testutils import (make_raw_dataset, nnunet_env, run_command, snapshot, tiny_model_config,  # noqa: F401
                           write_image)

QUIET = dict(progress=False, num_threads=1, log=lambda *a: None)


def test_training_writes_checkpoints_under_results_and_never_into_raw(nnunet_env):
    raw = make_raw_dataset(nnunet_env["nnUNet_raw"], 11, num_cases=6, num_test=2, shape=(32, 40))
    before = snapshot(raw)
    ckpt_path = train_mae(11, model_config=tiny_model_config(img_size=32),
                          train_config=TrainConfig(steps=4, batch_size=4), **QUIET)
    assert snapshot(raw) == before
    out = nnunet_env["nnUNet_results"] / "Dataset011_Blobs" / "nnunetv2_grcsf_mae"
    assert ckpt_path == out / FINAL and (out / LATEST).is_file() and (out / "training_log.json").is_file()
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["step"] == 4 and ckpt["complete"] and ckpt["residual_scale"] > 0
    assert ckpt["data"]["num_cases"] == 6 and ckpt["training_splits"] == ["imagesTr"]  # imagesTs never by default
    assert ckpt["data"]["num_channels"] == 1 and ckpt["data"]["image_dim"] == 2
    assert ckpt["data"]["file_ending"] == ".png" and ckpt["normalization"]["modes"] == ["per_image"]
    assert model_from_checkpoint(ckpt).config.img_size == 32
    assert find_latest_checkpoint("Dataset011_Blobs") == ckpt_path
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 4


def test_resume_continues_exactly_like_an_uninterrupted_run(nnunet_env, tmp_path):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 12, num_cases=6, shape=(32, 32))
    cfg = dict(model_config=tiny_model_config(img_size=32))
    full = train_mae(12, tmp_path / "full", train_config=TrainConfig(steps=6, batch_size=4, save_every=2), **cfg,
                     **QUIET)
    part = train_mae(12, tmp_path / "part", train_config=TrainConfig(steps=6, batch_size=4, save_every=2),
                     stop_after_steps=3, **cfg, **QUIET)
    assert part.name == LATEST and load_checkpoint(part)["step"] == 3 and not load_checkpoint(part)["complete"]
    assert not (tmp_path / "part" / FINAL).exists()
    with pytest.raises(MAEOutputExistsError, match="--resume"):
        train_mae(12, tmp_path / "part", train_config=TrainConfig(steps=6, batch_size=4), **cfg, **QUIET)
    resumed = train_mae(12, tmp_path / "part", resume=True, **QUIET)
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    assert b["step"] == 6 and b["complete"]
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key
    assert [round(v, 6) for _, v in a["loss_history"]] == [round(v, 6) for _, v in b["loss_history"]]
    # --resume with more steps extends the run
    longer = train_mae(12, tmp_path / "part", resume=True, train_config=TrainConfig(steps=8), **QUIET)
    assert load_checkpoint(longer)["step"] == 8


def test_seed_changes_the_run(nnunet_env, tmp_path):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 13, num_cases=4, shape=(32, 32))
    runs = [load_checkpoint(train_mae(13, tmp_path / f"s{seed}", tiny_model_config(img_size=32),
                                      TrainConfig(steps=2, batch_size=2, seed=seed), **QUIET))
            for seed in (0, 1)]
    assert runs[0]["loss_history"] != runs[1]["loss_history"]


def test_unfinished_training_is_named_when_no_final_checkpoint(nnunet_env):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 14, num_cases=4, shape=(32, 32))
    train_mae(14, model_config=tiny_model_config(img_size=32), train_config=TrainConfig(steps=4, batch_size=2),
              stop_after_steps=1, **QUIET)
    with pytest.raises(MAECheckpointError, match="unfinished training.*--resume"):
        find_latest_checkpoint("Dataset014_Blobs")
    with pytest.raises(MAECheckpointError, match="no MAE checkpoint for Dataset099_X"):
        find_latest_checkpoint("Dataset099_X")


def test_bad_checkpoints(tmp_path, nnunet_env):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 15, num_cases=2, shape=(32, 32))
    good = train_mae(15, tmp_path / "m", tiny_model_config(img_size=32), TrainConfig(steps=1, batch_size=2), **QUIET)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MAECheckpointError, match="truncated.pth cannot be loaded.*truncated, corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    with pytest.raises(MAECheckpointError, match="foreign.pth is not an nnunetv2_grcsf MAE checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(MAECheckpointError, match="notes.pth cannot be loaded"):
        load_checkpoint(text)
    with pytest.raises(MAECheckpointError, match="missing.pth does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


def test_bad_dataset_inputs(nnunet_env, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"'404' not found.*Dataset404_\*.*nnUNet_raw="):
        train_mae(404, tmp_path / "x", **QUIET)
    raw = make_raw_dataset(nnunet_env["nnUNet_raw"], 16, num_cases=3, shape=(32, 32))
    (raw / "imagesTr" / "case_001_0000.png").write_bytes(b"not a png at all")
    before = snapshot(nnunet_env["nnUNet_raw"])
    with pytest.raises(MAEImageReadError, match="case_001_0000.png.*corrupt"):
        train_mae(16, tmp_path / "y", tiny_model_config(img_size=32), TrainConfig(steps=1), **QUIET)
    assert snapshot(nnunet_env["nnUNet_raw"]) == before
    with pytest.raises(Exception, match="inside the raw data set"):
        train_mae(16, raw / "mae", **QUIET)



def test_labelled_patches_are_skipped_by_default_reading_training_labels_only(nnunet_env, tmp_path):
    raw = make_raw_dataset(nnunet_env["nnUNet_raw"], 18, num_cases=6, num_test=2, shape=(32, 40))
    (raw / "labelsTs").mkdir()
    (raw / "labelsTs" / "case_006.png").write_bytes(b"a test label must never be read")
    cfg = dict(model_config=tiny_model_config(img_size=32))
    plain = load_checkpoint(train_mae(18, tmp_path / "plain", train_config=TrainConfig(
        steps=3, batch_size=4, skip_labelled_patches=False), **cfg, **QUIET))
    assert plain["train_config"]["skip_labelled_patches"] is False and plain["data"]["labelled_patch_share"] is None
    skip_config = TrainConfig(steps=3, batch_size=4)  # the default
    skip = load_checkpoint(train_mae(18, tmp_path / "skip", train_config=skip_config, **cfg, **QUIET))
    assert skip["train_config"]["skip_labelled_patches"] is True and 0 < skip["data"]["labelled_patch_share"] < 0.5
    assert plain["loss_history"] != skip["loss_history"]  # same seed, batches and masks: only the loss differs
    with_test = load_checkpoint(train_mae(18, tmp_path / "with_test", train_config=skip_config,
                                         include_test_images=True, **cfg, **QUIET))
    assert with_test["training_splits"] == ["imagesTr", "imagesTs"]  # and labelsTs/case_006.png was not read
    assert with_test["data"]["labelled_patch_share"] < skip["data"]["labelled_patch_share"]
    assert TrainConfig.from_dict({"steps": 3}).skip_labelled_patches is False  # checkpoints from before the option
    assert TrainConfig.from_dict({"steps": 3}).crop_to_foreground is False and TrainConfig().crop_to_foreground
    (raw / "labelsTr" / "case_002.png").unlink()
    with pytest.raises(MAEDatasetError, match=r"labelsTr/case_002.png is missing.*--no-skip-labelled-patches"):
        train_mae(18, tmp_path / "missing", train_config=TrainConfig(steps=1), **cfg, **QUIET)
    assert not (tmp_path / "missing").exists()
    write_image(raw / "labelsTr" / "case_002.png", np.zeros((16, 16)), ".png", dtype=np.uint8)
    with pytest.raises(MAEDatasetError, match=r"labelsTr/case_002.png has shape \(1, 16, 16\), its image .*case_002_0000"
                                              r".png \(1, 32, 40\).*--no-skip-labelled-patches"):
        train_mae(18, tmp_path / "misshapen", train_config=TrainConfig(steps=1), **cfg, **QUIET)


def test_random_flips_move_the_excluded_patches_with_their_pixels():
    x = torch.zeros(16, 1, 32, 32)
    x[..., :8, :16] = 1.0  # the top-left 8 x 16 pixels: patches (0, 0) and (0, 1) of 8-px patches
    excluded = (torch.nn.functional.max_pool2d(x, 8) > 0).flatten(1)
    flipped, flags = random_flips(x, excluded, torch.Generator().manual_seed(0))
    assert 0 < (flipped[:, 0, 0, 0] == 0).sum() < 16  # some slices flipped, some not
    assert torch.equal(flags, (torch.nn.functional.max_pool2d(flipped, 8) > 0).flatten(1))
    assert random_flips(x, None, torch.Generator().manual_seed(0))[1] is None


def test_random_shifts_move_whole_patches_and_their_flags():
    x = torch.full((96, 2, 32, 32), -1.0)
    x[..., 8:16, 16:24] = torch.tensor([2.0, 3.0]).view(1, 2, 1, 1)  # patch (1, 2) of 8-px patches
    excluded = (torch.nn.functional.max_pool2d(x[:, :1], 8) > 0).flatten(1)
    shifted, flags = random_shifts(x, excluded, 1, 8, torch.Generator().manual_seed(0))
    assert torch.equal(flags, (torch.nn.functional.max_pool2d(shifted[:, :1], 8) > 0).flatten(1))
    assert torch.equal(flags.sum(1), torch.ones(96, dtype=torch.long))  # one patch each, never shifted out
    where = flags.float().reshape(96, 4, 4).nonzero()[:, 1:] - torch.tensor([1, 2])
    assert set(map(tuple, where.tolist())) == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}  # all 9 shifts
    assert torch.equal(torch.unique(shifted[:, 1]), torch.tensor([-1.0, 3.0]))  # background fill: the slice minimum
    assert random_shifts(x, excluded, 0, 8, torch.Generator())[0] is x

def test_learning_rate_schedule():
    lrs = [learning_rate(s, 100, 1e-3, 0.05) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-4) and max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-5


def test_cli_mae_train(nnunet_env, tmp_path, capsys):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 17, num_cases=3, shape=(32, 32))
    code = run_command("mae_train", ["mae-train", "-d", "17", "-o", str(tmp_path / "cli"), "--image-size", "32",
                                     "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32",
                                     "--decoder-depth", "1", "--steps", "2", "--batch-size", "2", "--quiet",
                                     "--num-threads", "1", "--max-shift", "1"])
    assert code == 0 and (tmp_path / "cli" / FINAL).is_file()
    ckpt = load_checkpoint(tmp_path / "cli" / FINAL)
    assert ckpt["model_config"]["embed_dim"] == 32 and ckpt["train_config"]["total_steps"] == 2
    assert ckpt["train_config"]["max_shift_patches"] == 1
    assert ckpt["train_config"]["skip_labelled_patches"] is True and ckpt["train_config"]["crop_to_foreground"] is True
    run_command("mae_train", ["mae-train", "-d", "17", "-o", str(tmp_path / "every_patch"), "--image-size", "32",
                              "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32",
                              "--decoder-depth", "1", "--steps", "1", "--quiet", "--num-threads", "1",
                              "--no-skip-labelled-patches", "--no-crop-to-foreground"])
    every_patch = load_checkpoint(tmp_path / "every_patch" / FINAL)["train_config"]
    assert every_patch["skip_labelled_patches"] is False and every_patch["crop_to_foreground"] is False
    with pytest.raises(MAEOutputExistsError):
        run_command("mae_train", ["mae-train", "-d", "17", "-o", str(tmp_path / "cli"), "--quiet"])


def test_unset_training_settings_take_the_defaults_of_the_mae_they_train():
    unset = TrainConfig()
    assert (unset.steps, unset.lr, unset.max_shift_patches) == (None, None, None)
    plain = unset.with_defaults(channel_tokens=False)
    assert (plain.steps, plain.lr, plain.max_shift_patches) == (DEFAULT_STEPS, 1e-3, 0)
    tokens = unset.with_defaults(channel_tokens=True)
    assert {k: getattr(tokens, k) for k in CHANNEL_TOKEN_TRAINING} == CHANNEL_TOKEN_TRAINING
    assert CHANNEL_TOKEN_TRAINING["steps"] != DEFAULT_STEPS
    by_epochs = TrainConfig(epochs=5, lr=3e-4).with_defaults(channel_tokens=True)
    assert (by_epochs.steps, by_epochs.epochs, by_epochs.lr) == (None, 5, 3e-4)


def test_cli_mae_train_gives_each_channel_its_own_tokens_on_several_channels(nnunet_env, tmp_path):
    """Channel tokens by default on a two-channel data set (off with --no-channel-tokens, and with one channel),
    recorded in the checkpoint; the residual maps of such an MAE cover the image like any other's."""
    from PIL import Image

    from nnunetv2_grcsf.mae.residuals import ResidualMapper

    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], 18, num_cases=3, shape=(32, 32), channels=2)
    small = ["--image-size", "32", "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--decoder-dim", "32",
             "--decoder-depth", "1", "--steps", "2", "--batch-size", "2", "--quiet", "--num-threads", "1"]
    for name, extra, expected in (("auto", [], True), ("off", ["--no-channel-tokens"], False)):
        assert run_command("mae_train", ["mae-train", "-d", "18", "-o", str(tmp_path / name), *small, *extra]) == 0
        checkpoint = load_checkpoint(tmp_path / name / FINAL)
        assert checkpoint["model_config"]["channel_tokens"] is expected
        # channel tokens train with their own defaults of the settings not given (--steps is given here)
        expected_training = {**CHANNEL_TOKEN_TRAINING, "steps": 2} if expected else \
            {"steps": 2, "lr": 1e-3, "max_shift_patches": 0}
        assert {k: checkpoint["train_config"][k] for k in expected_training} == expected_training
    assert run_command("mae_train", ["mae-train", "-d", "18", "-o", str(tmp_path / "given"), *small, "--lr", "5e-4",
                                     "--max-shift", "1"]) == 0
    given = load_checkpoint(tmp_path / "given" / FINAL)["train_config"]
    assert (given["lr"], given["max_shift_patches"]) == (5e-4, 1)
    mapper = ResidualMapper(tmp_path / "auto" / FINAL, device="cpu")
    assert mapper.model.config.num_tokens == 2 * mapper.model.config.num_patches
    image = np.stack([np.asarray(Image.open(folder / "imagesTr" / f"case_000_000{c}.png"), dtype=np.float32)
                      for c in (0, 1)])
    (result,) = mapper.compute([("case", image[:, None], (999.0, 1.0, 1.0))])
    assert result["residuals"].shape[-2:] == image.shape[-2:] and np.isfinite(result["residuals"]).all()
    make_raw_dataset(nnunet_env["nnUNet_raw"], 19, num_cases=3, shape=(32, 32))
    assert run_command("mae_train", ["mae-train", "-d", "19", "-o", str(tmp_path / "one"), *small]) == 0
    assert load_checkpoint(tmp_path / "one" / FINAL)["model_config"]["channel_tokens"] is False


def test_cli_help_documents_every_option():
    import argparse
    from nnunetv2_grcsf.commands import mae_train, residuals

    for module in (mae_train, residuals):
        sub = argparse.ArgumentParser().add_subparsers()
        parser = module.add_parser(sub)
        assert parser.description
        for action in parser._actions:
            assert action.help, f"{module.__name__}: option {action.option_strings} has no help"
        assert parser.get_default("func") is module.run
