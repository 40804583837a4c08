#!/usr/bin/env python
"""Video recognition with STAN, trained and evaluated with Accelerate.

With no arguments it builds a tiny random CLIP offline, generates the synthetic moving-shapes dataset (the class is
the motion direction, which needs temporal order), trains a small STAN classifier on it, evaluates it and saves
everything under `outputs/classification`, in a few minutes on a CPU:

    accelerate launch training/run_classification.py

Recipes for Kinetics-400 and Something-Something v2 are in `training/configs/`; pass `--config FILE` plus your
dataset paths (flags override the file). Evaluation reports top-1 (and top-5 with 5 classes or more) accuracy with
multi-view testing: `--num_test_clips` temporal clips x `--num_test_crops` spatial crops per video, softmax scores
averaged.
"""

# The command line comes first and is parsed before the heavy imports below (torch, transformers' models, datasets:
# seconds), so that `--help` and a bad flag answer at once.
from dataclasses import dataclass, field
from typing import Literal

from stan_arguments import DataArguments, ModelArguments, ScriptCommandLine, TrainingArguments


@dataclass
class ClassificationArguments:
    classifier_type: Literal["text", "linear"] = field(
        default="text", metadata={"help": "'text' (class-name text embeddings, the authors') or 'linear'."}
    )
    hypothesis_template: str = field(default="a video of {}.", metadata={"help": "Prompt of the text classifier."})
    num_test_clips: int = field(default=1, metadata={"help": "Temporal views per video at evaluation."})
    num_test_crops: int = field(default=1, metadata={"help": "Spatial views per clip at evaluation: 1 or 3."})
    labels_file: str | None = field(default=None, metadata={"help": "ssv2: something-something-v2-labels.json."})
    split_dir: str | None = field(default=None, metadata={"help": "ucf101/hmdb51: the folder of split lists."})
    fold: int = field(default=1, metadata={"help": "ucf101/hmdb51: split fold 1, 2 or 3."})

    @property
    def num_views(self) -> int:
        return self.num_test_clips * self.num_test_crops


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
    dataset_formats=("kinetics", "ssv2", "ucf101", "hmdb51", "folder"),
    description=__doc__,
)

if __name__ == "__main__":
    COMMAND_LINE.parse()  # exits here on --help or a bad flag

from pathlib import Path  # noqa: E402 (after the command line, see above)

import datasets
import torch

from modeling_stan import StanForVideoClassification
from modeling_stan.metrics import aggregate_views, topk_accuracy
from modeling_stan.video_datasets import (
    load_hmdb51,
    load_kinetics,
    load_something_something_v2,
    load_ucf101,
    load_video_folder,
)
from stan_training import RowOutputs, TrainingScript, collate_clips, evaluation_dataloader


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_split(data_args: DataArguments, args: ClassificationArguments, split: str,
               class_names: list[str] | None = None) -> datasets.Dataset | None:
    """One split in the dataset's layout; `class_names` (the training split's) keeps the label ids shared."""
    dataset, video_dir = data_args.dataset, data_args.video_dir
    if dataset in ("ucf101", "hmdb51"):
        # Their split lists define train and test only; validation is held out of train.
        if split == "validation":
            return None
        loader = load_ucf101 if dataset == "ucf101" else load_hmdb51
        return loader(_required(args.split_dir, "--split_dir", dataset), video_dir, split=split, fold=args.fold)
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
    return load_something_something_v2(annotation, _required(args.labels_file, "--labels_file", dataset), video_dir,
                                       **options)


def _required(value, flag: str, dataset: str):
    if value is None:
        raise ValueError(f"--dataset {dataset} needs {flag}.")
    return value


def hold_out(train: datasets.Dataset, data_args: DataArguments, seed: int):
    """Splits off `validation_split_percentage` % of the training videos, stratified by class, for validation."""
    if data_args.validation_split_percentage is None:
        raise ValueError("No validation split: pass --validation_file (or --video_dir/validation for 'folder') or "
                         "--validation_split_percentage (the best checkpoint is chosen on validation, never on test).")
    parts = train.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed,
                                   stratify_by_column="label")
    return parts["train"], parts["test"]


def collate_labelled_clips(samples: list[dict]) -> dict:
    return {**collate_clips(samples), "labels": torch.tensor([sample["label"] for sample in samples])}


# ----------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------


class ClassificationTask:
    """Cross-entropy training; top-1 / top-5 accuracy over the averaged softmax of each video's views."""

    def __init__(self, accelerator, metric_for_best_model: str, num_views: int, eval_loaders: dict):
        self.accelerator, self.metric_for_best_model = accelerator, metric_for_best_model
        self.num_views, self.eval_loaders = num_views, eval_loaders

    def training_loss(self, model, batch: dict) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

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
            outputs.add(batch["row"], probabilities=aggregate_views(logits.float(), self.num_views),
                        labels=batch["labels"])
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
    next_command = ("python -c \"import modeling_stan; from transformers import pipeline; "
                    "print(pipeline('video-classification', model='{output_dir}')('video.mp4', top_k=2))\"")

    def use_synthetic_dataset(self, data_args: DataArguments, root: Path) -> None:
        # The synthetic dataset ships a class-per-folder copy: folders/{train,validation,test}/<direction>/.
        data_args.dataset, data_args.video_dir = "folder", str(root / "folders")

    def load_splits(self, data_args: DataArguments, task_args: ClassificationArguments, seed: int) -> dict:
        train = load_split(data_args, task_args, "train")
        class_names = train.features["label"].names
        splits = {"train": train, **{split: load_split(data_args, task_args, split, class_names)
                                     for split in ("validation", "test")}}
        if splits["validation"] is None:
            splits["train"], splits["validation"] = hold_out(train, data_args, seed)
        for split in ("validation", "test"):
            if splits[split] is None or len(splits[split]) == 0 or min(splits[split]["label"]) < 0:
                raise ValueError(f"The {split} split needs labelled videos (--{split}_file, or --video_dir/{split} "
                                 "for --dataset folder).")
        return splits

    def model_config_fields(self, task_args: ClassificationArguments, splits: dict) -> dict:
        return {"classifier_type": task_args.classifier_type, "hypothesis_template": task_args.hypothesis_template,
                "class_names": splits["train"].features["label"].names}

    def training_collate(self, processor, task_args):
        return collate_labelled_clips

    def evaluation_dataloader(self, rows, video_options, task_args: ClassificationArguments, data_args, training_args):
        views = {**video_options, "num_clips": task_args.num_test_clips, "num_crops": task_args.num_test_crops}
        return evaluation_dataloader(rows, range(len(rows)), views, collate_labelled_clips, data_args, training_args)

    def make_task(self, accelerator, task_args, training_args, splits, eval_loaders, processor) -> ClassificationTask:
        return ClassificationTask(accelerator, training_args.metric_for_best_model, task_args.num_views, eval_loaders)


main = ClassificationScript().main


if __name__ == "__main__":
    ClassificationScript().run_from_command_line()
