"""Zero-shot to held-out class names: ViFi-CLIP's text-encoder-in-the-loop head vs a frozen class matrix.

Task: clips of one coloured shape (6 colours x 3 shapes = 18 classes named "<colour> <shape>", e.g. "red square";
random direction, size and position). Twelve classes are base classes, used for training; the six others are held
out (novel) and chosen so that every colour and every shape also occurs in some base class: a head that learns what
the *words* look like can name a novel combination it never saw. Two tiny `StanForVideoClassification` models
(`stan_depth=0`, i.e. ViFi-CLIP) start from the same seeded random tiny CLIP, with the same data, batches, steps
and a fixed logit scale (ours: 20, so that only the class embeddings differ):

- text encoder in the loop (`classifier_type="text_encoder"`, everything trains): ViFi-CLIP's full fine-tuning;
- frozen class matrix: the same head with the text tower frozen (`set_trainable_parts(model, "vision")`), so the
  class embeddings are the fixed text embeddings of the class prompts, as with the STAN authors' cached head.

Both are then scored on held-out clips of the base classes and, after `set_class_names(novel)`, of the novel
classes (chance: 1/12 and 1/6).

Usage (from the repository root): `python -m benchmarks.vifi_novel_classes [--steps 600] [--lr 3e-4] [--seed 0]`
"""

import argparse
import itertools
import tempfile
import time

import numpy as np
import torch
from transformers import AutoTokenizer, CLIPConfig

from modeling_stan import StanForVideoClassification
from modeling_stan.demo.synthetic_videos import COLOURS, DIRECTIONS, SHAPES, render_clip
from modeling_stan.demo.tiny_clip import save_tiny_clip
from modeling_stan.tuning.prompts import set_trainable_parts

from ._common import markdown_table, torch_threads


CLASSES = [f"{colour} {shape}" for colour, shape in itertools.product(COLOURS, SHAPES)]
# One held-out shape per colour, each shape held out twice: every word of a novel name occurs in base names.
NOVEL = ["red circle", "green triangle", "blue square", "yellow circle", "purple triangle", "orange square"]
BASE = [name for name in CLASSES if name not in NOVEL]
VARIANTS = {"text encoder in the loop (ViFi-CLIP)": "all", "frozen class matrix": "vision"}
TEMPLATE = "a {}."
LOGIT_SCALE = 20.0  # ours, the same for both variants
TINY_CLIP = {"vision_config": {"num_hidden_layers": 2}}


def render(names: list[str], per_class: int, num_frames: int, size: int, rng: np.random.Generator):
    """`(len(names) * per_class, T, 3, size, size)` clips in [-1, 1] and their labels (index in `names`)."""
    clips, labels = [], []
    for label, name in enumerate(names):
        colour, shape = name.split()
        for _ in range(per_class):
            clips.append(
                render_clip(
                    shape,
                    colour,
                    str(rng.choice(DIRECTIONS)),
                    num_frames=num_frames,
                    size=size,
                    radius=float(rng.uniform(0.15, 0.3)) * size,
                    offset=float(rng.uniform(0, 1)),
                )
            )
            labels.append(label)
    frames = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
    return frames, torch.tensor(labels)


def train(model, videos, labels, args) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses = []
    for _ in range(args.steps):
        index = torch.randint(len(videos), (args.batch_size,), generator=generator)
        loss = model(pixel_values=videos[index], labels=labels[index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses[-10:]))


@torch.no_grad()
def accuracy(model, videos, labels) -> float:
    model.eval()
    predictions = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in videos.split(64)])
    return (predictions == labels).float().mean().item()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--num_frames", type=int, default=2)
    parser.add_argument("--train_per_class", type=int, default=16)
    parser.add_argument("--test_per_class", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    start = time.perf_counter()
    train_rng, test_rng = (np.random.default_rng([args.seed, split]) for split in range(2))
    with tempfile.TemporaryDirectory() as clip_dir, torch_threads(args.threads):
        save_tiny_clip(clip_dir, seed=args.seed, **TINY_CLIP)
        tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        size = CLIPConfig.from_pretrained(clip_dir).vision_config.image_size
        train_videos, train_labels = render(BASE, args.train_per_class, args.num_frames, size, train_rng)
        base_videos, base_labels = render(BASE, args.test_per_class, args.num_frames, size, test_rng)
        novel_videos, novel_labels = render(NOVEL, args.test_per_class, args.num_frames, size, test_rng)
        results = {}
        for name, parts in VARIANTS.items():
            torch.manual_seed(args.seed)
            model = StanForVideoClassification.from_clip_pretrained(
                clip_dir,
                classifier_type="text_encoder",
                class_names=BASE,
                hypothesis_template=TEMPLATE,
                stan_depth=0,
                fixed_logit_scale=LOGIT_SCALE,
                num_frames=args.num_frames,
            )
            set_trainable_parts(model, parts)
            untrained_novel = _novel_accuracy(model, tokenizer, novel_videos, novel_labels)
            final_loss = train(model, train_videos, train_labels, args)
            results[name] = {
                "base": accuracy(model, base_videos, base_labels),
                "novel": _novel_accuracy(model, tokenizer, novel_videos, novel_labels),
                "novel_untrained": untrained_novel,
                "final_loss": final_loss,
            }
    print(
        f"tiny random CLIP (2 vision layers, {size} px), stan_depth=0, {args.num_frames} frames; {args.steps} AdamW "
        f"steps of {args.batch_size} clips at lr {args.lr}; {len(BASE)} base classes x {args.train_per_class} "
        f"training clips; held out: {args.test_per_class} clips per class; seed {args.seed}.\n"
    )
    rows = [
        [name, f"{r['base']:.1%}", f"{r['novel']:.1%}", f"{r['novel_untrained']:.1%}", f"{r['final_loss']:.3f}"]
        for name, r in results.items()
    ]
    print(
        markdown_table(
            [
                "head",
                f"base accuracy (chance {1 / len(BASE):.1%})",
                f"novel accuracy (chance {1 / len(NOVEL):.1%})",
                "novel before training",
                "train loss (last 10 steps)",
            ],
            rows,
        )
    )
    print(f"\nwhole run: {time.perf_counter() - start:.1f} s")
    return results


def _novel_accuracy(model, tokenizer, videos, labels) -> float:
    model.set_class_names(NOVEL, tokenizer)
    try:
        return accuracy(model, videos, labels)
    finally:
        model.set_class_names(BASE, tokenizer)


if __name__ == "__main__":
    main()
