"""A small 2D Masked Autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022).

As in the paper (and facebookresearch/mae ``models_mae.py``, read for reference; this is our code):

- the image is cut into non-overlapping ``patch_size`` x ``patch_size`` patches, each linearly embedded
  (timm's ``PatchEmbed``, a strided convolution), plus fixed 2D sine-cosine position embeddings and a class
  token; encoder and decoder are stacks of timm's pre-norm ViT ``Block`` (qkv bias, LayerNorm eps 1e-6 as
  in MAE). Checkpoints from before timm's blocks (own blocks, same layers under other names) are converted
  on load (:func:`convert_state_dict`);
- a random subset of patches (``mask_ratio``, default 0.75) is removed; the ViT encoder sees only the
  visible patches;
- a light transformer decoder gets the encoded visible tokens plus a shared learned mask token at every
  removed position (with its own position embeddings) and predicts every patch's pixels;
- the loss is the mean squared error on the *removed* patches only, against the per-patch normalized
  image (the paper's ``norm_pix_loss``, which it found to give better representations).

Ours, not the paper's (documented because residual maps need it): with a per-patch normalized target
the decoder output alone cannot be turned back into pixels without the masked patch's own mean and
standard deviation, which must not leak into a reconstruction that is meant to show what the model
*expects* there. So the decoder has a second small head that predicts, for every patch and channel,
the mean and log standard deviation of the patch (trained with an MSE on removed patches, added to the
loss). :meth:`MaskedAutoencoder.reconstruct` is then ``normalized prediction * predicted std +
predicted mean`` and uses nothing of the removed patches. With ``norm_pix_loss=False`` the decoder
predicts raw (already globally normalized) pixels and the statistics head is not built.

Ours too, for images of several channels (multi-modal MRI), with ``channel_tokens``: each channel of each
patch is its own token (one patch embedding shared by the channels, plus a learned embedding per channel, in
encoder and decoder), and masks remove tokens, so a patch may be removed in one channel and visible in
another (as in MultiMAE, Bachmann et al., ECCV 2022). The MAE then learns what one sequence shows given the
others at the same place, which the visible neighbourhood of a single channel predicts poorly in brain MRI.
Its masks, in training and for residual maps, stagger the channels of a patch (:func:`complementary_masks`):
at ratio 0.5 with two channels every removed channel is predicted from the other one at its place.
Lesions are where that cross-channel relation of normal tissue breaks (e.g. FLAIR bright where T1c shows
normal-looking tissue). Without it (the MAE paper's design, and what one channel means anyway) a token holds
every channel of its patch.

Other choices: patch normalization is per channel (multi-modal MRI channels have unrelated scales);
its variance gets ``norm_eps`` = 0.01 (images arrive z-scored, so this floors the patch standard
deviation at 0.1 image standard deviations: flat patches, e.g. padding, would otherwise turn noise
into unit-variance targets). Masks can be passed in explicitly (boolean ``[N, T]``, True = removed,
the same count in every row), which is how :mod:`.residuals` uses complementary masks.

Shapes: images ``[N, C, S, S]`` with ``S = img_size``; ``L = (S / patch_size)^2`` patches; patch vectors
are laid out ``[N, L, C * patch_size^2]`` channel-major. Masks are ``[N, T]`` over the ``T = L`` tokens, or with
``channel_tokens`` ``T = C * L`` (channel-major: token ``c * L + l`` is channel ``c`` of patch ``l``).
"""

from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block


