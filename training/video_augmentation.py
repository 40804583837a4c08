"""ViFi-CLIP's training augmentations as batch operations on processed clips, in plain torch (no torchvision).

They follow the authors' pipeline (muzairkhattak/ViFi-CLIP `datasets/build.py`, `datasets/pipeline.py`,
`datasets/blending.py`) after its crop, which the video processor takes (`--multi_scale_crop`): horizontal flip,
colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, drawn per frame, applied to a clip with
probability `color_jitter`), greyscale, then mixup or cutmix of the batch with label-smoothed soft targets. Ours
apply the four colour-jitter factors in a fixed order (brightness, contrast, saturation, hue) where torchvision
draws one. Randomness comes from torch's global generator, which the training checkpoints save and restore: per
step, for flip, colour jitter and greyscale in turn one draw per clip choosing the clips, then the jitter factors of
the chosen clips' frames only, so unchosen clips cost no work.
"""

import torch
from stan_arguments import AugmentationArguments


GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's "L" conversion


class VideoAugmentation:
    """Augments a batch of normalised clips `(B, T, 3, H, W)`; `mean`/`std` are the processor's normalisation."""

    def __init__(self, args: AugmentationArguments, mean, std):
        self.args = args
        # The processor may give one value for all channels.
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).expand(3).reshape(1, 1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1).expand(3).reshape(1, 1, 3, 1, 1)

    def clips(self, pixel_values: torch.Tensor) -> torch.Tensor:
        args = self.args
        if not (args.flip or args.color_jitter or args.grayscale):
            return pixel_values
        mean, std = self.mean.to(pixel_values), self.std.to(pixel_values)
        clips = (pixel_values * std + mean).clamp(0, 1)
        clips = on_chosen_clips(clips, args.flip, lambda chosen: chosen.flip(-1))
        clips = on_chosen_clips(clips, args.color_jitter, _jitter_clips)
        clips = on_chosen_clips(clips, args.grayscale, grayscale)
        return (clips - mean) / std

    def blend(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or cutmix of the batch with a shuffled copy; `targets` are soft `(B, num_classes)`."""
        args = self.args
        use_cutmix = args.cutmix > 0 and (args.mixup == 0 or torch.rand(()).item() < args.mixup_switch_prob)
        alpha = args.cutmix if use_cutmix else args.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = torch.randperm(len(pixel_values)).to(pixel_values.device)
        if use_cutmix:
            pixel_values, lam = cutmix(pixel_values, pixel_values[partner], lam)
        else:
            pixel_values = lam * pixel_values + (1 - lam) * pixel_values[partner]
        return pixel_values, lam * targets + (1 - lam) * targets[partner]


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing spread over all classes (on: 1 - s + s/C, off: s/C)."""
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1 - smoothing + off
    )


def on_chosen_clips(clips: torch.Tensor, probability: float, transform) -> torch.Tensor:
    """`clips` with `transform` applied to the clips drawn with `probability` (one draw per clip, made even at
    probability 0); `transform` sees, and draws its own randomness for, only the chosen clips."""
    chosen = (torch.rand(len(clips)) < probability).nonzero().flatten()  # decided on the CPU: no device sync
    if len(chosen) == 0:
        return clips
    chosen = chosen.to(clips.device)
    return clips.index_copy(0, chosen, transform(clips[chosen]))


def _jitter_clips(clips: torch.Tensor) -> torch.Tensor:
    # Every frame has its own factors and statistics, so the clips' frames are jittered as one batch of images.
    return color_jitter(clips.flatten(0, 1)).view_as(clips)


def grayscale(clips: torch.Tensor) -> torch.Tensor:
    weights = clips.new_tensor(GREY_WEIGHTS).view(3, 1, 1)
    return (clips * weights).sum(dim=-3, keepdim=True).expand_as(clips)


def color_jitter(frames: torch.Tensor, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) -> torch.Tensor:
    """Colour jitter of `(T, 3, H, W)` frames in [0, 1], factors drawn per frame as the authors' per-image calls do."""
    count = len(frames)
    factor = lambda spread: (1 + (torch.rand(count) * 2 - 1) * spread).to(frames).view(-1, 1, 1, 1)
    frames = (frames * factor(brightness)).clamp(0, 1)
    grey_mean = grayscale(frames).mean(dim=(-3, -2, -1), keepdim=True)
    frames = _blend(frames, grey_mean, factor(contrast))
    frames = _blend(frames, grayscale(frames), factor(saturation))
    shift = ((torch.rand(count) * 2 - 1) * hue).to(frames).view(-1, 1, 1)
    return _shift_hue(frames, shift)


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * image + (1 - ratio) * other).clamp(0, 1)


def _shift_hue(rgb: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the hue of `(N, 3, H, W)` RGB in [0, 1] by `shift` (N, 1, 1) turns, through HSV."""
    red, green, blue = rgb.unbind(dim=-3)
    value, _ = rgb.max(dim=-3)
    chroma = value - rgb.min(dim=-3).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == red,
        ((green - blue) / safe) % 6,
        torch.where(value == green, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    # HSV back to RGB: each channel is V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6.
    channels = [value - chroma * ((((n + hue * 6) % 6).minimum(4 - (n + hue * 6) % 6)).clamp(0, 1)) for n in (5, 3, 1)]
    return torch.stack(channels, dim=-3)


def cutmix(images: torch.Tensor, partners: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Pastes one random box (area about 1 - lam, clipped at the border) of `partners` into `images` (every frame);
    returns the images and the kept area fraction, the label weight."""
    height, width = images.shape[-2:]
    cut = (1 - lam) ** 0.5
    cut_h, cut_w = int(height * cut), int(width * cut)
    center_y, center_x = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(center_y - cut_h // 2, 0), min(center_y + cut_h // 2, height)
    left, right = max(center_x - cut_w // 2, 0), min(center_x + cut_w // 2, width)
    images = images.clone()
    images[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
    return images, 1 - (bottom - top) * (right - left) / (height * width)
