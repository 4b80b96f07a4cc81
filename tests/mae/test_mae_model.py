"""The MAE model: shapes, masking, the loss on removed patches only, complementary masks."""
import pytest
import torch

from nnunetv2_grcsf.mae.model import (MAEConfig, MaskedAutoencoder, complementary_masks, mask_schedule,
                                      masked_reconstruction, patch_mask_to_pixels, random_mask)

from mae_testutils import one_thread  # noqa: F401,E402 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
torch.manual_seed(0)


def tiny(**kw):
    return MaskedAutoencoder(MAEConfig(**{**dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2), **kw}))


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_shapes_and_patchify_roundtrip(channels, norm_pix):
    model = tiny(in_channels=channels, norm_pix_loss=norm_pix)
    x = torch.randn(3, channels, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    out = model(x, mask_ratio=0.75)
    assert out["pred"].shape == (3, 16, channels * 64)
    assert out["mask"].shape == (3, 16) and out["mask"].sum(dim=1).tolist() == [12, 12, 12]
    assert (out["stats"] is not None) == norm_pix
    if norm_pix:
        assert out["stats"].shape == (3, 16, channels, 2)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert model.reconstruct(x, out["mask"]).shape == x.shape


def test_random_mask_counts():
    m = random_mask(5, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert m.dtype == torch.bool and m.sum(dim=1).tolist() == [48] * 5
    assert not torch.equal(m[0], m[1])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_counts_removed_patches_only(norm_pix):
    model = tiny(norm_pix_loss=norm_pix)
    x = torch.randn(2, 1, 32, 32)
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    latent, ids_keep = model.forward_encoder(x, mask)
    pred, stats = model.forward_decoder(latent, ids_keep)
    loss = model.forward_loss(x, pred, stats, mask)
    visible = ~mask
    # changing predictions (and statistics) at visible patches does not change the loss ...
    pred2, stats2 = pred.clone(), None if stats is None else stats.clone()
    pred2[visible] += 5.0
    if stats2 is not None:
        stats2[visible] += 5.0
    assert torch.allclose(model.forward_loss(x, pred2, stats2, mask), loss)
    # ... at removed patches it does
    pred3 = pred.clone()
    pred3[mask] += 5.0
    assert not torch.allclose(model.forward_loss(x, pred3, stats, mask), loss)
    # and the loss equals the mean per-patch MSE over removed patches against the per-patch normalized target
    per_patch = ((pred - model.target(x)) ** 2).mean(-1)
    expected = per_patch[mask].mean()
    if norm_pix:
        patches = model.patchify(x).reshape(2, 16, 1, -1)
        true = torch.cat([patches.mean(-1, keepdim=True), 0.5 * torch.log(patches.var(-1, keepdim=True) + 1e-2)], -1)
        expected = expected + ((stats - true) ** 2).mean(dim=(-1, -2))[mask].mean()
    assert torch.allclose(loss, expected, atol=1e-6)



@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_leaves_excluded_patches_out(norm_pix):
    """Removed patches flagged as excluded (labelled lesions) do not count; the others count as before."""
    model = tiny(norm_pix_loss=norm_pix)
    x = torch.randn(2, 1, 32, 32)
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    excluded = torch.zeros(2, 16, dtype=torch.bool)
    excluded[0, mask[0].nonzero()[:3, 0]] = True  # three removed patches of slice 0
    excluded[1, (~mask[1]).nonzero()[0, 0]] = True  # a visible patch: excluded or not, it never counts
    latent, ids_keep = model.forward_encoder(x, mask)
    pred, stats = model.forward_decoder(latent, ids_keep)
    loss = model.forward_loss(x, pred, stats, mask, excluded)
    assert torch.allclose(loss, model.forward_loss(x, pred, stats, mask & ~excluded))
    assert not torch.allclose(loss, model.forward_loss(x, pred, stats, mask))
    pred2, stats2 = pred.clone(), None if stats is None else stats.clone()
    pred2[excluded] += 5.0
    if stats2 is not None:
        stats2[excluded] += 5.0
    assert torch.allclose(model.forward_loss(x, pred2, stats2, mask, excluded), loss)
    every_removed_excluded = model.forward_loss(x, pred, stats, mask, mask.clone())
    assert every_removed_excluded.item() == 0.0 and model(x, mask=mask, excluded=excluded)["loss"].isfinite()

def test_norm_pix_target_is_per_patch_normalized():
    model = tiny()
    x = torch.randn(1, 1, 32, 32) * 3 + 7
    t = model.target(x)
    assert torch.allclose(t.mean(-1), torch.zeros(1, 16), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(1, 16), atol=0.05)


@pytest.mark.parametrize("ratio,passes,times", [(0.75, 4, 3), (0.5, 2, 1), (0.6, 5, 3), (0.9, 10, 9)])
def test_mask_schedule(ratio, passes, times):
    assert mask_schedule(ratio) == (passes, times)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.6])