class DictRoundTrip:
    """``to_dict`` / ``from_dict`` for the config dataclasses stored in checkpoints (unknown keys ignored)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class MAEConfig(DictRoundTrip):
    """Architecture of :class:`MaskedAutoencoder` (stored in every checkpoint)."""

    in_channels: int = 1
    img_size: int = 128
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    decoder_embed_dim: int = 96
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    norm_eps: float = 1e-2
    stats_loss_weight: float = 1.0
    channel_tokens: bool = False

    def __post_init__(self):
        sizes = {"img_size": self.img_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                 "depth": self.depth, "num_heads": self.num_heads, "decoder_embed_dim": self.decoder_embed_dim,
                 "decoder_depth": self.decoder_depth, "decoder_num_heads": self.decoder_num_heads}
        bad = [f"{k} {v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive integers")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embedding dimensions must be divisible by their number of heads")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ValueError("embedding dimensions must be multiples of 4 (2D sine-cosine position embedding)")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def tokens_per_patch(self) -> int:
        """``in_channels`` with ``channel_tokens`` (a token per channel of a patch), else 1."""
        return self.in_channels if self.channel_tokens else 1

    @property
    def channels_per_token(self) -> int:
        return self.in_channels // self.tokens_per_patch

    @property
    def num_tokens(self) -> int:
        return self.num_patches * self.tokens_per_patch


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, ``[grid_size^2, dim]`` (half the dims per axis)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                         indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], axis=1)
    return torch.from_numpy(emb).float()


#: Parameter names of checkpoints written before the MAE used timm's blocks -> today's names.
_RENAMED_PARAMETERS = (("patch_embed.weight", "patch_embed.proj.weight"), ("patch_embed.bias", "patch_embed.proj.bias"),
                       (".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."))


def convert_state_dict(state_dict: dict) -> dict:
    """A state dict of an older checkpoint (own transformer blocks) with today's (timm) parameter names.

    The layers and their shapes are the same; only the names differ. Today's state dicts pass unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        for old, new in _RENAMED_PARAMETERS:
            if old in key and new not in key:
                key = key.replace(old, new)
        out[key] = value
    return out


