"""What `run_retrieval.py` and `run_classification.py` share: arguments and config files, the default tiny model and
synthetic data, resumable data loading, the optimiser recipe, the differentiable all-gather, the training loop with
atomic checkpoints, and the final export.

Both scripts are launched as `accelerate launch training/run_*.py`, which puts this folder on `sys.path`.
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser, get_scheduler

from modeling_stan import StanConfig, StanModel
from modeling_stan.model_card import write_training_model_card
from modeling_stan.pipeline_zero_shot_video_classification import save_for_hub
from modeling_stan.processing_stan import StanProcessor
from modeling_stan.synthetic_videos import generate_synthetic_dataset
from modeling_stan.testing_utils import save_tiny_clip
from modeling_stan.video_datasets import CorruptSampleCounter, SkipCorruptCollator, make_decode_transform
from modeling_stan.vifi_prompts import PROMPT_CONFIG_FIELDS
from modeling_stan.video_processing_stan import StanVideoProcessor
from stan_checkpointing import CheckpointManager


logger = get_logger(__name__)

SPLITS = ("train", "validation", "test")
# The default model of the no-argument demos: the offline tiny CLIP of `modeling_stan.testing_utils`, with two vision
# layers instead of six (faster) and a 5x larger initialisation scale: a random CLIP starts this task on a long
# plateau (constant predictions), which larger initial weights shorten.
DEMO_CLIP_OVERRIDES = {"vision_config": {"num_hidden_layers": 2}, "initializer_factor": 5.0}
SYNTHETIC_DATASET_NAME = "synthetic moving shapes"


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "CLIP checkpoint (Hub id or folder) to build STAN around, or a STAN checkpoint (post-pretrained, "
                          "converted or fine-tuned) to start from, whose STAN fields are then used. Default: a tiny random "
                          "CLIP built offline into OUTPUT_DIR/tiny_clip (for the synthetic demo and tests)."},
    )
    stan_depth: int = field(default=4, metadata={"help": "STAN layers K (0: the plain CLIP mean-pooling baseline)."})
    temporal_module: str = field(default="attention", metadata={"help": "'attention' (STAN-self) or 'conv'."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the last STAN layer."})
    fixed_logit_scale: float | None = field(
        default=None, metadata={"help": "Fixed logit scale 1/tau (100 for B/32, 50 for B/16); default: learnable."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})

    def stan_config_fields(self) -> dict:
        """The `StanConfig` fields these arguments set (StanConfig validates them)."""
        return {
            "stan_depth": self.stan_depth,
            "temporal_module": self.temporal_module,
            "drop_path_rate": self.drop_path_rate,
            "fixed_logit_scale": self.fixed_logit_scale,
        }


@dataclass
class DataArguments:
    dataset: str = field(default="synthetic", metadata={"help": "Dataset format; 'synthetic' generates the demo set."})
    video_dir: str | None = field(default=None, metadata={"help": "Folder of the videos."})
    annotation_file: str | None = field(
        default=None, metadata={"help": "Annotation file used for every split that has no file of its own below."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Annotation file of the training split."})
    validation_file: str | None = field(default=None, metadata={"help": "Annotation file of the validation split."})
    test_file: str | None = field(default=None, metadata={"help": "Annotation file of the test split."})
    video_ext: str | None = field(default=None, metadata={"help": "Video file extension, if not the format's."})
    validation_split_percentage: int | None = field(
        default=None,
        metadata={"help": "Hold out this percentage of the training rows for validation (datasets without one)."},
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Where the synthetic dataset is generated (default OUTPUT_DIR/synthetic_data)."}
    )
    synthetic_num_train: int = 160
    synthetic_num_val: int = 40
    synthetic_num_test: int = 40
    num_frames: int = field(default=8, metadata={"help": "Frames per clip."})
    sampling: str = field(default="uniform", metadata={"help": "Frame sampling: 'uniform' (STAN's) or 'dense'."})
    random_resized_crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "Area range of the training random resized crop."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many rows per eval split."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Decoding worker processes per process."})

    def annotation_for(self, split: str) -> str | None:
        return getattr(self, f"{split}_file") or self.annotation_file

    def video_options(self, video_processor) -> dict:
        """The `DecodedVideoDataset` options these arguments set."""
        return {"video_processor": video_processor, "num_frames": self.num_frames, "sampling": self.sampling,
                "random_resized_crop_scale": self.random_resized_crop_scale}


@dataclass
class TrainingArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and the final model go."})
    do_train: bool = field(
        default=True,
        metadata={"help": "False: only evaluate the model as given (e.g. zero-shot) on the validation and test splits."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the checkpoints of an earlier run in OUTPUT_DIR instead of failing."}
    )
    seed: int = 42
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-6
    stan_lr_multiplier: float = field(
        default=10.0, metadata={"help": "Learning-rate multiplier of the STAN branch ('.stan.' parameters)."}
    )
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_train_epochs: float = 10.0
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to train; > 0 overrides num_train_epochs."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers scheduler name."})
    warmup_ratio: float = 0.1
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps; > 0 overrides warmup_ratio."})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "'no', 'fp16' or 'bf16'; default: what `accelerate launch` was given."}
    )
    eval_strategy: str = field(default="epoch", metadata={"help": "Validate every 'epoch', every 'steps' or 'no'."})
    eval_steps: int | None = None
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every 'epoch', every 'steps' or 'no'."})
    save_steps: int | None = None
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept, besides the best one."})
    metric_for_best_model: str | None = field(default=None, metadata={"help": "Validation metric for the best model."})
    greater_is_better: bool = field(default=True, metadata={"help": "False for ranks (MdR, MnR)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (newest checkpoint in OUTPUT_DIR, if any) or a checkpoint folder."}
    )
    logging_steps: int = 10
    report_to: str = field(default="none", metadata={"help": "Accelerate tracker: 'none', 'tensorboard', 'wandb'..."})
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many consecutive steps with a NaN/inf loss or gradient."}
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    debug_dump_dir: str | None = field(
        default=None, metadata={"help": "Testing: each process appends its per-step loss and final weight hash here."}
    )
    debug_nonfinite_steps: list[int] = field(
        default_factory=list, metadata={"help": "Testing: make the loss NaN at these optimizer steps (1-based)."}
    )
    debug_checkpoint_write_delay: float = field(
        default=0.0, metadata={"help": "Testing: seconds to pause after each checkpoint file is written."}
    )

    def __post_init__(self):
        _check_choice("eval_strategy", self.eval_strategy, ("epoch", "steps", "no"))
        _check_choice("save_strategy", self.save_strategy, ("epoch", "steps", "no"))
        _check_choice("mixed_precision", self.mixed_precision, (None, "no", "fp16", "bf16"))
        for strategy in ("eval", "save"):
            if getattr(self, f"{strategy}_strategy") == "steps" and not (getattr(self, f"{strategy}_steps") or 0) > 0:
                raise ValueError(f"--{strategy}_strategy steps needs --{strategy}_steps > 0.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_nonfinite_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"--{name} must be one of {[a for a in allowed if a is not None]}, got {value!r}.")


def parse_arguments(dataclass_types: Sequence[type], defaults: dict | None = None, argv: Sequence[str] | None = None):
    """Parses the command line into `dataclass_types`.

    Precedence, lowest first: the dataclass defaults, the script's `defaults`, the `--config FILE` (YAML or JSON,
    keys are the flag names without `--`), then the flags themselves.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config")
    known, remaining = config_parser.parse_known_args(argv)
    parser = HfArgumentParser(
        dataclass_types,
        epilog="--config FILE: a YAML or JSON file of options (flag names without '--'); flags override it.",
    )
    merged = dict(defaults or {})
    if known.config:
        merged.update(_config_file_values(parser, known.config))
    parser.set_defaults(**merged)
    return parser.parse_args_into_dataclasses(args=remaining)


