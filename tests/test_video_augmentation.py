"""ViFi-CLIP's augmentations in torch (training/video_augmentation.py)."""

import sys

import pytest
import torch
from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "training"))
from video_augmentation import (  # noqa: E402
    AugmentationArguments,
    VideoAugmentation,
    _shift_hue,
    color_jitter,
    cutmix,
    grayscale,
    on_chosen_clips,
    soft_targets,
)


def test_hue_rotation_through_hsv():
    rgb = torch.rand(4, 3, 5, 5)
    torch.testing.assert_close(_shift_hue(rgb, torch.zeros(4, 1, 1)), rgb, atol=1e-5, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    third = torch.full((1, 1, 1), 1 / 3)
    torch.testing.assert_close(
        _shift_hue(red, third), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), atol=1e-5, rtol=0
    )


def test_grayscale_is_luma_in_every_channel():
    pixel = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    assert grayscale(pixel).flatten().tolist() == pytest.approx([0.299 + 0.2935] * 3)


def test_colour_jitter_keeps_range_and_changes_frames_independently():
    torch.manual_seed(0)
    frames = torch.rand(1, 3, 8, 8).expand(4, -1, -1, -1)
    jittered = color_jitter(frames)
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert not torch.allclose(jittered[0], jittered[1])  # drawn per frame


def test_cutmix_label_weight_is_the_kept_area():
    images, partners = torch.zeros(2, 1, 3, 10, 10), torch.ones(2, 1, 3, 10, 10)
    torch.manual_seed(3)
    mixed, kept = cutmix(images, partners, lam=0.5)
    assert kept == pytest.approx(1 - mixed[0, 0, 0].mean().item())


def test_soft_targets_and_blending_keep_distributions():
    targets = soft_targets(torch.tensor([0, 2]), 4, smoothing=0.1)
    assert targets[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])
    augmentation = VideoAugmentation(AugmentationArguments(mixup=0.8, cutmix=1.0), [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    for _ in range(4):
        pixels, mixed = augmentation.blend(torch.randn(2, 2, 3, 8, 8), targets)
        torch.testing.assert_close(mixed.sum(-1), torch.ones(2))


def test_clip_augmentations_keep_shape_and_normalisation():
    args = AugmentationArguments(flip=0.5, color_jitter=0.8, grayscale=0.2)
    pixels = (torch.rand(3, 2, 3, 8, 8) - 0.5) / 0.25
    for mean, std in (([0.5] * 3, [0.25] * 3), (0.5, 0.25)):  # per channel, or one value for all
        out = VideoAugmentation(args, mean, std).clips(pixels)
        assert out.shape == pixels.shape and out.min() >= -2 - 1e-6 and out.max() <= 2 + 1e-6
    with pytest.raises(ValueError, match="--flip is a probability"):
        AugmentationArguments(flip=1.5)


def test_a_clip_transform_sees_and_draws_for_the_chosen_clips_only():
    clips = torch.rand(16, 2, 3, 4, 4)
    seen = []

    def jitter(chosen):
        seen.append(len(chosen))
        return color_jitter(chosen.flatten(0, 1)).view_as(chosen)

    torch.manual_seed(0)
    out = on_chosen_clips(clips, 0.5, jitter)
    torch.manual_seed(0)
    chosen = torch.rand(16) < 0.5
    assert seen == [int(chosen.sum())] and 0 < seen[0] < 16
    assert torch.equal(out[~chosen], clips[~chosen])  # unchosen clips untouched
    assert not torch.allclose(out[chosen], clips[chosen])
    torch.manual_seed(0)
    assert torch.equal(on_chosen_clips(clips, 0.5, jitter), out)  # seeded: the same clips, the same factors
    assert on_chosen_clips(clips, 0.0, jitter) is clips and seen == [seen[0]] * 2  # none chosen: no work


def test_clip_augmentations_are_seeded():
    args = AugmentationArguments(flip=0.5, color_jitter=0.8, grayscale=0.2)
    augmentation = VideoAugmentation(args, [0.5] * 3, [0.25] * 3)
    pixels = (torch.rand(6, 2, 3, 8, 8) - 0.5) / 0.25
    torch.manual_seed(1)
    first = augmentation.clips(pixels)
    torch.manual_seed(1)
    assert torch.equal(augmentation.clips(pixels), first)
    assert not torch.equal(augmentation.clips(pixels), first)  # the stream moves on
