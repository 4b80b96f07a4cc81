"""Measure one network in this process: nnU-Net's training step and sliding-window inference, peak memory.

Run by ``benchmarks/speed.py`` once per network, each in a fresh process (so that the peak memory of one
network is not mixed with another's, and a network that fails or crashes does not stop the benchmark)::

    python benchmarks/speed_worker.py SPEC.json

SPEC.json (written by speed.py) holds ``trainer`` (a class name from nnunetv2_grcsf.trainers, or
``nnUNetTrainer``), ``plans``, ``configuration``, ``dataset_json``, ``batch_size``, ``steps``, ``warmup``,
``inference_runs``, ``image_scale``, ``device``, ``threads``, ``memory_limit_gb``, ``compile``,
``result_file`` and optionally ``reference``
(``trainer``, ``plans``, ``dataset_json`` of the reference row); the result (or the error and the stage where
it happened) is written as JSON to ``result_file``.

Everything measured is nnU-Net's own code on the trainer's own network:

- the trainer class is instantiated as nnUNetv2_train does (plans, configuration, fold 0, dataset.json);
  the network comes from its static ``build_network_architecture`` (what it trains and what the predictor
  builds), the optimizer from ``configure_optimizers`` (SGD, Nesterov, momentum 0.99), the loss from
  ``_build_loss`` (DC_and_CE_loss in DeepSupervisionWrapper with nnU-Net's weights); a training step is
  ``nnUNetTrainer.train_step`` itself (autocast and GradScaler on CUDA, gradient clipping) on a random batch
  whose deep-supervision targets are made by nnU-Net's ``DownsampleSegForDSTransform``;
- inference is ``nnUNetPredictor.predict_sliding_window_return_logits`` (Gaussian weighting, tile step 0.5,
  mirroring off) on a random image ``image_scale`` times the patch size per axis.

Order. 1) Memory: build; one sliding-window prediction; ``warmup`` training steps (at least one). CPU: peak
resident set size of this process (``ru_maxrss``) minus its value once the imports are done and the network,
optimizer and loss are built; inference comes first, so the training figure is the peak of both (training
needs more in practice). CUDA: ``torch.cuda.max_memory_allocated`` of each phase (peak statistics reset
before it), absolute, weights included. 1b) CPU only, tensor memory (the CPU counterpart of CUDA's figure):
one more prediction and one more training step, each under torch's profiler with ``profile_memory``; the peak
of the bytes of live tensors over the call (allocations minus frees, in the order the profiler recorded them),
plus the bytes of the tensors held when it starts (parameters; for training also their gradients, the
optimizer's state and the batch). Unlike the RSS it does not depend on how glibc's allocator places and
returns memory (its heap keeps freed blocks and grows when they do not fit: the RSS of one network can differ
by tens of MB from run to run, and by far more between networks whose temporaries differ in size and order).
2) Timing: wall-clock and
process CPU time (all threads) of each prediction / training step; ``threads`` > 0 sets torch's CPU threads.
With a ``reference`` (PlainConvUNet), the reference network is built in this process too, and each timed
step of the subject comes right after one of the reference (per-pair ratios, for wall-clock ratios on a
machine whose load changes during the run).
"""
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch

MB = 1024 ** 2


def trainer_class(name: str):
    """nnU-Net's ``nnUNetTrainer`` or one of our trainers (nnunetv2_grcsf.trainers) by class name."""
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    import nnunetv2_grcsf.trainers as trainers

    return getattr(trainers, name)


