"""The command line of the training scripts: the argument dataclasses, config files, and the script defaults.

This module imports nothing heavy (no torch, no datasets; transformers only for `HfArgumentParser`), so that a script
parses its arguments, answers `--help` and rejects a bad flag before it loads the training code.

Defaults come in two sets per script: the *recipe* defaults (fine-tuning a pre-trained CLIP, `--model_name_or_path`
given) and the *demo* defaults on top of them (no `--model_name_or_path`: the tiny random CLIP learns the synthetic
videos from scratch). `--help` shows the set the run would use and names the other one.
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import yaml


# `metadata={"help": HIDDEN}` keeps a flag out of `--help` (flags for the tests, not for users).
HIDDEN = argparse.SUPPRESS


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "CLIP checkpoint (Hub id or folder) to build STAN around, or a STAN checkpoint (post-pretrained, "
            "converted or fine-tuned) to start from, whose STAN fields are then used. Unset: a tiny random "
            "CLIP built offline into OUTPUT_DIR/tiny_clip, with the demo defaults (synthetic demo and tests)."
        },
    )
    stan_depth: int = field(default=4, metadata={"help": "STAN layers K (0: the plain CLIP mean-pooling baseline)."})
    temporal_module: Literal["attention", "conv"] = field(
        default="attention",
        metadata={"help": "STAN's temporal module: 'attention' (STAN-self) or 'conv' (STAN-conv)."},
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the last STAN layer."})
    fixed_logit_scale: float | None = field(
        default=None,
        metadata={"help": "Fixed logit scale 1/tau (100 for B/32, 50 for B/16). Unset: CLIP's learnable scale."},
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
    dataset: str = field(
        default="synthetic", metadata={"help": "Dataset format; 'synthetic' generates the demo's moving shapes."}
    )
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
        default=None, metadata={"help": "Where the synthetic dataset is generated. Unset: OUTPUT_DIR/synthetic_data."}
    )
    synthetic_num_train: int = field(default=160, metadata={"help": "Synthetic dataset: training videos."})
    synthetic_num_val: int = field(default=40, metadata={"help": "Synthetic dataset: validation videos."})
    synthetic_num_test: int = field(default=40, metadata={"help": "Synthetic dataset: test videos."})
    num_frames: int = field(default=8, metadata={"help": "Frames per clip."})
    sampling: Literal["uniform", "dense"] = field(
        default="uniform", metadata={"help": "Frame sampling: 'uniform' (STAN's segments) or 'dense'."}
    )
    random_resized_crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "Area range of the training random resized crop."}
    )
    multi_scale_crop: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Training crop of ViFi-CLIP instead of the random resized crop: box sides as these fractions "
            "of the resized short side (theirs: 1 .875 .75 .66), at 5 fixed positions, resized to the input size."
        },
    )
    resize_short_side: int | None = field(
        default=None,
        metadata={"help": "Short side the frames are resized to before the crop (ViFi-CLIP: 256). Unset: the crop's."},
    )
    image_normalization: Literal["clip", "imagenet"] = field(
        default="clip", metadata={"help": "Mean and std of the pixels: CLIP's, or ImageNet's (ViFi-CLIP's)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many rows per eval split."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Decoding worker processes per process."})

    def __post_init__(self):
        if any(not 0.0 < scale <= 1.0 for scale in self.multi_scale_crop):
            raise ValueError(f"--multi_scale_crop scales must be in (0, 1], got {self.multi_scale_crop}.")
        if self.image_normalization not in ("clip", "imagenet"):
            raise ValueError(f"--image_normalization must be 'clip' or 'imagenet', got {self.image_normalization!r}.")

    def processor_options(self) -> dict:
        """The `StanVideoProcessor.for_image_size` options these arguments set (saved with the model)."""
        from transformers.image_utils import (
            IMAGENET_DEFAULT_MEAN,
            IMAGENET_DEFAULT_STD,
            OPENAI_CLIP_MEAN,
            OPENAI_CLIP_STD,
        )

        imagenet = self.image_normalization == "imagenet"
        return {
            "short_side": self.resize_short_side,
            "multi_scale_crop_scales": tuple(self.multi_scale_crop) or None,
            "image_mean": list(IMAGENET_DEFAULT_MEAN if imagenet else OPENAI_CLIP_MEAN),
            "image_std": list(IMAGENET_DEFAULT_STD if imagenet else OPENAI_CLIP_STD),
        }

    def annotation_for(self, split: str) -> str | None:
        return getattr(self, f"{split}_file") or self.annotation_file

    def video_options(self, video_processor) -> dict:
        """The `DecodedVideoDataset` options these arguments set."""
        return {
            "video_processor": video_processor,
            "num_frames": self.num_frames,
            "sampling": self.sampling,
            "random_resized_crop_scale": self.random_resized_crop_scale,
        }


# What a re-run does with the checkpoints it finds: `stan_checkpointing.choose_checkpoint`.
RESUME_HELP = (
    "'auto': start afresh when OUTPUT_DIR holds no checkpoint; continue the run there when its arguments are this "
    "command's (a finished run is only evaluated and exported again); stop with a message when they differ. "
    "'latest': continue the newest checkpoint whatever its arguments. 'never': start afresh (stops if OUTPUT_DIR "
    "holds checkpoints, unless --overwrite_output_dir). Or a checkpoint folder."
)


@dataclass
class TrainingArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and the final model go."})
    do_train: bool = field(
        default=True,
        metadata={
            "help": "False: only evaluate the model as given (e.g. zero-shot) on the validation and test splits."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the checkpoints of an earlier run in OUTPUT_DIR and start afresh."}
    )
    resume_from_checkpoint: str = field(default="auto", metadata={"help": RESUME_HELP})
    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the new weights, the synthetic data, the data order and the "
            "augmentations (not of the demo's tiny CLIP, a fixed draw)."
        },
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training videos per process per step."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation videos per process per batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-6, metadata={"help": "AdamW learning rate of the CLIP weights."})
    stan_lr_multiplier: float = field(
        default=10.0, metadata={"help": "Learning-rate multiplier of the STAN branch ('.stan.' parameters)."}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (see --no_decay)."})
    no_decay: Literal["vectors_and_embeddings", "norms_and_biases", "none"] = field(
        default="vectors_and_embeddings",
        metadata={
            "help": "Parameters exempt from weight decay: 'vectors_and_embeddings' (ours), 'norms_and_biases' "
            "(STAN / Mug-STAN's mmengine rule; the STAN branch decays fully) or 'none' (ViFi-CLIP decays everything)."
        },
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs to train (ignored with --max_steps)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to train; > 0 overrides num_train_epochs."})
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={
            "help": "A transformers scheduler (linear, cosine, constant, constant_with_warmup...: warm-up from 0, "
            "decay to 0), 'timm_cosine' (ViFi-CLIP's timm CosineLRScheduler: cosine on the absolute step, warm-up "
            "included) or 'mmengine_linear_cosine' (STAN's LinearLR warm-up then CosineAnnealingLR)."
        },
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up steps as a fraction of the training steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps; > 0 overrides warmup_ratio."})
    warmup_epochs: float | None = field(
        default=None,
        metadata={"help": "Warm-up epochs; overrides warmup_ratio and warmup_steps (the authors' curves need it)."},
    )
    lr_warmup_start_factor: float = field(
        default=0.0,
        metadata={"help": "timm_cosine / mmengine_linear_cosine: the warm-up's first rate, times learning_rate."},
    )
    lr_min_ratio: float = field(
        default=0.0, metadata={"help": "timm_cosine / mmengine_linear_cosine: the floor, times learning_rate."}
    )
    lr_cosine_epochs: float | None = field(
        default=None,
        metadata={
            "help": "The cosine's period in epochs (timm t_initial, mmengine T_max). Unset: timm_cosine all epochs, "
            "mmengine_linear_cosine the epochs after the warm-up."
        },
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Mixed precision. Unset: what `accelerate launch` was given."}
    )
    eval_strategy: Literal["epoch", "steps", "no"] = field(
        default="epoch", metadata={"help": "Validate at the end of every epoch, every --eval_steps steps, or never."}
    )
    eval_steps: int | None = field(
        default=None, metadata={"help": "Steps between validations (--eval_strategy steps)."}
    )
    save_strategy: Literal["epoch", "steps", "no"] = field(
        default="epoch",
        metadata={
            "help": "Checkpoint at the end of every epoch, every --save_steps steps, or never "
            "(a validation that improves the best metric always checkpoints)."
        },
    )
    save_steps: int | None = field(
        default=None, metadata={"help": "Steps between checkpoints (--save_strategy steps)."}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept, besides the best one."})
    final_checkpoint: Literal["best", "last"] = field(
        default="best",
        metadata={
            "help": "The weights tested and exported: the best validation step's, or the last step's (ViFi-CLIP's "
            "base-to-novel protocol tests the last epoch)."
        },
    )
    metric_for_best_model: str | None = field(
        default=None, metadata={"help": "Validation metric that picks the best checkpoint (the exported model)."}
    )
    greater_is_better: bool = field(default=True, metadata={"help": "False for ranks (MdR, MnR) and error counts."})
    min_usable_sample_fraction: float = field(
        default=0.8,
        metadata={
            "help": "Stop with an error when fewer than this fraction of an epoch's training samples could be "
            "used (the rest failed to decode): a wrong --video_dir or --video_ext, not bad luck."
        },
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many consecutive steps with a NaN/inf loss or gradient."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Steps between logged training losses."})
    report_to: str = field(
        default="none",
        metadata={"help": "Accelerate tracker: none, tensorboard, wandb, ... (logs under OUTPUT_DIR/runs)."},
    )
    log_level: Literal["warning", "info", "debug"] = field(
        default="warning",
        metadata={
            "help": "Level of the libraries' logs (transformers, datasets, accelerate); the scripts' own "
            "progress lines are always shown."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository. Unset: OUTPUT_DIR's name."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    debug_dump_dir: str | None = field(default=None, metadata={"help": HIDDEN})
    debug_nonfinite_steps: list[int] = field(default_factory=list, metadata={"help": HIDDEN})
    debug_checkpoint_write_delay: float = field(default=0.0, metadata={"help": HIDDEN})
    # debug_dump_dir: each process appends its per-step loss and final weight hash there; debug_nonfinite_steps: make
    # the loss NaN in these optimizer-step attempts (1-based); debug_checkpoint_write_delay: seconds to pause after
    # each checkpoint file is written (to kill a run mid-write).

    def __post_init__(self):
        for strategy in ("eval", "save"):
            if getattr(self, f"{strategy}_strategy") == "steps" and not (getattr(self, f"{strategy}_steps") or 0) > 0:
                raise ValueError(f"--{strategy}_strategy steps needs --{strategy}_steps > 0.")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_nonfinite_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr_scheduler_type in ("timm_cosine", "mmengine_linear_cosine") and self.warmup_epochs is None:
            raise ValueError(
                f"--lr_scheduler_type {self.lr_scheduler_type} counts warm-up in epochs: set --warmup_epochs."
            )
        if not 0.0 <= self.lr_warmup_start_factor <= 1.0 or not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(
                f"--lr_warmup_start_factor and --lr_min_ratio are fractions of the learning rate in [0, 1], got "
                f"{self.lr_warmup_start_factor} and {self.lr_min_ratio}."
            )
        if not 0.0 <= self.min_usable_sample_fraction <= 1.0:
            raise ValueError(f"--min_usable_sample_fraction must be in [0, 1], got {self.min_usable_sample_fraction}.")


@dataclass(frozen=True)
class ScriptCommandLine:
    """A training script's command line: its argument dataclasses, its two sets of defaults and its datasets.

    Precedence, lowest first: the dataclass defaults, `recipe_defaults`, `demo_defaults` (only when no
    `--model_name_or_path` is given, on the command line or in the config file), the `--config FILE` (YAML or JSON,
    keys are the flag names without `--`), then the flags themselves.
    """

    argument_types: tuple  # (ModelArguments, DataArguments, the task's arguments, TrainingArguments)
    recipe_defaults: dict  # defaults for pre-trained CLIP checkpoints
    demo_defaults: dict  # on top of them for the default tiny random CLIP
    dataset_formats: tuple[str, ...]  # the `--dataset` values besides "synthetic"
    description: str = ""

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """The parsed dataclasses; `--help` and any bad flag or config file exit here with a message (status 2)."""
        return self.parse_with_given(argv)[0]

    def parse_with_given(self, argv: Sequence[str] | None = None) -> tuple[tuple, set[str]]:
        """The parsed dataclasses, and the names of the options the user set, on the command line or in its
        `--config` file (not the defaults: options left at them yield to a checkpoint's values)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        config_parser = argparse.ArgumentParser(add_help=False)
        config_parser.add_argument("--config")
        config_parser.add_argument("--model_name_or_path")
        known, remaining = config_parser.parse_known_args(argv)
        parser = self._parser({})
        try:
            config = _config_file_values(parser, known.config) if known.config else {}
        except (OSError, ValueError) as error:
            parser.error(str(error))
        is_demo = known.model_name_or_path is None and config.get("model_name_or_path") is None
        parser = self._parser({**self.defaults(is_demo), **config}, is_demo)
        if known.model_name_or_path is not None:
            remaining += ["--model_name_or_path", known.model_name_or_path]
        try:
            arguments = parser.parse_args_into_dataclasses(args=remaining)
        except ValueError as error:  # a dataclass's own check (__post_init__)
            parser.error(str(error))
        # HfArgumentParser also accepts --do-train for --do_train.
        flags = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
        return arguments, flags | set(config)

    def settings_line(self, arguments: tuple) -> str:
        """One line naming the set of defaults the run uses and the values it uses for that set's options."""
        used = arguments_dict(*arguments)
        is_demo = used["model_name_or_path"] is None
        names = self.defaults(is_demo)
        which = "Demo settings (no --model_name_or_path)" if is_demo else "Recipe settings"
        return f"{which}: " + " ".join(f"{name}={_show(used[name])}" for name in names if name in used)

    def defaults(self, is_demo: bool) -> dict:
        return {**self.recipe_defaults, **(self.demo_defaults if is_demo else {})}

    def _parser(self, defaults: dict, is_demo: bool = True) -> argparse.ArgumentParser:
        from transformers import HfArgumentParser  # light: the parser module imports neither torch nor the models

        which = (
            "the demo's (no --model_name_or_path; add one to --help to see the recipe's)"
            if is_demo
            else "the recipe's (--model_name_or_path given)"
        )
        parser = HfArgumentParser(
            self.argument_types,
            description=self.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            usage="%(prog)s [--config FILE] [--OPTION VALUE ...]  (options below)",
            allow_abbrev=False,  # a mistyped flag must fail, not silently set another one it abbreviates
            epilog="--config FILE: a YAML or JSON file of options (flag names without '--'); flags override it.\n"
            f"The defaults shown are {which}.",
        )
        for action in parser._actions:
            if action.dest == "dataset":
                action.choices = ("synthetic", *self.dataset_formats)
        dataclass_defaults = {action.dest: action.default for action in parser._actions}
        parser.set_defaults(**defaults)
        other = {**dataclass_defaults, **self.defaults(not is_demo)}
        for action in parser._actions:
            if action.help not in (None, argparse.SUPPRESS) and action.dest != "help" and action.const is not False:
                action.help = _with_defaults(action, other, is_demo)
        return parser


def _with_defaults(action: argparse.Action, other_defaults: dict, is_demo: bool) -> str:
    """The help text with the default this run uses and, where it differs, the other set's."""
    help_text = action.help.replace("%", "%%")
    parts = []
    if action.default is not None:
        parts.append(f"default: {_show(action.default)}")
    other = other_defaults[action.dest]
    if other != action.default:
        parts.append(f"{_show(other)} {'with' if is_demo else 'without'} --model_name_or_path")
    return f"{help_text} ({'; '.join(parts)})" if parts else help_text


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list) and not value:
        return "none"  # an empty list option, e.g. no --multi_scale_crop scales
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


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
        raise ValueError(
            f"{path}: unknown option(s) {unknown}; the keys are the script's flags without '--' (see --help)."
        )
    return {name: _convert_option(actions[name], value, path) for name, value in values.items()}


