"""mae-train's guards: which images it reads, its arguments, checkpoints of older versions, atomic writes, the
reconstruction check; and the report's baselines and PSNR."""
import numpy as np
import pytest
import torch

from nnunetv2_grcsf.mae import MAEError, MAEImageReadError, checkpoint_saw_test_images
from nnunetv2_grcsf.mae.model import MAEConfig, MaskedAutoencoder, random_mask
from nnunetv2_grcsf.mae.report import ResidualReport, auroc, baseline_maps, format_comparison, reconstruction_psnr
from nnunetv2_grcsf.mae.train import (FINAL, TrainConfig, load_checkpoint, model_from_checkpoint,
                                      reconstruction_warning, save_checkpoint, train_mae)

from mae_testutils import make_raw_dataset, nnunet_env, one_thread, run_command, tiny_model_config  # noqa: F401

QUIET = dict(progress=False, num_threads=1, log=lambda *a: None)
pytestmark = pytest.mark.usefixtures("one_thread")

#: Parameter names of a version-1 checkpoint (own blocks, before timm's), one encoder and one decoder block.
VERSION_1_KEYS = [
    "blocks.0.attn.proj.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.weight",
    "blocks.0.mlp.0.bias", "blocks.0.mlp.0.weight", "blocks.0.mlp.2.bias", "blocks.0.mlp.2.weight",
    "blocks.0.norm1.bias", "blocks.0.norm1.weight", "blocks.0.norm2.bias", "blocks.0.norm2.weight", "cls_token",
    "decoder_blocks.0.attn.proj.bias", "decoder_blocks.0.attn.proj.weight", "decoder_blocks.0.attn.qkv.bias",
    "decoder_blocks.0.attn.qkv.weight", "decoder_blocks.0.mlp.0.bias", "decoder_blocks.0.mlp.0.weight",
    "decoder_blocks.0.mlp.2.bias", "decoder_blocks.0.mlp.2.weight", "decoder_blocks.0.norm1.bias",
    "decoder_blocks.0.norm1.weight", "decoder_blocks.0.norm2.bias", "decoder_blocks.0.norm2.weight",
    "decoder_embed.bias", "decoder_embed.weight", "decoder_norm.bias", "decoder_norm.weight", "decoder_pred.bias",
    "decoder_pred.weight", "decoder_stats.bias", "decoder_stats.weight", "mask_token", "norm.bias", "norm.weight",
    "patch_embed.bias", "patch_embed.weight"]
OLD_NAMES = {"patch_embed.proj.": "patch_embed.", ".mlp.fc1.": ".mlp.0.", ".mlp.fc2.": ".mlp.2."}


def test_mae_train_reads_imagesTr_only_unless_asked(nnunet_env, tmp_path):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 31, num_cases=4, num_test=3, shape=(32, 32))
    cfg = dict(model_config=tiny_model_config(img_size=32), train_config=TrainConfig(steps=1, batch_size=2))
    default = load_checkpoint(train_mae(31, tmp_path / "a", **cfg, **QUIET))
    assert default["data"]["num_cases"] == 4 and default["training_splits"] == ["imagesTr"]
    assert checkpoint_saw_test_images(default) is False
    both = train_mae(31, tmp_path / "b", include_test_images=True, **cfg, **QUIET)
    assert load_checkpoint(both)["data"]["num_cases"] == 7 and checkpoint_saw_test_images(both) is True  # a path
    older = {k: v for k, v in default.items() if k != "training_splits"}  # a checkpoint from before the record
    assert checkpoint_saw_test_images(older) is None


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0"), (["--steps", "-5"], "--steps -5"), (["--batch-size", "0"], "--batch-size 0"),
    (["--lr", "-1"], "--lr -1"), (["--lr", "nan"], "--lr nan"), (["--epochs", "0"], "--epochs 0"),
    (["--mask-ratios", "0.5", "1.5"], "--mask-ratios 0.5 1.5"), (["--save-every", "0"], "--save-every 0"),
    (["--max-shift", "-1"], "--max-shift -1"),
    (["--num-threads", "0"], "--num-threads 0"), (["--patch-size", "0"], "patch_size 0"),
    (["--image-size", "30"], "multiple")])
def test_bad_arguments_are_refused_before_anything_is_written(nnunet_env, argv, message):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 32, num_cases=2, shape=(32, 32))
    with pytest.raises(MAEError, match=message):
        run_command("mae_train", ["mae-train", "-d", "32", "--quiet", *argv])
    assert not list(nnunet_env["nnUNet_results"].iterdir())  # no (empty) output folder left behind


