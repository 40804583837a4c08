#!/usr/bin/env python
"""Video-text retrieval with STAN / Mug-STAN, trained and evaluated with Accelerate.

With no arguments it builds a tiny random CLIP offline, generates the synthetic moving-shapes dataset, trains a
small STAN on it, evaluates it and saves everything under `outputs/retrieval`, in a few minutes on a CPU:

    accelerate launch training/run_retrieval.py

The authors' recipes are in `training/configs/` (pass `--config FILE` plus your dataset paths; flags override the
file), e.g.

    accelerate launch training/run_retrieval.py --config training/configs/stan_msrvtt_b32.yaml \\
        --video_dir MSRVTT/videos/all --annotation_file MSRVTT_data.json \\
        --train_video_ids_file MSRVTT_train.9k.csv --test_file MSRVTT_JSFUSION_test.csv

The loss is the symmetric InfoNCE over the text and video features all-gathered (with gradients) from every
process. Evaluation reports text-to-video and video-to-text R@1/5/10, MdR and MnR (every caption is a query), raw and with
dual softmax (`dsl_`), and on the test split also with querybank normalisation over the training captions
(`qbnorm_t2v_`).
"""

# The command line comes first and is parsed before the heavy imports below (torch, transformers' models, datasets:
# seconds), so that `--help` and a bad flag answer at once.
from dataclasses import dataclass, field
from typing import Literal

from stan_arguments import DataArguments, ModelArguments, ScriptCommandLine, TrainingArguments


@dataclass
class RetrievalArguments:
    alignment: Literal["mean", "mug"] = field(default="mean", metadata={"help": "'mean' (STAN) or 'mug' (Mug-STAN)."})
    mug_variant: Literal["simple", "full"] = field(
        default="simple", metadata={"help": "'simple' or 'full' Mug alignment."}
    )
    mug_lambda: float = field(
        default=100.0, metadata={"help": "Mug alignment: inverse temperature of its token/frame softmax."}
    )
    loss_reduction: Literal["sum", "mean"] = field(
        default="sum", metadata={"help": "'sum' (authors) or 'mean' (CLIP) of the 2 directions."}
    )
    freeze_text_tower: bool = field(default=False, metadata={"help": "Train the video tower only."})
    gather_gradient: Literal["global", "local"] = field(
        default="global",
        metadata={
            "help": "'global': the gradient of the whole global batch, as one process would compute it; 'local': the "
            "authors' (their all-gather keeps only each process's slice: 1/W of it on W processes)."
        },
    )
    max_text_length: int = field(default=32, metadata={"help": "Caption tokens (padded or truncated to this)."})
    train_video_ids_file: str | None = field(
        default=None, metadata={"help": "msrvtt/msvd: ids of the training videos."}
    )
    validation_video_ids_file: str | None = field(
        default=None, metadata={"help": "msrvtt/msvd: ids of the validation videos."}
    )
    test_video_ids_file: str | None = field(default=None, metadata={"help": "msrvtt/msvd: ids of the test videos."})
    dsl_lambda: float = field(default=100.0, metadata={"help": "Inverse temperature of dual-softmax re-ranking."})
    qb_norm_beta: float = field(default=20.0, metadata={"help": "Inverse temperature of QB-Norm."})
    qb_norm_k: int = field(default=1, metadata={"help": "QB-Norm: querybank neighbours per gallery video."})
    qb_norm_bank_size: int | None = field(
        default=None, metadata={"help": "Training captions in the QB-Norm querybank. Unset: all of them."}
    )

    def __post_init__(self):
        if self.gather_gradient not in ("global", "local"):
            raise ValueError(f"--gather_gradient must be 'global' or 'local', got {self.gather_gradient!r}.")


# The authors' MSR-VTT recipe (configs/exp/stan/stan_msrvtt_b32_hf.py) for pre-trained CLIP checkpoints.
RECIPE_DEFAULTS = {
    "output_dir": "outputs/retrieval",
    "metric_for_best_model": "t2v_R@1",
    "num_frames": 12,
    "fixed_logit_scale": 100.0,
}
# The tiny random CLIP of the no-argument demo is not pre-trained: it learns from scratch, at a from-scratch
# learning rate, in a few minutes. These apply only when --model_name_or_path is not given; flags still win.
DEMO_DEFAULTS = {
    "stan_depth": 1,
    "drop_path_rate": 0.0,
    "fixed_logit_scale": None,
    "num_frames": 8,
    "max_text_length": 16,
    "learning_rate": 1e-3,
    "stan_lr_multiplier": 1.0,
    "weight_decay": 0.01,
    "warmup_ratio": 0.05,
    "num_train_epochs": 12.0,
    "per_device_train_batch_size": 16,
    "random_resized_crop_scale": [0.6, 1.0],
    "dataloader_num_workers": 1,
}

