#!/usr/bin/env python
"""Video recognition with STAN, trained and evaluated with Accelerate.

With no arguments it builds a tiny random CLIP offline, generates the synthetic moving-shapes dataset (the class is
the motion direction, which needs temporal order), trains a small STAN classifier on it, evaluates it and saves
everything under `outputs/classification`, in a few minutes on a CPU:

    accelerate launch training/run_classification.py

Recipes for Kinetics-400 and Something-Something v2, and ViFi-CLIP's settings (`vifi_*.yaml`: fully supervised,
zero-shot, base-to-novel, few-shot, prompting), are in `training/configs/`; pass `--config FILE` plus your
dataset paths (flags override the file). Evaluation reports top-1 (and top-5 with 5 classes or more) accuracy with
multi-view testing: `--num_test_clips` temporal clips x `--num_test_crops` spatial crops per video, softmax scores
averaged.
"""

# The command line comes first and is parsed before the heavy imports below (torch, transformers' models, datasets:
# seconds), so that `--help` and a bad flag answer at once.
from dataclasses import dataclass, field
from typing import Literal, get_args

from stan_arguments import AugmentationArguments, DataArguments, ModelArguments, ScriptCommandLine, TrainingArguments


@dataclass
class ClassificationArguments(AugmentationArguments):
    classifier_type: Literal["linear", "class_embeddings", "frozen_class_embeddings", "text_encoder"] = field(
        default="frozen_class_embeddings",
        metadata={
            "help": "Recognition head: see StanConfig.classifier_type. "
            "'frozen_class_embeddings' is the STAN authors' (fixed scale 100), 'text_encoder' ViFi-CLIP's."
        },
    )
    hypothesis_template: str = field(default="a video of {}.", metadata={"help": "Class prompt of the text heads."})
    trainable_parts: Literal["all", "text", "vision", "prompts"] = field(
        default="all", metadata={"help": "What trains (ViFi-CLIP's variants)."}
    )
    train_token_embedding: bool = field(
        default=True,
        metadata={"help": "Train the text tower's token-embedding table (ViFi-CLIP's text encoder has none: False)."},
    )
    vision_prompt_depth: int = field(default=0, metadata={"help": "ViFi-CLIP vision prompt depth (0: none)."})
    vision_prompt_length: int = field(default=16, metadata={"help": "Vision prompt tokens per layer."})
    text_prompt_depth: int = field(default=0, metadata={"help": "ViFi-CLIP text prompt depth (0: none)."})
    text_prompt_length: int = field(default=16, metadata={"help": "Text prompt tokens per layer."})
    text_prompt_init: str | None = field(
        default="a photo of a", metadata={"help": "Phrase initialising text prompts."}
    )
    num_shots: int | None = field(
        default=None, metadata={"help": "Few-shot: train on exactly this many videos per class, drawn with --seed."}
    )
    novel_test_file: str | None = field(
        default=None,
        metadata={"help": "Base-to-novel: split file (ViFi-CLIP layout) of the novel classes' test videos."},
    )
    novel_labels_file: str | None = field(default=None, metadata={"help": "Base-to-novel: the novel classes' labels."})
    zero_shot_dataset: Literal["vifi", "ucf101", "hmdb51"] = field(
        default="vifi",
        metadata={
            "help": "Zero-shot evaluation layout: 'vifi' (--zero_shot_test_files), or 'ucf101' / "
            "'hmdb51' (their official split lists in --zero_shot_split_dir, folds 1-3)."
        },
    )
    zero_shot_split_dir: str | None = field(
        default=None,
        metadata={"help": "Zero-shot on ucf101/hmdb51: ucfTrainTestlist/ or testTrainMulti_7030_splits/."},
    )
    zero_shot_test_files: list[str] = field(
        default_factory=list, metadata={"help": "Zero-shot: split files (ViFi-CLIP layout) evaluated after training."}
    )
    zero_shot_labels_files: list[str] = field(
        default_factory=list, metadata={"help": "Zero-shot: their labels files (one for all, or one per split)."}
    )
    zero_shot_video_dir: str | None = field(default=None, metadata={"help": "Zero-shot videos (default --video_dir)."})
    num_test_clips: int = field(default=1, metadata={"help": "Temporal views per video at evaluation."})
    num_test_crops: int = field(default=1, metadata={"help": "Spatial views per clip at evaluation: 1 or 3."})
    labels_file: str | None = field(
        default=None, metadata={"help": "ssv2: something-something-v2-labels.json; vifi: the labels CSV (id,name)."}
    )
    split_dir: str | None = field(default=None, metadata={"help": "ucf101/hmdb51: the folder of split lists."})
    fold: int = field(default=1, metadata={"help": "ucf101/hmdb51: split fold 1, 2 or 3."})

    def __post_init__(self):
        # Checked before anything runs: the evaluations these options ask for come after training.
        super().__post_init__()
        for name in (
            "classifier_type",
            "trainable_parts",
            "zero_shot_dataset",
        ):  # also when built in Python, not from the command line
            allowed = get_args(self.__dataclass_fields__[name].type)
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if (self.novel_test_file is None) != (self.novel_labels_file is None):
            raise ValueError("Base-to-novel needs both --novel_test_file and --novel_labels_file.")
        files, labels = self.zero_shot_test_files, self.zero_shot_labels_files
        if files and len(labels) not in (1, len(files)):
            raise ValueError(
                f"--zero_shot_labels_files needs one file or one per split file ({len(files)}), got {len(labels)}."
            )
        evaluates_other_classes = self.novel_test_file or files or self.zero_shot_split_dir
        if evaluates_other_classes and self.classifier_type != "text_encoder":
            raise ValueError(
                "Base-to-novel and zero-shot evaluation need --classifier_type text_encoder: only the "
                f"text-encoder head embeds new class names, not {self.classifier_type!r}."
            )

    @property
    def num_views(self) -> int:
        return self.num_test_clips * self.num_test_crops

    def model_config_fields(self) -> dict:
        """The `StanConfig` fields these arguments set (StanConfig validates them)."""
        names = (
            "classifier_type",
            "hypothesis_template",
            "vision_prompt_depth",
            "vision_prompt_length",
            "text_prompt_depth",
            "text_prompt_length",
            "text_prompt_init",
        )
        return {name: getattr(self, name) for name in names}

    def zero_shot_splits(self, video_dir: str) -> "list[datasets.Dataset]":
        """The test splits of the zero-shot evaluation (none if it is not asked for)."""
        if self.zero_shot_dataset in ("ucf101", "hmdb51"):
            if self.zero_shot_split_dir is None:
                return []
            loader = load_ucf101 if self.zero_shot_dataset == "ucf101" else load_hmdb51
            return [loader(self.zero_shot_split_dir, video_dir, split="test", fold=fold) for fold in (1, 2, 3)]
        files, labels = self.zero_shot_test_files, self.zero_shot_labels_files
        return [
            load_vifi_split(file, labels[0] if len(labels) == 1 else labels[index], video_dir)
            for index, file in enumerate(files)
        ]


