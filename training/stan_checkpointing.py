"""Crash-safe training checkpoints on top of `Accelerator.save_state` / `load_state`.

A checkpoint is the folder `checkpoint-{step}` under the checkpoint directory. It is written under a temporary name in
the same parent (`.tmp-checkpoint-{step}`), every file and the folder are fsynced, and only then is it renamed to its
final name: a rename within one file system is atomic, so a `checkpoint-*` folder is always complete, and a crash
mid-write leaves the previous checkpoint as the latest one. Old checkpoints are renamed away before they are deleted,
for the same reason.

Each checkpoint also holds `run.json`: the run's arguments, its step out of the planned total, the number of
processes that wrote it and the size of every file, from which `choose_checkpoint` decides what a re-run of a
command does (resume, re-export, start afresh, or refuse) and whether a checkpoint is intact (`checkpoint_problem`:
a file truncated or missing since it was saved, or a `.safetensors` file that does not parse, is damaged).

Faults and what they do: a damaged newest checkpoint is passed over for the newest intact one (with a warning naming
the damaged file); a checkpoint written by another number of processes is refused (`check_process_count`, the one
rule of every script); a disk that fills while a checkpoint is written stops the run with `CheckpointWriteError`
("No space left on <folder>"), the previous checkpoint intact.
"""

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors import SafetensorError, safe_open


logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# Folders a crashed run may leave behind: an unfinished write or an unfinished deletion.
_LEFTOVER_PREFIXES = (".tmp-", ".deleting-")
RUN_FILE = "run.json"
# What torch's C++ writer and safetensors say when a write fails, a full disk among other causes; taken for a full
# disk when less than `_NEARLY_FULL_BYTES` are free (a writer fails before its last byte).
_WRITE_FAILURE_MESSAGES = ("iostream error", "file write failed", "PytorchStreamWriter failed", "os error 28")
_NEARLY_FULL_BYTES = 64 * 1024 * 1024


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk); the message names the folder and what is still intact."""


class CheckpointManager:
    """Writes, finds and prunes the `checkpoint-{step}` folders of one run.

    Args:
        accelerator: the run's `Accelerator`; every process must call `save` (each writes its own RNG state).
        directory: where the checkpoints live.
        total_limit: how many of the most recent checkpoints to keep (`None` keeps all); the checkpoint named by
            `protected_step` (the best one so far) is kept in addition.
        write_delay: seconds to sleep after fsyncing each file. Only for tests that kill a run mid-write.
        run_arguments: the run's arguments (JSON-serialisable), written into every checkpoint's `run.json`.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        directory: str | os.PathLike,
        total_limit: int | None = None,
        write_delay: float = 0.0,
        run_arguments: dict | None = None,
    ):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {total_limit}.")
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.total_limit = total_limit
        self.write_delay = write_delay
        self.run_arguments = run_arguments or {}

    def path(self, step: int) -> Path:
        return self.directory / f"{CHECKPOINT_PREFIX}{step}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        matches = (_CHECKPOINT_PATTERN.match(entry.name) for entry in self.directory.iterdir() if entry.is_dir())
        return sorted(int(match.group(1)) for match in matches if match)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def run_info(self, step: int) -> dict:
        """The `run.json` of checkpoint `step` (`{}` for a checkpoint written without one)."""
        path = self.path(step) / RUN_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def save(
        self, step: int, protected_step: int | None = None, metadata: dict | None = None, replace: bool = False
    ) -> Path:
        """Saves the full training state of `step` atomically (all processes call this), then prunes. `metadata`
        goes into `run.json` with the run's arguments. An existing intact checkpoint of `step` is kept unless
        `replace` (the state of that step changed since, e.g. a validation after it)."""
        final = self.path(step)
        if final.is_dir() and not replace and checkpoint_problem(final) is None:
            return final
        temporary = self.directory / f".tmp-{final.name}"
        accelerator = self.accelerator
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(temporary))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                files = {
                    str(path.relative_to(temporary)): path.stat().st_size
                    for path in sorted(temporary.rglob("*"))
                    if path.is_file()
                }
                run = {
                    "arguments": self.run_arguments,
                    **(metadata or {}),
                    "num_processes": accelerator.num_processes,
                    "files": files,
                }
                (temporary / RUN_FILE).write_text(json.dumps(run, indent=2), encoding="utf-8")
                self._fsync_tree(temporary)
        except (OSError, RuntimeError) as error:
            if not _is_disk_full(error, self.directory):
                raise
            if accelerator.is_main_process:
                shutil.rmtree(temporary, ignore_errors=True)  # gives back the space of the unfinished write
            raise CheckpointWriteError(errno.ENOSPC, self._disk_full_message(final, error)) from error
        if accelerator.is_main_process:
            if final.is_dir():
                # A rename cannot replace a non-empty folder: the old state of this step goes first (the checkpoints
                # before it stay, so a crash in between still leaves a complete one to resume from).
                _remove_atomically(final)
            os.replace(temporary, final)
            _fsync_directory(self.directory)
            self._prune(protected_step)
        accelerator.wait_for_everyone()
        logger.debug(f"Saved checkpoint {final}")
        return final

    def _disk_full_message(self, final: Path, error: BaseException) -> str:
        free = shutil.disk_usage(self.directory).free
        previous = self.latest()
        if previous is None:
            needed, intact = "", "No checkpoint of this run was written yet"
        else:
            size = sum(path.stat().st_size for path in previous.rglob("*") if path.is_file())
            needed = f"; the previous checkpoint takes {size} bytes, about what this one needs"
            intact = (
                f"The previous checkpoint {previous} is intact: free space and run the same command again to resume"
            )
        return (
            f"No space left on {self.directory} while writing {final.name} ({free} bytes free{needed}; the write "
            f"failed with: {error}). {intact} from it (or pass another --output_dir)."
        )

    def _fsync_tree(self, directory: Path) -> None:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            with open(path, "rb") as file:
                os.fsync(file.fileno())
            if self.write_delay:
                time.sleep(self.write_delay)
        for folder in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
            _fsync_directory(folder)
        _fsync_directory(directory)

    def _prune(self, protected_step: int | None) -> None:
        # A damaged checkpoint (one a resumed run passed over, named in a warning then) neither counts towards the
        # limit, which would delete intact ones in its place, nor stays.
        steps = self.steps()
        intact = [step for step in steps if checkpoint_problem(self.path(step)) is None]
        keep = set(intact if self.total_limit is None else intact[-self.total_limit :])
        if protected_step is not None:
            keep.add(protected_step)
        for step in steps:
            if step not in keep:
                _remove_atomically(self.path(step))
        for entry in self.directory.iterdir():
            # Leftovers of a crashed run (never the folder being written: that one was just renamed).
            if entry.name.startswith(_LEFTOVER_PREFIXES):
                shutil.rmtree(entry, ignore_errors=True)