def parse_script_arguments(dataclass_types: Sequence[type], recipe_defaults: dict, demo_defaults: dict,
                           argv: Sequence[str] | None = None):
    """`parse_arguments` with a script's defaults: `recipe_defaults` always, `demo_defaults` on top of them when no
    `--model_name_or_path` is given (the tiny random CLIP learns from scratch and needs other settings than the
    fine-tuning of a pre-trained CLIP). The config file and the flags override both."""
    parsed = parse_arguments(dataclass_types, recipe_defaults, argv)
    if parsed[0].model_name_or_path is None:
        parsed = parse_arguments(dataclass_types, {**recipe_defaults, **demo_defaults}, argv)
    return parsed


def explicit_options(argv: Sequence[str] | None = None) -> set[str]:
    """Names of the options the user set, on the command line or in its `--config` file (not the defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # HfArgumentParser also accepts --do-train for --do_train.
    names = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config")
    config = config_parser.parse_known_args(argv)[0].config
    return names | set(_read_config_file(config)) if config else names


def _read_config_file(path: str) -> dict:
    """The mapping of option names to values in a YAML or JSON config file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file.")
    with open(path, encoding="utf-8") as file:
        values = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}.")
    return values


def _config_file_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """The options of a config file, converted and checked as the same flags on the command line would be."""
    values = _read_config_file(path)
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; the keys are the script's flags without '--' (see --help).")
    return {name: _convert_option(actions[name], value, path) for name, value in values.items()}


