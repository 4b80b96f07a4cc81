"""How much the GCUs of trained models change their stage's output: is the Global Compensation Unit used?

Every GCU starts as the identity (blocks/gcu.py). This measures, for each model trained by a benchmark
(accuracy_busi256.py, hippocampus_3d.py) whose network has GCUs, what it became: per encoder stage, the norm of
what the GCU adds over the norm of the stage's output, ||GCU(x, y) - y|| / ||y||, on the first ``--cases``
preprocessed training cases of the model's data set (one patch each, from the volume's corner, zero-padded to the
patch size; eval mode, no gradients), median over the cases. 0 means the unit is the identity still.

    python benchmarks/gcu_activity.py --work-dir benchmarks/work/accuracy_heldout \\
        --output benchmarks/results/gcu_activity_busi256
    python benchmarks/gcu_activity.py --work-dir benchmarks/work/hippocampus_3d_heldout --trainers GRCSFTrainer_noRCU

Models: ``WORK/seeds/seed_*/nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_*/
checkpoint_final.pth``, rebuilt by the trainer's own ``build_network_architecture`` (the trainer named in the
checkpoint), cases from ``WORK/nnUNet_preprocessed``. Writes OUTPUT.json and OUTPUT.md (default
results/gcu_activity).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import write_atomically  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def gcu_contributions(network: torch.nn.Module, batches: Sequence[torch.Tensor]) -> Dict[str, List[float]]:
    """{stage: [||GCU(x, y) - y|| / ||y|| per batch]} for every encoder GCU of ``network`` (eval, no gradients)."""
    from nnunetv2_grcsf.architectures.blocks.gcu import GlobalCompensationUnit

    ratios: Dict[str, List[float]] = {}
    handles = []
    for name, module in network.named_modules():
        if isinstance(module, GlobalCompensationUnit) and not name.startswith("decoder."):  # the decoder's alias
            def record(module, inputs, output, stage=name.rsplit(".", 1)[-1]):
                stage_output = inputs[1]
                ratios.setdefault(stage, []).append(float((output - stage_output).norm() / stage_output.norm()))
            handles.append(module.register_forward_hook(record))
    network.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                network(batch)
    finally:
        for handle in handles:
            handle.remove()
    return ratios


def first_patches(preprocessed: Path, patch_size: Sequence[int], count: int) -> List[torch.Tensor]:
    """The first ``count`` cases (sorted) of a preprocessed folder, each one patch (1, C, *patch_size) from the
    corner, zero-padded where the case is smaller (2D configurations: the cases' single slice)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(str(preprocessed))(str(preprocessed))
    patches = []
    for key in sorted(dataset.identifiers)[:count]:
        data = torch.from_numpy(dataset.load_case(key)[0][:]).float()  # (C, Z, Y, X); Z = 1 for 2D data
        if len(patch_size) == 2:
            data = data[:, 0]
        data = data[(slice(None), *[slice(0, p) for p in patch_size])]
        pad = [p - s for p, s in zip(patch_size, data.shape[1:])]
        patches.append(torch.nn.functional.pad(data, [n for p in reversed(pad) for n in (0, p)])[None])
    return patches


def base_trainer_name(trainer: str) -> str:
    """The trainer without its schedule suffix (trainers/schedules.py), e.g. GRCSFTrainer_noRCU_10epochs_25iters ->
    GRCSFTrainer_noRCU."""
    from nnunetv2_grcsf.trainers.schedules import SCHEDULES

    for suffix in sorted(SCHEDULES, key=len, reverse=True):
        if trainer.endswith("_" + suffix):
            return trainer[:-len(suffix) - 1]
    return trainer


def has_gcus(trainer: str) -> bool:
    """Whether the trainer (one of ours, by name) builds a GRCSF network with GCUs."""
    import nnunetv2_grcsf.trainers as trainers

    cls = getattr(trainers, trainer, None)
    return (cls is not None and (cls.network_class_name or "").endswith(".GRCSFUNet")
            and cls.network_kwargs.get("use_gcu", True))


def trained_models(work: Path, trainers: Sequence[str]):
    """(seed, data set, trainer, configuration, checkpoint) of every final checkpoint in a benchmark work folder
    whose network has GCUs, of the trainers named (their schedule variants included; all when empty)."""
    for checkpoint in sorted(work.glob("seeds/seed_*/nnUNet_results/*/*__*__*/fold_*/checkpoint_final.pth")):
        model = checkpoint.parent.parent
        trainer, _, configuration = model.name.split("__")
        if (trainers and base_trainer_name(trainer) not in trainers) or not has_gcus(trainer):
            continue
        yield checkpoint.parents[4].name, model.parent.name, trainer, configuration, checkpoint


def measure_model(work: Path, dataset: str, trainer_name: str, configuration: str, checkpoint: Path,
                  cases: int) -> Dict[str, float]:
    """{stage: median contribution} of one trained model ({} if its network has no GCU)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnunetv2_grcsf.trainers as trainers

    model = checkpoint.parent.parent
    plans = json.loads((model / "plans.json").read_text())
    dataset_json = json.loads((model / "dataset.json").read_text())
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer = getattr(trainers, trainer_name)
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = trainer.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        label_manager.num_segmentation_heads, False)
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"])
    preprocessed = work / "nnUNet_preprocessed" / dataset / configuration_manager.data_identifier
    batches = first_patches(preprocessed, configuration_manager.patch_size, cases)
    return {stage: statistics.median(values) for stage, values in gcu_contributions(network, batches).items()}


def markdown(report: dict) -> str:
    stages = sorted({stage for row in report["models"] for stage in row["stages"]}, key=int)
    lines = [f"# GCU activity: what each trained GCU adds to its stage's output ({report['work_dir']})", "",
             f"||GCU(x, y) - y|| / ||y||, median over the first {report['cases']} preprocessed training cases of "
             f"each model's data set (0: the identity it started as). `{report['command']}`", "",
             "| seed | data set | trainer | " + " | ".join(f"stage {s}" for s in stages) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in stages) + " |"]
    for row in report["models"]:
        cells = [f"{row['stages'][s]:.4f}" if s in row["stages"] else "" for s in stages]
        lines.append(f"| {row['seed']} | {row['dataset']} | {row['trainer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="a benchmark's work folder (holding seeds/ and "
                                                          "nnUNet_preprocessed/)")
    parser.add_argument("--trainers", nargs="*", default=[], help="base trainer names (default: every model)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--output", default=str(RESULTS / "gcu_activity"), help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work_dir)
    if not (work / "seeds").is_dir():
        raise SystemExit(f"{work}/seeds does not exist: run the benchmark (accuracy_busi256.py, hippocampus_3d.py) "
                         f"with --work-dir {work} first.")
    report = {"work_dir": str(work), "cases": args.cases, "command": "python benchmarks/gcu_activity.py "
              + " ".join(argv if argv is not None else sys.argv[1:]), "models": []}
    for seed, dataset, trainer, configuration, checkpoint in trained_models(work, args.trainers):
        stages = measure_model(work, dataset, trainer, configuration, checkpoint, args.cases)
        if stages:
            report["models"].append({"seed": seed, "dataset": dataset, "trainer": trainer, "stages": stages})
            print(f"{seed} {dataset} {trainer}: " + ", ".join(f"stage {s} {v:.4f}" for s, v in stages.items()),
                  flush=True)
    if not report["models"]:
        raise SystemExit(f"no trained model with GCUs under {work}/seeds")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(output.with_suffix(".json"), json.dumps(report, indent=1))
    write_atomically(output.with_suffix(".md"), markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
