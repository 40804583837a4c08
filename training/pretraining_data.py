"""Streaming video-text and image-text pre-training data for `run_pretraining.py`.

The data are WebDataset tar shards as video2dataset and img2dataset write them (`{key}.mp4` or `{key}.jpg|png|webp`,
`{key}.txt` caption, optionally `{key}.json`, and a `{shard}_stats.json` beside each tar), read as a stream (a
`datasets.IterableDataset` over the tar members, read with `fsspec`), local or remote (`https://`, `s3://`, ...),
named by brace patterns (`webvid/{000000..000999}.tar`).

Damaged shards (`check_shard`): a local shard that does not end in a tar end-of-archive marker was cut (an
interrupted copy or download; cut at a member boundary it would read as a complete tar). Its headers are then read to
find how many whole samples precede the damage; the stream reads those and skips the rest, and the samples its
`_stats.json` declares beyond them are *lost*: named per shard in the log and counted per source and per shard in
`all_results.json` (`ShardSource.lost_samples`, `MixedStreamLoader.totals`). An epoch is planned on the samples that
can be read, so it is never filled by repeating samples; a source whose readable fraction is below
`--min_usable_sample_fraction` stops the run before training (`usable_shortfall`). A remote shard that turns out
damaged while streamed is skipped from the point of damage with a warning naming it.

Layout of one process's data:

* Every source is split into `num_processes * streams_per_process` disjoint *streams* with
  `datasets.distributed.split_dataset_by_node` (whole shards when their number allows it, else every n-th sample);
  each stream is read by its own single-worker `DataLoader` (decoding happens in that worker), and the process takes
  batches from its streams in turn. The split is thus exact across processes and workers, and the order in which a
  process reads its streams is its own bookkeeping, which makes resuming exact.
* Shuffling: the shard order is permuted per epoch, and each stream is shuffled in blocks of `buffer_size` samples
  (read a block, permute it). A stream's position is the `datasets` state dict at the start of its current block,
  the block number and the offset in the block: resuming re-reads that one block (raw bytes, not decoded) and
  continues with the next sample, so no sample is repeated or skipped. (The rolling buffer of
  `IterableDataset.shuffle` cannot do this: its content is lost on resume.)
* Mixing (`MixedStreamLoader`): each step takes one batch from one source, the same source on every process, in an
  order drawn per epoch from the seed, as the authors' `MetaLoader` (`mmaction/engine/runner/ndatasets_runner.py`):
  each source appears as many times as it has batches in an epoch ("size" mixing) or in proportion to given weights.
* Images enter as 1-frame clips. Samples that cannot be decoded, or lack media or caption, are skipped and counted.
"""

import glob
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import fsspec
import numpy as np
import pyarrow
import pyarrow.parquet as pyarrow_parquet
import torch
import torch.distributed as dist
from datasets import IterableDataset as StreamingDataset
from datasets.distributed import split_dataset_by_node
from PIL import Image, UnidentifiedImageError
from stan_checkpointing import check_same_process_count
from torch.utils.data import DataLoader, IterableDataset

from modeling_stan.demo.synthetic_videos import SyntheticVideo, caption_for, paraphrase_for, render_clip
from modeling_stan.video_io import VideoDecodeError, decode_video


logger = logging.getLogger(__name__)

VIDEO_FIELDS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("txt", "text", "caption")
MIXING_RULES = ("size", "weights")


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ShardCheck:
    """What one shard should hold (`declared`, its `_stats.json` "successes"; None without one) and, if it is
    damaged, what is wrong (`damage`) and how many whole samples precede the damage (`readable`)."""

    path: str
    declared: int | None
    damage: str | None = None
    readable: int | None = None

    @property
    def lost_samples(self) -> int | None:
        """Samples declared but unreadable (None: not known, the shard has no stats)."""
        if self.damage is None:
            return 0
        if self.declared is None or self.readable is None:
            return None
        return max(self.declared - self.readable, 0)


@dataclass
class ShardSource:
    """One training source: its name, its shard files (expanded), its number of samples in an epoch and, from
    `_stats.json`, the number its shards declare (None if not all have stats) and its damaged shards."""

    name: str
    files: list[str]
    num_samples: int
    declared_samples: int | None = None
    damaged: list[ShardCheck] = field(default_factory=list)

    @property
    def lost_samples(self) -> int:
        return sum(check.lost_samples or 0 for check in self.damaged)

    @property
    def read_limits(self) -> dict[str, int]:
        """The samples to read of each damaged shard (those before the damage)."""
        return {check.path: check.readable for check in self.damaged if check.readable is not None}

    def damage_report(self) -> dict[str, dict]:
        return {
            check.path: {
                "lost_samples": check.lost_samples,
                "declared_samples": check.declared,
                "damage": check.damage,
            }
            for check in self.damaged
        }


