"""Mean learning rate of a run, ours against the authors': the curves of tests/fixtures/lr_curves.json (made with
timm 0.4.12 and mmengine from the authors' code) against transformers' cosine with linear warm-up from 0 at the
warm-up ratio the recipes used before they took the authors' schedulers (`--lr_scheduler_type cosine`, still an
option). Deterministic arithmetic: no timing, no machine dependence.

    python -m benchmarks.recipe_lr_curves
"""

import json
import math
from pathlib import Path

import torch
from transformers import get_scheduler


FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lr_curves.json"
# The recipes' former warm-up ratios, by the first name part that matches (ViFi-CLIP: WARMUP_EPOCHS 5 of EPOCHS;
# STAN: the LinearLR epochs of the run).
FORMER_WARMUP_RATIO = (
    ("zero_shot", 5 / 10),
    ("base2novel", 5 / 11),
    ("few_shot", 5 / 50),
    ("vifi_k400", 5 / 30),
    ("pretrain", 0.125),
    ("mugstan_msrvtt", 0.1),
    ("stan_msrvtt", 1.0),
    ("lsmdc", 0.1),
    ("didemo", 0.2),
)


def transformers_cosine(learning_rate: float, steps: int, warmup_ratio: float) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = get_scheduler("cosine", optimizer, math.ceil(warmup_ratio * steps), steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def main() -> None:
    print("| recipe | batches per epoch | steps | mean LR, transformers cosine / authors' | authors' last LR / LR |")
    print("|---|---|---|---|---|")
    for case in json.loads(FIXTURE.read_text())["cases"]:
        ratio = next(ratio for part, ratio in FORMER_WARMUP_RATIO if part in case["recipe"])
        theirs = case["lrs"]
        ours = transformers_cosine(case["learning_rate"], len(theirs), ratio)
        print(
            f"| {case['recipe']} | {case['batches_per_epoch']} | {len(theirs)} | {sum(ours) / sum(theirs):.3f} "
            f"| {theirs[-1] / case['learning_rate']:.4f} |"
        )


if __name__ == "__main__":
    main()
