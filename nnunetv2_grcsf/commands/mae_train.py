"""``nnunetv2_grcsf mae-train``: train the Masked Autoencoder whose residual maps GRCSF's RCU uses.

See :mod:`nnunetv2_grcsf.mae.train` for what is trained on, how, and what is written where.
"""

import argparse

DESCRIPTION = """\
Train a Masked Autoencoder (He et al. 2022) on the images of an nnU-Net raw data set: imagesTr only
(--include-test-images adds imagesTs; the checkpoint records which were read). The loss leaves out
patches holding a labelled voxel of labelsTr, so the MAE models normal tissue only and lesions stand out
in its residual (--no-skip-labelled-patches: every patch); test images' labels are never read.
3D volumes are cut into slices along their lowest-resolution axis;
the checkpoint records the median in-slice spacing, which `residuals` compares its images with.
With several channels (multi-modal MRI) each channel of a patch is a token of its own, masked on its own
(--no-channel-tokens: one token per patch), trained by default for {steps} steps with --max-shift
{max_shift_patches} and --lr {lr:g} ({plain_steps} steps are not enough there).
Writes checkpoint_latest.pth (periodically), checkpoint_final.pth and training_log.json to
$nnUNet_results/DatasetXXX_Name/nnunetv2_grcsf_mae/ (or -o); never into the raw data set. At the end it
measures how much better than the mean image the MAE reconstructs masked patches (PSNR) and warns
when that gap is under 1 dB.
Next step: nnunetv2_grcsf residuals -d DATASET -o NEW_ID."""