def _is_disk_full(error: BaseException, directory: Path) -> bool:
    """Whether a failed write is a full disk (or quota): an ENOSPC anywhere in the chain of errors, or a writer's
    generic failure (torch's "basic_ios::clear: iostream error") while the disk has (almost) no space left."""
    chain = error
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    generic = any(message in str(error) for message in _WRITE_FAILURE_MESSAGES)
    return generic and shutil.disk_usage(directory).free < _NEARLY_FULL_BYTES


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is damaged in `checkpoint` (one line naming the file), or None when it looks intact: every file listed
    in its `run.json` present with the size it was saved with, and every `.safetensors` file readable."""
    run_file = checkpoint / RUN_FILE
    files = {}
    if run_file.is_file():
        try:
            files = json.loads(run_file.read_text(encoding="utf-8")).get("files") or {}
        except (OSError, ValueError) as error:
            return f"{run_file} is unreadable ({error})"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)"
    for path in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{path} is not a readable safetensors file ({error})"
    return None


def saved_process_count(checkpoint: Path) -> int | None:
    """How many processes wrote `checkpoint`: recorded in its `run.json`, else the number of per-process RNG
    states Accelerate saved (`random_states_{i}.pkl`); None if neither tells."""
    run_file = checkpoint / RUN_FILE
    if run_file.is_file():
        count = json.loads(run_file.read_text(encoding="utf-8")).get("num_processes")
        if count is not None:
            return int(count)
    return len(list(checkpoint.glob("random_states_*.pkl"))) or None


def process_count_mismatch(saved: int, current: int, checkpoint: str | os.PathLike) -> str:
    """The one message of every script for a checkpoint resumed on another number of processes."""
    return (
        f"{checkpoint} was written by a run on {saved} process(es); this run has {current}. The global batch and the "
        f"position in the epoch depend on the number of processes, so the run cannot continue sample-exactly: "
        f"resume with `accelerate launch --num_processes {saved} ...`, or start afresh with --overwrite_output_dir "
        "(or another --output_dir)."
    )


def check_same_process_count(saved: int | None, current: int, what: str | os.PathLike) -> None:
    """Refuses (`RerunError`) a state saved by `saved` processes (None: unknown) in a run of `current`."""
    if saved is not None and saved != current:
        raise RerunError(process_count_mismatch(saved, current, what))


def check_process_count(checkpoint: Path, num_processes: int) -> None:
    """Refuses (`RerunError`) to resume `checkpoint` on another number of processes than wrote it."""
    check_same_process_count(saved_process_count(checkpoint), num_processes, checkpoint)


def _remove_atomically(path: Path) -> None:
    """Renames first so that no half-deleted folder ever carries a checkpoint name."""
    doomed = path.with_name(f".deleting-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class RerunError(ValueError):
    """The output folder holds a run this command must not silently continue or overwrite."""


@dataclass
class Resumption:
    """What a run does with the checkpoints it finds: the checkpoint to resume from (None: start afresh), and the
    one line that tells the user which and why."""

    checkpoint: Path | None
    message: str


def choose_checkpoint(manager: CheckpointManager, spec: str) -> Resumption:
    """Decides what `--resume_from_checkpoint spec` does with the checkpoints in `manager.directory`.

    - `auto` (the default): no checkpoint: start afresh. Checkpoints of a run with the same arguments: resume from
      the newest intact one (a run that had finished training is only evaluated and exported again). Checkpoints of
      a run with other arguments: `RerunError` naming the differences and the flags that settle it.
    - `latest`: resume from the newest intact checkpoint whatever its arguments (start afresh if there is none).
    - `never`: start afresh; `RerunError` if there are checkpoints (pass --overwrite_output_dir to delete them).
    - a folder: resume from it; `RerunError` naming the damaged file if it is damaged.

    A damaged checkpoint newer than the one chosen is named in a warning (the run rewrites it when it gets there);
    a checkpoint written by another number of processes is refused (`check_process_count`).
    """
    where = manager.directory
    num_processes = manager.accelerator.num_processes
    if spec == "never":
        if manager.latest() is not None:
            raise RerunError(
                f"{where} holds checkpoints of an earlier run and --resume_from_checkpoint is 'never': "
                "pass --overwrite_output_dir to delete them, or another --output_dir."
            )
        return Resumption(None, f"Starting a new run in {where.parent}.")
    if spec not in ("auto", "latest"):
        path = Path(spec)
        if not path.is_dir():
            raise RerunError(f"--resume_from_checkpoint {spec}: no such checkpoint folder.")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise RerunError(
                f"--resume_from_checkpoint {spec}: the checkpoint is damaged: {problem}. Pass an intact checkpoint, "
                "or 'auto' to resume from the newest intact one."
            )
        check_process_count(path, num_processes)
        return Resumption(path, f"Resuming from {path} (--resume_from_checkpoint).")
    latest = _newest_intact(manager)
    if latest is None:
        return Resumption(None, f"Starting a new run in {where.parent}: no intact checkpoint there yet.")
    check_process_count(latest, num_processes)
    run = manager.run_info(int(_CHECKPOINT_PATTERN.match(latest.name).group(1)))
    if spec == "latest":
        return Resumption(latest, f"Resuming from {latest} (--resume_from_checkpoint latest).")
    differences = _differences(run.get("arguments"), manager.run_arguments)
    if differences:
        raise RerunError(
            f"{where} holds checkpoints of a run with other arguments ({differences}): pass --resume_from_checkpoint "
            "latest to continue it with this command's arguments, --overwrite_output_dir to delete it and start "
            "afresh, or another --output_dir."
        )
    step, total = run.get("step"), run.get("total_steps")
    if step is not None and step == total:
        return Resumption(
            latest,
            f"The run in {where.parent} already finished training (step {step} of {total}) with "
            "these arguments: evaluating and exporting it again (--overwrite_output_dir trains "
            "afresh).",
        )
    return Resumption(
        latest,
        f"Resuming the unfinished run in {where.parent} from {latest.name} (step {step} of "
        f"{total}): same arguments as this command (--overwrite_output_dir starts afresh).",
    )


def _newest_intact(manager: CheckpointManager) -> Path | None:
    """The newest checkpoint that `checkpoint_problem` finds intact; each newer damaged one is named in a warning."""
    for step in reversed(manager.steps()):
        path = manager.path(step)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning(
            f"Checkpoint {path.name} is damaged: {problem}. Passing over it for an older checkpoint (the run writes "
            f"step {step} again when it gets there)."
        )
    return None


def _differences(saved: dict | None, current: dict) -> str:
    """The arguments that differ, as `name: saved -> current`, or "" when they are the same."""
    if saved is None:
        return "the checkpoints record no arguments"
    current = json.loads(json.dumps(current))  # as saved: tuples become lists
    names = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
    return ", ".join(f"{name}: {saved.get(name)!r} there, {current.get(name)!r} here" for name in names)