def expand_shards(pattern: str) -> list[str]:
    """The files of a brace pattern (`a-{000..009}.tar`, `{a,b}.tar`); local entries may also be globs."""
    files = []
    for entry in braceexpand.braceexpand(pattern):
        if "://" in entry:
            files.append(entry)
            continue
        matches = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
        missing = [path for path in matches if not os.path.isfile(path)]
        if not matches or missing:
            raise FileNotFoundError(f"Shard pattern {pattern!r}: no such file {(missing or [entry])[0]!r}.")
        files.extend(os.path.abspath(path) for path in matches)
    return files


def parse_sources(specs: Sequence[str], num_samples: Sequence[int] | None, log: bool = True) -> list[ShardSource]:
    """Sources from `NAME=PATTERN` entries (a name given twice adds patterns to it; `PATTERN` alone is named
    `source{i}`), sized by `num_samples` (one per source, in order) or by the shards' `_stats.json` files.

    Every local shard is checked (`check_shard`); an epoch holds the samples that can be read. A `num_samples` that
    disagrees with the stats is a warning with both numbers (`log`: write the warnings, on one process)."""
    patterns: dict[str, list[str]] = {}
    for i, spec in enumerate(specs):
        name, separator, pattern = spec.partition("=")
        if not separator or "/" in name or "{" in name:
            name, pattern = f"source{i}", spec
        patterns.setdefault(name, []).append(pattern)
    if num_samples and len(num_samples) != len(patterns):
        raise ValueError(
            f"--train_num_samples gives {len(num_samples)} size(s) for {len(patterns)} source(s) {list(patterns)}."
        )
    sources = []
    for i, (name, source_patterns) in enumerate(patterns.items()):
        files = [file for pattern in source_patterns for file in expand_shards(pattern)]
        checks = [check_shard(file, _declared_samples(file)) for file in files]
        declared = None if any(c.declared is None for c in checks) else sum(c.declared for c in checks)
        source = ShardSource(name, files, 0, declared, [c for c in checks if c.damage is not None])
        source.num_samples = _epoch_size(source, num_samples[i] if num_samples else None, log)
        if source.num_samples < 1:
            raise ValueError(f"Source {name!r} has {source.num_samples} readable samples; it needs at least one.")
        if log:
            for check in source.damaged:
                lost = "an unknown number of" if check.lost_samples is None else check.lost_samples
                logger.warning(
                    "Source %r: shard %s is damaged: %s. Its %s readable sample(s) are used and %s sample(s) are "
                    "lost (of %s declared in its _stats.json).",
                    name,
                    check.path,
                    check.damage,
                    "?" if check.readable is None else check.readable,
                    lost,
                    "?" if check.declared is None else check.declared,
                )
        sources.append(source)
    return sources


def _epoch_size(source: ShardSource, given: int | None, log: bool) -> int:
    """The samples of `source` in an epoch: the readable ones by the stats, or `given`, never more than can be
    read (an epoch is not filled by repeating samples)."""
    readable = None if source.declared_samples is None else source.declared_samples - source.lost_samples
    if given is None:
        if readable is None:
            missing = next(file for file in source.files if _declared_samples(file) is None)
            raise ValueError(
                f"Source {source.name!r}: no _stats.json beside {missing} to count its samples; pass "
                "--train_num_samples (one number per source)."
            )
        return readable
    if readable is None or given == readable:
        return given
    used = min(given, readable)
    if log:
        lost = f", of which {source.lost_samples} are lost in damaged shards" if source.lost_samples else ""
        logger.warning(
            "--train_num_samples gives %d samples for source %r, but its shards' _stats.json files declare %d%s: "
            "an epoch uses %d (%s).",
            given,
            source.name,
            source.declared_samples,
            lost,
            used,
            "no sample is repeated" if given > readable else "the rest of the shards is not read within an epoch",
        )
    return used


def _stats_path(file: str) -> Path | None:
    return None if "://" in file else Path(file).with_name(Path(file).stem + "_stats.json")


