"""``nnunetv2_grcsf predict``: ``nnUNetv2_predict`` that first gives the images the model's MAE residual channel(s).

It takes exactly ``nnUNetv2_predict``'s arguments because it runs nnU-Net's own entry point
(argument parser, help, device set-up, multi-process or sequential prediction), with nnU-Net's
predictor class replaced for this one call by
:class:`~nnunetv2_grcsf.prediction.ResidualChannelPredictor`. SIGTERM raises an exception while it
runs (:func:`~nnunetv2_grcsf.interruption.sigterm_raises`), so the temporary folder of residual
inputs is removed as after Ctrl-C.
"""

import argparse
import contextlib
import sys

DESCRIPTION = """\
nnUNetv2_predict for models trained on MAE residual channels (GRCSFTrainer, GRCSF_FIASTrainer...):
give the images only (CASE_0000<ending>...), as for any nnU-Net model. The residual channel(s) are
made with the MAE stored in the model's checkpoint (same checkpoint and settings as the training
data set: no MAE file, raw data set or absolute path needed) in a temporary folder, which is
removed afterwards. Cases that already have the residual channel(s) (e.g. from `nnunetv2_grcsf
residuals -i`) are predicted as they are. For models without residual channels it is
nnUNetv2_predict. Arguments: those of nnUNetv2_predict (below)."""

EXAMPLE = ("example: nnunetv2_grcsf predict -i NEW_IMAGES -o PREDICTIONS -d 501 -c 2d -f 0 -tr GRCSFTrainer "
           "-device cpu")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict", add_help=False, description=DESCRIPTION,
        help="nnUNetv2_predict that adds the model's MAE residual channel(s) to the images (same arguments)")
    parser.set_defaults(func=run, takes_nnunet_arguments=True)
    return parser


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def run(args) -> int:
    from nnunetv2.inference import predict_from_raw_data

    from nnunetv2_grcsf.interruption import sigterm_raises
    from nnunetv2_grcsf.prediction import ResidualChannelPredictor

    arguments = list(args.nnunet_arguments)
    if "-h" in arguments or "--help" in arguments:
        print(f"{DESCRIPTION}\n\n{EXAMPLE}")
    with sigterm_raises(), _replaced(predict_from_raw_data, "nnUNetPredictor", ResidualChannelPredictor), \
            _replaced(sys, "argv", ["nnunetv2_grcsf predict", *arguments]):
        predict_from_raw_data.predict_entry_point()
    return 0
