"""Text-to-video search over a folder of videos with a STAN video-text model.

    python -m modeling_stan.search.video_search index --model DIR --videos FOLDER --index videos.sqlite
    python -m modeling_stan.search.video_search query --model DIR --index videos.sqlite "a red square moves" --top_k 5

`index` embeds every video under FOLDER (recursively, by extension) in batches and stores the embeddings with the
videos' paths in an SQLite database (`video_index`): each batch is committed as it is embedded, so an interrupted run
(Ctrl-C, an exception, a killed process) loses at most the batch in flight and a rerun goes on from there. A video
whose path, size and modification time match the index is not embedded again, new and changed videos are, deleted
ones are dropped. Videos that cannot be read, or whose embedding comes out non-finite, are not stored: they are
listed in the index and printed, and retried only when their file changes.

`query` ranks the indexed videos for a sentence, reading one consistent snapshot of the index; it writes nothing
unless `--remember` adds the sentence to the query bank. With `--dsl` the scores are re-ranked with the dual softmax
(DSL) against the index's query bank (the sentences given to `index --queries` and the remembered queries): a video
that matches other queries better than this one is damped, one that matches this query in particular is favoured.

`faiss` stores a FAISS index of the embeddings in the index file (the `faiss` extra); `query --faiss` then searches
it without loading every embedding, for folders of millions of videos. Brute force over the stored matrix stays the
default. `import` converts, once, an index written by the earlier safetensors version of this tool.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..evaluation.metrics import dual_softmax
from ..modeling_stan import StanForVideoTextRetrieval
from ..processing_stan import StanProcessor
from .video_index import (
    EmbeddedVideo,
    FailedVideo,
    IndexSettings,
    IndexStore,
    VideoFile,
    VideoIndex,
    VideoSearchError,
    finite_rows,
    import_safetensors_index,
    non_finite_embedding,
)


VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".ogv"}
)
# Failures a single unreadable video may raise while it is decoded and processed (decoders raise ValueError
# subclasses, missing or unreadable files OSError); anything else is a bug and stops the run.
_VIDEO_ERRORS = (OSError, ValueError, RuntimeError)
# The similarities DSL re-ranks (cosines, or Mug-STAN's weighted means of cosines) are >= -1: shifted by this they
# are >= 0, so the dual softmax's weight can only damp a score, never turn a negative one into a win.
_SIMILARITY_LOWER_BOUND = -1.0


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
    queries: list[str] = (),
    rebuild: bool = False,
    progress: bool = True,
) -> IndexReport:
    """Creates or updates the index of `videos_dir` at `index_path` (see the module docstring).

    `model_name` identifies the model in the index (`model_identity(model_dir)`): an existing index made by another
    model, for another folder or with another `num_frames` is refused unless `rebuild=True`. `queries` are added to
    the query bank used by DSL re-ranking. Each batch is committed as soon as it is embedded.
    """
    root = Path(videos_dir).resolve()
    current = scan_videos(root)
    with _open_for_indexing(Path(index_path), model, root, model_name, num_frames, rebuild) as store:
        removed = store.forget_absent(current)
        indexed, failed = store.entries()
        # A failure is kept (and the video not retried) while its file stays as it was.
        known_unreadable = {failure.file for failure in failed}
        todo = [video for video in current if video not in indexed and video not in known_unreadable]
        store.add_queries(queries)
        embedded = _embed_videos(store, model, processor, root, todo, batch_size, num_workers, progress)
        indexed, failed = store.entries()
    return IndexReport(
        embedded=embedded, skipped=len(current) - len(todo), removed=removed, failed=failed, total=len(indexed)
    )


def _open_for_indexing(index_path: Path, model, root: Path, model_name: str, num_frames, rebuild: bool) -> IndexStore:
    store = None if rebuild or not index_path.exists() else IndexStore.open(index_path)
    settings = IndexSettings(
        root=str(root),
        model=model_name,
        num_frames=num_frames or (store.settings.num_frames if store else model.config.num_frames),
        embed_dim=model.config.projection_dim,
        frame_embeds=model.config.alignment == "mug",
    )
    if store is None:
        return IndexStore.create(index_path, settings, replace=rebuild)
    mismatches = [
        f"{what} {getattr(store.settings, name)!r} (now {getattr(settings, name)!r})"
        for what, name in (("folder", "root"), ("model", "model"), ("num_frames", "num_frames"))
        if getattr(store.settings, name) != getattr(settings, name)
    ]
    if mismatches:
        store.close()
        raise VideoSearchError(
            f"{index_path} was built with {', '.join(mismatches)}; its embeddings cannot be mixed with new ones. "
            "Use another index file or rebuild it (--rebuild)."
        )
    return store


def _embed_videos(store: IndexStore, model, processor, root, todo, batch_size, num_workers, progress) -> int:
    """Embeds `todo` batch by batch, committing each batch to `store`; returns how many videos were stored."""
    dataset = _DecodedVideos(root, todo, processor.video_processor, store.settings.num_frames)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    embedded = 0
    with tqdm(total=len(todo), unit="video", desc="embedding", disable=not progress) as bar:
        for batch in loader:
            failed = [FailedVideo(video.path, video.size, video.mtime_ns, error) for video, _, error in batch if error]
            good = [(video, frames) for video, frames, error in batch if error is None]
            rows, non_finite = _embed_batch(model, good) if good else ([], [])
            store.add_batch(rows, failed + non_finite)
            embedded += len(rows)
            bar.update(len(batch))
    return embedded


@torch.no_grad()
def _embed_batch(model, good: list) -> tuple[list[EmbeddedVideo], list[FailedVideo]]:
    """The embeddings of one batch of decoded videos, on the CPU, and the videos whose embedding is not finite."""
    pixel_values = torch.stack([frames for _, frames in good]).to(model.device, model.dtype)
    outputs = model.get_video_features(pixel_values)
    pooled = outputs.pooler_output.float().cpu().numpy()
    frames = outputs.frame_embeds.float().cpu().numpy() if model.config.alignment == "mug" else None
    finite = finite_rows(pooled, frames)
    rows, failed = [], []
    for row, (video, _) in enumerate(good):
        if finite[row]:
            rows.append(EmbeddedVideo(video, pooled[row], None if frames is None else frames[row]))
        else:
            error = non_finite_embedding(f"the video {video.path}")
            failed.append(FailedVideo(video.path, video.size, video.mtime_ns, error))
    return rows, failed


# ----------------------------------------------------------------------------------------------------------------
# Querying
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def search(
    index: VideoIndex, model, processor, query: str, *, top_k: int = 5, dsl: bool = False, dsl_lambda: float = 100.0
) -> list[SearchHit]:
    """The `top_k` indexed videos that best match `query`, best first.

    Scores are the model's unscaled similarities (cosine, or Mug-STAN's alignment score); with `dsl=True` they are
    `dsl_rerank` of them against the index's query bank, which must hold other sentences than `query`.
    """
    _check_query(query, top_k)
    bank = [text for text in index.query_bank if text != query] if dsl else []
    if dsl and not bank:
        raise VideoSearchError(
            "DSL re-ranking compares the query with the other sentences of the index's query bank, and the bank "
            "holds none: with the query alone the dual softmax would leave every score as it is. Fill the bank with "
            "`index --queries FILE` (one sentence a line) or `query --remember`, or search without --dsl."
        )
    if not index.videos:
        return []
    scores = _similarity(index, model, processor, [query, *bank])
    if dsl:
        scores = dsl_rerank(scores, dsl_lambda)
    values, rows = scores[0].topk(min(top_k, len(index.videos)))
    return [
        SearchHit(rank=rank, score=value, path=index.absolute_path(index.videos[row]))
        for rank, (value, row) in enumerate(zip(values.tolist(), rows.tolist()), start=1)
    ]


def _check_query(query, top_k) -> None:
    if not isinstance(query, str) or not query.strip():
        raise VideoSearchError(f"query must be a non-empty sentence, got {query!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise VideoSearchError(f"top_k must be an integer >= 1, got {top_k!r}.")


def dsl_rerank(scores: torch.Tensor, lam: float = 100.0) -> torch.Tensor:
    """Dual-softmax re-ranking of `(texts, videos)` similarities for text -> video search (row 0 is the query).

    `metrics.dual_softmax` of the similarities shifted to be non-negative: each video's score is its shifted
    similarity times the softmax of `lam * similarity` over the texts (its column). Unshifted, a negative similarity
    times a near-zero weight (a video that matches another sentence far better) would rise to about 0, above every
    video that matches nothing better; shifted, that weight can only lower a score. The shift does not change the
    softmax (it is invariant to adding a constant), so positive-similarity rankings are those of plain DSL up to the
    factor `(1 + s) / s`.
    """
    return dual_softmax(scores - _SIMILARITY_LOWER_BOUND, lam=lam, axis=0)


def _similarity(index: VideoIndex, model, processor, texts: list[str]) -> torch.Tensor:
    """(texts, videos) unscaled scores under the model's alignment."""
    text, attention_mask = _encode_queries(model, processor, texts)
    frame_embeds = index.frame_embeds.to(model.device) if index.frame_embeds is not None else None
    return (
        model.similarity(
            text.pooler_output,
            index.video_embeds.to(model.device),
            token_embeds=text.token_embeds,
            text_attention_mask=attention_mask,
            frame_embeds=frame_embeds,
        )
        .float()
        .cpu()
    )


