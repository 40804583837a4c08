"""Shared fixtures: tiny random CLIP / STAN models built locally (no downloads), seeded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_stan import StanConfig
from modeling_stan.demo.tiny_clip import save_tiny_clip, tiny_clip_config


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; the calling test is skipped when shared/ is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared is absent)")
    return path


def launch_two_processes(script: str, *flags, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` of `training/{script}` in 2 CPU processes (gloo), with this checkout first on the path;
    its output captured as text."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO_ROOT / "training" / script),
        *map(str, flags),
    ]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_stan_config(**stan_kwargs) -> StanConfig:
    stan_kwargs.setdefault("drop_path_rate", 0.0)
    return StanConfig.from_clip_config(tiny_clip_config(), **stan_kwargs)


def random_video(batch_size=2, num_frames=4, config=None, seed=0) -> torch.Tensor:
    size = (config or tiny_stan_config()).vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, num_frames, 3, size, size, generator=generator)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