def _declared_samples(file: str) -> int | None:
    """The number of samples video2dataset / img2dataset report in `{shard}_stats.json` ("successes"); None
    without a local stats file."""
    stats = _stats_path(file)
    if stats is None or not stats.is_file():
        return None
    with open(stats, encoding="utf-8") as handle:
        count = json.load(handle).get("successes")
    if not isinstance(count, int):
        raise ValueError(f"{stats}: expected an integer 'successes' field, got {count!r}.")
    return count


# A tar ends with two zero blocks; a shard cut anywhere before them (even exactly between two members) lacks them.
_TAR_BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * _TAR_BLOCK)


def check_shard(path: str, declared: int | None) -> ShardCheck:
    """Checks a local shard for damage (remote shards are checked while they are read).

    A shard that ends in an end-of-archive marker is taken at its stats' word (one read of its last kilobyte). One
    that does not was cut or damaged: its member headers are read (seeking over the data) to find the whole samples
    before the damage; a sample whose members do not all precede the damage is not readable."""
    if "://" in path:
        return ShardCheck(path, declared)
    size = os.path.getsize(path)
    if size >= len(_END_OF_ARCHIVE) and size % _TAR_BLOCK == 0:
        with open(path, "rb") as file:
            file.seek(size - len(_END_OF_ARCHIVE))
            if file.read() == _END_OF_ARCHIVE:
                return ShardCheck(path, declared)
    readable, damage = _scan_members(path, size)
    return ShardCheck(path, declared, damage, readable)


def _scan_members(path: str, size: int) -> tuple[int, str]:
    """(whole samples before the damage, what the damage is) of a tar that lacks its end-of-archive marker."""
    groups: list[tuple[str, set[str]]] = []  # (key, fields) of consecutive samples
    damage = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, name = _key_and_field(member.name)
                if not groups or groups[-1][0] != key:
                    groups.append((key, set()))
                if member.offset_data + member.size > size:
                    groups.pop()  # its data is cut
                    damage = (
                        f"cut inside member {member.name!r} (its data ends at byte {member.offset_data + member.size},"
                        f" the file at byte {size})"
                    )
                    break
                groups[-1][1].add(name)
            end = tar.offset
    except tarfile.TarError as error:
        return 0, f"not a readable tar file ({error})"
    if damage is None:
        with open(path, "rb") as file:
            file.seek(end)
            rest = file.read(len(_END_OF_ARCHIVE))
        after = f"after sample {groups[-1][0]!r}" if groups else "at its start"
        if rest and not rest.strip(b"\0"):
            return len(groups), f"cut inside its end-of-archive marker (byte {size}); no sample is missing"
        if rest:
            damage = f"unreadable {after} (byte {end} is not a tar header)"
        else:
            damage = f"cut at a member boundary {after} (byte {end}), without an end-of-archive marker"
        # The last sample before the cut may lack members that came after it (its caption after its video).
        if len(groups) > 1 and groups[-1][1] != groups[-2][1]:
            groups.pop()
    return len(groups), damage


