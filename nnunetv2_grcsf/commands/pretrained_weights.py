"""``nnunetv2_grcsf pretrained-weights``: a start checkpoint for fine-tuning a GRCSF trainer from an nnU-Net model.

See :mod:`nnunetv2_grcsf.pretrained` for what it holds and why nnU-Net's ``-pretrained_weights`` needs it.
"""
import argparse

DESCRIPTION = """\
Make the start checkpoint for fine-tuning a GRCSF trainer from an nnU-Net model (PlainConvUNet or
ResEnc) trained with the same plans and configuration on the data set's image channels. The backbone's
weights come from that model; the Global and Region Compensation Units keep the network's own
initialization (the GCU starts as the identity), and the segmentation layers are left to nnU-Net, as
its -pretrained_weights always does. Train from the result with nnU-Net's own flag:
  nnUNetv2_train DATASET CONFIGURATION FOLD -tr GRCSFTrainer -pretrained_weights OUTPUT
DATASET is the data set GRCSF trains on (for GRCSFTrainer: the residual data set made by
`nnunetv2_grcsf residuals`; its plans must match those the nnU-Net model was trained with)."""

EXAMPLE = ("example: nnunetv2_grcsf pretrained-weights -i nnUNet_results/Dataset802_BUSI256/nnUNetTrainer__"
           "nnUNetPlans__2d/fold_0/checkpoint_final.pth -o busi_start.pth -d 803 -c 2d -tr GRCSFTrainer")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrained-weights", description=DESCRIPTION, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="start checkpoint for nnUNetv2_train -pretrained_weights: GRCSF's backbone from an nnU-Net model")
    parser.add_argument("-i", "--input", required=True, metavar="NNUNET_CHECKPOINT",
                        help="checkpoint of the nnU-Net model (checkpoint_final.pth of nnUNetTrainer...)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="start checkpoint to write (a new file; never overwritten)")
    parser.add_argument("-d", "--dataset", required=True, help="data set id or name the GRCSF trainer trains on")
    parser.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration (2d, 3d_fullres...)")
    parser.add_argument("-tr", "--trainer", required=True, help="the trainer to fine-tune (GRCSFTrainer...)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the units' initialization (default: 0)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    import json
    from pathlib import Path

    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_grcsf.datasets import dataset_name, nnunet_folder
    from nnunetv2_grcsf.pretrained import (PretrainedWeightsError, load_network_weights, network_for_training,
                                           save_start_checkpoint, start_weights)

    output = Path(args.output)
    source_weights = load_network_weights(args.input)
    text = str(args.dataset).strip()
    name = dataset_name(text)
    folder = nnunet_folder("nnUNet_preprocessed") / name
    plans_file = folder / f"{args.plans}.json"
    if not plans_file.is_file():
        raise PretrainedWeightsError(f"{plans_file} does not exist: plan the data set first "
                                     f"(nnUNetv2_plan_and_preprocess -d {text} -c {args.configuration}).")
    try:
        trainer_class = recursive_find_trainer_class_by_name(args.trainer)
    except RuntimeError as error:
        raise PretrainedWeightsError(f"trainer {args.trainer} not found ({str(error).splitlines()[0]}); "
                                     f"`nnunetv2_grcsf doctor` checks that nnU-Net finds ours.") from error
    torch.manual_seed(args.seed)
    network = network_for_training(trainer_class, json.loads(plans_file.read_text()), args.configuration,
                                   json.loads((folder / "dataset.json").read_text()))
    weights, units = start_weights(source_weights, network, args.input)
    provenance = {"source": str(Path(args.input).resolve()), "trainer": args.trainer, "dataset": name,
                  "configuration": args.configuration, "plans": args.plans, "seed": args.seed,
                  "initialized_units": units}
    save_start_checkpoint(output, weights, provenance)
    print(f"wrote {output}: {type(network).__name__}'s backbone from {args.input}, {len(units)} compensation units "
          f"initialized ({', '.join(units)}). Next:\n"
          f"  nnUNetv2_train {text} {args.configuration} FOLD -tr {args.trainer}"
          f"{'' if args.plans == 'nnUNetPlans' else f' -p {args.plans}'} -pretrained_weights {output}")
    return 0
