"""Shared fixtures: tiny random CLIP / STAN models built locally (no downloads), seeded."""

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