def build_trainer(spec: dict, device: torch.device):
    """The trainer with its network, optimizer and loss set up as ``nnUNetTrainer.initialize`` does."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    cls = trainer_class(spec["trainer"])
    if spec.get("network_kwargs_override"):  # a --variant row of speed.py
        cls = type(cls.__name__, (cls,), {"network_kwargs": {**cls.network_kwargs, **spec["network_kwargs_override"]}})
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's citation banner and device line
        trainer = cls({**spec["plans"], "continue_training": False}, spec["configuration"], 0, spec["dataset_json"],
                      device)
    trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                                              trainer.dataset_json)
    trainer.network = cls.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision).to(device)
    if spec["compile"]:
        trainer.network = torch.compile(trainer.network)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    return trainer


def random_batch(trainer, batch_size: int, device: torch.device) -> dict:
    """``{'data', 'target'}`` as nnU-Net's data loader yields it: image noise, random labels, one target per
    deep-supervision scale (made by nnU-Net's DownsampleSegForDSTransform)."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    patch = list(trainer.configuration_manager.patch_size)
    generator = torch.Generator().manual_seed(0)
    data = torch.randn((batch_size, trainer.num_input_channels, *patch), generator=generator)
    seg = torch.randint(0, trainer.label_manager.num_segmentation_heads, (batch_size, 1, *patch), generator=generator,
                        dtype=torch.int16)
    downsample = DownsampleSegForDSTransform(trainer._get_deep_supervision_scales())
    per_sample = [downsample(segmentation=s)["segmentation"] for s in seg]
    target = [torch.stack(scale).to(device) for scale in zip(*per_sample)]
    return {"data": data.to(device), "target": target}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> Tuple[float, float]:
    """Wall-clock and process CPU seconds of one call of ``function`` (device synchronized before and after)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


class PeakMemory:
    """Peak memory of a phase in MB: CPU RSS above the baseline taken at construction, or CUDA's peak allocation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_mb = self._max_rss_mb()

    @staticmethod
    def _max_rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: kilobytes

    def start_phase(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def phase_peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB
        return self._max_rss_mb() - self.baseline_mb


def tensors_in(*objects) -> list:
    """Every tensor in (nested) tensors, lists, tuples and dicts (e.g. an optimizer's state) and modules."""
    found, stack = [], list(objects)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
            if item.grad is not None:
                found.append(item.grad)
        elif isinstance(item, torch.nn.Module):
            stack.extend(item.parameters())
            stack.extend(item.buffers())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


def held_tensor_mb(*objects) -> float:
    """MB of the distinct storages of the tensors in ``objects`` (see ``tensors_in``)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_in(*objects)}
    return sum(storages.values()) / MB


def peak_tensor_mb(function, held_mb: float) -> Optional[float]:
    """``held_mb`` plus the peak, over one call of ``function``, of the bytes of tensors allocated and not yet freed
    (torch profiler memory events, CPU). None if this torch's profiler does not expose its memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    results = getattr(profiler.profiler, "kineto_results", None)
    if results is None:
        return None
    changes = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return held_mb + peak / MB


def first_tile(image: torch.Tensor, patch) -> torch.Tensor:
    """The network input (1, C, *patch) at the corner of a predictor input ((C, 1, H, W) in 2D, (C, D, H, W) in 3D)."""
    if len(patch) == 2:
        image = image[:, 0]
    return image[(slice(None), *[slice(0, p) for p in patch])][None]


class Subject:
    """One trainer's network with what it is measured on: nnU-Net's predictor and image, a training batch."""

    def __init__(self, trainer, spec: dict, device: torch.device):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        self.trainer, self.device = trainer, device
        self.patch = list(trainer.configuration_manager.patch_size)
        self.image_shape = [int(round(p * spec["image_scale"])) for p in self.patch]
        self.tiles = int(np.prod([len(s) for s in compute_steps_for_sliding_window(self.image_shape, self.patch, 0.5)]))
        with contextlib.redirect_stdout(io.StringIO()):
            self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                             perform_everything_on_device=True, device=device, allow_tqdm=False)
        self.predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                             None, trainer.dataset_json, spec["trainer"], None)
        # nnU-Net's 2D configurations predict (C, 1, H, W) slice by slice; 3D ones take (C, D, H, W)
        shape = [trainer.num_input_channels] + ([1] if len(self.patch) == 2 else []) + self.image_shape
        self.image = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        self.batch = None
        self.losses = []

    def inference_mode(self, warmup: int) -> None:
        """Deep supervision off, eval mode (as the predictor gets the network), ``warmup`` one-tile forwards."""
        self.trainer.set_deep_supervision_enabled(False)
        self.trainer.network.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                self.trainer.network(first_tile(self.image, self.patch).to(self.device))

    def predict(self) -> Tuple[float, float]:
        """Wall and CPU seconds of one sliding-window prediction of the image."""
        return timed(lambda: self.predictor.predict_sliding_window_return_logits(self.image), self.device)

    def training_mode(self, batch_size: int, warmup: int) -> None:
        """Deep supervision on, train mode, the batch made, ``warmup`` untimed training steps."""
        self.trainer.set_deep_supervision_enabled(True)
        self.trainer.network.train()
        if self.batch is None:
            self.batch = random_batch(self.trainer, batch_size, self.device)
        for _ in range(warmup):
            self.train_step()

    def train_step(self) -> Tuple[float, float]:
        """Wall and CPU seconds of one ``nnUNetTrainer.train_step`` on the batch."""
        return timed(lambda: self.losses.append(float(self.trainer.train_step(self.batch)["loss"])), self.device)


