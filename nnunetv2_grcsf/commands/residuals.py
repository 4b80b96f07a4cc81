"""``nnunetv2_grcsf residuals``: add MAE residual channel(s) to a raw data set or to a folder of inputs.

See :mod:`nnunetv2_grcsf.mae.residuals` for the residual definition, its scaling and channel name.
"""

import argparse

DESCRIPTION = """\
Add MAE residual map channel(s) (one per mask ratio) to nnU-Net images.

  -d SRC -o NEW_ID          make raw data set DatasetNEW_ID_<name>: SRC's channels (copied unchanged)
                            + residual channel(s) _000K, labels copied, dataset.json updated
                            (channel name rgb_to_0_1 and the 'nnunetv2_grcsf' key). MAE: -m or the
                            newest $nnUNet_results/<SRC>/nnunetv2_grcsf_mae*/checkpoint_final.pth.
  -i IN -o OUT -m CKPT      the same for prediction inputs (CASE_0000.ext ...), so nnUNetv2_predict
                            gets the channels the model was trained with. --from-dataset NEW_ID takes
                            the checkpoint and settings recorded by the -d run (recommended) and
                            checks the checkpoint against the recorded SHA-256 (-m: a copy of it).

Residual = |image - MAE reconstruction| where every patch is reconstructed only while masked
(complementary masks), in units of the MAE's normalized intensity, smoothed, stored as 8 bits
of a fixed per-checkpoint scale. The source data set / input folder is only ever read. Output is
built in a hidden sibling folder (.NAME.incomplete-PID) and renamed when complete: Ctrl-C or
SIGTERM leaves nothing that looks finished (after a SIGKILL, `nnunetv2_grcsf doctor` names the
folder to delete). The new dataset.json records the MAE checkpoint's SHA-256, so --from-dataset
and `doctor -d` refuse an MAE changed since.

Images must match the MAE: same channel count, 2D or 3D like its training images, slices at least
one patch (patch_size voxels) along both axes. Cases whose in-slice spacing is more than 2x from
the MAE's training spacing get one warning per run. `nnunetv2_grcsf doctor -d NEW_ID` later checks
that every residual file still lies on its image's grid and the images still equal the source's."""