COMMAND_LINE = ScriptCommandLine(
    argument_types=(ModelArguments, DataArguments, RetrievalArguments, TrainingArguments),
    recipe_defaults=RECIPE_DEFAULTS,
    demo_defaults=DEMO_DEFAULTS,
    dataset_formats=("msrvtt", "didemo", "lsmdc", "msvd", "activitynet", "webvid"),
    description=__doc__,
)

if __name__ == "__main__":
    COMMAND_LINE.parse()  # exits here on --help or a bad flag

import functools  # noqa: E402 (after the command line, see above)
from pathlib import Path  # noqa: E402

import datasets
import torch
from stan_training import RowOutputs, TrainingScript, all_gather_with_grad, collate_clips, evaluation_dataloader

from modeling_stan import StanForVideoTextRetrieval, video_text_contrastive_loss
from modeling_stan.data.video_datasets import (
    load_activitynet_captions,
    load_didemo,
    load_lsmdc,
    load_msrvtt,
    load_msvd,
    load_webvid,
    unique_video_rows,
)
from modeling_stan.demo.synthetic_videos import MSRVTT_SPLIT_NAMES
from modeling_stan.evaluation.metrics import (
    dual_softmax,
    querybank_normalize,
    retrieval_metrics,
    text_to_video_and_video_to_text,
)


BUILDERS = {
    "msrvtt": load_msrvtt,
    "didemo": load_didemo,
    "lsmdc": load_lsmdc,
    "msvd": load_msvd,
    "activitynet": load_activitynet_captions,
    "webvid": load_webvid,
}
# Builders that take a list of video ids per split (MSR-VTT's train.9k.csv, MSVD's train_list.txt).
TAKE_VIDEO_IDS = ("msrvtt", "msvd")

# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_split(data_args: DataArguments, retrieval_args: RetrievalArguments, split: str) -> datasets.Dataset | None:
    annotation = data_args.annotation_for(split)
    if annotation is None:
        return None
    options = {} if data_args.video_ext is None else {"video_ext": data_args.video_ext}
    video_ids = getattr(retrieval_args, f"{split}_video_ids_file")
    if video_ids is not None:
        if data_args.dataset not in TAKE_VIDEO_IDS:
            raise ValueError(f"--{split}_video_ids_file applies to {list(TAKE_VIDEO_IDS)}, not {data_args.dataset}.")
        options["video_ids_file"] = video_ids
    elif data_args.dataset == "msrvtt" and str(annotation).endswith(".json"):
        # One MSR-VTT JSON holds every split; each video names its own.
        options["split"] = MSRVTT_SPLIT_NAMES[split]
    return BUILDERS[data_args.dataset](annotation, data_args.video_dir, **options)


def hold_out_videos(train: datasets.Dataset, data_args: DataArguments, seed: int):
    """Splits off `validation_split_percentage` % of the training *videos* (all their captions) for validation."""
    if data_args.validation_split_percentage is None:
        raise ValueError(
            "No validation annotations: pass --validation_file or --validation_split_percentage (the "
            "best checkpoint is chosen on validation, never on test)."
        )
    video_indices = sorted(set(train["video_index"]))
    count = max(1, round(len(video_indices) * data_args.validation_split_percentage / 100))
    generator = torch.Generator().manual_seed(seed)
    held_out = {video_indices[i] for i in torch.randperm(len(video_indices), generator=generator)[:count].tolist()}
    is_held_out = [index in held_out for index in train["video_index"]]
    rows = {flag: [row for row, value in enumerate(is_held_out) if value == flag] for flag in (False, True)}
    return train.select(rows[False]), train.select(rows[True])