def _convert_option(action: argparse.Action, value, path: str):
    # YAML reads "1e-5" as a string and flags arrive as strings: both go through the flag's own type.
    if value is None or action.type is None:
        return value
    try:
        converted = [action.type(str(v)) for v in value] if isinstance(value, list) else action.type(str(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: option {action.dest!r}: cannot read {value!r} ({error}).") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{path}: option {action.dest!r} must be one of {list(action.choices)}, got {value!r}.")
    return converted


def arguments_dict(*arguments) -> dict:
    """All parsed arguments as one flat dict (for trackers, the model card and the metrics file)."""
    return {key: value for args in arguments for key, value in dataclasses.asdict(args).items()}


# ----------------------------------------------------------------------------------------------------------------
# Setup: accelerator, output folder, default tiny model and synthetic data
# ----------------------------------------------------------------------------------------------------------------


def setup_run(training_args: TrainingArguments) -> Accelerator:
    """The run's `Accelerator`, with logging configured, once the output folder is checked."""
    output_dir = Path(training_args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        mixed_precision=training_args.mixed_precision,
        log_with=None if training_args.report_to == "none" else training_args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
    )
    _configure_logging(accelerator)
    _check_output_dir(accelerator, training_args)
    return accelerator


def _configure_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _check_output_dir(accelerator: Accelerator, args: TrainingArguments) -> None:
    checkpoints = Path(args.output_dir) / "checkpoints"
    if args.resume_from_checkpoint or not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        return
    if not args.overwrite_output_dir:
        raise FileExistsError(
            f"{checkpoints} holds checkpoints of an earlier run: pass --resume_from_checkpoint latest to continue "
            "it, --overwrite_output_dir to start afresh, or another --output_dir."
        )
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            shutil.rmtree(checkpoints)


def prepare_once(accelerator: Accelerator, target: Path, build: Callable[[Path], Any]) -> Path:
    """Runs `build(folder)` once, on the main process, unless `target` exists; the other processes wait.

    The folder is built under a temporary name and renamed when complete, so an interrupted build is redone rather
    than reused.
    """
    with accelerator.main_process_first():
        if accelerator.is_main_process and not target.exists():
            temporary = target.with_name(f".tmp-{target.name}")
            shutil.rmtree(temporary, ignore_errors=True)
            build(temporary)
            os.replace(temporary, target)
    return target


def synthetic_dataset_root(accelerator: Accelerator, data_args: DataArguments, output_dir: Path,
                           seed: int) -> Path | None:
    """For `--dataset synthetic`, the root of the dataset of `modeling_stan.synthetic_videos` in `--data_dir`
    (default OUTPUT_DIR/synthetic_data), generated on first use; None for other datasets."""
    if data_args.dataset != "synthetic":
        return None
    sizes = {"train": data_args.synthetic_num_train, "validation": data_args.synthetic_num_val,
             "test": data_args.synthetic_num_test}
    root = prepare_once(
        accelerator,
        Path(data_args.data_dir or output_dir / "synthetic_data"),
        lambda folder: generate_synthetic_dataset(
            folder, num_train=sizes["train"], num_val=sizes["validation"], num_test=sizes["test"], seed=seed
        ),
    )
    _check_synthetic_sizes(root, sizes)
    return root


def make_processor(model: nn.Module, model_path: str, num_frames: int) -> StanProcessor:
    """The processor saved with the model: the checkpoint's tokenizer and a video processor for its input size."""
    video_processor = StanVideoProcessor.for_image_size(model.config.vision_config.image_size, num_frames)
    return StanProcessor(video_processor=video_processor, tokenizer=AutoTokenizer.from_pretrained(model_path))


def is_stan_checkpoint(model_path: str) -> bool:
    """Whether `model_path` (a folder or Hub id) holds a STAN model rather than a CLIP checkpoint."""
    return StanConfig.get_config_dict(model_path)[0].get("model_type") == StanConfig.model_type


def load_stan_model(model_class: type, model_path: str, model_args: ModelArguments, seed: int,
                    given: set[str] = frozenset(), options: set[str] = frozenset(), **config_fields):
    """The model to train or evaluate, with the model arguments' and `config_fields`' `StanConfig` fields.

    From a CLIP checkpoint: `model_class.from_clip_pretrained`. From a STAN checkpoint: its weights and STAN fields;
    a field the user set (`given`, among the script's `options`) to another value than the checkpoint's is an
    error, options only defaulted take the checkpoint's value, and `num_frames` plus the fields that come from the
    data (labels) are applied.

    Seeded right before, so that the new weights are the same in every run and on every process whatever ran
    before (building the default model or data draws random numbers on the main process only).
    """
    set_seed(seed)
    fields = {**model_args.stan_config_fields(), **config_fields}
    if is_stan_checkpoint(model_path):
        overrides = _fields_over_checkpoint(model_path, fields, given, options, model_class)
        class_names = overrides.pop("class_names", None)
        if class_names is not None:
            # The labels of the data replace the checkpoint's; a head of another size starts afresh.
            overrides.update(id2label=dict(enumerate(class_names)), ignore_mismatched_sizes=True)
        model = model_class.from_pretrained(model_path, **overrides)
    else:
        model = model_class.from_clip_pretrained(model_path, **fields)
    if model_args.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with frozen inputs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _fields_over_checkpoint(model_path: str, fields: dict, given: set[str], options: set[str],
                            model_class: type) -> dict:
    """The fields to set on a STAN checkpoint's config; raises on a flag that contradicts the checkpoint.

    `options` are the script's option names, `given` those the user set. Options left at their defaults yield to the
    checkpoint; `num_frames` (frames per clip may differ from training), fields from the data (labels) and, on a
    checkpoint of another task (a dual encoder fine-tuned into a classifier), the head's fields apply.
    """
    checkpoint = StanConfig.from_pretrained(model_path).to_dict()
    free = set(_ALWAYS_FREE_FIELDS)
    if model_class.__name__ not in (checkpoint.get("architectures") or []):
        free |= set(_HEAD_FIELDS)
    conflicts = [f"--{name} {value!r} (the checkpoint has {checkpoint[name]!r})" for name, value in fields.items()
                 if name in given and name not in free and name in checkpoint and checkpoint[name] != value]
    if conflicts:
        raise ValueError(f"--model_name_or_path {model_path} is a STAN checkpoint whose fields these flags contradict: "
                         f"{'; '.join(conflicts)}. Drop them to use the checkpoint's values, or start from a CLIP "
                         "checkpoint to build a different STAN.")
    return {name: value for name, value in fields.items()
            if name not in options or name in free and (name == "num_frames" or name in given)}


# StanConfig fields of a task head rather than of the shared towers.
_HEAD_FIELDS = ("classifier_type",)
# Fields a run may set on any STAN checkpoint: frames per clip, and what adds to the towers without changing their
# weights (the class prompt; ViFi-CLIP's prompts, whose second stage starts from a fine-tuned checkpoint).
_ALWAYS_FREE_FIELDS = ("num_frames", "hypothesis_template", *PROMPT_CONFIG_FIELDS)


def model_source(accelerator: Accelerator, model_args: ModelArguments, output_dir: Path, seed: int) -> str:
    """`--model_name_or_path`, or the default: a tiny random CLIP and tokenizer built offline into OUTPUT_DIR/tiny_clip."""
    if model_args.model_name_or_path is not None:
        return model_args.model_name_or_path
    return str(prepare_once(accelerator, output_dir / "tiny_clip",
                            lambda folder: save_tiny_clip(folder, seed=seed, **DEMO_CLIP_OVERRIDES)))


def _check_synthetic_sizes(root: Path, sizes: dict[str, int]) -> None:
    """A cached dataset made with other sizes would silently change the experiment."""
    found = dict.fromkeys(SPLITS, 0)
    with open(root / "metadata.csv", encoding="utf-8") as file:
        for line in file.readlines()[1:]:
            found[line.split(",")[1]] += 1
    if found != sizes:
        raise ValueError(
            f"--data_dir {root} holds a synthetic dataset of {found} videos, but the --synthetic_num_* flags ask for "
            f"{sizes}: delete the folder or give another --data_dir."
        )


# ----------------------------------------------------------------------------------------------------------------
# Data: resumable shuffling, per-sample augmentation seeds, lazy decoding
# ----------------------------------------------------------------------------------------------------------------


class EpochSampler(Sampler):
    """Yields `(row, sample_seed)` keys for `DecodedVideoDataset`.

    The order is a permutation fixed by `(seed, epoch)` (or the row order when `shuffle=False`), cut to a multiple of
    `multiple_of` (the global batch times the accumulation steps, so that every optimizer step and every process get
    full batches and epochs end on a step boundary). Each key carries a seed drawn from `(seed, epoch, row)`: the
    augmentation of a sample depends neither on the process layout nor on the worker that decodes it, so a resumed
    run or a run on another number of processes sees exactly the same clips.
    """

    def __init__(self, num_rows: int, *, seed: int, shuffle: bool, multiple_of: int = 1):
        self.num_rows, self.seed, self.shuffle, self.multiple_of = num_rows, seed, shuffle, multiple_of
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows - self.num_rows % self.multiple_of

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_rows)
        for row in order[: len(self)].tolist():
            yield row, (self._sample_seed(row) if self.shuffle else None)

    def _sample_seed(self, row: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, row]).generate_state(1)[0])


