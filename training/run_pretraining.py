#!/usr/bin/env python
"""Post-pretraining of STAN / Mug-STAN on web-scale video-text (and image-text) data, with Accelerate.

The training data are WebDataset tar shards as video2dataset / img2dataset write them, streamed with `datasets`
(see `pretraining_data.py`): split across processes and dataloader workers without overlap, shuffled, mixed one
source per step as the authors' MetaLoader, resumable mid-stream. Validation is zero-shot retrieval on any dataset
`run_retrieval.py` loads (same loaders, same metrics), every epoch or every `--eval_steps` steps.

With no arguments it builds a tiny random CLIP offline, generates the synthetic moving-shapes videos, packs them into
video shards plus image shards of stills (written once under `outputs/pretraining`), post-pretrains a small STAN on
the mixture and reports zero-shot retrieval on the generated validation and test videos:

    accelerate launch training/run_pretraining.py

The authors' WebVid-10M recipes are `training/configs/{stan,mugstan}_webvid10m_b32_pretrain.yaml`, e.g.

    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 ... training/run_pretraining.py \\
        --config training/configs/mugstan_webvid10m_b32_pretrain.yaml \\
        --train_shards "webvid=s3://bucket/webvid/{00000..10727}.tar" --train_num_samples 10727000 \\
        --video_dir MSRVTT/videos/all --annotation_file MSRVTT_JSFUSION_test.csv

`all_results.json` reports, besides the metrics, the samples seen and the corrupt samples skipped per source, and the
samples lost in damaged shards (cut or unreadable; see `pretraining_data.check_shard`) per source and per shard.
"""

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from pretraining_data import (
    ClipDecoder,
    MixedStreamLoader,
    ShardStream,
    batches_per_epoch,
    parse_sources,
    usable_shortfall,
    write_synthetic_shards,
)
from run_retrieval import DEMO_DEFAULTS, RECIPE_DEFAULTS, RetrievalArguments, RetrievalScript, load_split
from stan_arguments import DataArguments, ModelArguments, ScriptCommandLine, TrainingArguments
from stan_training import (
    SYNTHETIC_DATASET_NAME,
    TrainingLoop,
    UnusableTrainingDataError,
    build_optimizer,
    build_scheduler,
    prepare_once,
    training_summary,
)

from modeling_stan.demo.synthetic_videos import plan_videos


@dataclass
class PretrainingArguments(RetrievalArguments):
    train_shards: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training sources as NAME=PATTERN (brace patterns, globs, URLs; a name repeated adds "
            "patterns). Default: the generated synthetic shards."
        },
    )
    train_num_samples: list[int] | None = field(
        default=None,
        metadata={"help": "Samples of each source, in --train_shards order; default: the shards' _stats.json files."},
    )
    source_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Mix the sources in these proportions of batches; default: in proportion to their sizes "
            "(the authors' MetaLoader)."
        },
    )
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "Samples per shuffled block of each stream."})
    train_num_frames: int | None = field(
        default=None, metadata={"help": "Frames of a training clip (default --num_frames, which validation uses)."}
    )
    train_max_text_length: int | None = field(
        default=None, metadata={"help": "Tokens of a training caption (default --max_text_length, for validation)."}
    )
    synthetic_samples_per_shard: int = field(default=16, metadata={"help": "Samples per generated shard."})

    def __post_init__(self):
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}.")