class RetrievalCollator:
    """Stacks clips and tokenises captions to a fixed length (so every process's text tensors can be gathered)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict]) -> dict:
        text = self.tokenizer(
            [sample["caption"] for sample in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {**collate_clips(samples), "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


# ----------------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------------


class RetrievalTask:
    """Loss over the features of the whole global batch, and retrieval metrics with and without re-ranking."""

    def __init__(
        self,
        accelerator,
        args: RetrievalArguments,
        metric_for_best_model: str,
        eval_batch_size: int,
        splits: dict,
        eval_loaders: dict,
        tokenizer,
    ):
        self.accelerator, self.args, self.metric_for_best_model = accelerator, args, metric_for_best_model
        self.eval_batch_size, self.splits, self.eval_loaders, self.tokenizer = (
            eval_batch_size,
            splits,
            eval_loaders,
            tokenizer,
        )

    def training_loss(self, model, batch: dict) -> torch.Tensor:
        # Through the wrapped model's forward, so that DDP synchronises the gradients of this pass.
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            return_loss=False,
        )
        model = self.accelerator.unwrap_model(model)
        # The scores and the loss are computed in float32 whatever the mixed precision of the towers.
        gather = functools.partial(all_gather_with_grad, local_gradient=self.args.gather_gradient == "local")
        gathered = {
            "text_embeds": gather(outputs.text_embeds.float()),
            "video_embeds": gather(outputs.video_embeds.float()),
        }
        if model.config.alignment == "mug":
            gathered["token_embeds"] = gather(outputs.token_embeds.float())
            gathered["text_attention_mask"] = gather(batch["attention_mask"])
            gathered["frame_embeds"] = gather(outputs.frame_embeds.float())
        logits_per_text = model.similarity(**gathered) * model.logit_scale_value()
        return video_text_contrastive_loss(logits_per_text, model.config.loss_reduction)

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        """Every caption of the split is a query; the gallery is the split's videos that could be decoded."""
        model = self.accelerator.unwrap_model(model)
        model.eval()
        rows = self.splits[split].with_format(None)
        video_index, captions = rows["video_index"], rows["caption"]
        videos = self._video_features(model, split)
        # Gallery position of each decoded video; captions of an undecodable video have no ground truth left.
        position = {video_index[row]: i for i, row in enumerate(videos["rows"].tolist())}
        queries = [row for row, index in enumerate(video_index) if index in position]
        texts = self._text_features(model, [captions[row] for row in queries])
        similarity = self._similarity(model, texts, videos)
        text_to_video = torch.tensor([position[video_index[row]] for row in queries])
        metrics = text_to_video_and_video_to_text(similarity, text_to_video)
        lam = self.args.dsl_lambda
        dsl = text_to_video_and_video_to_text(
            dual_softmax(similarity, lam, axis=0), text_to_video, sim_v2t=dual_softmax(similarity, lam, axis=1)
        )
        metrics.update({f"dsl_{name}": value for name, value in dsl.items()})
        if split == "test" and "train" in self.splits:
            # Encoding the querybank (all training captions) is too costly to repeat at every validation.
            metrics.update(self._querybank_normalized_metrics(model, similarity, text_to_video, videos))
        metrics["corrupt_videos"] = float(len(set(video_index)) - len(position))
        return metrics

    def _querybank_normalized_metrics(self, model, similarity, text_to_video, videos) -> dict[str, float]:
        """Text-to-video metrics after QB-Norm, the querybank being the training captions scored on this gallery."""
        bank_captions = self.splits["train"].with_format(None)["caption"][: self.args.qb_norm_bank_size]
        bank = self._similarity(model, self._text_features(model, bank_captions), videos)
        normalized = querybank_normalize(
            similarity, bank, beta=self.args.qb_norm_beta, k=min(self.args.qb_norm_k, similarity.shape[1])
        )
        return {f"qbnorm_t2v_{name}": value for name, value in retrieval_metrics(normalized, text_to_video).items()}

    def _video_features(self, model, split: str) -> dict[str, torch.Tensor]:
        """Embeddings of the split's distinct videos (those that decoded), from every process, sorted by row."""
        config = model.config
        outputs = RowOutputs(
            video_embeds=(config.projection_dim,), frame_embeds=(config.num_frames, config.projection_dim)
        )
        for batch in self.eval_loaders[split]:
            if batch is None:
                continue
            with self.accelerator.autocast():
                features = model.get_video_features(batch["pixel_values"])
            outputs.add(batch["row"], video_embeds=features.pooler_output, frame_embeds=features.frame_embeds)
        return outputs.gather(self.accelerator.device)

    def _text_features(self, model, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text embeddings of `captions` in order, each process encoding a share of them."""
        length, dim = self.args.max_text_length, model.config.projection_dim
        outputs = RowOutputs(text_embeds=(dim,), token_embeds=(length, dim), text_attention_mask=(length,))
        with self.accelerator.split_between_processes(list(enumerate(captions))) as share:
            for start in range(0, len(share), self.eval_batch_size):
                indices, chunk = zip(*share[start : start + self.eval_batch_size])
                text = self.tokenizer(
                    list(chunk), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
                ).to(self.accelerator.device)
                with self.accelerator.autocast():
                    features = model.get_text_features(text["input_ids"], text["attention_mask"])
                outputs.add(
                    torch.tensor(indices),
                    text_embeds=features.pooler_output,
                    token_embeds=features.token_embeds,
                    text_attention_mask=text["attention_mask"],
                )
        return outputs.gather(self.accelerator.device)

    def _similarity(self, model, texts: dict, videos: dict) -> torch.Tensor:
        """Unscaled (texts, videos) scores under the model's alignment, texts in blocks to bound memory."""
        blocks = []
        for start in range(0, len(texts["text_embeds"]), self.eval_batch_size):
            block = {
                name: value[start : start + self.eval_batch_size] for name, value in texts.items() if name != "rows"
            }
            blocks.append(
                model.similarity(
                    block["text_embeds"],
                    videos["video_embeds"],
                    token_embeds=block["token_embeds"],
                    text_attention_mask=block["text_attention_mask"].long(),
                    frame_embeds=videos["frame_embeds"],
                )
            )
        return torch.cat(blocks)


# ----------------------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------------------


class RetrievalScript(TrainingScript):
    command_line = COMMAND_LINE
    model_class = StanForVideoTextRetrieval
    card_task = "video-text-retrieval"
    summary_metrics = ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "v2t_R@1", "dsl_t2v_R@1")
    # A saved checkpoint carries its pipeline code (custom_pipelines), which transformers runs only with
    # trust_remote_code=True, with or without this package installed.
    next_command = (
        'python -c "from transformers import pipeline; '
        "print(pipeline('zero-shot-video-classification', model='{output_dir}', trust_remote_code=True)("
        "'video.mp4', candidate_labels=['a red square moves from left to right', 'a blue circle moves "
        "from top to bottom'], hypothesis_template='{{}}'))\""
    )

    def use_synthetic_dataset(self, data_args: DataArguments, root: Path) -> None:
        # The synthetic dataset ships an MSR-VTT-style annotation file holding all three splits.
        data_args.dataset, data_args.video_dir = "msrvtt", str(root / "videos")
        data_args.annotation_file = str(root / "msrvtt" / "MSRVTT_data.json")

    def load_splits(
        self, data_args: DataArguments, task_args: RetrievalArguments, training_args: TrainingArguments
    ) -> dict:
        splits = {split: load_split(data_args, task_args, split) for split in ("train", "validation", "test")}
        if not training_args.do_train:
            # Evaluation only: the test split, and validation and train (the QB-Norm querybank) if given.
            if splits["test"] is None:
                raise ValueError("--do_train false evaluates the test split: pass --test_file or --annotation_file.")
            return {split: rows for split, rows in splits.items() if rows is not None}
        if splits["train"] is None:
            raise ValueError("No training annotations: pass --train_file or --annotation_file.")
        if splits["validation"] is None:
            splits["train"], splits["validation"] = hold_out_videos(splits["train"], data_args, training_args.seed)
        if splits["test"] is None:
            raise ValueError("No test annotations: pass --test_file or --annotation_file.")
        return splits

    def model_config_fields(self, task_args: RetrievalArguments, splits: dict) -> dict:
        return {
            "alignment": task_args.alignment,
            "mug_variant": task_args.mug_variant,
            "mug_lambda": task_args.mug_lambda,
            "loss_reduction": task_args.loss_reduction,
        }

    def prepare_model(self, model, task_args: RetrievalArguments, processor) -> None:
        if task_args.freeze_text_tower:
            model.text_model.requires_grad_(False)
            model.text_projection.requires_grad_(False)

    def training_collate(self, processor, task_args: RetrievalArguments) -> RetrievalCollator:
        return RetrievalCollator(processor.tokenizer, task_args.max_text_length)

    def evaluation_dataloader(self, rows, video_options, task_args, data_args, training_args):
        # The gallery: one row per distinct video.
        return evaluation_dataloader(
            rows, unique_video_rows(rows), video_options, collate_clips, data_args, training_args
        )

    def make_task(self, accelerator, task_args, training_args, splits, eval_loaders, processor) -> RetrievalTask:
        return RetrievalTask(
            accelerator,
            task_args,
            training_args.metric_for_best_model,
            training_args.per_device_eval_batch_size,
            splits,
            eval_loaders,
            processor.tokenizer,
        )


main = RetrievalScript().main


if __name__ == "__main__":
    RetrievalScript().run_from_command_line()