class DecodedVideoDataset(torch.utils.data.Dataset):
    """The rows of a `datasets.Dataset`, decoded on access and turned into `pixel_values` by a video processor.

    Keys are `(row, sample_seed)` pairs from `EpochSampler`. Decoding goes through
    `modeling_stan.video_datasets.make_decode_transform` (a corrupt video gets `decode_error` and no pixels instead
    of raising), with a fresh transform seeded from `sample_seed` for each sample, and the processor's random crop
    draws from a generator seeded from it too: a sample's clip is a function of its key alone.

    A sample keeps its row's columns and gains `decode_error`, `row`, and `pixel_values` of shape
    `(num_clips * num_crops, T, 3, H, W)` (None for a corrupt video), views clip-major as the processor orders them.
    """

    def __init__(self, rows: datasets.Dataset, video_processor, *, num_frames: int, sampling: str = "uniform",
                 train: bool = False, num_clips: int = 1, num_crops: int = 1,
                 random_resized_crop_scale: Sequence[float] | None = None):
        self.rows, self.video_processor = rows, video_processor
        self.num_frames, self.sampling, self.train = num_frames, sampling, train
        self.num_clips, self.num_crops = num_clips, num_crops
        self.random_resized_crop_scale = random_resized_crop_scale

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int | None]) -> dict:
        row, sample_seed = key
        decode_seed, crop_seed = (None, None) if sample_seed is None else map(int, _child_seeds(sample_seed))
        transform = make_decode_transform(self.num_frames, self.sampling, self.train, seed=decode_seed,
                                          decode_options={"num_clips": self.num_clips})
        sample = {name: values[0] for name, values in transform(self.rows[row : row + 1]).items()}
        frames = sample.pop("frames")
        sample["pixel_values"] = None if frames is None else self._views(frames, crop_seed)
        sample["row"] = row
        return sample

    def _views(self, frames: np.ndarray, crop_seed: int | None) -> torch.Tensor:
        # The frames are sampled already: the processor only crops, resizes and normalises each clip.
        clips = frames if self.num_clips > 1 else frames[None]
        options = {"train": self.train, "num_crops": self.num_crops, "do_sample_frames": False}
        if self.train:
            options["generator"] = None if crop_seed is None else torch.Generator().manual_seed(crop_seed)
            if self.random_resized_crop_scale is not None:
                options["random_resized_crop_scale"] = tuple(self.random_resized_crop_scale)
        return self.video_processor(list(clips), return_tensors="pt", **options)["pixel_values"]


def _child_seeds(seed: int) -> np.ndarray:
    """Two independent seeds from one: the frame sampling's and the crop's."""
    return np.random.SeedSequence(seed).generate_state(2)


def collate_clips(samples: list[dict]) -> dict:
    """Stacks the samples' views into `pixel_values` (B * views, T, 3, H, W), video-major, with their `row`s."""
    return {
        "pixel_values": torch.cat([sample["pixel_values"] for sample in samples]),
        "row": torch.tensor([sample["row"] for sample in samples]),
    }


def training_dataloader(rows: datasets.Dataset, video_options: dict, collate: Callable, counter: CorruptSampleCounter,
                        data_args: DataArguments, args: TrainingArguments,
                        num_processes: int) -> tuple[DataLoader, EpochSampler]:
    """The (unprepared) training loader over `rows` and its sampler; corrupt samples are skipped and counted."""
    global_batch = args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps
    sampler = EpochSampler(len(rows), seed=args.seed, shuffle=True, multiple_of=global_batch)
    dataset = DecodedVideoDataset(rows, train=True, **video_options)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, args.per_device_train_batch_size, drop_last=False),
                        collate_fn=SkipCorruptCollator(collate, counter), num_workers=data_args.dataloader_num_workers,
                        generator=_private_generator(args.seed))
    return loader, sampler


def evaluation_dataloader(rows: datasets.Dataset, keep_rows: Sequence[int], video_options: dict, collate: Callable,
                          data_args: DataArguments, args: TrainingArguments) -> DataLoader:
    """The (unprepared) loader of rows `keep_rows` of `rows`, in order, without augmentation."""
    dataset = DecodedVideoDataset(rows, train=False, **video_options)
    keys = [(row, None) for row in keep_rows]
    return DataLoader(dataset, batch_sampler=BatchSampler(keys, args.per_device_eval_batch_size, drop_last=False),
                      collate_fn=SkipCorruptCollator(collate), num_workers=data_args.dataloader_num_workers,
                      generator=_private_generator(args.seed))