class StreamingTrainingLoop(TrainingLoop):
    """`TrainingLoop` over a `MixedStreamLoader`, whose position is part of every checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accelerator.register_for_checkpointing(self.train_loader)

    def _epoch_batches(self, epoch: int, done: int):
        # The stream resumes from its own saved position, never by replaying batches.
        self.train_loader.start_epoch(epoch, done)
        return self._with_counts(self.train_loader)

    @staticmethod
    def _with_counts(loader):
        """The loop's micro-batches: each batch with its samples and the corrupt ones the stream skipped for it (the
        stream is read in this process, so its count moves exactly with the batches)."""
        seen = loader.total_corrupt
        for batch in loader:
            corrupt, seen = loader.total_corrupt - seen, loader.total_corrupt
            usable = 0 if batch is None else len(batch["input_ids"])
            yield {"batch": batch, "num_samples": usable + corrupt, "num_corrupt": corrupt}


class PretrainingScript(RetrievalScript):
    command_line = ScriptCommandLine(
        argument_types=(ModelArguments, DataArguments, PretrainingArguments, TrainingArguments),
        recipe_defaults={**RECIPE_DEFAULTS, "output_dir": "outputs/pretraining"},
        # The tiny random CLIP learns from scratch (as run_retrieval.py's demo); our choices, not the authors'.
        demo_defaults={**DEMO_DEFAULTS, "num_train_epochs": 20.0},
        dataset_formats=RetrievalScript.command_line.dataset_formats,
        description=__doc__,
    )

    def load_splits(
        self, data_args: DataArguments, task_args: PretrainingArguments, training_args: TrainingArguments
    ) -> dict:
        """The zero-shot validation and test rows (the training data are the shards)."""
        splits = {split: load_split(data_args, task_args, split) for split in ("validation", "test")}
        for split, rows in splits.items():
            if rows is None:
                raise ValueError(f"Zero-shot {split} needs annotations: pass --{split}_file or --annotation_file.")
        return splits

    def _splits(self, accelerator, data_args, task_args, training_args):
        dataset_name, splits = super()._splits(accelerator, data_args, task_args, training_args)
        if dataset_name == SYNTHETIC_DATASET_NAME and not task_args.train_shards:
            task_args.train_shards = self._synthetic_shards(accelerator, data_args, task_args, training_args)
        if not task_args.train_shards:
            raise ValueError("No training data: pass --train_shards NAME=PATTERN ...")
        # Expanded and sized before the model is built, so that a wrong pattern fails at once.
        self.sources = parse_sources(
            task_args.train_shards, task_args.train_num_samples, log=accelerator.is_main_process
        )
        shortfall = usable_shortfall(self.sources, training_args.min_usable_sample_fraction)
        if shortfall is not None:
            raise UnusableTrainingDataError(shortfall)
        sources = ", ".join(source.name for source in self.sources)
        return f"{sources} (WebDataset shards; zero-shot evaluation on {dataset_name})", splits

    def _synthetic_shards(self, accelerator, data_args, task_args, training_args) -> list[str]:
        """Video shards of the synthetic training videos and image shards of their stills, written once."""
        videos = [
            video
            for video in plan_videos(
                num_train=data_args.synthetic_num_train,
                num_val=data_args.synthetic_num_val,
                num_test=data_args.synthetic_num_test,
                size=64,
                seed=training_args.seed,
            )
            if video.split == "train"
        ]
        root = prepare_once(
            accelerator,
            Path(training_args.output_dir) / "synthetic_shards",
            lambda folder: write_synthetic_shards(
                folder, videos, Path(data_args.video_dir), samples_per_shard=task_args.synthetic_samples_per_shard
            ),
        )
        return [f"videos={root / 'videos' / '*.tar'}", f"images={root / 'images' / '*.tar'}"]

    def _training_loop(self, accelerator, model, processor, splits, data_args, task_args, training_args, checkpoints):
        sources = self.sources
        batch_size = training_args.per_device_train_batch_size
        counts = batches_per_epoch(sources, batch_size * accelerator.num_processes, task_args.source_weights)
        workers = data_args.dataloader_num_workers
        decoder = ClipDecoder(
            processor.video_processor,
            task_args.train_num_frames or data_args.num_frames,
            data_args.random_resized_crop_scale,
        )
        loader = MixedStreamLoader(
            sources,
            counts,
            make_stream=functools.partial(
                ShardStream,
                seed=training_args.seed,
                buffer_size=task_args.shuffle_buffer_size,
                batch_size=batch_size,
                decode=decoder,
            ),
            # One stream per dataloader worker, each read by its own one-worker loader (none: in this process).
            streams_per_process=max(1, workers),
            num_workers=min(1, workers),
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            seed=training_args.seed,
            tokenize=functools.partial(
                processor.tokenizer,
                padding="max_length",
                truncation=True,
                max_length=task_args.train_max_text_length or task_args.max_text_length,
                return_tensors="pt",
            ),
            device=accelerator.device,
            record=self._recorder(accelerator, training_args),
        )
        self.train_loader = loader
        video_options = data_args.video_options(processor.video_processor)
        eval_splits = ("validation", "test")
        eval_loaders = [
            self.evaluation_dataloader(splits[split], video_options, task_args, data_args, training_args)
            for split in eval_splits
        ]
        optimizer = build_optimizer(model, training_args)
        model, optimizer, *eval_loaders = accelerator.prepare(model, optimizer, *eval_loaders)
        task = self.make_task(
            accelerator, task_args, training_args, splits, dict(zip(eval_splits, eval_loaders)), processor
        )
        scheduler = build_scheduler(optimizer, training_args, loader)
        return StreamingTrainingLoop(
            accelerator, training_args, task, model, optimizer, scheduler, loader, loader, checkpoints
        )

    @staticmethod
    def _recorder(accelerator, training_args):
        """Testing (--debug_dump_dir): each process appends the keys of every batch it trains on."""
        if not training_args.debug_dump_dir:
            return None
        path = Path(training_args.debug_dump_dir) / f"rank{accelerator.process_index}_samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)

        def record(entry: dict) -> None:
            with open(path, "a", encoding="utf-8") as file:
                file.write(json.dumps(entry) + "\n")

        return record

    def training_summary(self, loop, best_step, runtime):
        damaged = {path: report for source in self.sources for path, report in source.damage_report().items()}
        return {
            **training_summary(loop, best_step, runtime),
            "lost_samples": sum(source.lost_samples for source in self.sources),
            "damaged_shards": damaged,
            "sources": self.train_loader.totals(),
        }


main = PretrainingScript().main


if __name__ == "__main__":
    PretrainingScript().run_from_command_line()
