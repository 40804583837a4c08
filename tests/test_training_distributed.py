"""Two real processes (gloo on CPU) against one process on the same global batch: the loss over the all-gathered
features, the gradient scale and the weights must agree; and the best validation step, which is not the last, is the
model both export.

The run uses Mug-STAN alignment, so token embeddings, masks and frame embeddings are gathered too.
"""

import json
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import REPO_ROOT, launch_two_processes
from safetensors.torch import load_file

from modeling_stan import StanForVideoTextRetrieval
from modeling_stan.demo.synthetic_videos import generate_synthetic_dataset


sys.path.insert(0, str(REPO_ROOT / "training"))
import run_retrieval  # noqa: E402


STEPS = 3
# Validation and a checkpoint at every step; the selection metric (corrupt validation videos, 0 at every step, a tie
# never improves) makes step 1 the best and so not the last.
BEST_STEP = 1
COMMON = [
    "--synthetic_num_train",
    16,
    "--synthetic_num_val",
    8,
    "--synthetic_num_test",
    8,
    "--seed",
    1,
    "--alignment",
    "mug",
    "--max_steps",
    STEPS,
    "--eval_strategy",
    "steps",
    "--eval_steps",
    1,
    "--save_strategy",
    "steps",
    "--save_steps",
    1,
    "--metric_for_best_model",
    "corrupt_videos",
]


def records(dump_dir, rank):
    with open(dump_dir / f"rank{rank}.jsonl", encoding="utf-8") as file:
        lines = [json.loads(line) for line in file]
    return [line for line in lines if "step" in line], next(line for line in lines if "weights_sha256" in line)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes with 4 videos each, and one process with 8: the same global batches in the same order."""
    root = tmp_path_factory.mktemp("distributed")
    data_dir = generate_synthetic_dataset(root / "data", num_train=16, num_val=8, num_test=8, seed=1)
    flags = [*COMMON, "--data_dir", data_dir]
    two = launch_two_processes(
        "run_retrieval.py",
        *flags,
        "--output_dir",
        root / "two",
        "--per_device_train_batch_size",
        4,
        "--debug_dump_dir",
        root / "two_dump",
    )
    print(f"two-process run: exit {two.returncode}", flush=True)
    assert two.returncode == 0, two.stderr[-4000:]
    # The same two processes with the authors' gradient scale (their gather keeps only the local slice).
    local = launch_two_processes(
        "run_retrieval.py",
        *flags,
        "--output_dir",
        root / "two_local",
        "--per_device_train_batch_size",
        4,
        "--debug_dump_dir",
        root / "two_local_dump",
        "--gather_gradient",
        "local",
        "--max_steps",
        1,
    )
    assert local.returncode == 0, local.stderr[-4000:]

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run_retrieval.main(
        [
            *map(str, flags),
            "--output_dir",
            str(root / "one"),
            "--per_device_train_batch_size",
            "8",
            "--debug_dump_dir",
            str(root / "one_dump"),
        ]
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return root


def test_gathered_loss_equals_the_single_process_loss(runs):
    one, _ = records(runs / "one_dump", 0)
    # Rounding in a gradient follows the size of the terms summed, not of the result: after a large update the
    # gradient can nearly cancel (measured: norms 25.7, 69.5, then 0.39), and the two reduction orders then agree to
    # about 1e-6 of the run's largest norm (5.5e-5 at step 3), not to 1e-4 of the tiny one.
    rounding = 1e-6 * max(record["grad_norm"] for record in one)
    for rank in (0, 1):
        two, _ = records(runs / "two_dump", rank)
        assert [r["step"] for r in two] == list(range(1, STEPS + 1))
        for single, distributed in zip(one, two):
            # Each process computes the loss of the whole global batch from the gathered features.
            assert distributed["loss"] == pytest.approx(single["loss"], abs=1e-5)
            # Gradient scale: DDP's average of the processes' gradients is the single-process gradient.
            assert distributed["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4, abs=rounding)


def test_authors_gradient_scale_is_one_over_the_number_of_processes(runs):
    one, _ = records(runs / "one_dump", 0)
    for rank in (0, 1):
        local, _ = records(runs / "two_local_dump", rank)
        assert local[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
        # Every tower weight gets half the one-process gradient; the learnable logit scale, applied after the
        # gather, keeps its full gradient, hence the looser tolerance (the two scales differ by 100%).
        assert local[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"] / 2, rel=2e-3)


def test_both_processes_end_with_the_single_process_weights(runs):
    _, rank0 = records(runs / "two_dump", 0)
    _, rank1 = records(runs / "two_dump", 1)
    assert rank0["num_processes"] == rank1["num_processes"] == 2
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    last = f"checkpoints/checkpoint-{STEPS}/model.safetensors"
    for exported in ("model.safetensors", last):
        single, distributed = load_file(runs / "one" / exported), load_file(runs / "two" / exported)
        assert single.keys() == distributed.keys()
        worst = max(float((single[name] - distributed[name]).abs().max()) for name in single)
        # Summation order differs between the two layouts; Adam's first steps magnify float rounding a little.
        assert worst < 1e-4, exported


def test_two_processes_export_the_best_checkpoint_not_the_last(runs):
    results = json.loads((runs / "two" / "all_results.json").read_text())
    assert results["train"]["best_step"] == BEST_STEP and results["train"]["steps"] == STEPS
    exported = load_file(runs / "two" / "model.safetensors")
    best = load_file(runs / "two" / "checkpoints" / f"checkpoint-{BEST_STEP}" / "model.safetensors")
    last = load_file(runs / "two" / "checkpoints" / f"checkpoint-{STEPS}" / "model.safetensors")
    assert exported.keys() == best.keys()
    assert all(torch.equal(exported[name], best[name]) for name in best)
    assert not all(torch.equal(exported[name], last[name]) for name in last)
    # The folder is a loadable model with its card.
    model = StanForVideoTextRetrieval.from_pretrained(runs / "two")
    assert torch.equal(model.state_dict()["visual_projection.weight"], best["visual_projection.weight"])
    assert (runs / "two" / "README.md").is_file()
