"""Crash-safe training checkpoints on top of `Accelerator.save_state` / `load_state`.

A checkpoint is the folder `checkpoint-{step}` under the checkpoint directory. It is written under a temporary name in
the same parent (`.tmp-checkpoint-{step}`), every file and the folder are fsynced, and only then is it renamed to its
final name: a rename within one file system is atomic, so a `checkpoint-*` folder is always complete, and a crash
mid-write leaves the previous checkpoint as the latest one. Old checkpoints are renamed away before they are deleted,
for the same reason.
"""

import os
import re
import shutil
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger


logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# Folders a crashed run may leave behind: an unfinished write or an unfinished deletion.
_LEFTOVER_PREFIXES = (".tmp-", ".deleting-")


class CheckpointManager:
    """Writes, finds and prunes the `checkpoint-{step}` folders of one run.

    Args:
        accelerator: the run's `Accelerator`; every process must call `save` (each writes its own RNG state).
        directory: where the checkpoints live.
        total_limit: how many of the most recent checkpoints to keep (`None` keeps all); the checkpoint named by
            `protected_step` (the best one so far) is kept in addition.
        write_delay: seconds to sleep after fsyncing each file. Only for tests that kill a run mid-write.
    """

    def __init__(self, accelerator: Accelerator, directory: str | os.PathLike, total_limit: int | None = None,
                 write_delay: float = 0.0):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {total_limit}.")
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.total_limit = total_limit
        self.write_delay = write_delay

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

    def resolve(self, spec: str | None) -> Path | None:
        """The checkpoint to resume from: `None` (start afresh), `"latest"` (the newest one, or `None` when there is
        none yet, so that a preempted job can always be relaunched with the same command) or a path."""
        if spec is None:
            return None
        if spec == "latest":
            latest = self.latest()
            if latest is None:
                logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {self.directory}; starting afresh.")
            return latest
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {spec}: no such checkpoint folder.")
        return path

    def save(self, step: int, protected_step: int | None = None) -> Path:
        """Saves the full training state of `step` atomically (all processes call this), then prunes."""
        final = self.path(step)
        if final.is_dir():
            # Already saved at this step (e.g. the best checkpoint, then the end-of-training one): same state.
            return final
        temporary = self.directory / f".tmp-{final.name}"
        accelerator = self.accelerator
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._fsync_tree(temporary)
            os.replace(temporary, final)
            _fsync_directory(self.directory)
            self._prune(protected_step)
        accelerator.wait_for_everyone()
        logger.info(f"Saved checkpoint {final}")
        return final

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
        steps = self.steps()
        keep = set(steps if self.total_limit is None else steps[-self.total_limit:])
        if protected_step is not None:
            keep.add(protected_step)
        for step in steps:
            if step not in keep:
                _remove_atomically(self.path(step))
        for entry in self.directory.iterdir():
            # Leftovers of a crashed run (never the folder being written: that one was just renamed).
            if entry.name.startswith(_LEFTOVER_PREFIXES):
                shutil.rmtree(entry, ignore_errors=True)


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
