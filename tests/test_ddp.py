"""DDP as nnU-Net runs it (``nnUNetv2_train -num_gpus 2``), on the CPU: every shipped network in
DistributedDataParallel (gloo, two processes, ``find_unused_parameters=False`` as nnU-Net wraps it), two
nnUNetTrainer.train_step calls on different batches per rank.

DDP fails at the second step ("Expected to have finished reduction in the prior iteration") if any parameter got
no gradient in the first, e.g. a unit skipped by a random draw or a branch unused by the loss; and the ranks'
weights differ afterwards if gradients were not all reduced. nnU-Net's own DDP settings are kept: its
``_build_loss`` for DDP (all-gathered Dice, and the 1e-6 weight it gives the lowest deep-supervision output so that
DDP sees a gradient there), ``convert_sync_batchnorm``.
"""
import json
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gpu_path import CASES, TRAINERS, synthetic_batch, tiny_trainer

CASE_IDS = [f"{name}-{dimension}" for dimension in CASES for name in TRAINERS]


def train_two_steps_in_ddp(rank: int, world_size: int, init_file: str, results_folder: str, out_folder: str):
    """One DDP rank: every network, two train steps, then its flattened weights compared across ranks."""
    torch.set_num_threads(1)
    # trainers made before the process group exists: nnUNetTrainer moves a DDP trainer to cuda:rank
    trainers = {f"{name}-{dimension}": tiny_trainer(name, dimension, os.path.join(results_folder, str(rank)), seed=rank)
                for dimension in CASES for name in TRAINERS}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = {}
    for case, trainer in trainers.items():
        try:
            trainer.is_ddp, trainer.local_rank = True, rank
            trainer.loss = trainer._build_loss()
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainer.network)
            trainer.network = torch.nn.parallel.DistributedDataParallel(network)  # CPU: no device_ids
            losses = [float(trainer.train_step(synthetic_batch(trainer, seed=10 * rank + step))["loss"])
                      for step in range(2)]
            weights = torch.cat([p.detach().flatten() for p in trainer.network.module.parameters()])
            gathered = [torch.empty_like(weights) for _ in range(world_size)]
            dist.all_gather(gathered, weights)
            results[case] = {"losses": losses, "ranks_equal": all(torch.equal(gathered[0], g) for g in gathered)}
        except Exception:  # recorded per network; the other rank fails the same collective and records it too
            results[case] = {"error": traceback.format_exc()[-3000:]}
    with open(os.path.join(out_folder, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(train_two_steps_in_ddp, args=(2, os.path.join(folder, "init"), os.path.join(folder, "results"),
                                               folder), nprocs=2, join=True)
        return [json.load(open(os.path.join(folder, f"rank{rank}.json"))) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_IDS)
def test_two_ddp_steps_without_unused_parameters_leave_equal_weights_on_both_ranks(ddp_results, case):
    for rank_results in ddp_results:
        assert "error" not in rank_results[case], rank_results[case].get("error")
        assert rank_results[case]["ranks_equal"]
        assert all(torch.isfinite(torch.tensor(rank_results[case]["losses"])))
    # different batches on each rank (as nnU-Net's per-rank data loaders), else the test would prove nothing
    assert ddp_results[0][case]["losses"] != ddp_results[1][case]["losses"]