# Defaults for pre-trained CLIP checkpoints (the recipes in training/configs/ set the rest).
RECIPE_DEFAULTS = {
    "output_dir": "outputs/classification",
    "metric_for_best_model": "top1",
}
# The tiny random CLIP of the no-argument demo learns from scratch (see run_retrieval.py); flags still win.
# From random weights the model first sits on a plateau (constant predictions) for about 300 steps; a constant
# learning rate keeps the escape from depending on how far a decaying schedule has gone by then. (STAN-conv was
# chosen when it was a light bottleneck; the authors' full-width module still passes the demo's test.)
DEMO_DEFAULTS = {
    "stan_depth": 1,
    "temporal_module": "conv",
    "drop_path_rate": 0.0,
    "classifier_type": "linear",
    "num_frames": 8,
    "learning_rate": 1e-3,
    "stan_lr_multiplier": 1.0,
    "weight_decay": 0.01,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_ratio": 0.05,
    "num_train_epochs": 60.0,
    "per_device_train_batch_size": 16,
    "random_resized_crop_scale": [0.8, 1.0],
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_strategy": "steps",
    "save_steps": 100,
    "dataloader_num_workers": 1,
}

COMMAND_LINE = ScriptCommandLine(
    argument_types=(ModelArguments, DataArguments, ClassificationArguments, TrainingArguments),
    recipe_defaults=RECIPE_DEFAULTS,
    demo_defaults=DEMO_DEFAULTS,
    dataset_formats=("kinetics", "ssv2", "ucf101", "hmdb51", "vifi", "folder"),
    description=__doc__,
)

