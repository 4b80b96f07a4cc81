"""nnU-Net's predictor, giving input images the model's MAE residual channel(s) first.

:class:`ResidualChannelPredictor` is ``nnUNetPredictor`` with two additions, used by
``nnunetv2_grcsf predict`` and usable from Python in its place:

- ``initialize_from_trained_model_folder`` also reads the residual channels from the model's
  plans and the MAE stored in its checkpoints (:mod:`nnunetv2_grcsf.model_mae`);
- ``predict_from_files`` / ``predict_from_files_sequential`` with an input folder whose cases have
  only their image channels first write the images plus the residual channel(s) into a temporary
  folder with ``nnunetv2_grcsf residuals -i``'s own code (:func:`~nnunetv2_grcsf.mae.residuals.make_residual_folder`)
  and the stored checkpoint and settings, then predict from there; the folder is removed
  afterwards, also after an error, Ctrl-C or SIGTERM (the command turns SIGTERM into an exception).
  Cases that already have all channels (``_0000`` .. ``_{N-1}``, e.g. made by ``residuals -i``) are
  predicted as they are.

For a model without residual channels (plans without them) it is nnU-Net's predictor, unchanged.
"""

import contextlib
import functools
import tempfile
from pathlib import Path

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_grcsf.model_mae import describe, entry_settings, mae_entry_of_model, write_checkpoint_file
from nnunetv2_grcsf.residual_channels import PLANS_KEY, ResidualChannelError

TEMPORARY_PREFIX = "nnunetv2_grcsf_predict_"


def _on_inputs_with_residual_channels(predict):
    """nnUNetPredictor's ``predict`` method (first argument: the inputs) run on ``inputs_with_residual_channels``.

    ``functools.wraps`` keeps nnU-Net's signature visible: its methods record their arguments through
    ``inspect.signature(self.<method>)``.
    """
    @functools.wraps(predict)
    def wrapper(self, list_of_lists_or_source_folder, *args, **kwargs):
        with self.inputs_with_residual_channels(list_of_lists_or_source_folder) as inputs:
            return predict(self, inputs, *args, **kwargs)
    return wrapper


class ResidualChannelPredictor(nnUNetPredictor):
    """nnUNetPredictor that adds the model's MAE residual channel(s) to input folders lacking them (see the module)."""

    residual_channels = ()
    mae_entry = None

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self.model_folder = Path(model_training_output_dir)
        self.residual_channels = list(self.plans_manager.plans.get(PLANS_KEY, {}).get("residual_channels", []))
        if self.residual_channels:
            folds = use_folds if use_folds is not None else self.auto_detect_available_folds(
                model_training_output_dir, checkpoint_name)
            self.mae_entry = mae_entry_of_model(self.model_folder, [folds] if isinstance(folds, str) else folds,
                                                checkpoint_name)

    predict_from_files = _on_inputs_with_residual_channels(nnUNetPredictor.predict_from_files)
    predict_from_files_sequential = _on_inputs_with_residual_channels(nnUNetPredictor.predict_from_files_sequential)

    @contextlib.contextmanager
    def inputs_with_residual_channels(self, source):
        """Yields ``source``, or a temporary folder with its images plus the residual channel(s) (removed on exit)."""
        if not self.residual_channels or not isinstance(source, (str, Path)):
            yield source
            return
        from nnunetv2_grcsf.mae.data import list_cases

        ending = self.dataset_json["file_ending"]
        cases = list_cases(source, ending)
        if not self.lacks_residual_channels(source, cases):
            yield source
            return
        with tempfile.TemporaryDirectory(prefix=TEMPORARY_PREFIX) as folder:
            yield self.add_residual_channels(source, Path(folder), ending)

    def lacks_residual_channels(self, source, cases: dict) -> bool:
        """True if every case has only its image channels, False if every case also has the residual ones."""
        num_inputs = len(self.dataset_json["channel_names"])
        num_images = num_inputs - len(self.residual_channels)
        if self.residual_channels != list(range(num_images, num_inputs)):
            raise ResidualChannelError(f"the model in {self.model_folder} takes residual channel(s) "
                                       f"{self.residual_channels} among {num_inputs}, not after its image channels: "
                                       f"give every case all {num_inputs} channel files and predict with "
                                       f"nnUNetv2_predict")
        counts = {case: len(files) for case, files in cases.items()}
        image_only = [case for case, n in counts.items() if n == num_images]
        complete = [case for case, n in counts.items() if n == num_inputs]
        other = [f"{case} ({n})" for case, n in counts.items() if n not in (num_images, num_inputs)]
        takes = (f"the model takes {num_images} image channel file(s) per case (_0000..), or {num_inputs} with its "
                 f"residual channel(s) {self.residual_channels}")
        if other:
            raise ResidualChannelError(f"case(s) {', '.join(other[:5])} in {source} have another number of channel "
                                       f"files: {takes}")
        if len(image_only) == len(counts):
            return bool(counts)
        if len(complete) == len(counts):
            print(f"the cases in {source} already have the residual channel(s) {self.residual_channels}: predicting "
                  f"them as they are (they must come from this model's MAE, e.g. `nnunetv2_grcsf residuals -i`)")
            return False
        raise ResidualChannelError(f"{source} mixes cases with the residual channel(s) ({', '.join(complete[:3])}...) "
                                   f"and without ({', '.join(image_only[:3])}...): {takes}; put the two kinds in "
                                   f"separate folders")

    def add_residual_channels(self, source, folder: Path, ending: str) -> str:
        """Images of ``source`` plus residual channel(s) made with the stored MAE, in ``folder / 'images'``."""
        from nnunetv2_grcsf.mae.residuals import make_residual_folder

        if self.mae_entry is None:
            raise ResidualChannelError(
                f"the images in {source} lack the residual channel(s) {self.residual_channels}, and the model in "
                f"{self.model_folder} carries no MAE to make them (it was trained on a data set whose dataset.json "
                f"names no MAE checkpoint): add them with `nnunetv2_grcsf residuals -i {source} -o NEW_FOLDER -m "
                f"MAE_CHECKPOINT` (the MAE and settings the training data set was made with) and predict NEW_FOLDER")
        print(f"adding residual channel(s) {self.residual_channels} with the model's {describe(self.mae_entry)}")
        images = folder / "images"
        make_residual_folder(source, images, write_checkpoint_file(self.mae_entry, folder),
                             entry_settings(self.mae_entry), file_ending=ending,
                             device=str(self.device), progress=self.allow_tqdm)
        return str(images)