@pytest.mark.parametrize("num_patches,tokens_per_patch", [(16, 1), (64, 1), (30, 1), (32, 2), (60, 3)])
@pytest.mark.parametrize("repeats", [1, 2])
def test_complementary_masks_cover_every_patch_exactly(ratio, num_patches, tokens_per_patch, repeats):
    k, m = mask_schedule(ratio)
    masks = complementary_masks(3, num_patches, ratio, repeats, torch.Generator().manual_seed(0), tokens_per_patch)
    assert masks.shape == (k * repeats, 3, num_patches)
    # every patch is removed in exactly m * repeats passes (so visible in (k - m) * repeats)
    assert (masks.sum(dim=0) == m * repeats).all()
    # each pass removes the same number of patches in every row, about ratio * L (exact when k divides L)
    counts = masks.sum(dim=2)
    assert (counts == counts[:, :1]).all()
    if num_patches % k == 0:
        assert (counts == round(ratio * num_patches)).all()
    # the visible sets of the k passes of one repeat partition the patches
    for r in range(repeats):
        assert ((~masks[r * k:(r + 1) * k]).sum(dim=0) == k - m).all()


def test_complementary_masks_stagger_the_channels_of_a_patch():
    """With channel tokens a removed channel is predicted while the other channel at its place is visible (0.5),
    or visible in as many of its passes as the ratio allows (0.75: one of three); never both visible at once."""
    half = complementary_masks(4, 2 * 16, 0.5, generator=torch.Generator().manual_seed(0), tokens_per_patch=2)
    per_channel = half.reshape(2, 4, 2, 16)  # [pass, row, channel, patch]
    assert (per_channel[:, :, 0] != per_channel[:, :, 1]).all()
    quarter = complementary_masks(4, 2 * 16, 0.75, generator=torch.Generator().manual_seed(0), tokens_per_patch=2)
    per_channel = quarter.reshape(4, 4, 2, 16)
    assert not (~per_channel[:, :, 0] & ~per_channel[:, :, 1]).any()
    assert ((per_channel[:, :, 0] & ~per_channel[:, :, 1]).sum(dim=0) == 1).all()


def test_training_masks_of_channel_tokens_are_staggered_like_the_residual_maps_masks():
    mask = random_mask(4, 2 * 16, 0.5, generator=torch.Generator().manual_seed(0), tokens_per_patch=2)
    assert mask.shape == (4, 32)
    per_channel = mask.reshape(4, 2, 16)
    assert (per_channel[:, 0] != per_channel[:, 1]).all()  # one channel of every patch removed
    assert (per_channel.sum(dim=2) == 8).all()  # half of each channel's patches
    assert not torch.equal(mask, random_mask(4, 32, 0.5, generator=torch.Generator().manual_seed(1),
                                             tokens_per_patch=2))


def test_complementary_masks_of_one_token_per_patch_are_those_residual_data_sets_were_made_with():
    """Single-token patches keep the masks of earlier versions (random groups of patches), so `residuals -i`
    remakes the residual channel of an existing data set exactly."""
    ranks = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)).argsort(dim=1).argsort(dim=1)
    group = ranks * 4 // 64
    earlier = torch.stack([(group - k) % 4 < 3 for k in range(4)])
    assert torch.equal(complementary_masks(3, 64, 0.75, generator=torch.Generator().manual_seed(0)), earlier)