def test_a_run_failing_on_its_data_leaves_no_folder_and_keeps_an_old_checkpoint(nnunet_env, tmp_path):
    raw = make_raw_dataset(nnunet_env["nnUNet_raw"], 33, num_cases=3, shape=(32, 32))
    (raw / "imagesTr" / "case_001_0000.png").write_bytes(b"not a png")
    cfg = dict(model_config=tiny_model_config(img_size=32), train_config=TrainConfig(steps=1, batch_size=2))
    with pytest.raises(MAEImageReadError):
        train_mae(33, **cfg, **QUIET)
    assert not list(nnunet_env["nnUNet_results"].iterdir())
    old = tmp_path / "m" / FINAL
    save_checkpoint({"format": "old"}, old)
    before = old.read_bytes()
    with pytest.raises(MAEImageReadError):
        train_mae(33, tmp_path / "m", overwrite=True, **cfg, **QUIET)
    assert old.read_bytes() == before  # --overwrite removes old checkpoints only once the new run has one


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"step": 1}, path)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_version_1_checkpoints_load_with_timm_blocks(tmp_path):
    config = MAEConfig(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, decoder_embed_dim=8,
                       decoder_depth=1, decoder_num_heads=2)
    torch.manual_seed(0)
    model = MaskedAutoencoder(config).eval()
    old_state = {}
    for key, value in model.state_dict().items():
        for new, old in OLD_NAMES.items():
            key = key.replace(new, old)
        old_state[key] = value
    assert sorted(old_state) == VERSION_1_KEYS
    loaded = model_from_checkpoint({"model_config": config.to_dict(), "model_state": old_state})
    x = torch.randn(2, 1, 16, 16)
    mask = random_mask(2, 4, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.reconstruct(x, mask), model.reconstruct(x, mask))
    with pytest.raises(MAEError, match="do not fit.*mae-train -d DATASET --overwrite"):
        model_from_checkpoint({"model_config": config.to_dict(), "model_state": {"patch_embed.weight": x}})


def test_training_too_short_to_reconstruct_warns(nnunet_env, tmp_path):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 34, num_cases=4, shape=(32, 32))
    lines = []
    ckpt = train_mae(34, tmp_path / "m", tiny_model_config(img_size=32), TrainConfig(steps=1, batch_size=2),
                     progress=False, num_threads=1, log=lines.append)
    check = load_checkpoint(ckpt)["reconstruction_check"]
    assert check["slices"] == 4 and check["median_psnr_gap_db"] < 1.0
    assert check["median_interpolation_gap_db"] > check["median_psnr_gap_db"] + 1  # smooth images: interpolation wins
    assert any(line.startswith("warning:") and "--steps" in line and "Dataset034_Blobs" in line
               and "from the visible pixels" in line for line in lines)
    assert reconstruction_warning({"median_psnr_gap_db": 3.0}, "X") is None


def test_reconstruction_psnr_against_the_mean_image():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 20, 20))
    where = np.ones((20, 20), dtype=bool)
    rec, mean = reconstruction_psnr(x, x + 0.1 * rng.normal(size=x.shape), where)
    assert rec - mean == pytest.approx(20.0, abs=1.0)  # noise at a tenth of the signal: 20 dB better
    rec, mean = reconstruction_psnr(x, np.full_like(x, x.mean()), where)
    assert rec == pytest.approx(mean)


def test_report_compares_the_residual_with_baselines(tmp_path):
    """A dark lesion: intensity (better sign) finds it, the residual here is uninformative noise."""
    rng = np.random.default_rng(1)
    report = ResidualReport(tmp_path, [0.5], scale=1.0, max_panels=0, with_untrained=True)
    for i in range(3):
        image = rng.normal(size=(1, 1, 24, 24)).astype(np.float32)
        lesion = np.zeros((1, 24, 24), dtype=bool)
        lesion[0, 8:16, 8:16] = True
        image[0][lesion] -= 3.0
        residual = rng.uniform(size=(1, 1, 24, 24)).astype(np.float32)
        report.add_case(f"c{i}", residual, lesion, image=image, recon=np.zeros_like(image),
                        untrained_residuals=residual[:, ::-1].copy(), interpolated=image + 0.1,
                        interpolation_residuals=np.abs(image - image.mean()))
    summary = report.summary()
    intensity = summary["baselines"]["intensity"]
    assert intensity["mean_case_auroc"] > 0.95 and intensity["pooled_auroc"] > 0.95  # the better (inverted) sign
    assert auroc(-image[0], lesion) == pytest.approx(report.baselines[("intensity", 0)].per_case[-1] * -1 + 1)
    assert 0.3 < summary["overall"]["0.5"]["mean_case_auroc"] < 0.7
    assert set(summary["baselines"]) == {"intensity", "abs_minus_median", "abs_minus_smoothed", "intensity_smoothed",
                                         "abs_minus_median_smoothed", "abs_minus_smoothed_smoothed",
                                         "untrained_mae@0.5", "interpolation@0.5"}
    assert summary["baselines"]["interpolation@0.5"]["mean_case_auroc"] > 0.9  # |x - mean| finds the dark lesion
    rec = summary["reconstruction"]
    assert rec["cases"] == 3 and rec["median_interpolation_gap_db"] > rec["median_psnr_gap_db"] + 10
    assert any("interpolating masked patches" in line for line in format_comparison(summary))
    maps = baseline_maps(image)
    assert all(m.shape == image.shape for m in maps.values())


def test_mae_train_names_misnamed_images_instead_of_skipping_them(nnunet_env, tmp_path):
    raw = make_raw_dataset(nnunet_env["nnUNet_raw"], 34, num_cases=3, shape=(32, 32))
    (raw / "imagesTr" / "case_000_0000.png").rename(raw / "imagesTr" / "case_000.png")
    with pytest.raises(MAEError, match=r"case_000\.png"):
        train_mae(34, tmp_path / "out", model_config=tiny_model_config(img_size=32),
                  train_config=TrainConfig(steps=1, batch_size=2), **QUIET)
