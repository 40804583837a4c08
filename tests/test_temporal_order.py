"""The temporal-order benchmark (benchmarks/temporal_order.py): its data, and a shortened run of its claim."""

import sys

import numpy as np
import torch
from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a folder of scripts at the repository root, not installed.
from benchmarks.temporal_order import main, pair_labels, render_pairs  # noqa: E402


def test_each_clip_is_followed_by_the_same_frames_in_reverse_order():
    videos = render_pairs(6, num_frames=8, size=32, rng=np.random.default_rng(0))
    assert videos.shape == (12, 8, 3, 32, 32)
    assert videos.min() >= -1.0 and videos.max() <= 1.0
    forward, backward = videos[0::2], videos[1::2]
    assert torch.equal(backward, forward.flip(1))
    # Motion: frames differ within a clip, so order matters.
    assert all(not torch.equal(clip[0], clip[-1]) for clip in forward)
    assert pair_labels(3).tolist() == [0, 1, 0, 1, 0, 1]


def test_shortened_run_learns_order_with_the_stan_branch_only():
    results = main(["--steps", "600", "--test_pairs", "64"])  # the full benchmark runs 1000 steps, 256 test pairs
    assert results["STAN-self"].accuracy >= 0.85
    assert results["STAN-conv"].accuracy >= 0.85
    # Mean pooling gives a clip and its reverse the same logits: exactly one of the two is right.
    assert abs(results["CLIP mean pooling (K=0)"].accuracy - 0.5) <= 0.02