if __name__ == "__main__":
    COMMAND_LINE.parse()  # exits here on --help or a bad flag

from pathlib import Path  # noqa: E402 (after the command line, see above)

import datasets
import torch
import torch.nn.functional as F
from stan_training import RowOutputs, TrainingScript, collate_clips, evaluation_dataloader
from video_augmentation import VideoAugmentation, soft_targets
from vifi_protocols import base_to_novel_summary, few_shot_subset, summarize_splits

from modeling_stan import StanForVideoClassification, StanModel
from modeling_stan.data.video_datasets import (
    load_hmdb51,
    load_kinetics,
    load_something_something_v2,
    load_ucf101,
    load_video_folder,
    load_vifi_split,
)
from modeling_stan.evaluation.metrics import aggregate_views, topk_accuracy
from modeling_stan.tuning.prompts import set_trainable_parts


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_split(
    data_args: DataArguments, args: ClassificationArguments, split: str, class_names: list[str] | None = None
) -> datasets.Dataset | None:
    """One split in the dataset's layout; `class_names` (the training split's) keeps the label ids shared."""
    dataset, video_dir = data_args.dataset, data_args.video_dir
    if dataset in ("ucf101", "hmdb51"):
        # Their split lists define train and test only; validation is held out of train.
        if split == "validation":
            return None
        loader = load_ucf101 if dataset == "ucf101" else load_hmdb51
        return loader(_required(args.split_dir, "--split_dir", dataset), video_dir, split=split, fold=args.fold)
    if dataset == "vifi":
        split_file = data_args.annotation_for(split)
        if split_file is None:
            return None
        return load_vifi_split(split_file, _required(args.labels_file, "--labels_file", dataset), video_dir)
    if dataset == "folder":
        root = Path(video_dir) / split
        if split == "validation" and not root.is_dir():
            return None
        return load_video_folder(root, class_names=class_names)
    annotation = data_args.annotation_for(split)
    if annotation is None:
        return None
    options = {} if data_args.video_ext is None else {"video_ext": data_args.video_ext}
    if dataset == "kinetics":
        return load_kinetics(annotation, video_dir, class_names=class_names, **options)
    return load_something_something_v2(
        annotation, _required(args.labels_file, "--labels_file", dataset), video_dir, **options
    )


def _required(value, flag: str, dataset: str):
    if value is None:
        raise ValueError(f"--dataset {dataset} needs {flag}.")
    return value


def hold_out(train: datasets.Dataset, data_args: DataArguments, seed: int):
    """Splits off `validation_split_percentage` % of the training videos, stratified by class, for validation."""
    if data_args.validation_split_percentage is None:
        raise ValueError(
            "No validation split: pass --validation_file (or --video_dir/validation for 'folder') or "
            "--validation_split_percentage (the best checkpoint is chosen on validation, never on test)."
        )
    parts = train.train_test_split(
        test_size=data_args.validation_split_percentage / 100, seed=seed, stratify_by_column="label"
    )
    return parts["train"], parts["test"]


def collate_labelled_clips(samples: list[dict]) -> dict:
    return {**collate_clips(samples), "labels": torch.tensor([sample["label"] for sample in samples])}


# ----------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------