def test_patch_mask_to_pixels():
    mask = torch.tensor([[True, False, False, True]])
    px = patch_mask_to_pixels(mask, 2)
    assert px.shape == (1, 1, 4, 4)
    assert px[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_reconstruction_of_a_patch_never_sees_that_patch():
    """Visible patches carry no signal: a pixel's value comes only from passes where its patch was removed."""
    model = tiny().eval()
    x = torch.randn(2, 1, 32, 32)
    x2 = x.clone()
    x2[:, :, 8:16, 16:24] += 10.0  # change one patch only (patch index 1 * 4 + 2)
    rec = masked_reconstruction(model, x, 0.75, generator=torch.Generator().manual_seed(3))
    rec2 = masked_reconstruction(model, x2, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(rec[:, :, 8:16, 16:24], rec2[:, :, 8:16, 16:24], atol=1e-5)
    assert not torch.allclose(rec, rec2, atol=1e-3)  # other patches did see it (while it was visible)


def test_masked_reconstruction_rejects_masks_that_leave_patches_visible():
    model = tiny().eval()
    masks = torch.zeros(1, 1, 16, dtype=torch.bool)
    masks[0, 0, :8] = True
    with pytest.raises(ValueError, match="visible"):
        masked_reconstruction(model, torch.randn(1, 1, 32, 32), masks=masks)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_channel_tokens_mask_each_channel_of_a_patch_on_its_own(norm_pix):
    """With channel tokens a mask is [N, C * L]; the loss counts exactly the removed patch channels."""
    model = tiny(in_channels=2, channel_tokens=True, norm_pix_loss=norm_pix)
    assert model.config.num_tokens == 32 and model.patch_embed.proj.in_channels == 1
    x = torch.randn(2, 2, 32, 32)
    mask = random_mask(2, 32, 0.5, generator=torch.Generator().manual_seed(0))
    out = model(x, mask=mask)
    assert out["pred"].shape == (2, 16, 128) and out["mask"].shape == (2, 32)
    patch_channel = model.patch_channel_mask(mask)  # [N, L, C]
    assert patch_channel.shape == (2, 16, 2) and torch.equal(patch_channel[:, :, 1], mask[:, 16:])
    per_channel = ((out["pred"] - model.target(x)) ** 2).reshape(2, 16, 2, 64).mean(-1)
    expected = per_channel[patch_channel].mean()
    if norm_pix:
        patches = model.patchify(x).reshape(2, 16, 2, -1)
        true = torch.cat([patches.mean(-1, keepdim=True), 0.5 * torch.log(patches.var(-1, keepdim=True) + 1e-2)], -1)
        expected = expected + ((out["stats"] - true) ** 2).mean(-1)[patch_channel].mean()
    torch.testing.assert_close(out["loss"], expected)
    px = patch_mask_to_pixels(mask, 8, 2)
    assert px.shape == (2, 2, 32, 32) and torch.equal(px[:, 1, ::8, ::8].bool().flatten(1), mask[:, 16:])


def test_channel_tokens_predict_a_removed_channel_from_the_other_channel_at_the_same_place():
    """A patch removed in channel 0 but visible in channel 1: its reconstruction depends on channel 1 there (the
    cross-channel relation the MAE learns), never on channel 0's own pixels there."""
    model = tiny(in_channels=2, channel_tokens=True).eval()
    x = torch.randn(1, 2, 32, 32)
    mask = torch.zeros(1, 32, dtype=torch.bool)
    mask[0, 6] = True  # channel 0 of patch 6 (grid row 1, column 2) removed; channel 1 of it visible
    mask[0, :4] = mask[0, 16:20] = True  # and some tokens of both channels elsewhere

    def patch6(y):
        return model.reconstruct(y, mask)[0, 0, 8:16, 16:24]

    own, other = x.clone(), x.clone()
    own[0, 0, 8:16, 16:24] += 10.0
    other[0, 1, 8:16, 16:24] += 10.0
    torch.testing.assert_close(patch6(own), patch6(x))
    assert float((patch6(other) - patch6(x)).abs().max()) > 1e-3
    # masked_reconstruction then takes each channel's pixels only from passes where that channel was removed
    masks = complementary_masks(1, 32, 0.5, generator=torch.Generator().manual_seed(0))
    rec, rec_own = masked_reconstruction(model, x, masks=masks), masked_reconstruction(model, own, masks=masks)
    torch.testing.assert_close(rec[0, 0, 8:16, 16:24], rec_own[0, 0, 8:16, 16:24])


def test_without_channel_tokens_a_token_holds_every_channel_of_its_patch():
    """Checkpoints from before channel tokens (no key) read as a token per patch, as they were trained."""
    config = MAEConfig.from_dict({k: v for k, v in MAEConfig(in_channels=2).to_dict().items() if k != "channel_tokens"})
    assert not config.channel_tokens and config.num_tokens == config.num_patches
    model = tiny(in_channels=2)
    mask = random_mask(1, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.patch_channel_mask(mask), mask[..., None].expand(1, 16, 2))
    assert model.channel_embed is None and model.patch_embed.proj.in_channels == 2


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        MAEConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="patch_size 0.*positive"):
        MAEConfig(patch_size=0)
    assert MAEConfig.from_dict({**MAEConfig().to_dict(), "unknown": 1}) == MAEConfig()