EXAMPLES = """\
examples:
  nnunetv2_grcsf residuals -d 500 -o 501 --report
  nnunetv2_grcsf residuals -d 500 -o 502 --mask-ratios 0.5 0.75
  nnunetv2_grcsf residuals -i new_images -o new_images_res --from-dataset 501
  nnunetv2_grcsf residuals -i new_images -o new_images_res -m /path/checkpoint_final.pth --file-ending .nii.gz"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "residuals", help="add MAE residual channel(s) to a raw data set (-d) or a folder of inputs (-i)",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--dataset", help="source raw data set id or name (in $nnUNet_raw)")
    source.add_argument("-i", "--input", help="input folder of images named CASE_XXXX<file ending>")
    parser.add_argument("-o", "--output", required=True,
                        help="with -d: id of the new data set (e.g. 501); with -i: output folder")
    parser.add_argument("-m", "--checkpoint", default=None,
                        help="MAE checkpoint (default with -d: newest under $nnUNet_results/<SRC>/nnunetv2_grcsf_mae*; "
                             "with --from-dataset: the recorded one, or a copy of it, checked by its SHA-256)")
    parser.add_argument("--from-dataset", default=None,
                        help="with -i: take checkpoint, mask ratios and residual settings from the dataset.json of "
                             "this data set (made by `residuals -d`), so inputs match what the model was trained on")
    parser.add_argument("--mask-ratios", type=float, nargs="+", default=None,
                        help="one residual channel per mask ratio, in this order (default 0.75)")
    parser.add_argument("--name", default=None, help="with -d: name of the new data set (default: the source's)")
    parser.add_argument("--file-ending", default=None,
                        help="with -i: file ending of the images (default: the one the MAE was trained on)")
    parser.add_argument("--smoothing", type=float, default=None,
                        help="Gaussian sigma in model-grid pixels applied to the residual (default 2.0; 0 = none)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="sets of complementary masks to average (default 1; each patch is masked m times per set)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random masks (default 0)")
    parser.add_argument("--reconstruction", choices=("mae", "interpolation"), default=None,
                        help="what the residual compares the image with: the MAE's reconstruction (default) or, as a "
                             "control without a model of the images, each masked patch interpolated from the visible "
                             "pixels around it (same masks, normalization, scale and encoding)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="CPU threads for torch (default: one per core that is idle now, at least 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output data set (same id and name) / write into a non-empty "
                             "output folder; the source is never touched")
    parser.add_argument("--report", action="store_true",
                        help="write report.json (pixel AUROC of the residual for label > 0, per case and overall) and "
                             "PNG panels (image | reconstruction | residual | mask); with -i needs --labels")
    parser.add_argument("--labels", default=None, help="with -i: folder of labels CASE<file ending> for --report")
    parser.add_argument("--report-dir", default=None,
                        help="report folder (default with -d: $nnUNet_results/<NEW>/nnunetv2_grcsf_residual_report; "
                             "with -i: OUTPUT_residual_report)")
    parser.add_argument("--report-cases", type=int, default=4, help="number of PNG panels (default 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _settings(args, base=None):
    """ResidualSettings from the options given, on top of ``base`` (recorded by --from-dataset, which they must match)."""
    from nnunetv2_grcsf.mae import MAEError
    from nnunetv2_grcsf.mae.residuals import ResidualSettings

    values = (base or ResidualSettings()).to_dict()
    options = {"mask_ratios": ("--mask-ratios", args.mask_ratios), "smoothing_sigma": ("--smoothing", args.smoothing),
               "repeats": ("--repeats", args.repeats), "seed": ("--seed", args.seed),
               "reconstruction": ("--reconstruction", args.reconstruction)}
    for key, (option, value) in options.items():
        if value is None:
            continue
        if key == "mask_ratios":
            value = [float(v) for v in value]
        if base is not None and value != values[key]:
            raise MAEError(f"{option} {value} differs from the {values[key]} recorded in data set {args.from_dataset}; "
                           f"the model would get other inputs than it was trained on. Leave {option} out.")
        values[key] = value
    return ResidualSettings(**values)


def run(args) -> int:
    from nnunetv2_grcsf.mae import MAEError
    from nnunetv2_grcsf.mae.residuals import checkpoint_for_dataset, make_residual_dataset, make_residual_folder

    from nnunetv2_grcsf.mae.train import auto_num_threads

    common = dict(device=args.device, batch_size=args.batch_size, progress=not args.quiet,
                  num_threads=args.num_threads or auto_num_threads())
    if args.dataset is not None:
        for option in ("from_dataset", "labels", "file_ending"):
            if getattr(args, option):
                raise MAEError(f"--{option.replace('_', '-')} is for -i input folders; with -d the source data set's "
                               f"own settings are used")
        make_residual_dataset(args.dataset, args.output, args.checkpoint, _settings(args), name=args.name,
                              overwrite=args.overwrite, report=args.report, report_dir=args.report_dir,
                              report_cases=args.report_cases, **common)
        return 0
    if args.name:
        raise MAEError("--name is for -d (new data sets)")
    checkpoint, base = args.checkpoint, None
    if args.from_dataset:
        checkpoint, base = checkpoint_for_dataset(args.from_dataset, checkpoint)
    if checkpoint is None:
        raise MAEError("with -i give the MAE checkpoint: -m CHECKPOINT, or --from-dataset ID of the data set the "
                       "model was trained on")
    if args.report and not args.labels:
        raise MAEError("--report with -i needs --labels LABELS_FOLDER (files CASE<file ending>)")
    make_residual_folder(args.input, args.output, checkpoint, _settings(args, base), file_ending=args.file_ending,
                         overwrite=args.overwrite, labels_folder=args.labels, report_dir=args.report_dir,
                         report_cases=args.report_cases, **common)
    return 0