class ClassificationTask:
    """Cross-entropy training; top-1 / top-5 accuracy over the averaged softmax of each video's views."""

    def __init__(
        self,
        accelerator,
        metric_for_best_model: str,
        num_views: int,
        eval_loaders: dict,
        augmentation: VideoAugmentation | None = None,
        label_smoothing: float = 0.0,
    ):
        self.accelerator, self.metric_for_best_model = accelerator, metric_for_best_model
        self.num_views, self.eval_loaders = num_views, eval_loaders
        self.augmentation, self.label_smoothing = augmentation, label_smoothing

    def training_loss(self, model, batch: dict) -> torch.Tensor:
        """Cross-entropy against label-smoothed targets, after the clip augmentations and mixup / cutmix."""
        pixel_values = batch["pixel_values"]
        num_classes = self.accelerator.unwrap_model(model).config.num_labels
        targets = soft_targets(batch["labels"].to(pixel_values.device), num_classes, self.label_smoothing)
        if self.augmentation is not None:
            pixel_values = self.augmentation.clips(pixel_values)
            if self.augmentation.args.blends:
                pixel_values, targets = self.augmentation.blend(pixel_values, targets)
        logits = model(pixel_values=pixel_values).logits
        return F.cross_entropy(logits.float(), targets.to(logits.device))

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        model = self.accelerator.unwrap_model(model)
        model.eval()
        outputs = RowOutputs(probabilities=(model.config.num_labels,), labels=())
        for batch in self.eval_loaders[split]:
            if batch is None:
                continue
            with self.accelerator.autocast():
                logits = model(pixel_values=batch["pixel_values"]).logits
            outputs.add(
                batch["row"], probabilities=aggregate_views(logits.float(), self.num_views), labels=batch["labels"]
            )
        gathered = outputs.gather(self.accelerator.device)
        ks = (1, 5) if model.config.num_labels >= 5 else (1,)
        metrics = topk_accuracy(gathered["probabilities"], gathered["labels"].long(), ks=ks)
        metrics["corrupt_videos"] = float(len(self.eval_loaders[split].dataset) - len(gathered["rows"]))
        return metrics


# ----------------------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------------------


