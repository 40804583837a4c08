"""Faults met when resuming and checkpointing retrieval / classification runs (training/stan_checkpointing.py):
a checkpoint resumed on another number of processes is refused with one message naming both counts; a damaged newest
checkpoint is passed over for the newest intact one (`auto`) or refused naming the file (an explicit path); a disk
that fills while a checkpoint is written stops the run with "No space left on <folder>", the previous checkpoint
intact and resumable.

The runs use the tiny default model on a small synthetic dataset generated once per module.
"""

import errno
import json
import os
import shutil
import sys

import pytest
from accelerate import Accelerator
from conftest import REPO_ROOT, launch_two_processes
from safetensors.torch import load_file
from test_training import run  # one in-process runner for the training scripts' tests

from modeling_stan.demo.synthetic_videos import generate_synthetic_dataset


sys.path.insert(0, str(REPO_ROOT / "training"))
import run_retrieval  # noqa: E402
import stan_checkpointing  # noqa: E402
from stan_checkpointing import (  # noqa: E402
    CheckpointManager,
    CheckpointWriteError,
    RerunError,
    checkpoint_problem,
    choose_checkpoint,
)


FLAGS = [
    "--synthetic_num_train",
    16,
    "--synthetic_num_val",
    8,
    "--synthetic_num_test",
    8,
    "--per_device_train_batch_size",
    4,
    "--per_device_eval_batch_size",
    8,
    "--seed",
    3,
    "--max_steps",
    4,
    "--eval_strategy",
    "no",
    "--save_strategy",
    "steps",
    "--save_steps",
    2,
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_dataset(root, num_train=16, num_val=8, num_test=8, seed=3)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    """One process, 4 steps, checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("finished") / "out"
    run(run_retrieval, output, *FLAGS, "--data_dir", data_dir)
    return output


def copy_of(run_dir, destination):
    shutil.copytree(run_dir, destination)
    return destination


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def same_weights(a, b) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all((first[name] == second[name]).all() for name in first)


# ----------------------------------------------------------------------------------------------------------------
# Another number of processes
# ----------------------------------------------------------------------------------------------------------------


def test_a_checkpoint_of_another_process_count_is_refused_with_both_counts(tmp_path):
    accelerator = Accelerator(cpu=True)
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints", run_arguments={"seed": 1})
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "run.json").write_text(json.dumps({"arguments": {"seed": 1}, "step": 2, "num_processes": 2}))
    for spec in ("auto", "latest", str(checkpoint)):
        with pytest.raises(
            RerunError, match=r"written by a run on 2 process\(es\); this run has 1\..*--num_processes 2"
        ):
            choose_checkpoint(manager, spec)
    # A checkpoint without the count in run.json: Accelerate's per-process RNG states tell it.
    (checkpoint / "run.json").write_text(json.dumps({"arguments": {"seed": 1}, "step": 2}))
    for rank in (0, 1, 2):
        (checkpoint / f"random_states_{rank}.pkl").write_bytes(b"")
    with pytest.raises(RerunError, match=r"3 process\(es\); this run has 1"):
        choose_checkpoint(manager, "auto")


def test_a_two_process_run_resumed_in_one_process_and_back_is_refused(tmp_path, data_dir, finished_run):
    """Real processes (gloo on CPU): a 2-process checkpoint refused in 1 process, a 1-process one in 2."""
    two = tmp_path / "two"
    flags = [*FLAGS, "--data_dir", data_dir, "--max_steps", 2, "--per_device_train_batch_size", 2]
    completed = launch_two_processes("run_retrieval.py", *flags, "--output_dir", two)
    assert completed.returncode == 0, completed.stderr[-4000:]
    with pytest.raises(RerunError, match=r"checkpoint-2 was written by a run on 2 process\(es\); this run has 1"):
        run(run_retrieval, two, *flags)

    one = copy_of(finished_run, tmp_path / "one")
    completed = launch_two_processes("run_retrieval.py", *FLAGS, "--data_dir", data_dir, "--output_dir", one)
    assert completed.returncode == 1
    assert "checkpoint-4 was written by a run on 1 process(es); this run has 2" in completed.stderr


# ----------------------------------------------------------------------------------------------------------------
# A damaged newest checkpoint
# ----------------------------------------------------------------------------------------------------------------


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(tmp_path, data_dir, finished_run, caplog):
    output = copy_of(finished_run, tmp_path / "out")
    damaged = output / "checkpoints" / "checkpoint-4" / "model.safetensors"
    truncate(damaged)
    assert "model.safetensors has" in checkpoint_problem(damaged.parent)
    # An explicit path to it fails naming the file, before any work.
    with pytest.raises(
        RerunError, match=r"checkpoint-4: the checkpoint is damaged: .*checkpoint-4/model\.safetensors has"
    ):
        run(run_retrieval, output, *FLAGS, "--data_dir", data_dir, "--resume_from_checkpoint", damaged.parent)
    # `auto` (the default) passes over it with a warning naming the file, and resumes from checkpoint-2.
    caplog.set_level("INFO")
    results = run(run_retrieval, output, *FLAGS, "--data_dir", data_dir)
    assert f"Checkpoint checkpoint-4 is damaged: {damaged} has" in caplog.text
    assert "Resuming the unfinished run" in caplog.text and "checkpoint-2 (step 2 of 4)" in caplog.text
    assert results["train"]["steps"] == 4
    # Resuming is exact: the same weights as the uninterrupted run, and checkpoint-4 written again, intact.
    assert same_weights(output / "model.safetensors", finished_run / "model.safetensors")
    assert checkpoint_problem(damaged.parent) is None


def test_pruning_keeps_intact_checkpoints_over_a_damaged_newer_one(finished_run, tmp_path):
    """A run resumed from checkpoint-2 past a damaged checkpoint-4 saves checkpoint-3: with --save_total_limit 1
    the damaged checkpoint must not be the one kept."""
    directory = copy_of(finished_run / "checkpoints", tmp_path / "checkpoints")
    truncate(directory / "checkpoint-4" / "model.safetensors")
    shutil.copytree(directory / "checkpoint-2", directory / "checkpoint-3")
    manager = CheckpointManager(Accelerator(cpu=True), directory, total_limit=1)
    manager._prune(protected_step=None)
    assert manager.steps() == [3]


def test_a_checkpoint_file_of_another_size_than_saved_is_damaged(finished_run, tmp_path):
    checkpoint = copy_of(finished_run / "checkpoints" / "checkpoint-2", tmp_path / "checkpoint-2")
    assert checkpoint_problem(checkpoint) is None
    files = json.loads((checkpoint / "run.json").read_text())["files"]
    assert "model.safetensors" in files and "optimizer.bin" in files
    truncate(checkpoint / "optimizer.bin", keep=0.9)
    assert "optimizer.bin has" in checkpoint_problem(checkpoint)
    (checkpoint / "optimizer.bin").unlink()
    assert "optimizer.bin is missing" in checkpoint_problem(checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------------


def test_a_disk_full_while_checkpointing_names_the_folder_and_resuming_works(
    tmp_path, data_dir, finished_run, monkeypatch
):
    save_state = Accelerator.save_state

    def fill_the_disk(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):  # the second checkpoint: the disk fills halfway through
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as file:
                file.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fill_the_disk)
    output = tmp_path / "out"
    with pytest.raises(CheckpointWriteError, match=r"No space left on .*checkpoints while writing checkpoint-4 "):
        run(run_retrieval, output, *FLAGS, "--data_dir", data_dir)
    monkeypatch.undo()
    # The previous checkpoint is intact, the unfinished write is gone, and the same command resumes.
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert checkpoint_problem(output / "checkpoints" / "checkpoint-2") is None
    run(run_retrieval, output, *FLAGS, "--data_dir", data_dir)
    assert same_weights(output / "model.safetensors", finished_run / "model.safetensors")


def test_a_generic_write_failure_on_a_nearly_full_disk_is_named_a_full_disk(tmp_path, monkeypatch):
    torch_message = RuntimeError(
        "[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: basic_ios::clear: iostream error"
    )
    free = {"bytes": 10**12}
    monkeypatch.setattr(
        stan_checkpointing.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**13, 0, free["bytes"])
    )
    assert not stan_checkpointing._is_disk_full(torch_message, tmp_path)
    free["bytes"] = 4096
    assert stan_checkpointing._is_disk_full(torch_message, tmp_path)
    assert not stan_checkpointing._is_disk_full(RuntimeError("CUDA error"), tmp_path)
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert stan_checkpointing._is_disk_full(wrapped, tmp_path)