EXAMPLES = """\
examples:
  nnunetv2_grcsf mae-train -d 500                      # tiny preset, default steps (CPU: minutes)
  nnunetv2_grcsf mae-train -d 500 --preset small --epochs 200 --device cuda
  nnunetv2_grcsf mae-train -d 500 --resume --steps 1000   # continue / extend a run
  nnunetv2_grcsf mae-train -d 501                      # multi-modal MRI: channel tokens, {steps} steps (CPU: 10 min)"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from nnunetv2_grcsf.mae import CHANNEL_TOKEN_TRAINING, DEFAULT_TRAINING, PRESETS

    plain, tokens = DEFAULT_TRAINING, CHANNEL_TOKEN_TRAINING

    parser = subparsers.add_parser(
        "mae-train", help="train the MAE for residual maps on an nnU-Net raw data set's images",
        description=DESCRIPTION.format(**tokens, plain_steps=plain["steps"]), epilog=EXAMPLES.format(**tokens),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True,
                        help="raw data set id (e.g. 500) or name (Dataset500_X), looked up in $nnUNet_raw")
    parser.add_argument("-o", "--output", default=None,
                        help="output folder (default: $nnUNet_results/DatasetXXX_Name/nnunetv2_grcsf_mae)")
    arch = parser.add_argument_group("architecture (ignored with --resume: taken from the checkpoint)")
    arch.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                      help="named model size: tiny (CPU, 128 px, patch 8, dim 96, depth 3, pixel loss), small / base "
                           "(GPU, 256 px, normalized pixel loss). Default: tiny")
    arch.add_argument("--image-size", type=int, default=None, help="model input size in pixels (square)")
    arch.add_argument("--patch-size", type=int, default=None,
                      help="patch size in pixels (image size must be a multiple); every slice of the data set must "
                           "be at least this many voxels along both axes")
    arch.add_argument("--embed-dim", type=int, default=None, help="encoder width")
    arch.add_argument("--depth", type=int, default=None, help="number of encoder blocks")
    arch.add_argument("--num-heads", type=int, default=None, help="encoder attention heads")
    arch.add_argument("--decoder-dim", type=int, default=None, help="decoder width")
    arch.add_argument("--decoder-depth", type=int, default=None, help="number of decoder blocks")
    arch.add_argument("--channel-tokens", action=argparse.BooleanOptionalAction, default=None,
                      help="a token per channel of each patch, masked on its own, so the MAE learns what one channel "
                           "shows given the others at the same place (default: on for data sets of several "
                           "channels, e.g. multi-modal MRI)")
    loss = arch.add_mutually_exclusive_group()
    loss.add_argument("--pixel-loss", dest="norm_pix_loss", action="store_false", default=None,
                      help="loss on pixels (the tiny preset's default)")
    loss.add_argument("--norm-pix-loss", dest="norm_pix_loss", action="store_true",
                      help="loss on per-patch normalized pixels, as in the paper (the small and base presets' default)")
    opt = parser.add_argument_group("training")
    budget = opt.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default {plain['steps']}; {tokens['steps']} with channel tokens)")
    budget.add_argument("--epochs", type=float, default=None, help="passes over the training slices (instead of --steps)")
    opt.add_argument("--batch-size", type=int, default=16, help="slices per step (default 16)")
    opt.add_argument("--lr", type=float, default=None,
                     help=f"peak learning rate of AdamW (default {plain['lr']:g}; {tokens['lr']:g} with channel "
                          f"tokens)")
    opt.add_argument("--mask-ratios", "--mask-ratio", dest="mask_ratios", type=float, nargs="+", default=[0.5, 0.75],
                     help="share(s) of patches removed; each step uses the next (default 0.5 0.75)")
    opt.add_argument("--include-test-images", action="store_true",
                     help="train on imagesTs too (recorded in the checkpoint; residual figures on those test images "
                          "are then optimistic). Default: imagesTr only")
    opt.add_argument("--skip-labelled-patches", action=argparse.BooleanOptionalAction, default=True,
                     help="leave patches that hold a labelled voxel (labelsTr) out of the loss, so the MAE learns "
                          "normal tissue only and lesions stand out in its residual (default: on; "
                          "--no-skip-labelled-patches trains on every patch)")
    opt.add_argument("--crop-to-foreground", action=argparse.BooleanOptionalAction, default=True,
                     help="cut each image to the bounding box of its foreground (voxels where any channel is above "
                          "its minimum, e.g. a skull-stripped brain) before slicing, so the anatomy fills the MAE's "
                          "input (default: on; recorded in the checkpoint, residuals cut alike)")
    opt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    opt.add_argument("--save-every", type=int, default=100, help="write checkpoint_latest.pth every N steps (default 100)")
    opt.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    opt.add_argument("--max-shift", type=int, default=None, metavar="PATCHES",
                     help="shift each training slice by a random whole number of patches, up to this many per axis, "
                          "so the MAE reconstructs from the visible tissue around a patch rather than from where "
                          f"anatomy usually lies (default {plain['max_shift_patches']}: no shifts; "
                          f"{tokens['max_shift_patches']} with channel tokens)")
    opt.add_argument("--max-slices-per-case", type=int, default=None,
                     help="3D: keep at most N evenly spaced slices per volume in memory (default: all)")
    opt.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default auto)")
    opt.add_argument("--num-threads", type=int, default=None,
                     help="CPU threads for torch (default: one per core that is idle now, at least 1: on a busy "
                          "machine extra threads slow training down several-fold)")
    state = opt.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true",
                       help="continue from checkpoint_latest.pth in the output folder (--steps/--epochs may extend)")
    state.add_argument("--overwrite", action="store_true", help="delete existing checkpoints in the output folder and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from nnunetv2_grcsf.mae import MAEError
    from nnunetv2_grcsf.mae.train import TrainConfig, auto_num_threads, model_config_from_preset, train_mae

    # every argument is checked before the data set is read or a folder is made
    train_config = TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               mask_ratios=args.mask_ratios, seed=args.seed, save_every=args.save_every,
                               flip=not args.no_flip, max_slices_per_case=args.max_slices_per_case,
                               skip_labelled_patches=args.skip_labelled_patches, max_shift_patches=args.max_shift,
                               crop_to_foreground=args.crop_to_foreground)
    train_config.check()
    if args.num_threads is not None and args.num_threads < 1:
        raise MAEError(f"--num-threads {args.num_threads}: give at least 1")
    architecture = dict(img_size=args.image_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                        depth=args.depth, num_heads=args.num_heads, decoder_embed_dim=args.decoder_dim,
                        decoder_depth=args.decoder_depth, norm_pix_loss=args.norm_pix_loss,
                        channel_tokens=args.channel_tokens)
    model_config = None
    if not args.resume:
        from nnunetv2_grcsf.mae.data import channel_names_of, load_dataset_json, resolve_raw_dataset

        model_config_from_preset(args.preset, 1, **architecture)  # checks the architecture before any reading
        _, folder = resolve_raw_dataset(args.dataset)
        model_config = model_config_from_preset(args.preset, len(channel_names_of(load_dataset_json(folder))),
                                                **architecture)
    train_mae(args.dataset, args.output, model_config, train_config, device=args.device, resume=args.resume,
              overwrite=args.overwrite, progress=not args.quiet, num_threads=args.num_threads or auto_num_threads(),
              include_test_images=args.include_test_images)
    return 0
