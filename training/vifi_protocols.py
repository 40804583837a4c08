"""ViFi-CLIP's evaluation protocols on top of `run_classification.py`: few-shot training sets, base-to-novel and
zero-shot evaluation on other class sets (class-name prompts through the text tower), their summary numbers.

The protocols (Rasheed et al., "Fine-tuned CLIP Models are Efficient Video Learners", CVPR 2023; their configs in
muzairkhattak/ViFi-CLIP `configs/`):
- zero-shot: train on Kinetics-400, evaluate on UCF101 and HMDB51 (3 official test splits each) and on the 3
  Kinetics-600 splits of 160 classes not in Kinetics-400; report the mean over the splits and its std;
- base-to-novel: train on the base half of the classes with K=16 shots per class (3 seeds = 3 split files), report
  accuracy on base and novel classes and their harmonic mean;
- few-shot: K = 2, 4, 8, 16 videos per class;
- fully supervised: the full training set, multi-view testing.
"""

import math
from collections.abc import Sequence

import datasets
import numpy as np
import torch


def few_shot_rows(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """Row indices holding exactly `shots` rows of every class, drawn without replacement; a function of `seed`
    (the same seed gives the same rows, whatever the platform), listed in row order."""
    if shots < 1:
        raise ValueError(f"The number of shots must be >= 1, got {shots}.")
    rows_of: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        rows_of.setdefault(int(label), []).append(row)
    short = {label: len(rows) for label, rows in rows_of.items() if len(rows) < shots}
    if short:
        raise ValueError(
            f"{shots}-shot sampling needs {shots} videos of every class; these classes have fewer "
            f"(label: count): {dict(sorted(short.items()))}"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in sorted(rows_of):
        rows = rows_of[label]
        chosen.extend(rows[i] for i in torch.randperm(len(rows), generator=generator)[:shots].tolist())
    return sorted(chosen)


def few_shot_subset(rows: datasets.Dataset, shots: int, seed: int) -> datasets.Dataset:
    return rows.select(few_shot_rows(rows["label"], shots, seed))


def harmonic_mean(base: float, novel: float) -> float:
    """The base-to-novel summary: 2 * base * novel / (base + novel), 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def summarize_splits(per_split: dict[str, dict[str, float]], metric: str = "top1") -> dict[str, float]:
    """Mean and (population, ddof=0) standard deviation of `metric` over the evaluated splits."""
    values = np.array([metrics[metric] for metrics in per_split.values()], dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"Cannot summarise {metric} over the splits {list(per_split)}: got {values.tolist()}.")
    return {f"{metric}_mean": float(values.mean()), f"{metric}_std": float(values.std())}


def base_to_novel_summary(base: dict[str, float], novel: dict[str, float], metric: str = "top1") -> dict[str, float]:
    summary = {
        "base": base[metric],
        "novel": novel[metric],
        "harmonic_mean": harmonic_mean(base[metric], novel[metric]),
    }
    if not all(math.isfinite(value) for value in summary.values()):
        raise ValueError(f"Base-to-novel accuracies must be finite, got {summary}.")
    return summary
