"""Optimisation: the AdamW parameter groups, the optimizer, the step counts and the learning-rate schedule."""

import math

import torch
from stan_arguments import TrainingArguments
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler


def parameter_groups(
    model: nn.Module, *, learning_rate: float, weight_decay: float, stan_lr_multiplier: float
) -> list[dict]:
    """AdamW parameter groups of the authors' recipe.

    No weight decay on vectors and scalars (biases, norm weights, CLIP's class embedding, the logit scale) nor on
    embedding tables; the STAN branch (parameter names containing `.stan.`) learns `stan_lr_multiplier` times
    faster, being new where the rest is pre-trained. Frozen parameters are left out.
    """
    embedding_tables = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    groups: dict[tuple[bool, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = parameter.ndim >= 2 and id(parameter) not in embedding_tables
        stan = ".stan." in f".{name}"
        group = groups.setdefault(
            (decay, stan),
            {
                "name": f"{'stan' if stan else 'clip'}_{'decay' if decay else 'no_decay'}",
                "params": [],
                "lr": learning_rate * (stan_lr_multiplier if stan else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(parameter)
    return list(groups.values())


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    groups = parameter_groups(
        model,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        stan_lr_multiplier=args.stan_lr_multiplier,
    )
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def steps_per_epoch(train_loader: DataLoader, args: TrainingArguments) -> int:
    """Optimizer steps in one epoch of the (prepared, per-process) training loader."""
    steps = len(train_loader) // args.gradient_accumulation_steps
    if steps < 1:
        raise ValueError(
            f"The training split is too small for one optimizer step of per_device_train_batch_size="
            f"{args.per_device_train_batch_size} x gradient_accumulation_steps={args.gradient_accumulation_steps} "
            "x the number of processes."
        )
    return steps


def total_training_steps(train_loader: DataLoader, args: TrainingArguments) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * steps_per_epoch(train_loader, args))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int):
    """Linear warm-up then `lr_scheduler_type` decay, stepped once per optimizer step (not per process)."""
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
