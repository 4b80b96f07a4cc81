"""The plans the speed benchmark runs on ("cases"): real stored plans and plans nnU-Net makes for generated volumes.

Every network of one case is measured on the same configuration: the same patch size, batch size and
topology (stages, features, strides, kernels) as nnU-Net planned it.

- ``busi256`` (2d): tests/data/plans/Dataset802_BUSI256_nnUNetPlans.json, 2d, patch 224x256, 6 stages; its
  ResEnc M row from Dataset802_BUSI256_nnUNetResEncUNetMPlans.json (same patch and topology).
- ``volume`` (3d): a synthetic lesion volume data set written by
  :func:`nnunetv2_grcsf.synthetic.write_synthetic_dataset` (8 cases of ``--volume-shape``, default 32x64x64
  at 1 mm) and planned by nnU-Net's own ``nnUNetv2_extract_fingerprint`` + ``nnUNetv2_plan_experiment``
  (default planner and ``nnUNetPlannerResEncM``), in the work folder, once (later runs reuse the plans).
- extra 3d cases: ``hippocampus`` (Dataset804 3d_fullres, patch 40x56x40, 4 stages) and ``brats6`` (Dataset805
  3d_fullres, patch 96x160x160, 6 stages, 2 channels) from tests/data/plans; their ResEnc M plans are made by
  nnU-Net's planner from the raw data in ../shared/data (``GRCSF_SHARED_DATA``) when it is there.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STORED_PLANS = PROJECT_ROOT / "tests" / "data" / "plans"
VOLUME_DATASET_ID = 981
RESENC_PLANNER, RESENC_PLANS_NAME = "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"


@dataclass
class Case:
    """One configuration of one plans file, and the ResEnc M plans of the same data set (if any)."""

    name: str
    dims: str
    configuration: str
    source: str
    plans: dict
    dataset_json: dict
    resenc_plans: Optional[dict] = None
    notes: list = field(default_factory=list)

    def with_patch(self, patch_size: Sequence[int]) -> "Case":
        """The same case measured at another patch size (a multiple of the strides' product), noted."""
        resenc = plans_with_patch(self.resenc_plans, self.configuration, patch_size) if self.resenc_plans else None
        return Case(self.name, self.dims, self.configuration, self.source,
                    plans_with_patch(self.plans, self.configuration, patch_size), self.dataset_json, resenc,
                    self.notes + [f"patch size set to {list(patch_size)} by --patch-size"])

    def summary(self) -> dict:
        """Patch size and topology, for the results file and the table's heading."""
        config = self.plans["configurations"][self.configuration]
        arch = config["architecture"]["arch_kwargs"]
        return {"name": self.name, "dims": self.dims, "configuration": self.configuration, "source": self.source,
                "dataset": self.plans["dataset_name"], "patch_size": config["patch_size"],
                "planned_batch_size": config["batch_size"], "n_stages": arch["n_stages"],
                "features_per_stage": arch["features_per_stage"], "strides": arch["strides"],
                "image_channels": len(self.dataset_json["channel_names"]),
                "classes": len(self.dataset_json["labels"]), "notes": self.notes}


def shared_data_dir() -> Path:
    """../shared/data beside the project root, or $GRCSF_SHARED_DATA (as tests/conftest.py)."""
    return Path(os.environ.get("GRCSF_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def minimal_dataset_json(plans: dict, labels: Dict[str, int]) -> dict:
    """A dataset.json with the plans' channel count and the given labels (all a network and its loss need)."""
    channels = plans["foreground_intensity_properties_per_channel"]
    return {"channel_names": {c: f"channel{c}" for c in channels}, "labels": labels,
            "file_ending": ".nii.gz", "numTraining": 0}


def nnunet_command(name: str) -> str:
    """Path of an nnU-Net console script of this Python environment (else the bare name, found on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def nnunet_env(root: Path) -> dict:
    """os.environ with nnUNet_raw / _preprocessed / _results below ``root`` (created)."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    return env


def run_quietly(command: Sequence[str], env: dict) -> None:
    """Run a console command; raise with the end of its output if it fails."""
    result = subprocess.run(list(command), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-2000:]}")


def plan_with_nnunet(root: Path, dataset_name: str, planners: Sequence[str]) -> Path:
    """nnU-Net's fingerprint and experiment planning of ``root/nnUNet_raw/<dataset_name>`` for each planner
    (skipped for plans already there). Returns the data set's nnUNet_preprocessed folder."""
    env = nnunet_env(root)
    dataset_id = dataset_name[len("Dataset"):].split("_")[0]
    preprocessed = root / "nnUNet_preprocessed" / dataset_name
    if not (preprocessed / "dataset_fingerprint.json").is_file():
        print(f"  nnU-Net fingerprint of {dataset_name} ...", flush=True)
        run_quietly([nnunet_command("nnUNetv2_extract_fingerprint"), "-d", dataset_id, "-np", "2"], env)
    for planner, plans_name in planners:
        if not (preprocessed / f"{plans_name}.json").is_file():
            print(f"  nnU-Net planning of {dataset_name} with {planner} ...", flush=True)
            run_quietly([nnunet_command("nnUNetv2_plan_experiment"), "-d", dataset_id, "-pl", planner], env)
    return preprocessed


def plans_with_patch(plans: dict, configuration: str, patch_size: Sequence[int]) -> dict:
    """A copy of ``plans`` whose ``configuration`` has another patch size (topology unchanged)."""
    config = {**plans["configurations"][configuration], "patch_size": list(patch_size)}
    return {**plans, "configurations": {**plans["configurations"], configuration: config}}


def same_patch_resenc(resenc_plans: dict, plans: dict, configuration: str, notes: list) -> dict:
    """The ResEnc plans, with the default plans' patch size if the ResEnc planner chose another (noted)."""
    patch = plans["configurations"][configuration]["patch_size"]
    planned = resenc_plans["configurations"][configuration]["patch_size"]
    if planned == patch:
        return resenc_plans
    notes.append(f"ResEnc M planned patch {planned}; measured at the default plans' {patch}")
    return plans_with_patch(resenc_plans, configuration, patch)


def busi256_case(work: Path, options) -> Case:
    """2D: the stored BUSI256 plans (2d, patch 224x256) and their ResEnc M plans."""
    plans = load_json(STORED_PLANS / "Dataset802_BUSI256_nnUNetPlans.json")
    resenc = load_json(STORED_PLANS / "Dataset802_BUSI256_nnUNetResEncUNetMPlans.json")
    notes = []
    return Case("busi256", "2d", "2d", "tests/data/plans/Dataset802_BUSI256_nnUNetPlans.json (real, stored)", plans,
                minimal_dataset_json(plans, {"background": 0, "lesion": 1}),
                same_patch_resenc(resenc, plans, "2d", notes), notes)


def volume_case(work: Path, options) -> Case:
    """3D: plans nnU-Net makes for a generated synthetic lesion volume data set of ``options.volume_shape``."""
    from nnunetv2_grcsf.synthetic import write_synthetic_dataset

    shape = tuple(options.volume_shape)
    root = work / f"volume_{'x'.join(map(str, shape))}"
    raw = nnunet_env(root)["nnUNet_raw"]
    name = f"Dataset{VOLUME_DATASET_ID}_BenchVolumes"
    if not (Path(raw) / name / "dataset.json").is_file():
        print(f"  writing {name} (8 synthetic volumes of {shape}) ...", flush=True)
        write_synthetic_dataset(raw, VOLUME_DATASET_ID, "BenchVolumes", num_training=8, num_test=0, shape=shape,
                                progress=False)
    preprocessed = plan_with_nnunet(root, name, [("ExperimentPlanner", "nnUNetPlans"),
                                                 (RESENC_PLANNER, RESENC_PLANS_NAME)])
    plans = load_json(preprocessed / "nnUNetPlans.json")
    notes = []
    resenc = same_patch_resenc(load_json(preprocessed / f"{RESENC_PLANS_NAME}.json"), plans, "3d_fullres", notes)
    return Case("volume", "3d", "3d_fullres",
                f"nnU-Net's plans of {name} (generated, {len(shape)}D volumes {shape}), 3d_fullres", plans,
                load_json(Path(raw) / name / "dataset.json"), resenc, notes)


def shared_3d_case(name: str, dataset: str, labels: Dict[str, int]) -> Callable:
    """An extra 3d case: stored nnUNetPlans of a shared real data set; ResEnc M planned from its raw data if present."""

    def make(work: Path, options) -> Case:
        plans = load_json(STORED_PLANS / f"{dataset}_nnUNetPlans.json")
        notes, resenc = [], None
        raw = shared_data_dir() / dataset
        if (raw / "dataset.json").is_file():
            root = work / "shared"
            link = root / "nnUNet_raw" / dataset
            nnunet_env(root)
            if not link.exists():
                link.symlink_to(raw.resolve(), target_is_directory=True)
            preprocessed = plan_with_nnunet(root, dataset, [(RESENC_PLANNER, RESENC_PLANS_NAME)])
            resenc = same_patch_resenc(load_json(preprocessed / f"{RESENC_PLANS_NAME}.json"), plans, "3d_fullres",
                                       notes)
        else:
            notes.append(f"no ResEnc M plans: raw data {raw} not found (set GRCSF_SHARED_DATA)")
        return Case(name, "3d", "3d_fullres", f"tests/data/plans/{dataset}_nnUNetPlans.json (real, stored), 3d_fullres",
                    plans, minimal_dataset_json(plans, labels), resenc, notes)

    return make


CASES = {
    "busi256": busi256_case,
    "volume": volume_case,
    "hippocampus": shared_3d_case("hippocampus", "Dataset804_Hippocampus",
                                  {"background": 0, "anterior": 1, "posterior": 2}),
    "brats6": shared_3d_case("brats6", "Dataset805_BraTS6", {"background": 0, "tumour": 1}),
}
DEFAULT_CASES = {"2d": ["busi256"], "3d": ["volume"]}
CASE_DIMS = {"busi256": "2d", "volume": "3d", "hippocampus": "3d", "brats6": "3d"}