def _key_and_field(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def usable_shortfall(sources: Sequence[ShardSource], minimum: float) -> str | None:
    """Why the data are unusable (a source whose readable fraction of its declared samples is below `minimum`,
    with its damaged shards), or None."""
    problems = []
    for source in sources:
        declared = source.declared_samples
        if not declared or source.lost_samples == 0:
            continue
        readable = declared - source.lost_samples
        if readable < minimum * declared:
            shards = "; ".join(f"{c.path} ({c.lost_samples} lost: {c.damage})" for c in source.damaged)
            problems.append(
                f"source {source.name!r}: only {readable} of its {declared} samples ({readable / declared:.0%}) "
                f"can be read, below --min_usable_sample_fraction {minimum}; damaged shards: {shards}"
            )
    if not problems:
        return None
    return "; ".join(problems) + ". Copy or download those shards again (or lower the flag to train on the rest)."


def batches_per_epoch(sources: list[ShardSource], global_batch: int, weights: Sequence[float] | None) -> list[int]:
    """Batches of each source in one epoch.

    Without `weights`, as the authors' MetaLoader: every full global batch of every source (mixing in proportion to
    size). With `weights`, the sources' batch counts follow the weights, scaled so that the source that runs out
    first is used exactly once per epoch (the others are subsampled: an epoch does not reach their end).
    """
    available = [source.num_samples // global_batch for source in sources]
    for source, count in zip(sources, available):
        if count < 1:
            raise ValueError(
                f"Source {source.name!r} has {source.num_samples} samples, fewer than one global batch "
                f"({global_batch})."
            )
    if weights is None:
        return available
    if len(weights) != len(sources) or any(w < 0 for w in weights) or not any(weights):
        raise ValueError(
            f"--source_weights needs one non-negative weight per source {[s.name for s in sources]}, "
            f"not all zero; got {list(weights)}."
        )
    scale = min(count / weight for count, weight in zip(available, weights) if weight > 0)
    return [int(weight * scale) for weight in weights]


def source_order(counts: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """The source of each step of `epoch`: each source index `counts[i]` times, shuffled from `(seed, epoch)`.

    Every process draws the same order from the same seed (the authors broadcast rank 0's)."""
    order = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng([seed, epoch]).permutation(order)


# ----------------------------------------------------------------------------------------------------------------
# One stream: a disjoint share of one source, block-shuffled, decoded and batched in a DataLoader worker
# ----------------------------------------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """Batches of decoded samples from stream `index` of `num_streams` over `files`.

    Each batch is a dict: `pixel_values` (B, T, 3, H, W) (T = 1 for images), `captions`, `keys`, `corrupt` (samples
    skipped while filling it) and `state` (the stream's position after it, for `state=` on resume).
    """

    def __init__(
        self,
        files: list[str],
        *,
        index: int,
        num_streams: int,
        epoch: int,
        seed: int,
        buffer_size: int,
        batch_size: int,
        decode: Callable[[dict, int], torch.Tensor],
        state: dict | None = None,
        read_limits: dict[str, int] | None = None,
    ):
        self.files, self.index, self.num_streams = files, index, num_streams
        self.epoch, self.seed, self.buffer_size, self.batch_size = epoch, seed, buffer_size, batch_size
        self.decode, self.state, self.read_limits = decode, state, read_limits or {}

    def _samples(self):
        # Shard order permuted per epoch (same permutation everywhere), then this stream's share.
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))
        shards = [(self.files[i], self.read_limits.get(self.files[i])) for i in order]
        dataset = StreamingDataset.from_generator(read_shards, gen_kwargs={"shards": shards})
        return split_dataset_by_node(dataset, rank=self.index, world_size=self.num_streams)

    def _shuffled(self) -> Iterator[tuple[dict, dict]]:
        """(raw sample, stream state after it) in block-shuffled order, from `self.state` on."""
        dataset = self._samples()
        # The position where the current block starts; None: the start of the stream.
        block_state, block, offset = None, 0, 0
        if self.state is not None:
            block_state, block, offset = self.state["block_state"], self.state["block"], self.state["offset"]
            if block_state is not None:
                dataset.load_state_dict(block_state)
        samples = iter(dataset)
        while True:
            chunk = [sample for _, sample in zip(range(self.buffer_size), samples)]
            if not chunk:
                return
            order = np.random.default_rng([self.seed, self.epoch, self.index, block]).permutation(len(chunk))
            for position in range(offset, len(chunk)):
                yield chunk[order[position]], {"block_state": block_state, "block": block, "offset": position + 1}
            block_state, block, offset = dataset.state_dict(), block + 1, 0

    def __iter__(self) -> Iterator[dict]:
        pixels, captions, keys, corrupt, state = [], [], [], 0, self.state
        for sample, state in self._shuffled():
            sample_seed = [self.seed, self.epoch, self.index, state["block"], state["offset"]]
            clip, caption = self._decode(sample, sample_seed)
            if clip is None:
                corrupt += 1
                continue
            pixels.append(clip)
            captions.append(caption)
            keys.append(sample["__key__"])
            if len(pixels) == self.batch_size:
                yield _batch(pixels, captions, keys, corrupt, state)
                pixels, captions, keys, corrupt = [], [], [], 0
        if pixels or corrupt:
            yield _batch(pixels, captions, keys, corrupt, state)

    def _decode(self, sample: dict, sample_seed: list[int]) -> tuple[torch.Tensor | None, str | None]:
        """The sample's clip and caption, or (None, None) for a sample that is skipped (and logged)."""
        caption = next((sample[name] for name in CAPTION_FIELDS if sample.get(name)), None)
        media = next(((name, sample[name]) for name in VIDEO_FIELDS + IMAGE_FIELDS if sample.get(name)), None)
        where = f"{sample.get('__url__')}: sample {sample.get('__key__')!r}"
        if caption is None or media is None:
            logger.warning("Skipping %s: no %s", where, "caption" if media else "video or image")
            return None, None
        name, value = media
        seed = int(np.random.SeedSequence(sample_seed).generate_state(1)[0])
        try:
            return self.decode(
                {"kind": "video" if name in VIDEO_FIELDS else "image", "bytes": value["bytes"]}, seed
            ), caption.strip()
        except (VideoDecodeError, UnidentifiedImageError, OSError) as error:  # PIL reports truncated files as OSError
            logger.warning("Skipping %s: %s: %s", where, type(error).__name__, error)
            return None, None


def read_shards(shards: list[tuple[str, int | None]]) -> Iterator[dict]:
    """The samples of each `(shard, limit)` in turn: the first `limit` (None: all) of its samples, each a dict of
    `__key__`, `__url__`, the captions as text and the other members as `{"bytes": ...}`, keyed by extension.

    A shard that turns out damaged while it is read ends there, with a warning naming it; the sample being read
    when the damage was met is dropped."""
    for path, limit in shards:
        yield from _shard_samples(path, limit)


def _shard_samples(path: str, limit: int | None) -> Iterator[dict]:
    count, sample = 0, {}
    try:
        with fsspec.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, name = _key_and_field(member.name)
                if sample and sample["__key__"] != key:
                    if count == limit:
                        return
                    yield sample
                    count, sample = count + 1, {}
                sample.setdefault("__key__", key)
                sample["__url__"] = path
                data = tar.extractfile(member).read()
                sample[name] = data.decode("utf-8", "replace") if name in CAPTION_FIELDS else {"bytes": data}
            if sample and count != limit:
                yield sample
    except (tarfile.TarError, OSError, EOFError) as error:
        logger.warning(
            "Shard %s is damaged after %d sample(s) (%s: %s): the rest of it is skipped.",
            path,
            count,
            type(error).__name__,
            error,
        )


def _batch(pixels, captions, keys, corrupt, state) -> dict:
    return {
        "pixel_values": torch.stack(pixels) if pixels else None,
        "captions": captions,
        "keys": keys,
        "corrupt": corrupt,
        "state": state,
    }


class ClipDecoder:
    """Decodes a sample's bytes into training `pixel_values` (T, 3, H, W): a video's `num_frames` frames, or an
    image as a 1-frame clip, through the video processor's training augmentation, seeded per sample."""

    def __init__(self, video_processor, num_frames: int, random_resized_crop_scale: Sequence[float]):
        self.video_processor, self.num_frames = video_processor, num_frames
        self.random_resized_crop_scale = tuple(random_resized_crop_scale)

    def __call__(self, media: dict, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        if media["kind"] == "video":
            frames, _ = decode_video(media["bytes"], self.num_frames, "uniform", train=True, generator=generator)
        else:
            with Image.open(io.BytesIO(media["bytes"])) as image:
                frames = np.asarray(image.convert("RGB"))[None]
        return self.video_processor(
            [frames],
            return_tensors="pt",
            train=True,
            do_sample_frames=False,
            generator=generator,
            random_resized_crop_scale=self.random_resized_crop_scale,
        )["pixel_values"][0]


# ----------------------------------------------------------------------------------------------------------------
# The mixing loader of one process
# ----------------------------------------------------------------------------------------------------------------


class MixedStreamLoader:
    """Yields this process's training batches of one epoch: one source per step (the same on every process), each
    source's batches taken from its streams in turn. `state_dict` / `load_state_dict` (every process's position,
    gathered, for `Accelerator.register_for_checkpointing`) make a resumed run continue with the next batch.

    A batch is a dict of `pixel_values`, `input_ids` and `attention_mask` on `device`, or None when this process
    has nothing left of the step's source (the training loop then skips the step on every process).
    """

    def __init__(
        self,
        sources: list[ShardSource],
        counts: list[int],
        *,
        make_stream: Callable[..., ShardStream],
        streams_per_process: int,
        num_workers: int,
        process_index: int,
        num_processes: int,
        seed: int,
        tokenize: Callable[[list[str]], dict],
        device: torch.device,
        record: Callable[[dict], None] | None = None,
    ):
        self.sources, self.counts, self.make_stream = sources, counts, make_stream
        self.streams_per_process, self.num_workers = streams_per_process, num_workers
        self.process_index, self.num_processes, self.seed = process_index, num_processes, seed
        self.tokenize, self.device, self.record = tokenize, device, record
        self.samples_seen = {source.name: 0 for source in sources}
        self.corrupt = {source.name: 0 for source in sources}
        self._ran_dry: set[tuple[int, str]] = set()  # (epoch, source) already reported
        self._reset(epoch=0)

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def total_corrupt(self) -> int:
        """Corrupt samples skipped by this process so far, all sources together."""
        return sum(self.corrupt.values())

    def _reset(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self.streams = [
            {"states": [None] * self.streams_per_process, "exhausted": [False] * self.streams_per_process, "next": 0}
            for _ in self.sources
        ]
        self._iterators: dict[tuple[int, int], Iterator] = {}

    def start_epoch(self, epoch: int, consumed: int) -> None:
        """Positions the loader at `epoch` after `consumed` batches (the loop's count); checks a resumed state."""
        if epoch != self.epoch:
            self._reset(epoch)
        if self.position != consumed:
            raise RuntimeError(
                f"The data stream is at batch {self.position} of epoch {self.epoch} but the training "
                f"loop at batch {consumed}: the checkpoint's data state does not match its step."
            )
        self._iterators = {}

    def __iter__(self) -> Iterator[dict | None]:
        order = source_order(self.counts, self.seed, self.epoch)
        while self.position < len(order):
            source = int(order[self.position])
            batch = self._next_batch(source)
            self.position += 1
            yield batch

    def _next_batch(self, source: int) -> dict | None:
        streams, name = self.streams[source], self.sources[source].name
        while not all(streams["exhausted"]):
            stream = streams["next"]
            streams["next"] = (stream + 1) % self.streams_per_process
            if streams["exhausted"][stream]:
                continue
            batch = next(self._iterator(source, stream), None)
            if batch is None:
                streams["exhausted"][stream] = True
                continue
            streams["states"][stream] = batch["state"]
            self.corrupt[name] += batch["corrupt"]
            if batch["pixel_values"] is None:
                continue
            self.samples_seen[name] += len(batch["keys"])
            if self.record is not None:
                self.record({"epoch": self.epoch, "batch": self.position, "source": name, "keys": batch["keys"]})
            text = self.tokenize(batch["captions"])
            return {
                "pixel_values": batch["pixel_values"].to(self.device),
                "input_ids": text["input_ids"].to(self.device),
                "attention_mask": text["attention_mask"].to(self.device),
            }
        if (self.epoch, name) not in self._ran_dry:
            self._ran_dry.add((self.epoch, name))
            logger.warning(
                "Source %r: process %d has read all its shards at batch %d of epoch %d, before the planned end of "
                "the epoch (its shards hold fewer samples than declared); its remaining steps are skipped, no sample "
                "is repeated.",
                name,
                self.process_index,
                self.position,
                self.epoch,
            )
        return None

    def _iterator(self, source: int, stream: int) -> Iterator[dict]:
        key = (source, stream)
        if key not in self._iterators:
            dataset = self.make_stream(
                self.sources[source].files,
                index=self.process_index * self.streams_per_process + stream,
                num_streams=self.num_processes * self.streams_per_process,
                epoch=self.epoch,
                state=self.streams[source]["states"][stream],
                read_limits=self.sources[source].read_limits,
            )
            self._iterators[key] = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers))
        return self._iterators[key]

    def local_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "streams": self.streams,
            "samples_seen": self.samples_seen,
            "corrupt": self.corrupt,
        }

    def state_dict(self) -> dict:
        """Every process's position (Accelerate saves custom state from the main process only)."""
        states = [None] * self.num_processes
        if dist.is_available() and dist.is_initialized():
            dist.all_gather_object(states, self.local_state())
        else:
            states = [self.local_state()]
        return {
            "num_processes": self.num_processes,
            "streams_per_process": self.streams_per_process,
            "processes": states,
        }

    def load_state_dict(self, state: dict) -> None:
        check_same_process_count(state["num_processes"], self.num_processes, "The checkpoint's data position")
        saved = (state["num_processes"], state["streams_per_process"])
        if saved != (self.num_processes, self.streams_per_process):
            raise ValueError(
                f"The checkpoint's data position is for {saved[0]} process(es) x {saved[1]} stream(s) "
                f"each; this run has {self.num_processes} x {self.streams_per_process}. Resume a streaming "
                "run with the same number of processes and --dataloader_num_workers (each stream is a "
                "fixed share of the shards)."
            )
        local = state["processes"][self.process_index]
        self._reset(local["epoch"])
        self.position, self.streams = local["position"], local["streams"]
        self.samples_seen, self.corrupt = local["samples_seen"], local["corrupt"]

    def totals(self) -> dict[str, dict[str, int]]:
        """Samples seen and corrupt samples per source, summed over processes (every process must call this), and
        the samples lost in damaged shards with each damaged shard."""
        local = torch.tensor(
            [[self.samples_seen[s.name], self.corrupt[s.name]] for s in self.sources],
            dtype=torch.long,
            device=self.device,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
        return {
            source.name: {
                "samples_seen": int(seen),
                "corrupt_samples": int(bad),
                "lost_samples": source.lost_samples,
                "damaged_shards": source.damage_report(),
            }
            for source, (seen, bad) in zip(self.sources, local.tolist())
        }


# ----------------------------------------------------------------------------------------------------------------
# Generated shards for the default run and the tests
# ----------------------------------------------------------------------------------------------------------------


def write_synthetic_shards(
    root: Path, videos: list[SyntheticVideo], video_dir: Path, *, samples_per_shard: int, image_size: int = 64
) -> dict[str, str]:
    """Packs the synthetic `videos` (their mp4 files in `video_dir`) into video shards and renders one still per
    video (its first frame, captioned without motion: "a red square") into PNG image shards, in the video2dataset /
    img2dataset layout with `_stats.json` files. Captions alternate between the two wordings of
    `modeling_stan.demo.synthetic_videos`. Returns the brace pattern of each source."""
    video_samples, image_samples = [], []
    for i, video in enumerate(videos):
        wording = caption_for if i % 2 == 0 else paraphrase_for
        mp4 = (video_dir / f"{video.video_id}.mp4").read_bytes()
        video_samples.append(
            (video.video_id, {"mp4": mp4, "txt": wording(video.shape, video.colour, video.direction)})
        )
        still = render_clip(
            video.shape,
            video.colour,
            video.direction,
            num_frames=2,
            size=image_size,
            radius=video.radius,
            offset=video.offset,
        )[0]
        png = io.BytesIO()
        Image.fromarray(still).save(png, format="PNG")
        article = "an" if video.colour[0] in "aeiou" else "a"
        image_samples.append((f"image{i}", {"png": png.getvalue(), "txt": f"{article} {video.colour} {video.shape}"}))
    return {
        "videos": write_shards(root / "videos", video_samples, samples_per_shard),
        "images": write_shards(root / "images", image_samples, samples_per_shard),
    }


def write_shards(folder: Path, samples: list[tuple[str, dict]], samples_per_shard: int) -> str:
    """Writes `(key, {extension: bytes or text})` samples into shards as video2dataset writes them: `{i:05d}.tar`
    (each sample's members in sorted order, with a `{key}.json` of its metadata), `{i:05d}_stats.json` and
    `{i:05d}.parquet` (one row per sample). Returns the brace pattern of the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(samples) // samples_per_shard)
    for shard in range(num_shards):
        part = samples[shard * samples_per_shard : (shard + 1) * samples_per_shard]
        started, rows = time.time(), []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for key, fields in part:
                caption = next((fields[name] for name in CAPTION_FIELDS if name in fields), None)
                row = {"url": f"synthetic://{key}", "caption": caption, "key": key, "status": "success"}
                rows.append({**row, "error_message": None})
                members = {**fields, "json": json.dumps({**row, "error_message": None})}
                for extension in sorted(members):
                    value = members[extension]
                    data = value.encode("utf-8") if isinstance(value, str) else value
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size, info.mode, info.mtime = len(data), 0o444, started
                    info.uname = info.gname = "bigdata"
                    tar.addfile(info, io.BytesIO(data))
        stats = {
            "count": len(part),
            "successes": len(part),
            "failed_to_download": 0,
            "failed_to_subsample": 0,
            "duration": time.time() - started,
            "bytes_downloaded": sum(len(v) for _, fields in part for v in fields.values() if isinstance(v, bytes)),
            "start_time": started,
            "end_time": time.time(),
            "status_dict": {"success": len(part)},
        }
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4), encoding="utf-8")
        pyarrow_parquet.write_table(pyarrow.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    return str(folder / f"{{00000..{num_shards - 1:05d}}}.tar")