class ClassificationScript(TrainingScript):
    command_line = COMMAND_LINE
    model_class = StanForVideoClassification
    card_task = "video-classification"
    summary_metrics = ("top1", "top5")
    next_command = (
        "python -c \"from transformers import pipeline; print(pipeline('video-classification', "
        "model='{output_dir}', trust_remote_code=True)('video.mp4', top_k=2))\""
    )

    def use_synthetic_dataset(self, data_args: DataArguments, root: Path) -> None:
        # The synthetic dataset ships a class-per-folder copy: folders/{train,validation,test}/<direction>/.
        data_args.dataset, data_args.video_dir = "folder", str(root / "folders")

    def load_splits(
        self, data_args: DataArguments, task_args: ClassificationArguments, training_args: TrainingArguments
    ) -> dict:
        if not training_args.do_train:
            # Evaluation only (e.g. zero-shot from a dual encoder): the test split, whose classes the head takes.
            test = load_split(data_args, task_args, "test")
            if test is None or len(test) == 0:
                raise ValueError(
                    "--do_train false evaluates the test split: pass --test_file (or --video_dir/test "
                    "for --dataset folder, --split_dir and --fold for ucf101/hmdb51)."
                )
            return {"test": test}
        train = load_split(data_args, task_args, "train")
        class_names = train.features["label"].names
        splits = {
            "train": train,
            **{split: load_split(data_args, task_args, split, class_names) for split in ("validation", "test")},
        }
        if splits["validation"] is None:
            splits["train"], splits["validation"] = hold_out(train, data_args, training_args.seed)
        if task_args.num_shots is not None:
            splits["train"] = few_shot_subset(splits["train"], task_args.num_shots, training_args.seed)
        for split in ("validation", "test"):
            if splits[split] is None or len(splits[split]) == 0 or min(splits[split]["label"]) < 0:
                raise ValueError(
                    f"The {split} split needs labelled videos (--{split}_file, or --video_dir/{split} "
                    "for --dataset folder)."
                )
        return splits

    def model_config_fields(self, task_args: ClassificationArguments, splits: dict) -> dict:
        named_by = splits["train"] if "train" in splits else splits["test"]
        return {**task_args.model_config_fields(), "class_names": named_by.features["label"].names}

    def prepare_model(self, model, task_args: ClassificationArguments, processor) -> None:
        if model.has_text_tower:
            # A head loaded from a STAN checkpoint of another task (a dual encoder) has no class prompts yet.
            model.set_class_names(model.class_names(), processor.tokenizer)
        elif model.config.classifier_type != "linear" and _loaded_from_dual_encoder(model):
            # Its class embeddings come from the dual encoder's text tower, which the classifier does not keep.
            model.init_class_embeddings(StanModel.from_pretrained(model.config._name_or_path), processor.tokenizer)
        set_trainable_parts(model, task_args.trainable_parts, task_args.train_token_embedding)

    def training_collate(self, processor, task_args):
        return collate_labelled_clips

    def evaluation_dataloader(self, rows, video_options, task_args: ClassificationArguments, data_args, training_args):
        views = {**video_options, "num_clips": task_args.num_test_clips, "num_crops": task_args.num_test_crops}
        return evaluation_dataloader(rows, range(len(rows)), views, collate_labelled_clips, data_args, training_args)

    def make_task(self, accelerator, task_args, training_args, splits, eval_loaders, processor) -> ClassificationTask:
        video_processor = processor.video_processor
        augmentation = VideoAugmentation(task_args, video_processor.image_mean, video_processor.image_std)
        return ClassificationTask(
            accelerator,
            training_args.metric_for_best_model,
            task_args.num_views,
            eval_loaders,
            augmentation,
            task_args.label_smoothing,
        )

    def extra_results(
        self,
        accelerator,
        model,
        task: ClassificationTask,
        processor,
        results: dict,
        data_args: DataArguments,
        task_args: ClassificationArguments,
        training_args,
    ) -> dict:
        """Evaluations on other class sets, through the text-encoder head: base-to-novel and zero-shot."""
        extra = {}
        evaluate = lambda rows, name: self._evaluate_class_set(
            accelerator, model, task, processor, rows, name, data_args, task_args, training_args
        )
        if task_args.novel_test_file is not None:
            novel_rows = load_vifi_split(task_args.novel_test_file, task_args.novel_labels_file, data_args.video_dir)
            extra["novel"] = evaluate(novel_rows, "novel")
            extra["base_to_novel"] = base_to_novel_summary(results["test"], extra["novel"])
        zero_shot_splits = task_args.zero_shot_splits(task_args.zero_shot_video_dir or data_args.video_dir)
        if zero_shot_splits:
            per_split = {
                f"split{index + 1}": evaluate(rows, f"zero_shot_split{index + 1}")
                for index, rows in enumerate(zero_shot_splits)
            }
            extra["zero_shot"] = {**per_split, **summarize_splits(per_split)}
        return extra

    def _evaluate_class_set(
        self,
        accelerator,
        model,
        task: ClassificationTask,
        processor,
        rows: datasets.Dataset,
        name: str,
        data_args: DataArguments,
        task_args: ClassificationArguments,
        training_args,
    ) -> dict:
        """Metrics on `rows` with the head pointed at their class names; the model's own classes are restored."""
        head = accelerator.unwrap_model(model)
        own_classes = head.class_names()
        video_options = data_args.video_options(processor.video_processor)
        task.eval_loaders[name] = accelerator.prepare(
            self.evaluation_dataloader(rows, video_options, task_args, data_args, training_args)
        )
        head.set_class_names(rows.features["label"].names, processor.tokenizer)
        try:
            return task.evaluate(model, name)
        finally:
            head.set_class_names(own_classes, processor.tokenizer)


def _loaded_from_dual_encoder(model) -> bool:
    """Whether `from_pretrained` built `model` from a STAN dual-encoder folder (its config still names that class)."""
    return bool(set(model.config.architectures or ()) & {"StanModel", "StanForVideoTextRetrieval"})


main = ClassificationScript().main


if __name__ == "__main__":
    ClassificationScript().run_from_command_line()