def _convert_option(action: argparse.Action, value, path: str):
    # YAML reads "1e-5" as a string and flags arrive as strings: both go through the flag's own type.
    if value is None or action.type is None:
        return value
    try:
        converted = [action.type(str(v)) for v in value] if isinstance(value, list) else action.type(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{path}: option {action.dest!r}: cannot read {value!r} ({error}).") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{path}: option {action.dest!r} must be one of {list(action.choices)}, got {value!r}.")
    return converted


def arguments_dict(*arguments) -> dict:
    """All parsed arguments as one flat dict (for trackers, the model card and the metrics file)."""
    return {key: value for args in arguments for key, value in dataclasses.asdict(args).items()}


@dataclass
class AugmentationArguments:
    """ViFi-CLIP's training augmentations (applied by `video_augmentation.VideoAugmentation`)."""

    flip: float = field(default=0.0, metadata={"help": "Probability of a horizontal flip of a clip (ViFi-CLIP: 0.5)."})
    color_jitter: float = field(default=0.0, metadata={"help": "Probability of colour jitter of a clip (ViFi: 0.8)."})
    grayscale: float = field(default=0.0, metadata={"help": "Probability of a greyscale clip (ViFi-CLIP: 0.2)."})
    mixup: float = field(default=0.0, metadata={"help": "Mixup Beta alpha, 0 = off (ViFi-CLIP: 0.8)."})
    cutmix: float = field(default=0.0, metadata={"help": "Cutmix Beta alpha, 0 = off (ViFi-CLIP: 1.0)."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "With both on: probability of cutmix."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the targets (ViFi-CLIP: 0.1)."})

    def __post_init__(self):
        for name in ("flip", "color_jitter", "grayscale", "mixup_switch_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} is a probability in [0, 1], got {getattr(self, name)}.")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"--mixup and --cutmix are Beta alphas >= 0, got {self.mixup} and {self.cutmix}.")

    @property
    def blends(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0