def _encode_queries(model, processor, texts: list[str]):
    """The model's text features of `texts` and their attention mask. A text whose embedding is not finite is refused
    by name: every video's score for it would be NaN. The stored video embeddings are finite (`IndexStore.snapshot`
    verifies them), so finite text embeddings give finite scores."""
    inputs = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    # Mug-STAN scores with the token embeddings too; mean alignment only with the pooled one.
    token_embeds = text.token_embeds.float().cpu().numpy() if model.config.alignment == "mug" else None
    finite = finite_rows(text.pooler_output.float().cpu().numpy(), token_embeds)
    if not finite.all():
        raise VideoSearchError(non_finite_embedding(f"the query {texts[np.flatnonzero(~finite)[0]]!r}"))
    return text, inputs["attention_mask"]


# ----------------------------------------------------------------------------------------------------------------
# FAISS (the `faiss` extra): approximate search without loading the whole index
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_FAISS_FACTORY = "HNSW32"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise VideoSearchError("FAISS search needs the faiss extra: pip install 'stan-video[faiss]'.") from None
    return faiss


def build_faiss_index(index_path: str | Path, factory: str = DEFAULT_FAISS_FACTORY) -> int:
    """Builds a FAISS index of the normalised video embeddings (inner product = cosine) and stores it in the index
    file; returns how many videos it holds. `factory` is a `faiss.index_factory` description: `"HNSW32"` (default,
    a graph over the full vectors), `"Flat"` (exact), `"IVF1024,PQ64"` (compressed, for millions of videos)."""
    faiss = _faiss()
    with IndexStore.open(index_path) as store:
        if store.settings.frame_embeds:
            raise VideoSearchError("A Mug-STAN index scores with frame and token embeddings: FAISS cannot serve it.")
        index = store.snapshot()
        vectors = torch.nn.functional.normalize(index.video_embeds, dim=-1).numpy()
        try:
            searchable = faiss.IndexIDMap2(
                faiss.index_factory(store.settings.embed_dim, factory, faiss.METRIC_INNER_PRODUCT)
            )
            if not searchable.is_trained:
                searchable.train(vectors)
            searchable.add_with_ids(vectors, np.asarray(index.row_ids, dtype=np.int64))
        except RuntimeError as error:  # faiss reports a bad factory string or too few vectors to train this way
            raise VideoSearchError(f"FAISS could not build {factory!r} over {len(vectors)} videos: {error}") from None
        store.save_faiss_index(factory, faiss.serialize_index(searchable).tobytes())
    return len(vectors)