def _private_generator(seed: int) -> torch.Generator:
    # Starting an iteration draws a worker base seed; from its own generator it leaves torch's global one (drop
    # path) untouched, so validating or resuming mid-epoch does not shift the training randomness.
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, *, learning_rate: float, weight_decay: float,
                     stan_lr_multiplier: float) -> list[dict]:
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
        group = groups.setdefault((decay, stan), {
            "name": f"{'stan' if stan else 'clip'}_{'decay' if decay else 'no_decay'}",
            "params": [],
            "lr": learning_rate * (stan_lr_multiplier if stan else 1.0),
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(parameter)
    return list(groups.values())


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.AdamW:
    groups = parameter_groups(model, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                              stan_lr_multiplier=args.stan_lr_multiplier)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


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


# ----------------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------------


def all_gather_with_grad(tensor: torch.Tensor, local_gradient: bool = False) -> torch.Tensor:
    """Concatenates `tensor` from every process along dim 0, differentiably; the input itself on one process.

    Processes may hold different numbers of rows (a batch that lost a corrupt sample); all other dims must agree
    (captions are padded to a fixed length for this).

    Gradient scale: every process computes the same loss over the gathered rows, and the backward hands each
    process the *sum* over processes of the gradients of its own rows, i.e. W times the gradient of that loss; DDP's
    averaging over the W processes then yields exactly the gradient of one process training on the whole global
    batch. The authors' `GatherLayer` instead keeps only the local slice of the gradient, so their gradient of every
    weight before the gather is 1/W of this one (W processes; weights applied after it, like a learnable logit
    scale, get the same gradient either way); with `local_gradient=True` this function does the same. The
    difference matters for gradient clipping (AdamW itself is almost scale-free): the authors' `max_grad_norm` on W
    processes corresponds to W x that norm here.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    shape = torch.tensor(tensor.shape, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(other[1:], shape[1:]) for other in shapes):
        raise ValueError(f"all_gather_with_grad: the processes' tensors differ beyond dim 0: {[s.tolist() for s in shapes]}.")
    return _AllGatherRows.apply(tensor, [int(other[0]) for other in shapes], local_gradient)


class _AllGatherRows(torch.autograd.Function):
    """Forward: the rows of every process, concatenated in rank order. Backward: the gradient of the whole result,
    summed over processes (not summed with `local_gradient`, as the authors do), sliced to this process's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rows: list[int], local_gradient: bool) -> torch.Tensor:
        # all_gather needs equal shapes: pad to the largest row count, cut the padding off afterwards.
        padded = F.pad(tensor, [0, 0] * (tensor.ndim - 1) + [0, max(rows) - tensor.shape[0]]).contiguous()
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.count, ctx.local_gradient = sum(rows[:rank]), rows[rank], local_gradient
        return torch.cat([part[:count] for part, count in zip(parts, rows)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        if not ctx.local_gradient:
            dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.count], None, None


class RowOutputs:
    """Evaluation outputs of one process, keyed by dataset row, to be gathered from every process.

    `trailing_shapes` gives each output's shape past the row dim, so that a process that saw no sample (all its
    videos corrupt, or fewer rows than processes) still takes part in the gathers.
    """

    def __init__(self, **trailing_shapes: tuple[int, ...]):
        self.trailing_shapes = trailing_shapes
        self.rows: list[torch.Tensor] = []
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in trailing_shapes}

    def add(self, rows: torch.Tensor, **outputs: torch.Tensor) -> None:
        self.rows.append(rows.cpu())
        for name, value in outputs.items():
            self.parts[name].append(value.detach().float().cpu())

    def gather(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every process's outputs, sorted by row, each row once (even batches repeat some rows at the end)."""
        local = {"rows": torch.cat(self.rows) if self.rows else torch.empty(0, dtype=torch.long)}
        for name, shape in self.trailing_shapes.items():
            local[name] = torch.cat(self.parts[name]) if self.parts[name] else torch.empty(0, *shape)
        gathered = {name: all_gather_with_grad(value.to(device)).cpu() for name, value in local.items()}
        order = torch.argsort(gathered["rows"], stable=True)
        rows = gathered["rows"][order]
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        return {name: value[order][first] for name, value in gathered.items()}


def weights_sha256(model: nn.Module) -> str:
    """Hash of every tensor of the model's state dict (names and bytes), to compare weights across processes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------


class TrainingTask(Protocol):
    """What a script supplies to `TrainingLoop`."""

    metric_for_best_model: str

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (every process calls this with its own batch)."""

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics of `split` ("validation" or "test"), identical on every process."""


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive optimizer steps had a NaN or infinite loss or gradient norm."""


@dataclass
class TrainingProgress:
    """The loop's own state, saved in every checkpoint (`Accelerator.register_for_checkpointing`)."""

    step: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    skipped_micro_batches: int = 0
    corrupt_samples_per_epoch: dict[int, int] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    validation_history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class _Window:
    """The micro-batches of one optimizer step."""

    losses: list[float] = field(default_factory=list)
    local_losses: list[float] = field(default_factory=list)
    backward_passes: int = 0
    nonfinite: bool = False
    # The last micro-batch was skipped: its backward, which all-reduces the window's gradients, never ran.
    unsynchronised: bool = False

    @property
    def usable(self) -> bool:
        return self.backward_passes > 0 and not self.nonfinite and not self.unsynchronised


class TrainingLoop:
    """Trains `model` with `task`'s loss, validates, checkpoints atomically, and resumes exactly.

    A step is one optimizer step (`gradient_accumulation_steps` micro-batches on every process). The position in
    the data is a function of the step count alone (epochs hold a whole number of steps), so a resumed run skips
    exactly the micro-batches already consumed.
    """

    def __init__(self, accelerator: Accelerator, args: TrainingArguments, task: TrainingTask, model: nn.Module,
                 optimizer, scheduler, train_loader: DataLoader, train_sampler: EpochSampler,
                 corrupt_counter: CorruptSampleCounter):
        self.accelerator, self.args, self.task = accelerator, args, task
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.train_sampler, self.corrupt_counter = train_loader, train_sampler, corrupt_counter
        self.steps_per_epoch = steps_per_epoch(train_loader, args)
        self.total_steps = total_training_steps(train_loader, args)
        self.progress = TrainingProgress()
        # The scheduler is not `prepare`d (that would step it once per process): it is saved as a custom object.
        accelerator.register_for_checkpointing(scheduler, self.progress)
        self.checkpoints = CheckpointManager(accelerator, Path(args.output_dir) / "checkpoints",
                                             args.save_total_limit, args.debug_checkpoint_write_delay)
        self._corrupt_seen = 0
        self._last_evaluated_step = None

    # -- driving ----------------------------------------------------------------------------------------------------

    def train(self) -> TrainingProgress:
        resume = self.checkpoints.resolve(self.args.resume_from_checkpoint)
        if resume is not None:
            self.accelerator.load_state(str(resume))
            logger.info(f"Resumed from {resume} at step {self.progress.step}", main_process_only=True)
        self._log_plan()
        self.bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="training",
                        disable=not self.accelerator.is_local_main_process)
        while self.progress.step < self.total_steps:
            self._train_epoch()
        self.bar.close()
        if self.args.eval_strategy != "no" and self._last_evaluated_step != self.progress.step:
            self._validate()
        self.checkpoints.save(self.progress.step, protected_step=self.progress.best_step)
        if self.args.debug_dump_dir:
            self._debug_dump({"final_step": self.progress.step, "num_processes": self.accelerator.num_processes,
                              "weights_sha256": weights_sha256(self.accelerator.unwrap_model(self.model))})
        return self.progress

    def load_best_weights(self) -> int:
        """Puts the weights of the best validation step back into the model; returns that step."""
        step = self.progress.best_step
        if step is None or step == self.progress.step:
            return self.progress.step
        # The checkpoint holds the prepared model's state dict, as `Accelerator.load_state` reads it.
        safetensors.torch.load_model(self.model, self.checkpoints.path(step) / "model.safetensors")
        logger.info(f"Loaded the best weights (step {step}, {self.task.metric_for_best_model}="
                    f"{self.progress.best_metric})", main_process_only=True)
        return step

    def _log_plan(self) -> None:
        accelerator, args = self.accelerator, self.args
        global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info(
            f"Training {self.total_steps} steps ({self.steps_per_epoch} per epoch), global batch {global_batch} = "
            f"{args.per_device_train_batch_size} per process x {accelerator.num_processes} process(es) x "
            f"{args.gradient_accumulation_steps} accumulation step(s), starting at step {self.progress.step}",
            main_process_only=True,
        )

    def _epoch_batches(self, epoch: int, done: int):
        """The micro-batches of `epoch` after its first `done` optimizer steps."""
        self.train_sampler.set_epoch(epoch)
        loader = self.train_loader
        if done:
            loader = self.accelerator.skip_first_batches(loader, done * self.args.gradient_accumulation_steps)
        # Accelerate re-applies its own epoch counter to the sampler when iteration starts: keep both equal.
        loader.set_epoch(epoch)
        return loader

    def _train_epoch(self) -> None:
        epoch, done = divmod(self.progress.step, self.steps_per_epoch)
        loader = self._epoch_batches(epoch, done)
        self.model.train()
        window = _Window()
        for batch in loader:
            with self.accelerator.accumulate(self.model):
                self._micro_step(batch, window)
            if self.accelerator.sync_gradients:
                self._optimizer_step(window)
                window = _Window()
                self._after_step(epoch)
                if self.progress.step >= self.total_steps:
                    break

    # -- one step ---------------------------------------------------------------------------------------------------

    def _micro_step(self, batch: dict | None, window: _Window) -> None:
        if not self._every_process_has_samples(batch):
            # Every process must run the same forward/backward passes (DDP, all-gathers): all skip together.
            self.progress.skipped_micro_batches += 1
            window.unsynchronised = self.accelerator.sync_gradients
            return
        loss = self.task.training_loss(self.model, batch)
        if self.progress.step + 1 in self.args.debug_nonfinite_steps:
            loss = loss * float("nan")
        mean_loss = self.accelerator.reduce(loss.detach().float(), reduction="mean")
        window.local_losses.append(loss.item())
        window.losses.append(mean_loss.item())
        if not torch.isfinite(mean_loss):
            window.nonfinite = True
            return
        self.accelerator.backward(loss)
        window.backward_passes += 1

    def _every_process_has_samples(self, batch: dict | None) -> bool:
        has_samples = torch.tensor(float(batch is not None), device=self.accelerator.device)
        return bool(self.accelerator.reduce(has_samples, reduction="sum") == self.accelerator.num_processes)

    def _optimizer_step(self, window: _Window) -> None:
        grad_norm = None
        if window.usable and self.args.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            # Under fp16 the gradient scaler handles overflowing gradients itself (it skips the step, lowers the scale).
            if self.accelerator.scaler is None and not torch.isfinite(grad_norm):
                window.nonfinite = True
        if window.usable:
            self.optimizer.step()
            if not self.accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
            self.progress.consecutive_nonfinite = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        if window.nonfinite:
            self._refuse_nonfinite_step(window)
        self._record_step(window, grad_norm)

    def _refuse_nonfinite_step(self, window: _Window) -> None:
        progress, limit = self.progress, self.args.max_nonfinite_steps
        progress.nonfinite_steps += 1
        progress.consecutive_nonfinite += 1
        message = (
            f"Step {progress.step}: non-finite loss or gradient norm (losses {window.losses}); the optimizer step "
            f"was skipped and the weights are unchanged ({progress.consecutive_nonfinite} consecutive, "
            f"--max_nonfinite_steps {limit})."
        )
        if progress.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                message + " Stopping: lower the learning rate, use bf16 rather than fp16, or check the inputs."
            )
        logger.warning(message)

    def _record_step(self, window: _Window, grad_norm: torch.Tensor | None) -> None:
        step = self.progress.step
        loss = float(np.mean(window.losses)) if window.losses else float("nan")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")
        if step % self.args.logging_steps == 0 or step == self.total_steps:
            values = {"train/loss": loss, "train/learning_rate": self.scheduler.get_last_lr()[0],
                      "train/epoch": step / self.steps_per_epoch}
            if grad_norm is not None:
                values["train/grad_norm"] = float(grad_norm)
            self.accelerator.log(values, step=step)
        if self.args.debug_dump_dir:
            self._debug_dump({"step": step, "loss": float(np.mean(window.local_losses or [float("nan")])),
                              "mean_loss": loss, "applied": window.usable,
                              "grad_norm": None if grad_norm is None else float(grad_norm)})

    def _after_step(self, epoch: int) -> None:
        self._count_corrupt_samples(epoch)
        step = self.progress.step
        end_of_epoch = step % self.steps_per_epoch == 0
        if end_of_epoch:
            count = self.progress.corrupt_samples_per_epoch.get(epoch, 0)
            logger.info(f"Epoch {epoch}: {count} corrupt training sample(s) skipped", main_process_only=True)
        improved = self._due("eval", step, end_of_epoch) and self._validate()
        if improved or self._due("save", step, end_of_epoch):
            self.checkpoints.save(step, protected_step=self.progress.best_step)

    def _due(self, what: str, step: int, end_of_epoch: bool) -> bool:
        strategy = getattr(self.args, f"{what}_strategy")
        if strategy == "epoch":
            return end_of_epoch
        return strategy == "steps" and step % getattr(self.args, f"{what}_steps") == 0

    def _count_corrupt_samples(self, epoch: int) -> None:
        # Each process counts what its own collator skipped; the epoch's total is their sum.
        count = self.corrupt_counter.count
        new = torch.tensor(float(count - self._corrupt_seen), device=self.accelerator.device)
        self._corrupt_seen = count
        total = int(self.accelerator.reduce(new, reduction="sum").item())
        per_epoch = self.progress.corrupt_samples_per_epoch
        per_epoch[epoch] = per_epoch.get(epoch, 0) + total

    def _validate(self) -> bool:
        """Evaluates the validation split; returns whether it is the best so far."""
        metrics = self.task.evaluate(self.model, "validation")
        self.model.train()
        step, progress = self.progress.step, self.progress
        self._last_evaluated_step = step
        self.accelerator.log({f"validation/{name}": value for name, value in metrics.items()}, step=step)
        progress.validation_history.append({"step": step, **metrics})
        name = self.task.metric_for_best_model
        if name not in metrics:
            raise KeyError(f"--metric_for_best_model {name!r} is not among the validation metrics {sorted(metrics)}.")
        value = metrics[name]
        best = progress.best_metric
        improved = best is None or (value > best if self.args.greater_is_better else value < best)
        if improved:
            progress.best_metric, progress.best_step = value, step
        logger.info(f"Step {step}: validation {name}={value:.4f} (best {progress.best_metric:.4f} at step "
                    f"{progress.best_step})", main_process_only=True)
        return improved

    def _debug_dump(self, record: dict) -> None:
        folder = Path(self.args.debug_dump_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{self.accelerator.process_index}.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


EVAL_SPLITS = ("validation", "test")


class TrainingScript:
    """The run shared by the training scripts; a script subclasses it and fills in its task.

    The run: parse the arguments, build the default model and data if needed, load the splits and the model, train
    with `TrainingLoop`, restore the best validation weights, evaluate the test split once, and save the model, the
    processor, `all_results.json` and the model card (and push them with `--push_to_hub`).
    """

    argument_types: tuple  # (ModelArguments, DataArguments, the task's arguments, TrainingArguments)
    recipe_defaults: dict  # defaults for pre-trained CLIP checkpoints
    demo_defaults: dict  # on top of them for the default tiny random CLIP
    dataset_formats: tuple[str, ...]  # the `--dataset` values besides "synthetic"
    model_class: type
    card_task: str  # the model card's task
    do_train: bool = True  # --do_train, set by `main` (False: the splits of an evaluation only)

    def use_synthetic_dataset(self, data_args: DataArguments, root: Path) -> None:
        """Points `data_args` at the synthetic dataset generated in `root`."""
        raise NotImplementedError

    def load_splits(self, data_args: DataArguments, task_args, seed: int) -> dict[str, datasets.Dataset]:
        """The train, validation and test rows."""
        raise NotImplementedError

    def model_config_fields(self, task_args, splits: dict) -> dict:
        """The task's `StanConfig` fields (and `from_clip_pretrained` options)."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, task_args, processor) -> None:
        """Adjusts the freshly built model (e.g. freezes parts, or tokenizes class names with the processor)."""

    def training_collate(self, processor, task_args) -> Callable[[list[dict]], dict]:
        raise NotImplementedError

    def evaluation_dataloader(self, rows: datasets.Dataset, video_options: dict, task_args, data_args: DataArguments,
                              training_args: TrainingArguments) -> DataLoader:
        raise NotImplementedError

    def make_task(self, accelerator: Accelerator, task_args, training_args: TrainingArguments, splits: dict,
                  eval_loaders: dict, processor) -> TrainingTask:
        raise NotImplementedError

    def main(self, argv: Sequence[str] | None = None) -> dict:
        """Runs the script; returns the metrics also written to OUTPUT_DIR/all_results.json."""
        started = time.time()
        arguments = parse_script_arguments(self.argument_types, self.recipe_defaults, self.demo_defaults, argv)
        model_args, data_args, task_args, training_args = arguments
        accelerator = setup_run(training_args)
        output_dir = Path(training_args.output_dir)
        model_path = model_source(accelerator, model_args, output_dir, training_args.seed)
        self.do_train = training_args.do_train
        dataset_name, splits = self._splits(accelerator, data_args, task_args, training_args)
        options = {name for kind in self.argument_types for name in kind.__dataclass_fields__}
        model = load_stan_model(self.model_class, model_path, model_args, training_args.seed,
                                given=explicit_options(argv), options=options, num_frames=data_args.num_frames,
                                **self.model_config_fields(task_args, splits))
        processor = make_processor(model, model_path, data_args.num_frames)
        self.prepare_model(model, task_args, processor)
        if not training_args.do_train:
            return self.evaluate_only(accelerator, model, processor, splits, data_args, task_args, training_args)
        loop = self._training_loop(accelerator, model, processor, splits, data_args, task_args, training_args)
        accelerator.init_trackers(f"stan-{self.card_task}", config=_tracker_config(arguments_dict(*arguments)))

        progress = loop.train()
        best_step = loop.load_best_weights()
        results = {
            "validation": next((m for m in progress.validation_history if m["step"] == best_step), {}),
            "test": loop.task.evaluate(loop.model, "test"),
            "train": self.training_summary(loop, best_step, time.time() - started),
        }
        results.update(self.extra_results(accelerator, loop.model, loop.task, processor, results, data_args, task_args,
                                          training_args))
        logger.info(f"Test metrics: {results['test']}", main_process_only=True)
        card = {"task": self.card_task, "base_model": model_args.model_name_or_path or "tiny random CLIP",
                "dataset_name": dataset_name, "training_args": arguments_dict(*arguments)}
        _save_final_model(accelerator, accelerator.unwrap_model(loop.model), processor, results, card, output_dir)
        _push_to_hub(accelerator, training_args, output_dir)
        accelerator.end_training()
        return results

    def extra_results(self, accelerator: Accelerator, model: nn.Module, task: TrainingTask, processor, results: dict,
                      data_args: DataArguments, task_args, training_args: TrainingArguments) -> dict:
        """Results beyond the evaluation splits (e.g. other class sets), merged into `all_results.json`."""
        return {}

    def evaluate_only(self, accelerator: Accelerator, model: nn.Module, processor, splits: dict,
                      data_args: DataArguments, task_args, training_args: TrainingArguments) -> dict:
        """`--do_train false`: the metrics of the model as given on the evaluation splits there are, written to
        OUTPUT_DIR/all_results.json (the model itself is not saved again)."""
        video_options = data_args.video_options(processor.video_processor)
        present = [split for split in EVAL_SPLITS if split in splits]
        loaders = [self.evaluation_dataloader(splits[split], video_options, task_args, data_args, training_args)
                   for split in present]
        model, *loaders = accelerator.prepare(model, *loaders)
        task = self.make_task(accelerator, task_args, training_args, splits, dict(zip(present, loaders)), processor)
        results = {split: task.evaluate(model, split) for split in present}
        results.update(self.extra_results(accelerator, model, task, processor, results, data_args, task_args,
                                          training_args))
        logger.info(f"Evaluation without training: {results}", main_process_only=True)
        if accelerator.is_main_process:
            output_dir = Path(training_args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            with open(output_dir / "all_results.json", "w", encoding="utf-8") as file:
                json.dump(results, file, indent=2)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return results

    def training_summary(self, loop: TrainingLoop, best_step: int, runtime: float) -> dict:
        """The "train" entry of `all_results.json`."""
        return training_summary(loop, best_step, runtime)

    def _splits(self, accelerator: Accelerator, data_args: DataArguments, task_args,
                training_args: TrainingArguments) -> tuple[str, dict[str, datasets.Dataset]]:
        """The dataset's name (for the model card) and its splits, the synthetic dataset generated if asked for."""
        dataset_name = data_args.dataset
        synthetic_root = synthetic_dataset_root(accelerator, data_args, Path(training_args.output_dir),
                                                training_args.seed)
        if synthetic_root is not None:
            dataset_name = SYNTHETIC_DATASET_NAME
            self.use_synthetic_dataset(data_args, synthetic_root)
        self._check_dataset(data_args)
        with accelerator.main_process_first():
            return dataset_name, _limit_rows(self.load_splits(data_args, task_args, training_args.seed), data_args)

    def _training_loop(self, accelerator: Accelerator, model: nn.Module, processor, splits: dict,
                       data_args: DataArguments, task_args, training_args: TrainingArguments) -> TrainingLoop:
        """Data loaders, optimizer and scheduler, prepared by the accelerator, and the loop that uses them."""
        video_options = data_args.video_options(processor.video_processor)
        counter = CorruptSampleCounter()
        train_loader, train_sampler = training_dataloader(
            splits["train"], video_options, self.training_collate(processor, task_args), counter, data_args,
            training_args, accelerator.num_processes,
        )
        eval_loaders = [self.evaluation_dataloader(splits[split], video_options, task_args, data_args, training_args)
                        for split in EVAL_SPLITS]
        optimizer = build_optimizer(model, training_args)
        model, optimizer, train_loader, *eval_loaders = accelerator.prepare(model, optimizer, train_loader, *eval_loaders)
        task = self.make_task(accelerator, task_args, training_args, splits, dict(zip(EVAL_SPLITS, eval_loaders)),
                              processor)
        scheduler = build_scheduler(optimizer, training_args, total_training_steps(train_loader, training_args))
        return TrainingLoop(accelerator, training_args, task, model, optimizer, scheduler, train_loader,
                            train_sampler, counter)

    def _check_dataset(self, data_args: DataArguments) -> None:
        if data_args.dataset not in self.dataset_formats:
            raise ValueError(f"--dataset must be 'synthetic' or one of {list(self.dataset_formats)}, "
                             f"got {data_args.dataset!r}.")
        if data_args.video_dir is None:
            raise ValueError(f"--dataset {data_args.dataset} needs --video_dir.")


def _limit_rows(splits: dict[str, datasets.Dataset], data_args: DataArguments) -> dict[str, datasets.Dataset]:
    """Applies --max_train_samples and --max_eval_samples."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
              "test": data_args.max_eval_samples}
    return {split: rows if limits[split] is None or limits[split] >= len(rows) else rows.select(range(limits[split]))
            for split, rows in splits.items()}


def _tracker_config(values: dict) -> dict:
    # Trackers such as TensorBoard take scalars and strings only.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _save_final_model(accelerator: Accelerator, model: nn.Module, processor, results: dict, card: dict,
                      output_dir: Path) -> None:
    """The model (safetensors, remote code), the processor, `all_results.json` and the model card."""
    save_kwargs = dict(is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if isinstance(model, StanModel):
        # A dual encoder also carries the zero-shot pipeline as remote code (it writes the processor too).
        save_for_hub(model, processor, output_dir, **save_kwargs)
    else:
        model.save_pretrained(output_dir, **save_kwargs)
        if accelerator.is_main_process:
            processor.save_pretrained(output_dir)
    if accelerator.is_main_process:
        with open(output_dir / "all_results.json", "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
        write_training_model_card(output_dir, metrics=results["test"], eval_split="test", **card)
    accelerator.wait_for_everyone()


def training_summary(loop: TrainingLoop, best_step: int, runtime: float) -> dict:
    progress = loop.progress
    return {
        "steps": progress.step,
        "best_step": best_step,
        "nonfinite_steps": progress.nonfinite_steps,
        "skipped_micro_batches": progress.skipped_micro_batches,
        "corrupt_samples": sum(progress.corrupt_samples_per_epoch.values()),
        "corrupt_samples_per_epoch": {str(k): v for k, v in sorted(progress.corrupt_samples_per_epoch.items())},
        "runtime_seconds": round(runtime, 1),
    }


def _push_to_hub(accelerator: Accelerator, args: TrainingArguments, output_dir: Path) -> None:
    """Uploads the final model folder (not checkpoints, caches or logs) to `--hub_model_id`."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or output_dir.name
    create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="Upload a STAN model trained with training/",
                  ignore_patterns=["checkpoints/*", "synthetic_data/*", "tiny_clip/*", "runs/*", ".tmp-*"])
