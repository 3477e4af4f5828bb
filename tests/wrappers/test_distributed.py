"""QATFxModule inside DistributedDataParallel: 2 CPU processes (gloo), 2 epochs, different data per rank.

After training, every rank must hold the same epoch count, the same freezing state and the same quantization
parameters, batch-norm statistics and weights; rank 0 exports the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tests.quantization._models import TinyCNN, batches, seeded
    from tiexport.wrappers import QATFxModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = seeded(TinyCNN(), seed=0)  # the same start on every rank
        example = batches((4, 1, 6, 6), 1, seed=100)[0]
        # bias calibration on as well: its corrections must be averaged across ranks too
        w = QATFxModule(model, total_epochs=2, num_batch_norm_update_epochs=1, num_observer_update_epochs=1,
                        example_inputs=example, bias_calibration_factor=0.05)
        # broadcast_buffers=False: DDP's own per-forward broadcast of rank 0's buffers would hide a missing sync
        # in the wrapper (observer statistics, batch-norm statistics, bias corrections); here nothing else syncs
        ddp = DistributedDataParallel(w, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        data = batches((4, 1, 6, 6), 3, seed=10 + rank)  # different data per rank
        states = []
        for _ in range(2):
            ddp.train()
            states.append((w.num_epochs_tracked, w.bn_frozen, w.observers_frozen))
            for x in data:
                opt.zero_grad()
                ddp(x).square().mean().backward()
                opt.step()
        ddp.eval()
        result: dict[str, Any] = {
            "states": states,
            "state_dict": {k: v.detach().clone() for k, v in w.module.state_dict().items()},
        }
        if rank == 0:
            exported = w.export(example, Path(out_dir) / "ddp.onnx", device="AM68A")
            result["export"] = (str(exported.path), exported.parity_passed)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    init_file = out / "init"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(init_file), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_epoch_counting_and_freezing_per_rank(ranks: list[dict[str, Any]]) -> None:
    # epoch 1 updates batch norm and observers; epoch 2 has both frozen (1 update epoch each)
    for r in ranks:
        assert r["states"] == [(1, False, False), (2, True, True)]


def test_quantization_parameters_identical_across_ranks(ranks: list[dict[str, Any]]) -> None:
    first, second = ranks[0]["state_dict"], ranks[1]["state_dict"]
    assert first.keys() == second.keys()
    qparams = [k for k in first if k.endswith((".scale", ".zero_point", ".min_val", ".max_val"))]
    assert len(qparams) > 10
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_batch_norm_statistics_and_biases_identical_across_ranks(ranks: list[dict[str, Any]]) -> None:
    first, second = ranks[0]["state_dict"], ranks[1]["state_dict"]
    keys = [k for k in first if "running_" in k or k.endswith("bias")]
    assert keys
    for key in keys:
        assert torch.equal(first[key], second[key]), key


def test_rank_0_exports(ranks: list[dict[str, Any]]) -> None:
    path, parity_passed = ranks[0]["export"]
    assert Path(path).is_file()
    assert parity_passed
