"""Optimisation: the AdamW parameter groups, the optimizer, the step counts and the learning-rate schedule.

Three weight-decay rules (`--no_decay`) and three learning-rate curves (`--lr_scheduler_type`) reproduce the authors'
runs: ViFi-CLIP's (timm 0.4.12 `CosineLRScheduler`, AdamW decaying every parameter) and STAN / Mug-STAN's (mmengine
`LinearLR` then `CosineAnnealingLR`, norms and biases exempt from decay), besides ours (transformers' schedulers,
vectors and embedding tables exempt). Every curve is a `LambdaLR`, so a resumed run continues it from the saved
state. tests/fixtures/lr_curves.json holds the authors' curves, made by running timm and mmengine
(tests/fixtures/make_lr_curves.py).
"""

import functools
import math

import torch
from stan_arguments import TrainingArguments
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler


# `--lr_scheduler_type` values besides transformers' schedulers.
AUTHORS_SCHEDULERS = ("timm_cosine", "mmengine_linear_cosine")


def parameter_groups(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    stan_lr_multiplier: float,
    no_decay: str = "vectors_and_embeddings",
) -> list[dict]:
    """AdamW parameter groups: the STAN branch (parameter names containing `.stan.`) learns `stan_lr_multiplier` times
    faster, being new where the rest is pre-trained; frozen parameters are left out. `no_decay` names the parameters
    exempt from weight decay:

    - `"vectors_and_embeddings"` (ours): vectors and scalars (biases, norm weights, CLIP's class embedding, the logit
      scale) and embedding tables;
    - `"norms_and_biases"` (STAN / Mug-STAN, mmengine `paramwise_cfg` with `norm_decay_mult=0, bias_decay_mult=0` and
      the custom key `STAN`): the parameters of norm layers and the `bias` of other layers, outside the STAN branch,
      whose custom key sets its decay to the full rate;
    - `"none"` (ViFi-CLIP, `utils/optimizer.py`: AdamW over `model.parameters()` with one weight decay): nothing.
    """
    if no_decay not in NO_DECAY_RULES:
        raise ValueError(f"no_decay must be one of {list(NO_DECAY_RULES)}, got {no_decay!r}.")
    exempt = NO_DECAY_RULES[no_decay](model)
    groups: dict[tuple[bool, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        stan = ".stan." in f".{name}"
        decay = name not in exempt
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


def _vectors_and_embeddings(model: nn.Module) -> set[str]:
    tables = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    return {name for name, p in model.named_parameters() if p.ndim < 2 or id(p) in tables}


def _norms_and_biases(model: nn.Module) -> set[str]:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    exempt = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if ".stan." in f".{prefix}":
            continue  # mmengine's custom key `STAN` (lr_mult 10) gives the branch the full decay
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, norms) or name == "bias":
                exempt.add(prefix + name)
    return exempt


NO_DECAY_RULES = {
    "vectors_and_embeddings": _vectors_and_embeddings,
    "norms_and_biases": _norms_and_biases,
    "none": lambda model: set(),
}


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    groups = parameter_groups(
        model,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        stan_lr_multiplier=args.stan_lr_multiplier,
        no_decay=args.no_decay,
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


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, train_loader: DataLoader):
    """The learning-rate schedule, stepped once per optimizer step (not per process).

    `timm_cosine` and `mmengine_linear_cosine` count epochs in the batches of `train_loader` as the authors do;
    transformers' schedulers warm up linearly from 0 then decay over the run.
    """
    if args.lr_scheduler_type in AUTHORS_SCHEDULERS:
        factor = lr_factor_function(args, batches_per_epoch=len(train_loader))
        steps_per_epoch(train_loader, args)  # a clear error when the split is too small
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    total_steps = total_training_steps(train_loader, args)
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    if args.warmup_epochs is not None:
        warmup = int(args.warmup_epochs * steps_per_epoch(train_loader, args))
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def lr_factor_function(args: TrainingArguments, batches_per_epoch: int):
    """The authors' learning rate at each optimizer step, as a fraction of `learning_rate` (a `LambdaLR` factor).

    `batches_per_epoch` is the length of the per-process training loader (micro-batches).
    """
    cosine_epochs = args.lr_cosine_epochs
    if args.lr_scheduler_type == "timm_cosine":
        return functools.partial(
            timm_cosine_factor,
            batches_per_epoch=batches_per_epoch,
            accumulation=args.gradient_accumulation_steps,
            cycle_batches=int((cosine_epochs or args.num_train_epochs) * batches_per_epoch),
            warmup_batches=int(args.warmup_epochs * batches_per_epoch),
            start_factor=args.lr_warmup_start_factor,
            min_factor=args.lr_min_ratio,
        )
    steps = batches_per_epoch // args.gradient_accumulation_steps  # mmengine counts optimizer steps (iterations)
    warmup_end = int(args.warmup_epochs * steps)
    if warmup_end == 1:
        raise ValueError(
            f"--warmup_epochs {args.warmup_epochs} is a single step of {steps} per epoch: mmengine's LinearLR needs "
            "2 or more (or 0 for none)."
        )
    return functools.partial(
        mmengine_linear_cosine_factor,
        warmup_end=warmup_end,
        cosine_end=int(args.num_train_epochs * steps),
        cosine_period=(cosine_epochs or args.num_train_epochs - args.warmup_epochs) * steps,
        start_factor=args.lr_warmup_start_factor,
        min_factor=args.lr_min_ratio,
    )


def timm_cosine_factor(
    step: int,
    *,
    batches_per_epoch: int,
    accumulation: int,
    cycle_batches: int,
    warmup_batches: int,
    start_factor: float,
    min_factor: float,
) -> float:
    """ViFi-CLIP's learning rate (`utils/optimizer.py`, `main.py`) at optimizer step `step`, as a factor.

    timm 0.4.12 `CosineLRScheduler(t_initial=cycle_batches, lr_min=LR * min_factor, warmup_t=warmup_batches,
    warmup_lr_init=LR * start_factor, cycle_limit=1, t_in_epochs=False)`, counted in micro-batches: `main.py` calls
    `step_update(epoch * batches_per_epoch + idx)` after the optimizer step that ends at micro-batch `idx`, so a step
    uses the value set after the step before it (the first, the scheduler's initial value). Without `warmup_prefix`
    the cosine runs on the absolute count: the warm-up ends on an already decayed value.
    """
    if step == 0:
        return start_factor if warmup_batches > 0 else 1.0
    steps_per_epoch = batches_per_epoch // accumulation
    epoch, index = divmod(step - 1, steps_per_epoch)
    t = epoch * batches_per_epoch + (index + 1) * accumulation - 1
    if t < warmup_batches:
        return start_factor + t * (1.0 - start_factor) / warmup_batches
    if t >= cycle_batches:
        return min_factor
    return min_factor + 0.5 * (1.0 - min_factor) * (1.0 + math.cos(math.pi * t / cycle_batches))


def mmengine_linear_cosine_factor(
    step: int, *, warmup_end: int, cosine_end: int, cosine_period: float, start_factor: float, min_factor: float
) -> float:
    """STAN / Mug-STAN's learning rate (`configs/exp/stan/*_pretrain.py`) at optimizer step `step`, as a factor.

    mmengine `LinearLR(start_factor, begin=0, end=warmup_end)` then `CosineAnnealingLR(T_max=cosine_period,
    eta_min=LR * min_factor, begin=warmup_end, end=cosine_end)`, both converted from epochs to iterations
    (`convert_to_iter_based`) and stepped after every iteration. LinearLR reaches the full rate on its last step,
    `warmup_end - 1`; the cosine starts from it; after `cosine_end` the rate stays where the cosine left it.
    """
    if step < warmup_end:
        return start_factor + (1.0 - start_factor) * step / (warmup_end - 1)
    k = min(step, max(cosine_end - 1, warmup_end)) - warmup_end
    cosine = math.cos(math.pi * k / cosine_period) if k else 1.0  # k = 0 also when no cosine phase follows
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + cosine)
