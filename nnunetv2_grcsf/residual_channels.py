"""Which input channels of a data set are MAE residual maps: one convention for every layer.

`nnunetv2_grcsf residuals` writes, beside nnU-Net's own keys, one extra key into the new data set's
``dataset.json`` (nnU-Net ignores keys it does not know and copies dataset.json on to the
preprocessed and results folders)::

    "nnunetv2_grcsf": {
        "residual_channels": [1],                 # indices into "channel_names"
        "mae_checkpoint": "/abs/path/checkpoint_final.pth",
        "mae_sha256": "...",                      # of the checkpoint file
        "mask_ratios": [0.75],                    # one residual channel per MAE mask ratio
        "source_dataset": "Dataset500_X",
        "residual_definition": {...}              # smoothing, repeats, seed, scale...
    }

Trainers that use the Region Compensation Unit read the indices from here, check them, and copy
them into the plans they save with the model (top-level plans key of the same name), because at
inference nnU-Net's predictor calls only the static ``build_network_architecture`` with the plans.
The MAE checkpoint itself travels inside the model's checkpoints (:mod:`nnunetv2_grcsf.model_mae`).
A network given another channel count than it was built for (plain ``nnUNetv2_predict`` on images
without the residual channel) stops with :func:`check_input_channels`' one line.
"""

from nnunetv2_grcsf.errors import UserFacingError

DATASET_JSON_KEY = "nnunetv2_grcsf"
PLANS_KEY = DATASET_JSON_KEY


class ResidualChannelError(UserFacingError, ValueError):
    """A data set, plans file or input that lacks (or misdeclares) the MAE residual channel(s)."""


def residual_channels_of_dataset(dataset_json: dict, dataset_name: str = "this data set") -> list:
    """The residual channel indices declared in a dataset.json; raises ResidualChannelError if none.

    The message says how to make a data set with residual channels.
    """
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    declared = dataset_json.get(DATASET_JSON_KEY, {}).get("residual_channels", [])
    if not declared:
        raise ResidualChannelError(
            f"{dataset_name} has no MAE residual channel (its channels are {dict(channel_names)}; its dataset.json "
            f"has no '{DATASET_JSON_KEY}.residual_channels'). Make a data set with one: "
            f"`nnunetv2_grcsf mae-train -d SRC` then `nnunetv2_grcsf residuals -d SRC -o NEW_ID`, and train on NEW_ID; "
            f"or train a variant without the Region Compensation Unit (e.g. GRCSFTrainer_noRCU, FIASTrainer).")
    return check_residual_channels(declared, len(channel_names), dataset_name)


def check_residual_channels(residual_channels, num_input_channels: int, where: str) -> list:
    """Validate residual channel indices against the channel count; at least one image channel must remain."""
    indices = [int(i) for i in residual_channels]
    bad = [i for i in indices if not 0 <= i < num_input_channels]
    if bad:
        raise ResidualChannelError(
            f"{where}: residual channel index {bad} is out of range for {num_input_channels} input channels "
            f"(valid: 0..{num_input_channels - 1}). Check '{DATASET_JSON_KEY}.residual_channels'.")
    if len(set(indices)) != len(indices) or len(indices) >= num_input_channels:
        raise ResidualChannelError(
            f"{where}: residual channels {indices} must be distinct and leave at least one image channel "
            f"among {num_input_channels} input channels.")
    return sorted(indices)


def residual_channels_of_plans(plans: dict, num_input_channels: int, trainer_name: str) -> list:
    """The residual channel indices a trained model was trained with (from its plans)."""
    declared = plans.get(PLANS_KEY, {}).get("residual_channels")
    if not declared:
        raise ResidualChannelError(
            f"{trainer_name} needs MAE residual channel(s), but these plans record none (no top-level "
            f"'{PLANS_KEY}.residual_channels'). The trainer writes it when it trains on a data set made by "
            f"`nnunetv2_grcsf residuals`; a model folder whose plans.json lacks it was not trained by {trainer_name}.")
    return check_residual_channels(declared, num_input_channels, f"plans of {trainer_name}")


def check_input_channels(num_given: int, image_channels, residual_channels, network_name: str) -> None:
    """Raise one clear ResidualChannelError when a network gets another channel count than it was built for.

    Typically ``nnUNetv2_predict`` on images without the residual channel(s): the message names the
    command that adds them.
    """
    expected = len(image_channels) + len(residual_channels)
    if num_given == expected:
        return
    needs = (f"{network_name} needs {expected} input channels (image channel(s) {list(image_channels)} + MAE residual "
             f"channel(s) {list(residual_channels)}), the images have {num_given}")
    if num_given == len(image_channels):
        raise ResidualChannelError(f"{needs}: predict with `nnunetv2_grcsf predict` (nnUNetv2_predict's arguments), "
                                   f"which adds the residual channel(s) with the model's own MAE")
    raise ResidualChannelError(f"{needs}: give every case the files _0000.._{expected - 1:04d}, or only its image "
                               f"channels and predict with `nnunetv2_grcsf predict` (nnUNetv2_predict's arguments)")


def plans_with_residual_channels(plans: dict, residual_channels) -> dict:
    """A shallow copy of ``plans`` that records the residual channel indices (for the saved model)."""
    return {**plans, PLANS_KEY: {**plans.get(PLANS_KEY, {}), "residual_channels": list(residual_channels)}}
