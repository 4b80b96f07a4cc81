"""``nnunetv2_grcsf demo``: the whole pipeline on a synthetic lesion data set (see nnunetv2_grcsf/demo.py)."""

from pathlib import Path

from nnunetv2_grcsf.demo import DEFAULT_TRAINER


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo", help="synthetic lesions -> MAE residuals -> nnU-Net plan, train (GRCSF), predict, evaluate",
        description="Runs the whole GRCSF pipeline end to end on a synthetic 2D lesion data set, with the real "
                    "nnU-Net commands, below one output folder (its own nnUNet_raw/_preprocessed/_results). "
                    "Prints Dice per label and writes overlay PNGs. About 7-8 minutes on a 2-core CPU.")
    parser.add_argument("-o", "--output", type=Path, default=Path("nnunetv2_grcsf_demo"),
                        help="output folder (default: ./nnunetv2_grcsf_demo)")
    parser.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"),
                        help="device for MAE, training and prediction (default: cpu)")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER,
                        help=f"GRCSF trainer variant to train (default: {DEFAULT_TRAINER})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the MAE (default: 0)")
    parser.add_argument("--num-training", type=int, default=40, help="synthetic training images (default: 40)")
    parser.add_argument("--num-test", type=int, default=10, help="synthetic held-out test images (default: 10)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier demo in the output folder")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from nnunetv2_grcsf.demo import run_demo

    run_demo(args.output, device=args.device, trainer=args.trainer, seed=args.seed,
             num_training=args.num_training, num_test=args.num_test, overwrite=args.overwrite)
    return 0
