"""Text-to-video search over a folder of videos with a STAN video-text model.

    python -m modeling_stan.video_search index --model DIR --videos FOLDER --index videos.safetensors
    python -m modeling_stan.video_search query --model DIR --index videos.safetensors "a red square moves" --top_k 5

`index` embeds every video under FOLDER (recursively, by extension) in batches and stores the embeddings with the
videos' paths in a safetensors file. It is resumable: a video whose path, size and modification time match the index
is not embedded again, new and changed videos are, deleted ones are dropped, and the index is saved every
`--save_every` videos so an interrupted run loses little. Videos that cannot be read are skipped, listed in the
index metadata and printed; they are retried only when their file changes.

`query` ranks the indexed videos for a sentence. With `--dsl` the scores are re-ranked with the dual softmax (DSL)
against the index's query bank (the sentences given to `index --queries` and, unless `--no_remember`, every past
query): a video that matches many other queries is damped, one that matches this query in particular is favoured.
"""

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .metrics import dual_softmax
from .modeling_stan import StanForVideoTextRetrieval
from .processing_stan import StanProcessor


INDEX_FORMAT = "stan-video-index/1"
_METADATA_KEY = "stan_video_index"
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".ogv"}
)
# Failures a single unreadable video may raise while it is decoded and processed (decoders raise ValueError
# subclasses, missing or unreadable files OSError); anything else is a bug and stops the run.
_VIDEO_ERRORS = (OSError, ValueError, RuntimeError)


class VideoSearchError(ValueError):
    """The index, the folder or the model cannot be used together: the message names which and why."""


@dataclass(frozen=True)
class VideoFile:
    """A video of the folder, identified by its path relative to the folder, its size and modification time."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FailedVideo:
    path: str
    size: int
    mtime_ns: int
    error: str


@dataclass
class VideoIndex:
    """Embeddings of the videos of one folder, made by one model.

    `video_embeds[i]` (and `frame_embeds[i]`, kept for Mug-STAN models) belong to `videos[i]`; embeddings are the
    model's projected outputs, not normalised.
    """

    root: str
    model: str
    num_frames: int
    videos: list[VideoFile] = field(default_factory=list)
    video_embeds: torch.Tensor | None = None
    frame_embeds: torch.Tensor | None = None
    failed: list[FailedVideo] = field(default_factory=list)
    query_bank: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Writes the index atomically (a partially written file never replaces a good one)."""
        path = Path(path)
        tensors = {"video_embeds": self.video_embeds.contiguous()}
        if self.frame_embeds is not None:
            tensors["frame_embeds"] = self.frame_embeds.contiguous()
        metadata = {
            "format": INDEX_FORMAT,
            "root": self.root,
            "model": self.model,
            "num_frames": self.num_frames,
            "videos": [dataclasses.astuple(video) for video in self.videos],
            "failed": [dataclasses.asdict(failure) for failure in self.failed],
            "query_bank": self.query_bank,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={_METADATA_KEY: json.dumps(metadata)})
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path) -> "VideoIndex":
        path = Path(path)
        if not path.is_file():
            raise VideoSearchError(f"{path}: no such index file; build it with `video_search index`.")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = json.loads((file.metadata() or {})[_METADATA_KEY])
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
            raise VideoSearchError(
                f"{path}: not a video index written by modeling_stan.video_search ({error})."
            ) from error
        if metadata.get("format") != INDEX_FORMAT:
            raise VideoSearchError(f"{path}: index format {metadata.get('format')!r}, expected {INDEX_FORMAT!r}.")
        return cls(
            root=metadata["root"],
            model=metadata["model"],
            num_frames=metadata["num_frames"],
            videos=[VideoFile(*video) for video in metadata["videos"]],
            video_embeds=tensors["video_embeds"],
            frame_embeds=tensors.get("frame_embeds"),
            failed=[FailedVideo(**failure) for failure in metadata["failed"]],
            query_bank=metadata["query_bank"],
        )

    def absolute_path(self, video: VideoFile) -> Path:
        return Path(self.root) / video.path


