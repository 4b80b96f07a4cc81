"""The ``nnunetv2_grcsf`` command: one subcommand per module of :mod:`nnunetv2_grcsf.commands`.

Subcommand modules import their heavy dependencies (torch, nnunetv2) inside ``run`` so that
``--help`` answers at once.
"""

import argparse
import importlib
import sys

from nnunetv2_grcsf import __version__
from nnunetv2_grcsf.errors import UserFacingError

COMMAND_MODULES = ("doctor", "mae_train", "residuals", "predict", "pretrained_weights", "demo", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_grcsf",
        description="GRCSF and FIAS for nnU-Net v2: MAE residual maps, prediction with them, start checkpoints for "
                    "fine-tuning GRCSF from nnU-Net models, checks, the demo and evaluation. Training uses nnU-Net's "
                    "own commands with -tr GRCSFTrainer (or FIASTrainer...).")
    parser.add_argument("--version", action="version", version=f"nnunetv2-grcsf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"nnunetv2_grcsf.commands.{module_name}").add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "takes_nnunet_arguments", False):  # `predict`: nnU-Net's own parser reads them
        args.nnunet_arguments = unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