@torch.no_grad()
def search_faiss(index_path: str | Path, model, processor, query: str, *, top_k: int = 5) -> list[SearchHit]:
    """`search` through the FAISS index stored by `build_faiss_index`: the embeddings are not loaded, and scores are
    the cosine similarities FAISS finds (exact with `"Flat"` and `"HNSW32"`, approximate with compressed factories)."""
    _check_query(query, top_k)
    faiss = _faiss()
    with IndexStore.open(index_path, verify=False) as store, store.reading():
        stored = store.faiss_index()
        if stored is None:
            raise VideoSearchError(f"{index_path} has no FAISS index; build it with `video_search faiss`.")
        searchable = faiss.deserialize_index(np.frombuffer(stored[1], dtype=np.uint8))
        row_ids = store.row_ids()
        if sorted(faiss.vector_to_array(searchable.id_map).tolist()) != row_ids:
            raise VideoSearchError(
                f"{index_path}: the FAISS index is older than the videos indexed since; rebuild it with "
                "`video_search faiss` (or search without --faiss)."
            )
        text, _ = _encode_queries(model, processor, [query])
        text = torch.nn.functional.normalize(text.pooler_output.float(), dim=-1).cpu().numpy()
        scores, ids = searchable.search(text, min(top_k, len(row_ids)))
        found = [(score, row_id) for score, row_id in zip(scores[0].tolist(), ids[0].tolist()) if row_id >= 0]
        videos = store.videos_at([row_id for _, row_id in found])
    root = Path(store.settings.root)
    return [
        SearchHit(rank=rank, score=score, path=root / video.path)
        for rank, ((score, _), video) in enumerate(zip(found, videos), start=1)
    ]


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_stan.search.video_search", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="embed the videos of a folder (resumable)")
    index.add_argument("--model", required=True, help="STAN checkpoint directory (model + processor)")
    index.add_argument("--videos", required=True, help="folder of videos, searched recursively")
    index.add_argument("--index", required=True, help="index file to create or update (e.g. videos.sqlite)")
    index.add_argument(
        "--batch_size", "--batch-size", type=int, default=8, help="videos embedded (and committed) together"
    )
    index.add_argument("--num_workers", "--num-workers", type=int, default=0, help="decoding worker processes")
    index.add_argument("--num_frames", "--num-frames", type=int, help="frames per video (default: the model's)")
    index.add_argument("--queries", help="text file, one query per line, added to the DSL query bank")
    index.add_argument("--rebuild", action="store_true", help="discard an existing index instead of updating it")

    query = commands.add_parser("query", help="rank the indexed videos for a sentence")
    query.add_argument("text", help="the sentence to search for")
    query.add_argument("--model", required=True, help="the checkpoint the index was built with")
    query.add_argument("--index", required=True)
    query.add_argument("--top_k", "--top-k", type=int, default=5)
    query.add_argument("--dsl", action="store_true", help="re-rank with the dual softmax against the query bank")
    query.add_argument("--remember", action="store_true", help="add the query to the index's DSL query bank")
    query.add_argument("--faiss", action="store_true", help="search with the stored FAISS index (`faiss` command)")

    faiss = commands.add_parser("faiss", help="build (or rebuild) the index's FAISS index (the faiss extra)")
    faiss.add_argument("--index", required=True)
    faiss.add_argument("--factory", default=DEFAULT_FAISS_FACTORY, help="faiss.index_factory description")

    importer = commands.add_parser("import", help="convert an index of the earlier safetensors format, once")
    importer.add_argument("--from", dest="source", required=True, help="the .safetensors index")
    importer.add_argument("--index", required=True, help="the new index file to write (e.g. videos.sqlite)")
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
        queries=queries,
        rebuild=args.rebuild,
    )
    print(
        f"{args.index}: {report.total} videos indexed ({report.embedded} embedded now, {report.skipped} unchanged or "
        f"known unreadable, {report.removed} removed)"
    )
    for failure in report.failed:
        print(f"not indexed: {failure.path} ({failure.error})")


