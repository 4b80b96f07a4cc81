"""``nnunetv2_grcsf evaluate``: nnU-Net's Dice plus HD95, volume difference and lesion-wise detection.

Thin over :func:`nnunetv2_grcsf.evaluation.evaluate.evaluate_folders`; the conventions are documented in
:mod:`nnunetv2_grcsf.evaluation.metrics`. Nothing heavy is imported until :func:`run`.
"""
import argparse

NAME = "evaluate"
USAGE_EXAMPLE = "nnunetv2_grcsf evaluate -ref nnUNet_raw/Dataset802_BUSI256/labelsTr -pred OUT --png"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="evaluate predictions: Dice (nnU-Net's), HD95, volume difference, lesion-wise detection",
        description=(
            "Evaluate a folder of predicted segmentations against reference labels. Dice comes from nnU-Net's "
            "own evaluation; added per case and label: HD95 and absolute volume difference in physical units "
            "(from the image spacing), and lesion-wise detection (connected components; precision, recall, F1). "
            "Labels, file ending and reader/writer come from a dataset.json: -djfile, else the one "
            "nnUNetv2_predict writes into the predictions folder, else the one in the reference folder's parent. "
            "Writes OUTPUT.json and OUTPUT.csv (per case and label, plus means and pooled lesion counts) and "
            "prints a table; --png also draws the worst and best cases. Conventions: a reference lesion is "
            "detected when a predicted component overlaps it with IoU > --iou-threshold (default 0: at least "
            "one voxel); with --empty lesion (default) a case where reference and prediction are both empty "
            "scores Dice 1 and HD95 0, and one empty mask gives HD95 = the image diagonal."),
        epilog=f"example: {USAGE_EXAMPLE}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-ref", "--reference", dest="reference", required=True, metavar="LABELS",
                        help="folder of reference segmentations (e.g. nnUNet_raw/DatasetXXX/labelsTr)")
    parser.add_argument("-pred", "--predictions", dest="predictions", required=True, metavar="PREDICTIONS",
                        help="folder of predicted segmentations, same file names as the reference")
    parser.add_argument("-djfile", "--dataset-json", dest="dataset_json", default=None, metavar="DATASET_JSON",
                        help="dataset.json with labels and file_ending (default: PREDICTIONS/dataset.json, "
                             "else the reference folder's parent)")
    parser.add_argument("-l", "--labels", dest="labels", type=int, nargs="+", default=None, metavar="LABEL",
                        help="label ids to evaluate (default: every foreground label or region of the dataset.json)")
    parser.add_argument("-o", "--output", dest="output", default=None, metavar="OUTPUT_JSON",
                        help="summary JSON to write; the CSV and PNGs go beside it "
                             "(default: PREDICTIONS/summary_lesions.json)")
    parser.add_argument("--png", action="store_true",
                        help="draw OUTPUT_worst.png and OUTPUT_best.png: overlays of the cases with the lowest and "
                             "highest Dice (masks alone unless --images is given)")
    parser.add_argument("--images", default=None, metavar="IMAGES",
                        help="folder of the images (nnU-Net naming CASE_0000<ending>) to draw under the masks; "
                             "implies --png")
    parser.add_argument("--png-cases", dest="png_cases", type=int, default=4, metavar="N",
                        help="how many worst and how many best cases to draw")
    parser.add_argument("--iou-threshold", dest="iou_threshold", type=float, default=0.0, metavar="T",
                        help="a reference lesion and a predicted component match when their IoU > T; "
                             "0 = any overlap of one voxel or more (ISLES/ATLAS); e.g. 0.1 demands real overlap")
    parser.add_argument("--connectivity", choices=("full", "face"), default="full",
                        help="lesion connectivity: full = 26 (3D) / 8 (2D) neighbours, face = 6 / 4")
    parser.add_argument("--min-lesion-voxels", dest="min_lesion_voxels", type=int, default=1, metavar="N",
                        help="ignore connected components smaller than N voxels in both masks for lesion detection")
    parser.add_argument("--empty", choices=("lesion", "nan"), default="lesion",
                        help="empty-mask convention. lesion (BraTS/ISLES): both empty = Dice 1, HD95 0, "
                             "lesion F1 1; one empty = HD95 image diagonal. nan (nnU-Net): 0/0 is NaN and left out "
                             "of means")
    parser.add_argument("--chill", action="store_true",
                        help="evaluate only the cases that have a prediction (as nnU-Net's --chill); otherwise a "
                             "reference case without a prediction is an error")
    parser.add_argument("-np", "--num-processes", dest="num_processes", type=int, default=1, metavar="N",
                        help="worker processes (spawned; each imports nnU-Net, worth it for large 3D cases)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no table")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from nnunetv2_grcsf.evaluation.evaluate import evaluate_folders, format_table

    summary = evaluate_folders(
        args.reference, args.predictions, output_json=args.output, labels=args.labels,
        dataset_json=args.dataset_json, images_folder=args.images, png=args.png, png_cases=args.png_cases,
        overwrite=args.overwrite, chill=args.chill, iou_threshold=args.iou_threshold,
        connectivity=args.connectivity, min_lesion_voxels=args.min_lesion_voxels, empty=args.empty,
        num_processes=args.num_processes, verbose=not args.quiet)
    if not args.quiet:
        print(format_table(summary))
        skipped = summary["settings"]["skipped_reference_cases"]
        if skipped:
            print(f"skipped {len(skipped)} reference case(s) without a prediction (--chill)")
        print("wrote " + ", ".join(summary["files"].values()))
    return 0