def transformer_block(dim: int, num_heads: int, mlp_ratio: float) -> Block:
    """timm's pre-norm ViT block (fused attention, GELU MLP), with qkv bias and LayerNorm eps 1e-6 as in MAE."""
    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def random_mask(batch_size: int, num_tokens: int, mask_ratio: float, device=None,
                generator: torch.Generator = None, tokens_per_patch: int = 1) -> torch.Tensor:
    """A random boolean mask ``[N, T]`` (True = removed) with the same number of removed tokens per row.

    ``T = num_tokens`` (``MAEConfig.num_tokens``); ``round(T * (1 - mask_ratio))`` stay visible (at least one);
    the rest are removed. With channel tokens (``tokens_per_patch`` > 1) the mask is one pass of
    :func:`complementary_masks`, whose channels of a patch are staggered: the MAE trains on the masks its
    residual maps are made with.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if tokens_per_patch > 1:
        return complementary_masks(batch_size, num_tokens, mask_ratio, generator=generator,
                                   tokens_per_patch=tokens_per_patch)[0].to(device)
    num_keep = max(1, int(round(num_tokens * (1.0 - mask_ratio))))
    noise = torch.rand(batch_size, num_tokens, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks >= num_keep).to(device)


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder and a light transformer decoder; see the module docstring."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.channels_per_token, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(c.embed_dim, c.grid_size)[None], persistent=False)
        # with channel tokens: which channel a token shows, in the encoder and in the decoder
        self.channel_embed = nn.Parameter(torch.zeros(1, c.in_channels, 1, c.embed_dim)) if c.channel_tokens else None
        self.decoder_channel_embed = nn.Parameter(torch.zeros(1, c.in_channels, 1, c.decoder_embed_dim)) \
            if c.channel_tokens else None
        self.blocks = nn.ModuleList([transformer_block(c.embed_dim, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(c.decoder_embed_dim, c.grid_size)[None],
                             persistent=False)
        self.decoder_blocks = nn.ModuleList([transformer_block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio)
                                             for _ in range(c.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size ** 2 * c.channels_per_token)
        # per patch and channel: mean and log-std of the patch (only with a per-patch normalized target)
        self.decoder_stats = nn.Linear(c.decoder_embed_dim, 2 * c.channels_per_token) if c.norm_pix_loss else None
        self._init_weights()

    def _init_weights(self):
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for embedding in (self.channel_embed, self.decoder_channel_embed):
            if embedding is not None:
                nn.init.normal_(embedding, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- patches ----------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` -> ``[N, L, C * p^2]`` (row-major patch order, channel-major inside a patch)."""
        n, ch, s, _ = imgs.shape
        p, g = self.config.patch_size, s // self.config.patch_size
        x = imgs.reshape(n, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, g * g, ch * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, L, C * p^2]`` -> ``[N, C, S, S]``."""
        n, length, _ = x.shape
        p, ch = self.config.patch_size, self.config.in_channels
        g = int(round(length ** 0.5))
        x = x.reshape(n, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, ch, g * p, g * p)

    def patch_stats(self, patches: torch.Tensor):
        """Per patch and channel mean and variance of ``[N, L, C * p^2]`` patches: two ``[N, L, C, 1]``."""
        n, length, _ = patches.shape
        x = patches.reshape(n, length, self.config.in_channels, -1)
        return x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The loss target ``[N, L, C * p^2]``: per-patch normalized pixels (``norm_pix_loss``) or pixels."""
        patches = self.patchify(imgs)
        if not self.config.norm_pix_loss:
            return patches
        mean, var = self.patch_stats(patches)
        n, length, _ = patches.shape
        x = patches.reshape(n, length, self.config.in_channels, -1)
        return ((x - mean) / (var + self.config.norm_eps).sqrt()).reshape(n, length, -1)

    def patch_channel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A token mask ``[N, T]`` -> ``[N, L, C]``: whether channel ``c`` of patch ``l`` is removed."""
        c = self.config
        n = mask.shape[0]
        if c.channel_tokens:
            return mask.reshape(n, c.in_channels, c.num_patches).transpose(1, 2)
        return mask.unsqueeze(-1).expand(n, c.num_patches, c.in_channels)

    def _tokens(self, x: torch.Tensor, pos_embed: torch.Tensor, channel_embed) -> torch.Tensor:
        """Token embeddings ``[N * C', L, D]`` or ``[N, C' * L, D]`` (``C'`` = tokens per patch, channel-major)
        -> ``[N, T, D]`` with position (and channel) embeddings added."""
        if channel_embed is None:
            return x + pos_embed
        d = x.shape[-1]
        x = x.reshape(-1, self.config.in_channels, self.config.num_patches, d) + pos_embed[:, None] + channel_embed
        return x.reshape(x.shape[0], -1, d)

    # ---- encoder / decoder ------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor):
        """Encode the visible tokens. ``mask`` ``[N, T]`` bool, True = removed, same count per row.

        Returns ``(latent [N, 1 + T_visible, D], ids_keep [N, T_visible])``.
        """
        if self.config.channel_tokens:
            imgs = imgs.reshape(-1, 1, *imgs.shape[2:])
        x = self._tokens(self.patch_embed(imgs), self.pos_embed, self.channel_embed)  # [N, T, D]
        n, length, d = x.shape
        num_keep = length - int(mask[0].sum())
        # stable sort puts visible (False) patches first, in positional order
        ids_keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), ids_keep

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor):
        """Decode every token. Returns ``(pred [N, L, C * p^2], stats [N, L, C, 2] or None)``, per patch whether
        or not its channels are separate tokens."""
        c = self.config
        x = self.decoder_embed(latent)
        n, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(n, c.num_tokens, d)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x[:, 1:])
        full = self._tokens(full, self.decoder_pos_embed, self.decoder_channel_embed)
        x = torch.cat([x[:, :1], full], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, 1:]
        if c.channel_tokens:  # [N, C * L, D] -> [N, L, C, D]: a patch's channels side by side
            x = x.reshape(n, c.in_channels, c.num_patches, -1).transpose(1, 2)
        pred = self.decoder_pred(x).reshape(n, c.num_patches, -1)
        stats = None
        if self.decoder_stats is not None:
            stats = self.decoder_stats(x).reshape(n, c.num_patches, c.in_channels, 2)
        return pred, stats

    # ---- loss / forward ---------------------------------------------------------------------------
    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, stats, mask: torch.Tensor,
                     excluded: torch.Tensor = None) -> torch.Tensor:
        """MSE on removed tokens only (mean over the removed patch channels of their mean squared error).

        ``excluded`` (``[N, L]`` bool, optional): patches left out of the loss even when removed, e.g. those
        holding a labelled lesion, so that the MAE learns to reconstruct normal tissue only.
        With ``norm_pix_loss`` the MSE of the predicted patch mean and log-std (also on removed tokens
        only) is added with weight ``stats_loss_weight``.
        """
        n, length, _ = pred.shape
        m = self.patch_channel_mask(mask)  # [N, L, C]
        m = (m & ~excluded.unsqueeze(-1) if excluded is not None else m).float()
        error = (pred.float() - self.target(imgs)) ** 2
        loss = error.reshape(n, length, self.config.in_channels, -1).mean(dim=-1)  # [N, L, C]
        loss = (loss * m).sum() / m.sum().clamp_min(1.0)
        if stats is not None:
            mean, var = self.patch_stats(self.patchify(imgs))
            log_std = 0.5 * torch.log(var + self.config.norm_eps)
            true_stats = torch.cat([mean, log_std], dim=-1)  # [N, L, C, 2]
            s_loss = ((stats.float() - true_stats) ** 2).mean(dim=-1)
            loss = loss + self.config.stats_loss_weight * (s_loss * m).sum() / m.sum().clamp_min(1.0)
        return loss

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, mask: torch.Tensor = None,
                generator: torch.Generator = None, excluded: torch.Tensor = None) -> dict:
        """Mask (randomly at ``mask_ratio`` unless ``mask`` is given), encode, decode, loss (without ``excluded``
        patches: :meth:`forward_loss`).

        Returns ``{"loss": scalar, "pred": [N, L, C*p^2], "stats": [N, L, C, 2] or None, "mask": [N, T]}``.
        """
        if mask is None:
            mask = random_mask(imgs.shape[0], self.config.num_tokens, mask_ratio, imgs.device, generator,
                               self.config.tokens_per_patch)
        latent, ids_keep = self.forward_encoder(imgs, mask)
        pred, stats = self.forward_decoder(latent, ids_keep)
        return {"loss": self.forward_loss(imgs, pred, stats, mask, excluded), "pred": pred, "stats": stats,
                "mask": mask}

    def prediction_to_image(self, pred: torch.Tensor, stats) -> torch.Tensor:
        """Decoder output -> image ``[N, C, S, S]`` in the input's intensity units (see module docstring)."""
        if stats is None:
            return self.unpatchify(pred.float())
        n, length, _ = pred.shape
        x = pred.float().reshape(n, length, self.config.in_channels, -1)
        x = x * stats[..., 1:2].float().exp() + stats[..., 0:1].float()
        return self.unpatchify(x.reshape(n, length, -1))

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's reconstruction ``[N, C, S, S]`` of ``imgs`` with ``mask`` (True = removed) tokens removed.

        Only the removed tokens are meaningful predictions; nothing of them is used to make them.
        """
        latent, ids_keep = self.forward_encoder(imgs, mask)
        pred, stats = self.forward_decoder(latent, ids_keep)
        return self.prediction_to_image(pred, stats)


def mask_schedule(mask_ratio: float, max_passes: int = 20) -> tuple:
    """``(passes K, times_masked m)`` with ``m / K == mask_ratio`` (as a fraction of denominator <= max_passes).

    0.75 -> (4, 3), 0.5 -> (2, 1), 0.6 -> (5, 3), 0.9 -> (10, 9).
    """
    from fractions import Fraction

    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    frac = Fraction(mask_ratio).limit_denominator(max_passes)
    if frac.numerator == 0 or frac.numerator == frac.denominator:
        raise ValueError(f"mask_ratio {mask_ratio} is too close to 0 or 1")
    return frac.denominator, frac.numerator


def complementary_masks(batch_size: int, num_tokens: int, mask_ratio: float, repeats: int = 1,
                        generator: torch.Generator = None, tokens_per_patch: int = 1) -> torch.Tensor:
    """Masks ``[P, N, T]`` (True = removed) for ``P = K * repeats`` passes over ``T = num_tokens`` tokens
    (``MAEConfig.num_tokens``: the patches, or each channel of each patch); see :func:`mask_schedule`.

    Per row and repeat the patches are split at random into ``K`` groups of (almost) equal size
    (sizes differ by at most one and are the same in every row); pass ``k`` removes groups
    ``k, k+1, ..., k+m-1`` (mod ``K``). So every pass removes a ``mask_ratio`` share of the tokens
    (exactly when ``K`` divides ``T``) with the same count in every row, the visible groups of the ``K``
    passes partition the tokens, and **every token is removed in exactly ``m * repeats`` passes**.

    With channel tokens (``tokens_per_patch`` = C > 1, tokens channel-major) channel ``c`` of a patch of group
    ``g`` is in group ``g + c * K // C`` (mod ``K``): the channels of a patch are staggered over the passes,
    so a removed channel is predicted while as many of the other channels at its place are visible as the
    ratio allows (at 0.5 with two channels: always the other one). Our design: the MAE then models each channel
    from the others at the same place, the cross-sequence relation a model of normal tissue should know.
    """
    k_passes, m = mask_schedule(mask_ratio)
    patches = num_tokens // tokens_per_patch
    offsets = torch.arange(tokens_per_patch)[:, None] * k_passes // tokens_per_patch  # [C, 1]
    masks = []
    for _ in range(repeats):
        ranks = torch.rand(batch_size, patches, generator=generator).argsort(dim=1).argsort(dim=1)
        group = ((ranks * k_passes // patches)[:, None] + offsets).reshape(batch_size, num_tokens)  # [N, T]
        for k in range(k_passes):
            masks.append((group - k) % k_passes < m)
    return torch.stack(masks)


def patch_mask_to_pixels(mask: torch.Tensor, patch_size: int, tokens_per_patch: int = 1) -> torch.Tensor:
    """``[N, T]`` token mask -> ``[N, tokens_per_patch, S, S]`` float pixel mask (per channel with channel
    tokens, else one for all channels)."""
    n, length = mask.shape
    g = int(round((length // tokens_per_patch) ** 0.5))
    m = mask.reshape(n, tokens_per_patch, g, g).float()
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


@torch.no_grad()
def masked_reconstruction(model: "MaskedAutoencoder", imgs: torch.Tensor, mask_ratio: float = 0.75, repeats: int = 1,
                          generator: torch.Generator = None, masks: torch.Tensor = None) -> torch.Tensor:
    """Reconstruction ``[N, C, S, S]`` in which every pixel comes only from passes where its token was removed.

    Uses :func:`complementary_masks` (or the given ``masks`` ``[P, N, T]``, which must remove every token at
    least once); each pixel's value is the mean of its predictions made while its token was removed
    (visible tokens, which the decoder merely copies, never count).
    """
    c = model.config
    if masks is None:
        masks = complementary_masks(imgs.shape[0], c.num_tokens, mask_ratio, repeats, generator, c.tokens_per_patch)
    if not bool(masks.any(dim=0).all()):
        raise ValueError("the masks leave some patch visible in every pass")
    total = torch.zeros(imgs.shape, dtype=torch.float32, device=imgs.device)
    count = torch.zeros((imgs.shape[0], c.tokens_per_patch, *imgs.shape[2:]), dtype=torch.float32,
                        device=imgs.device)
    for mask in masks.to(imgs.device):
        pixel_mask = patch_mask_to_pixels(mask, c.patch_size, c.tokens_per_patch)
        total += model.reconstruct(imgs, mask).float() * pixel_mask
        count += pixel_mask
    return total / count


def build_model(config) -> MaskedAutoencoder:
    """A :class:`MaskedAutoencoder` from an :class:`MAEConfig` or its dict."""
    if isinstance(config, dict):
        config = MAEConfig.from_dict(config)
    return MaskedAutoencoder(config)
