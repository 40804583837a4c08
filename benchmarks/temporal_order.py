"""The STAN paper's central claim in miniature: temporal order is learnable with the branch, not without it.

Task: a square moving left to right (label 0) or the very same clip played backwards (label 1). Both classes hold
exactly the same frames, only their order differs; colour, size, vertical position, speed and start position are
random, so no single frame tells the label. Three tiny random-initialised `StanForVideoClassification` models are
trained from scratch with identical seeds, data, batches and steps:

- STAN-self (`temporal_module="attention"`), STAN-conv (`temporal_module="conv"`), and
- the `stan_depth=0` baseline, which averages per-frame embeddings: order-blind by construction. Every held-out clip
  comes with its reverse, and the baseline gives both the same logits (up to float rounding of the frame mean), so
  exactly one of the two is right: it scores 50%, give or take a near-tie.

Whole run: about 1-2 minutes on 2 CPU cores. The CI test (tests/test_temporal_order.py) runs it with 600 steps.

Usage (from the repository root): `python -m benchmarks.temporal_order [--steps 1000] [--seed 0]`
"""

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from modeling_stan import StanForVideoClassification
from modeling_stan.demo.synthetic_videos import COLOURS, render_clip

from ._common import Backbone, build_random_model, markdown_table, torch_threads


# A one-layer ViT of width 32 on 32 px frames of 16 px patches (a 2 x 2 grid), with a one-layer STAN branch. From
# random weights the order signal starts tiny (a clip and its reverse get almost the same embedding) and the loss
# sits at ln 2 until it grows: 150-500 steps here (seed-dependent), several times more with deeper towers or finer
# patches.
TINY_BACKBONE = Backbone(
    "tiny ViT",
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    patch_size=16,
    num_hidden_layers=1,
    image_size=32,
)
MODELS = {
    "STAN-self": {"stan_depth": 1, "temporal_module": "attention"},
    "STAN-conv": {"stan_depth": 1, "temporal_module": "conv"},
    "CLIP mean pooling (K=0)": {"stan_depth": 0},
}
LABELS = {0: "forward (left to right)", 1: "reversed (right to left)"}


def render_pairs(num_pairs: int, num_frames: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """`(2 * num_pairs, T, 3, size, size)` clips scaled to [-1, 1]: each forward clip followed by its reverse.

    Each forward clip is a random window of `num_frames` consecutive frames from a left-to-right pass of
    `num_frames` to 2 x `num_frames` frames, so both the speed and the start position vary.
    """
    clips = []
    for _ in range(num_pairs):
        pass_length = int(rng.integers(num_frames, 2 * num_frames + 1))
        start = int(rng.integers(0, pass_length - num_frames + 1))
        full_pass = render_clip(
            "square",
            str(rng.choice(list(COLOURS))),
            "left_to_right",
            num_frames=pass_length,
            size=size,
            radius=float(rng.uniform(0.1, 0.2)) * size,
            offset=float(rng.uniform(0.0, 1.0)),
        )
        forward = full_pass[start : start + num_frames]
        clips += [forward, forward[::-1]]
    frames = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3)
    return frames.float() / 127.5 - 1.0


def pair_labels(num_pairs: int) -> torch.Tensor:
    return torch.tensor([0, 1]).repeat(num_pairs)


@dataclass(frozen=True)
class RunResult:
    name: str
    accuracy: float
    final_loss: float
    train_seconds: float


def build_model(stan_kwargs: dict, num_frames: int, seed: int) -> StanForVideoClassification:
    config = TINY_BACKBONE.stan_config(
        num_frames=num_frames, drop_path_rate=0.0, num_labels=len(LABELS), id2label=dict(LABELS), **stan_kwargs
    )
    return build_random_model(StanForVideoClassification, config, seed)


def train(model, videos: torch.Tensor, labels: torch.Tensor, args) -> float:
    """AdamW with a cosine learning-rate decay on random batches of whole (clip, reverse) pairs; returns the mean
    loss of the last 10 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    num_pairs = len(videos) // 2
    model.train()
    losses = []
    for _ in range(args.steps):
        pairs = torch.randint(num_pairs, (args.batch_size // 2,), generator=generator)
        index = torch.stack([2 * pairs, 2 * pairs + 1], dim=1).flatten()
        loss = model(pixel_values=videos[index], labels=labels[index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return float(np.mean(losses[-10:]))


@torch.no_grad()
def accuracy(model, videos: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    predictions = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in videos.split(batch_size)])
    return (predictions == labels).float().mean().item()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16, help="clips per step (whole pairs)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--train_pairs", type=int, default=1024)
    parser.add_argument("--test_pairs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op CPU threads; the tiny model's ops are too small to gain from more, and spare cores keep "
        "timings steady when the machine is shared",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.batch_size % 2:
        parser.error(f"--batch_size must be an even number >= 2 (whole pairs), got {args.batch_size}.")
    return args


def main(argv: list[str] | None = None) -> dict[str, RunResult]:
    args = parse_args(argv)
    start = time.perf_counter()
    # Disjoint random streams: no held-out clip is a training clip.
    train_rng, test_rng = (np.random.default_rng([args.seed, split]) for split in range(2))
    size = TINY_BACKBONE.image_size
    train_videos = render_pairs(args.train_pairs, args.num_frames, size, train_rng)
    test_videos = render_pairs(args.test_pairs, args.num_frames, size, test_rng)
    train_labels, test_labels = pair_labels(args.train_pairs), pair_labels(args.test_pairs)

    results = {}
    with torch_threads(args.threads):
        for name, stan_kwargs in MODELS.items():
            model = build_model(stan_kwargs, args.num_frames, args.seed)
            tic = time.perf_counter()
            final_loss = train(model, train_videos, train_labels, args)
            train_seconds = time.perf_counter() - tic
            results[name] = RunResult(name, accuracy(model, test_videos, test_labels), final_loss, train_seconds)

    print(
        f"{TINY_BACKBONE.name} ({TINY_BACKBONE.num_hidden_layers} layers, width {TINY_BACKBONE.hidden_size}, "
        f"{size} px, patch {TINY_BACKBONE.patch_size}), {args.num_frames} frames, random init; "
        f"{args.steps} AdamW steps of {args.batch_size} clips, lr {args.lr} with cosine decay, "
        f"{args.threads} CPU thread(s); "
        f"{2 * args.train_pairs} training clips, {2 * args.test_pairs} held-out clips (each with its reverse); "
        "chance = 50%.\n"
    )
    rows = [[r.name, f"{r.accuracy:.1%}", f"{r.final_loss:.3f}", f"{r.train_seconds:.1f}"] for r in results.values()]
    print(markdown_table(["model", "held-out accuracy", "train loss (last 10 steps)", "train time (s)"], rows))
    print(f"\nwhole run: {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