@dataclass
class IndexReport:
    """What an `index` run did: `embedded` counts the embeddings computed by this run (new and changed videos),
    `skipped` the videos left as they were, `removed` the indexed videos whose file is gone."""

    embedded: int
    skipped: int
    removed: int
    failed: list[FailedVideo]
    total: int


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float
    path: Path


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def load_search_model(model_dir: str | Path, device: str | torch.device | None = None):
    """The retrieval model (its similarity follows `config.alignment`) and processor saved in `model_dir`."""
    model_dir = str(model_dir)
    model = StanForVideoTextRetrieval.from_pretrained(model_dir)
    if "StanForVideoClassification" in (model.config.architectures or []):
        raise VideoSearchError(f"{model_dir}: a video classification checkpoint has no text tower to search with.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), StanProcessor.from_pretrained(model_dir)


def model_identity(model_dir: str | Path) -> str:
    """How an index records its model: the absolute path of a local directory, else the Hub id as given."""
    path = Path(model_dir)
    return str(path.resolve()) if path.exists() else str(model_dir)


# ----------------------------------------------------------------------------------------------------------------
# Indexing
# ----------------------------------------------------------------------------------------------------------------


def scan_videos(videos_dir: str | Path) -> list[VideoFile]:
    """Every video file under `videos_dir` (recursively, symlinks followed), sorted by path."""
    root = Path(videos_dir)
    if not root.is_dir():
        raise VideoSearchError(f"{root}: not a directory of videos.")
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file():
            stat = path.stat()
            found.append(VideoFile(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return found


class _DecodedVideos(Dataset):
    """Decodes and processes one video per item; an unreadable video yields its error instead of frames."""

    def __init__(self, root: Path, videos: list[VideoFile], video_processor, num_frames: int):
        self.root, self.videos, self.video_processor, self.num_frames = root, videos, video_processor, num_frames

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int):
        video = self.videos[index]
        try:
            inputs = self.video_processor(
                videos=[str(self.root / video.path)], num_frames=self.num_frames, return_tensors="pt"
            )
            return video, inputs["pixel_values"][0], None
        except _VIDEO_ERRORS as error:
            return video, None, f"{type(error).__name__}: {error}"


def build_index(
    index_path: str | Path,
    model,
    processor,
    videos_dir: str | Path,
    *,
    model_name: str,
    batch_size: int = 8,
    num_workers: int = 0,
    num_frames: int | None = None,
    save_every: int = 1000,
    queries: list[str] = (),
    rebuild: bool = False,
    progress: bool = True,
) -> IndexReport:
    """Creates or updates the index of `videos_dir` at `index_path` (see the module docstring).

    `model_name` identifies the model in the index (`model_identity(model_dir)`): an existing index made by another
    model, for another folder or with another `num_frames` is refused unless `rebuild=True`. `queries` are added to
    the query bank used by DSL re-ranking.
    """
    root = Path(videos_dir).resolve()
    current = scan_videos(root)
    index = _existing_index(index_path, rebuild)
    num_frames = num_frames or (index.num_frames if index else model.config.num_frames)
    if index is None:
        index = VideoIndex(root=str(root), model=model_name, num_frames=num_frames)
    _check_compatible(index, index_path, root, model_name, num_frames)

    present = set(current)
    kept = [i for i, video in enumerate(index.videos) if video in present]
    current_paths = {video.path for video in current}
    removed = sum(video.path not in current_paths for video in index.videos)
    _keep_rows(index, kept, model)
    # A failure is kept (and the video not retried) while its file stays as it was.
    index.failed = [f for f in index.failed if VideoFile(f.path, f.size, f.mtime_ns) in present]
    known_unreadable = {VideoFile(f.path, f.size, f.mtime_ns) for f in index.failed}
    done = set(index.videos)
    todo = [v for v in current if v not in done and v not in known_unreadable]
    index.query_bank = _merged_bank(index.query_bank, queries)

    embedded = _embed_videos(index, index_path, model, processor, todo, batch_size, num_workers, save_every, progress)
    index.save(index_path)
    return IndexReport(
        embedded=embedded,
        skipped=len(current) - len(todo),
        removed=removed,
        failed=list(index.failed),
        total=len(index.videos),
    )


def _existing_index(index_path, rebuild: bool) -> VideoIndex | None:
    if rebuild or not Path(index_path).exists():
        return None
    return VideoIndex.load(index_path)


def _check_compatible(index: VideoIndex, index_path, root: Path, model_name: str, num_frames: int) -> None:
    mismatches = [
        f"{what} {theirs!r} (now {ours!r})"
        for what, theirs, ours in (
            ("folder", index.root, str(root)),
            ("model", index.model, model_name),
            ("num_frames", index.num_frames, num_frames),
        )
        if theirs != ours
    ]
    if mismatches:
        raise VideoSearchError(
            f"{index_path} was built with {', '.join(mismatches)}; its embeddings cannot be mixed with new ones. "
            "Use another index file or rebuild it (--rebuild)."
        )


def _keep_rows(index: VideoIndex, rows: list[int], model) -> None:
    """Keeps the given rows of the index; an empty index gets empty tensors of the model's embedding size."""
    if index.video_embeds is None:
        size = model.config.projection_dim
        index.video_embeds = torch.empty(0, size)
        if model.config.alignment == "mug":
            index.frame_embeds = torch.empty(0, index.num_frames, size)
    selection = torch.tensor(rows, dtype=torch.long)
    index.videos = [index.videos[i] for i in rows]
    index.video_embeds = index.video_embeds[selection]
    if index.frame_embeds is not None:
        index.frame_embeds = index.frame_embeds[selection]


def _merged_bank(bank: list[str], queries) -> list[str]:
    return list(dict.fromkeys([*bank, *(q.strip() for q in queries if q.strip())]))


def _embed_videos(index, index_path, model, processor, todo, batch_size, num_workers, save_every, progress):
    """Embeds `todo` into `index`, saving it every `save_every` videos; returns how many were embedded."""
    dataset = _DecodedVideos(Path(index.root), todo, processor.video_processor, index.num_frames)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    # New embeddings wait in a list and join the index tensors at each save, so the index is not copied per batch.
    pending, embedded, since_save = [], 0, 0
    with tqdm(total=len(todo), unit="video", desc="embedding", disable=not progress) as bar:
        for batch in loader:
            good = [(video, frames) for video, frames, error in batch if error is None]
            index.failed.extend(
                FailedVideo(video.path, video.size, video.mtime_ns, error) for video, _, error in batch if error
            )
            if good:
                pending.append(_embed_batch(model, good))
                embedded += len(good)
            bar.update(len(batch))
            since_save += len(batch)
            if since_save >= save_every:
                _merge_pending(index, pending)
                index.save(index_path)
                since_save = 0
    _merge_pending(index, pending)
    return embedded


@torch.no_grad()
def _embed_batch(model, good: list) -> tuple:
    """(videos, pooled embeddings, frame embeddings) of one batch of decoded videos, on the CPU."""
    pixel_values = torch.stack([frames for _, frames in good]).to(model.device, model.dtype)
    outputs = model.get_video_features(pixel_values)
    return [video for video, _ in good], outputs.pooler_output.float().cpu(), outputs.frame_embeds.float().cpu()


def _merge_pending(index: VideoIndex, pending: list) -> None:
    if not pending:
        return
    videos, pooled, frames = zip(*pending)
    index.videos.extend(video for batch in videos for video in batch)
    index.video_embeds = torch.cat([index.video_embeds, *pooled])
    if index.frame_embeds is not None:
        index.frame_embeds = torch.cat([index.frame_embeds, *frames])
    pending.clear()


# ----------------------------------------------------------------------------------------------------------------
# Querying
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def search(
    index: VideoIndex, model, processor, query: str, *, top_k: int = 5, dsl: bool = False, dsl_lambda: float = 100.0
) -> list[SearchHit]:
    """The `top_k` indexed videos that best match `query`, best first.

    Scores are the model's unscaled similarities (cosine, or Mug-STAN's alignment score); with `dsl=True` they are
    the dual-softmax re-ranked scores against the index's query bank (`metrics.dual_softmax`).
    """
    if not isinstance(query, str) or not query.strip():
        raise VideoSearchError(f"query must be a non-empty sentence, got {query!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise VideoSearchError(f"top_k must be an integer >= 1, got {top_k!r}.")
    if not index.videos:
        return []
    texts = [query] + ([text for text in index.query_bank if text != query] if dsl else [])
    scores = _similarity(index, model, processor, texts)
    if dsl:
        # Each video's column is normalised over the query and the bank, so the query's row is re-ranked.
        scores = dual_softmax(scores, lam=dsl_lambda, axis=0)
    values, rows = scores[0].topk(min(top_k, len(index.videos)))
    return [
        SearchHit(rank=rank, score=value, path=index.absolute_path(index.videos[row]))
        for rank, (value, row) in enumerate(zip(values.tolist(), rows.tolist()), start=1)
    ]


def _similarity(index: VideoIndex, model, processor, texts: list[str]) -> torch.Tensor:
    """(texts, videos) unscaled scores under the model's alignment."""
    inputs = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    frame_embeds = index.frame_embeds.to(model.device) if index.frame_embeds is not None else None
    return model.similarity(
        text.pooler_output,
        index.video_embeds.to(model.device),
        token_embeds=text.token_embeds,
        text_attention_mask=inputs["attention_mask"],
        frame_embeds=frame_embeds,
    ).float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modeling_stan.video_search", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="embed the videos of a folder (resumable)")
    index.add_argument("--model", required=True, help="STAN checkpoint directory (model + processor)")
    index.add_argument("--videos", required=True, help="folder of videos, searched recursively")
    index.add_argument("--index", required=True, help="index file to create or update (.safetensors)")
    index.add_argument("--batch_size", "--batch-size", type=int, default=8)
    index.add_argument("--num_workers", "--num-workers", type=int, default=0, help="decoding worker processes")
    index.add_argument("--num_frames", "--num-frames", type=int, help="frames per video (default: the model's)")
    index.add_argument("--save_every", "--save-every", type=int, default=1000, help="save the index every N videos")
    index.add_argument("--queries", help="text file, one query per line, added to the DSL query bank")
    index.add_argument("--rebuild", action="store_true", help="discard an existing index instead of updating it")

    query = commands.add_parser("query", help="rank the indexed videos for a sentence")
    query.add_argument("text", help="the sentence to search for")
    query.add_argument("--model", required=True, help="the checkpoint the index was built with")
    query.add_argument("--index", required=True)
    query.add_argument("--top_k", "--top-k", type=int, default=5)
    query.add_argument("--dsl", action="store_true", help="re-rank with the dual softmax against the query bank")
    query.add_argument("--no_remember", "--no-remember", action="store_true", help="do not add the query to the bank")
    return parser


def _run_index(args) -> None:
    queries = Path(args.queries).read_text(encoding="utf-8").splitlines() if args.queries else ()
    model, processor = load_search_model(args.model)
    report = build_index(
        args.index,
        model,
        processor,
        args.videos,
        model_name=model_identity(args.model),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        num_frames=args.num_frames,
        save_every=args.save_every,
        queries=queries,
        rebuild=args.rebuild,
    )
    print(
        f"{args.index}: {report.total} videos indexed ({report.embedded} embedded now, {report.skipped} unchanged or "
        f"known unreadable, {report.removed} removed)"
    )
    for failure in report.failed:
        print(f"unreadable: {failure.path} ({failure.error})")


def _run_query(args) -> None:
    index = VideoIndex.load(args.index)
    if index.model != model_identity(args.model):
        raise VideoSearchError(
            f"{args.index} was built with model {index.model!r}, not {model_identity(args.model)!r}."
        )
    model, processor = load_search_model(args.model)
    for hit in search(index, model, processor, args.text, top_k=args.top_k, dsl=args.dsl):
        print(f"{hit.rank:>3}  {hit.score:.4f}  {hit.path}")
    if index.failed:
        print(f"({len(index.failed)} unreadable videos are not indexed; `index` lists them)")
    if not args.no_remember and args.text not in index.query_bank:
        index.query_bank.append(args.text)
        index.save(args.index)


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _run_index(args) if args.command == "index" else _run_query(args)
    except VideoSearchError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
