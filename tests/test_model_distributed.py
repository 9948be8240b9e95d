"""Multi-worker semantics of the image-attribute loss, with two real gloo processes.

With ``model.ia_negatives: global`` each worker scores its rows against every worker's tokens and
descriptions: the mean of the two workers' losses must be the one-process loss of the whole batch,
and the gradients data parallelism applies (each worker's, averaged) must be that loss's gradients.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliplung.model import contrastive_losses

B, N, E, C, K = 6, 4, 16, 3, 8  # per-worker batch; tokens, embed width, classes, attributes


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """A global batch of 2·B samples (leaf tensors standing in for the model's outputs)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": F.normalize(torch.randn(2 * B, N, E, generator=g), dim=-1),
        "class_features": F.normalize(torch.randn(2 * B, C, E, generator=g), dim=-1),
        "attr_features": F.normalize(torch.randn(2 * B, K, E, generator=g), dim=-1),
        "weights": torch.softmax(torch.randn(2 * B, K, generator=g), dim=-1),
        "labels": torch.arange(2 * B) % C,
        "logit_scale": torch.tensor(2.0),
    }


def _losses(inputs: dict[str, torch.Tensor], rows: slice, global_negatives: bool):
    leaves = {
        k: v[rows].clone().requires_grad_(v.is_floating_point())
        for k, v in inputs.items()
        if k != "logit_scale"
    }
    _, _, ia = contrastive_losses(
        **leaves, logit_scale=inputs["logit_scale"], global_negatives=global_negatives
    )
    return leaves, ia


def _worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        inputs = _inputs()
        rows = slice(rank * B, (rank + 1) * B)
        leaves, ia = _losses(inputs, rows, global_negatives=True)
        ia.backward()
        _, ia_local = _losses(inputs, rows, global_negatives=False)
        torch.save(
            {
                "ia": ia.detach(),
                "ia_local": ia_local.detach(),
                "grad_tokens": leaves["tokens"].grad,
                "grad_attr": leaves["attr_features"].grad,
            },
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_global_negatives_make_two_workers_equal_one(tmp_path) -> None:
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(str(tmp_path / "store"), out), nprocs=2, start_method="spawn")
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]

    inputs = _inputs()
    leaves, ia = _losses(inputs, slice(0, 2 * B), global_negatives=True)  # one process, whole batch
    ia.backward()
    torch.testing.assert_close((results[0]["ia"] + results[1]["ia"]) / 2, ia.detach())
    # Data parallelism averages the workers' gradients; each worker's gradient of its own rows holds
    # every worker's loss's contribution (the gather's backward sums them), i.e. 2x the mean loss's.
    for rank in (0, 1):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(results[rank]["grad_tokens"] / 2, leaves["tokens"].grad[rows])
        torch.testing.assert_close(results[rank]["grad_attr"] / 2, leaves["attr_features"].grad[rows])
    # Local negatives are a different objective: fewer negatives per row.
    local = (results[0]["ia_local"] + results[1]["ia_local"]) / 2
    assert not torch.allclose(local, ia.detach())


def test_global_negatives_without_a_process_group_are_the_local_loss() -> None:
    inputs = _inputs()
    _, a = _losses(inputs, slice(0, 2 * B), global_negatives=True)
    _, b = _losses(inputs, slice(0, 2 * B), global_negatives=False)
    assert torch.equal(a, b)