def _run_query(args) -> None:
    if args.faiss and args.dsl:
        raise VideoSearchError("--dsl needs every video's score for every bank sentence; it cannot use --faiss.")
    with IndexStore.open(args.index, verify=not args.faiss) as store:
        index = None if args.faiss else store.snapshot()
        built_with, failed = store.settings.model, (index.failed if index else store.failed())
    if built_with != model_identity(args.model):
        raise VideoSearchError(
            f"{args.index} was built with model {built_with!r}, not {model_identity(args.model)!r}."
        )
    model, processor = load_search_model(args.model)
    if args.faiss:
        hits = search_faiss(args.index, model, processor, args.text, top_k=args.top_k)
    else:
        hits = search(index, model, processor, args.text, top_k=args.top_k, dsl=args.dsl)
    score_format = _score_format([hit.score for hit in hits])
    for hit in hits:
        print(f"{hit.rank:>3}  {hit.score:{score_format}}  {hit.path}")
    if failed:
        print(f"({len(failed)} videos could not be indexed; `index` lists them)")
    if args.remember:
        with IndexStore.open(args.index, verify=False) as store:
            store.add_queries([args.text])


def _score_format(scores: list[float]) -> str:
    """The shortest `g` format (4 significant digits or more) that prints different scores differently: DSL scores
    span many orders of magnitude, so a fixed number of decimals would print most of them as 0."""
    for digits in range(4, 17):
        if len({f"{score:.{digits}g}" for score in scores}) == len(set(scores)):
            return f".{digits}g"
    return ".17g"


def _run_import(args) -> None:
    imported, left_out = import_safetensors_index(args.source, args.index)
    print(
        f"{args.index}: {imported} videos imported from {args.source}"
        + (
            f"; {left_out} with a non-finite embedding left out (the next `index` run embeds them again)"
            if left_out
            else ""
        )
    )


def _run_faiss(args) -> None:
    print(f"{args.index}: FAISS index {args.factory!r} of {build_faiss_index(args.index, args.factory)} videos stored")


_COMMANDS = {"index": _run_index, "query": _run_query, "import": _run_import, "faiss": _run_faiss}


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except VideoSearchError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