def paired_times(measure_subject, measure_reference: Optional[Callable], runs: int):
    """``runs`` timings of the subject, each right after one of the reference if there is one (same load)."""
    own, ref = [], []
    for _ in range(runs):
        if measure_reference is not None:
            ref.append(measure_reference())
        own.append(measure_subject())
    return own, ref


def timing_summary(key: str, own: list, ref: list) -> dict:
    """Median wall (``<key>_s``) and CPU (``<key>_cpu_s``) seconds; with a reference, the medians of the
    per-pair ratios of both."""
    summary = {}
    for clock, index in (("", 0), ("_cpu", 1)):
        times = [t[index] for t in own]
        summary.update({f"{key}{clock}_s": times, f"{key}{clock}_median_s": statistics.median(times)})
        if ref:
            ref_times = [t[index] for t in ref]
            summary.update({f"reference_{key}{clock}_s": ref_times,
                            f"{key}{clock}_paired_ratio": statistics.median(o / r for o, r in zip(times, ref_times))})
    return summary


def measure(spec: dict) -> dict:
    """Memory (build, one prediction, warm-up training steps), then timings paired with the reference's.

    On an exception the result names the stage and the error.
    """
    device = torch.device(spec["device"])
    if spec["memory_limit_gb"]:  # anonymous memory (tensors) beyond it fails as this row's error
        limit = int(spec["memory_limit_gb"] * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    result = {"loadavg_start": os.getloadavg()[0], "torch_threads": torch.get_num_threads()}
    stage = "build"
    try:
        trainer = build_trainer(spec, device)
        network = getattr(trainer.network, "_orig_mod", trainer.network)
        result.update(network_class=f"{type(network).__module__}.{type(network).__name__}",
                      params=sum(p.numel() for p in network.parameters()),
                      input_channels=trainer.num_input_channels,
                      patch_size=list(trainer.configuration_manager.patch_size))
        memory = PeakMemory(device)
        result["baseline_rss_mb"] = memory.baseline_mb if device.type == "cpu" else None
        stage = "inference"
        subject = Subject(trainer, spec, device)
        subject.inference_mode(spec["warmup"])
        memory.start_phase()
        subject.predict()
        result.update(inference_image_shape=subject.image_shape, inference_tiles=subject.tiles,
                      peak_memory_inference_mb=memory.phase_peak_mb())
        stage = "train"
        memory.start_phase()
        subject.training_mode(spec["batch_size"], max(spec["warmup"], 1))
        result["peak_memory_train_mb"] = memory.phase_peak_mb()
        if device.type == "cpu":
            stage = "tensor memory"
            subject.inference_mode(0)
            result["peak_tensors_inference_mb"] = peak_tensor_mb(subject.predict, held_tensor_mb(trainer.network))
            subject.training_mode(spec["batch_size"], 0)
            result["peak_tensors_train_mb"] = peak_tensor_mb(subject.train_step, held_tensor_mb(
                trainer.network, trainer.optimizer.state, subject.batch))
        stage = "reference"
        reference = None
        if spec.get("reference"):
            reference_spec = {**spec, **spec["reference"]}
            reference = Subject(build_trainer(reference_spec, device), reference_spec, device)
        stage = "inference timing"
        subject.inference_mode(0)
        if reference is not None:
            reference.inference_mode(spec["warmup"])
            reference.predict()
        result.update(timing_summary("inference", *paired_times(subject.predict, reference and reference.predict,
                                                                spec["inference_runs"])))
        stage = "train timing"
        subject.training_mode(spec["batch_size"], 0)
        if reference is not None:
            reference.training_mode(spec["batch_size"], spec["warmup"])
        result.update(timing_summary("train_step", *paired_times(subject.train_step,
                                                                 reference and reference.train_step, spec["steps"])))
        result.update(losses=subject.losses, status="ok")
    except Exception as error:  # noqa: BLE001 - any failure of a network is a result of the benchmark
        result.update(status="error", stage=stage, error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=-6))
    result["loadavg_end"] = os.getloadavg()[0]
    return result


def main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    result = measure(spec)
    Path(spec["result_file"]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
