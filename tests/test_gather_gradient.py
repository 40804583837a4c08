"""The gradient scale of the differentiable all-gather on two real (gloo) processes: the global-batch gradient by
default, the authors' local slice (1/W of it) with `local_gradient=True`."""

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "training"))
import stan_training  # noqa: E402


WORLD_SIZE = 2
# Rows of the global batch, split 2 + 1 over the processes (unequal on purpose), and the weights of a linear loss.
ROWS = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
SPLIT = [slice(0, 2), slice(2, 3)]
WEIGHTS = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-3.0, 1.5]])


def _gradient_on_each_process(rank: int, init_file: str, local_gradient: bool, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = ROWS[SPLIT[rank]].clone().requires_grad_(True)
        gathered = stan_training.all_gather_with_grad(rows, local_gradient=local_gradient)
        # Every process computes the same loss over the whole gathered batch, as the contrastive loss does.
        (gathered * WEIGHTS).sum().backward()
        results[rank] = (gathered.detach().clone(), rows.grad.clone())
    finally:
        dist.destroy_process_group()


def _run(tmp_path, local_gradient: bool) -> dict:
    results = mp.Manager().dict()
    # fork: the children inherit the imported modules instead of importing transformers again (seconds each).
    mp.start_processes(
        _gradient_on_each_process,
        args=(str(tmp_path / f"init-{local_gradient}"), local_gradient, results),
        nprocs=WORLD_SIZE,
        start_method="fork",
    )
    return dict(results)


@pytest.mark.parametrize("local_gradient, scale", [(False, WORLD_SIZE), (True, 1)])
def test_gradient_of_the_gathered_rows(tmp_path, local_gradient, scale):
    results = _run(tmp_path, local_gradient)
    for rank in range(WORLD_SIZE):
        gathered, grad = results[rank]
        torch.testing.assert_close(gathered, ROWS)
        # d loss / d rows = WEIGHTS on this process's rows; the default hands each process W times that (all
        # processes' identical losses summed), so that DDP's mean over processes is the one-process gradient. The
        # authors' layer keeps one copy, so after DDP's mean theirs is 1/W of the one-process gradient.
        torch.testing.assert_close(grad, scale * WEIGHTS[SPLIT[rank]])


def test_retrieval_script_refuses_an_unknown_gather_gradient():
    import run_retrieval

    assert run_retrieval.RetrievalArguments(gather_gradient="local").gather_gradient == "local"
    with pytest.raises(ValueError, match="--gather_gradient must be 'global' or 'local', got 'authors'"):
        run_retrieval.RetrievalArguments(gather_gradient="authors")
