"""The file behind `video_search`: an SQLite database (standard library) of video embeddings.

Why SQLite: every embedded batch is one transaction, so Ctrl-C, an exception or SIGKILL lose at most the batch in
flight; the write-ahead log (WAL mode) lets `query` read a consistent snapshot while `index` adds rows, and each
command writes only its own rows (a query remembered for DSL is one row of its own table), so no command reverts
another's work.

Layout (schema version `SCHEMA_VERSION`, kept in `PRAGMA user_version`; `PRAGMA application_id` marks the file as
this tool's):

    settings    one row: JSON of `IndexSettings` (folder, model, frames per video, embedding size)
    videos      path, size, mtime_ns, video_embed (float32 bytes), frame_embeds (Mug-STAN only), checksum
    failed      path, size, mtime_ns, error: videos that could not be embedded, retried when their file changes
    query_bank  position, text: the sentences DSL re-ranking normalises against
    faiss_index one row, optional: a serialized FAISS index of the video embeddings, ids = rowids of `videos`

Each video row carries a CRC-32 of its path, file identity and embedding bytes; reading the index verifies every
row (and SQLite's own structure with `PRAGMA quick_check`), so damaged data is refused with `VideoSearchError`
naming what is damaged instead of being ranked. `import_safetensors_index` converts, once, an index written by the
earlier safetensors version of the tool.
"""

import contextlib
import dataclasses
import json
import os
import sqlite3
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


SCHEMA_VERSION = 1
# "STAN" in ASCII: tells this tool's databases apart from any other SQLite file.
APPLICATION_ID = 0x5354414E
_SQLITE_MAGIC = b"SQLite format 3\x00"
# How many damaged rows an error message lists by name.
_NAMED_IN_ERRORS = 5
# How long a writer waits for another writer's transaction (two `index` runs on one file) before giving up.
_BUSY_TIMEOUT_S = 60.0
_SCHEMA = """
CREATE TABLE settings (id INTEGER PRIMARY KEY CHECK (id = 1), value TEXT NOT NULL);
CREATE TABLE videos (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    video_embed BLOB NOT NULL, frame_embeds BLOB, checksum INTEGER NOT NULL
);
CREATE TABLE failed (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, error TEXT NOT NULL);
CREATE TABLE query_bank (position INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);
CREATE TABLE faiss_index (
    id INTEGER PRIMARY KEY CHECK (id = 1), factory TEXT NOT NULL, data BLOB NOT NULL, checksum INTEGER NOT NULL
);
"""


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

    @property
    def file(self) -> VideoFile:
        return VideoFile(self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class IndexSettings:
    """What the embeddings of an index depend on: mixing rows made under other settings would rank garbage."""

    root: str
    model: str
    num_frames: int
    embed_dim: int
    frame_embeds: bool  # Mug-STAN models also store per-frame embeddings


@dataclass(frozen=True)
class EmbeddedVideo:
    """One row to store: `video_embed` is `(embed_dim,)`, `frame_embeds` `(num_frames, embed_dim)` or None."""

    video: VideoFile
    video_embed: np.ndarray
    frame_embeds: np.ndarray | None = None


def finite_rows(embeds: np.ndarray, per_item_embeds: np.ndarray | None = None) -> np.ndarray:
    """Whether each row of `embeds` (one video's or one text's `(embed_dim,)` embedding) is finite, and so is its
    `(n, embed_dim)` row of `per_item_embeds` (a Mug-STAN video's frame embeddings, a text's token embeddings) when
    given: a non-finite row would rank arbitrarily, so it is never stored or searched with."""
    finite = np.isfinite(embeds).all(axis=1)
    if per_item_embeds is not None:
        finite &= np.isfinite(per_item_embeds).all(axis=(1, 2))
    return finite


def non_finite_embedding(what: str) -> str:
    """The one wording of a non-finite embedding, reported for a video or refused for a query; `what` names it."""
    return f"the model produced a non-finite embedding (NaN or inf) for {what}"


@dataclass
class VideoIndex:
    """A consistent snapshot of an index, in memory.

    `video_embeds[i]` (and `frame_embeds[i]`, kept for Mug-STAN models) belong to `videos[i]`; embeddings are the
    model's projected outputs, not normalised, and always finite.
    """

    root: str
    model: str
    num_frames: int
    videos: list[VideoFile] = field(default_factory=list)
    video_embeds: torch.Tensor | None = None
    frame_embeds: torch.Tensor | None = None
    failed: list[FailedVideo] = field(default_factory=list)
    query_bank: list[str] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)  # each video's row in the file (the ids of a FAISS index)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VideoIndex":
        """Reads the index at `path` (one read transaction: rows an `index` run adds meanwhile are not half-seen)."""
        with IndexStore.open(path) as store:
            return store.snapshot()

    def absolute_path(self, video: VideoFile) -> Path:
        return Path(self.root) / video.path


def row_checksum(video: VideoFile, video_embed: bytes, frame_embeds: bytes | None) -> int:
    identity = f"{video.path}\0{video.size}\0{video.mtime_ns}".encode("utf-8", "surrogateescape")
    return zlib.crc32(frame_embeds or b"", zlib.crc32(video_embed, zlib.crc32(identity)))


def _float32_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


class IndexStore:
    """An open index file. Use `IndexStore.create` / `IndexStore.open`, as a context manager (closes the file)."""

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path, self._connection = path, connection
        self.settings = self._read_settings()

    # ---- opening -------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> "IndexStore":
        """Opens an existing index; `verify` runs SQLite's structural check of the whole file first."""
        path = Path(path)
        if not path.is_file():
            raise VideoSearchError(f"{path}: no such index file; build it with `video_search index`.")
        _check_file_kind(path)
        with _damage_reported(path):
            connection = _connect(path)
            try:
                _check_identity(path, connection)
                if verify:
                    _quick_check(path, connection)
                return cls(path, connection)
            except BaseException:
                connection.close()
                raise

    @classmethod
    def create(cls, path: str | os.PathLike, settings: IndexSettings, *, replace: bool = False) -> "IndexStore":
        """A new, empty index at `path`; `replace=True` discards an index already there (never another file)."""
        path = Path(path)
        if path.exists():
            if not replace:
                raise VideoSearchError(f"{path} already exists.")
            _check_file_kind(path)
            if not _has_application_id(path):
                raise VideoSearchError(f"{path}: an SQLite database, but not a video index; not replacing it.")
            for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                leftover.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _damage_reported(path):
            connection = _connect(path)
            with _transaction(connection):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute("INSERT INTO settings VALUES (1, ?)", (json.dumps(dataclasses.asdict(settings)),))
                connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return cls(path, connection)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------------------------

    def _read_settings(self) -> IndexSettings:
        with _damage_reported(self.path):
            row = self._connection.execute("SELECT value FROM settings WHERE id = 1").fetchone()
        try:
            return IndexSettings(**json.loads(row[0]))
        except (TypeError, ValueError) as error:
            raise VideoSearchError(f"{self.path} is damaged: its settings row is unreadable ({error}).") from None

    def entries(self) -> tuple[set[VideoFile], list[FailedVideo]]:
        """The indexed videos (without their embeddings) and the failed ones."""
        with _damage_reported(self.path), _transaction(self._connection, write=False):
            indexed = {VideoFile(*row) for row in self._connection.execute("SELECT path, size, mtime_ns FROM videos")}
            failed = self._failed()
        return indexed, failed

    def failed(self) -> list[FailedVideo]:
        """The videos that could not be embedded (without reading the indexed ones)."""
        with _damage_reported(self.path), _transaction(self._connection, write=False):
            return self._failed()

    def _failed(self) -> list[FailedVideo]:
        rows = self._connection.execute("SELECT path, size, mtime_ns, error FROM failed ORDER BY path")
        return [FailedVideo(*row) for row in rows]

    def snapshot(self) -> VideoIndex:
        """The whole index in memory, read in one transaction, every row verified."""
        settings = self.settings
        with _damage_reported(self.path), _transaction(self._connection, write=False):
            count = self._connection.execute("SELECT count(*) FROM videos").fetchone()[0]
            video_embeds = np.empty((count, settings.embed_dim), dtype=np.float32)
            frame_embeds = (
                np.empty((count, settings.num_frames, settings.embed_dim), dtype=np.float32)
                if settings.frame_embeds
                else None
            )
            videos, row_ids, damaged = [], [], []
            rows = self._connection.execute(
                "SELECT rowid, path, size, mtime_ns, video_embed, frame_embeds, checksum FROM videos ORDER BY rowid"
            )
            for row, (row_id, path, size, mtime_ns, video_blob, frames_blob, checksum) in enumerate(rows):
                video = VideoFile(path, size, mtime_ns)
                videos.append(video)
                row_ids.append(row_id)
                if not self._fill_row(row, video, video_blob, frames_blob, checksum, video_embeds, frame_embeds):
                    damaged.append(path)
            failed = self._failed()
            bank = [text for (text,) in self._connection.execute("SELECT text FROM query_bank ORDER BY position")]
        # A stored row is finite (non-finite embeddings are never stored): one that is not is damaged.
        finite = finite_rows(video_embeds, frame_embeds)
        damaged += [videos[row].path for row in np.flatnonzero(~finite) if videos[row].path not in damaged]
        if damaged:
            raise VideoSearchError(
                f"{self.path} is damaged: the stored embeddings of {len(damaged)} video(s) fail their checksum "
                f"(first: {', '.join(damaged[:_NAMED_IN_ERRORS])}). Rebuild the index (`index --rebuild`)."
            )
        return VideoIndex(
            root=settings.root,
            model=settings.model,
            num_frames=settings.num_frames,
            videos=videos,
            video_embeds=torch.from_numpy(video_embeds),
            frame_embeds=None if frame_embeds is None else torch.from_numpy(frame_embeds),
            failed=failed,
            query_bank=bank,
            row_ids=row_ids,
        )

    def _fill_row(self, row, video, video_blob, frames_blob, checksum, video_embeds, frame_embeds) -> bool:
        """Copies one stored row into the matrices; False when it is damaged (wrong size or checksum)."""
        if not isinstance(video_blob, bytes) or row_checksum(video, video_blob, frames_blob) != checksum:
            return False
        if len(video_blob) != video_embeds[row].nbytes:
            return False
        video_embeds[row] = np.frombuffer(video_blob, dtype="<f4")
        if frame_embeds is not None:
            if not isinstance(frames_blob, bytes) or len(frames_blob) != frame_embeds[row].nbytes:
                return False
            frame_embeds[row] = np.frombuffer(frames_blob, dtype="<f4").reshape(frame_embeds.shape[1:])
        return True

    def reading(self):
        """A read transaction: the reads made inside it see one state of the file."""
        return _transaction(self._connection, write=False)

    def row_ids(self) -> list[int]:
        with _damage_reported(self.path):
            return [row_id for (row_id,) in self._connection.execute("SELECT rowid FROM videos ORDER BY rowid")]

    def videos_at(self, row_ids: list[int]) -> list[VideoFile]:
        """The videos of the given rows, in that order, each verified against its checksum."""
        found = {}
        with _damage_reported(self.path):
            for row_id in row_ids:
                row = self._connection.execute(
                    "SELECT path, size, mtime_ns, video_embed, frame_embeds, checksum FROM videos WHERE rowid = ?",
                    (row_id,),
                ).fetchone()
                if row is not None:
                    video = VideoFile(*row[:3])
                    if row_checksum(video, row[3], row[4]) != row[5]:
                        raise VideoSearchError(f"{self.path} is damaged: the row of {video.path} fails its checksum.")
                    found[row_id] = video
        missing = [row_id for row_id in row_ids if row_id not in found]
        if missing:
            raise VideoSearchError(f"{self.path}: rows {missing} are not in the index (the FAISS index is stale).")
        return [found[row_id] for row_id in row_ids]

    def faiss_index(self) -> tuple[str, bytes] | None:
        """(factory string, serialized FAISS index) as `save_faiss_index` stored them, or None."""
        with _damage_reported(self.path):
            row = self._connection.execute("SELECT factory, data, checksum FROM faiss_index WHERE id = 1").fetchone()
        if row is None:
            return None
        factory, data, checksum = row
        if zlib.crc32(data) != checksum:
            raise VideoSearchError(f"{self.path} is damaged: its FAISS index fails its checksum; rebuild it.")
        return factory, data

    # ---- writing (each method is one transaction) ------------------------------------------------------------

    def save_faiss_index(self, factory: str, data: bytes) -> None:
        with _damage_reported(self.path), _transaction(self._connection):
            self._connection.execute(
                "INSERT OR REPLACE INTO faiss_index VALUES (1, ?, ?, ?)", (factory, data, zlib.crc32(data))
            )

    def forget_absent(self, current: list[VideoFile]) -> int:
        """Drops the rows and failures of videos deleted or changed since they were stored; returns how many indexed
        videos are gone from the folder."""
        present = set(current)
        present_paths = {video.path for video in current}
        with _damage_reported(self.path), _transaction(self._connection):
            stale = [video for video in self._indexed() if video not in present]
            self._connection.executemany("DELETE FROM videos WHERE path = ?", [(video.path,) for video in stale])
            stale_failures = [failure.path for failure in self._failed() if failure.file not in present]
            self._connection.executemany("DELETE FROM failed WHERE path = ?", [(path,) for path in stale_failures])
        return sum(video.path not in present_paths for video in stale)

    def _indexed(self) -> list[VideoFile]:
        return [VideoFile(*row) for row in self._connection.execute("SELECT path, size, mtime_ns FROM videos")]

    def add_batch(self, embedded: list[EmbeddedVideo], failed: list[FailedVideo]) -> None:
        """Stores one batch: its embeddings and its failures, all or nothing."""
        rows = []
        for item in embedded:
            video_blob = _float32_bytes(item.video_embed)
            frames_blob = None if item.frame_embeds is None else _float32_bytes(item.frame_embeds)
            checksum = row_checksum(item.video, video_blob, frames_blob)
            rows.append((item.video.path, item.video.size, item.video.mtime_ns, video_blob, frames_blob, checksum))
        with _damage_reported(self.path), _transaction(self._connection):
            self._connection.executemany("INSERT OR REPLACE INTO videos VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._connection.executemany("DELETE FROM failed WHERE path = ?", [(row[0],) for row in rows])
            self._connection.executemany(
                "INSERT OR REPLACE INTO failed VALUES (?, ?, ?, ?)",
                [(f.path, f.size, f.mtime_ns, f.error) for f in failed],
            )

    def add_queries(self, queries) -> None:
        """Appends the non-blank `queries` not yet in the query bank."""
        texts = [query.strip() for query in queries if query.strip()]
        with _damage_reported(self.path), _transaction(self._connection):
            self._connection.executemany("INSERT OR IGNORE INTO query_bank (text) VALUES (?)", [(t,) for t in texts])


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are the explicit BEGIN/COMMIT of `_transaction`, nothing implicit.
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    return connection


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection, write: bool = True):
    """One transaction; rolled back on any exception, KeyboardInterrupt included. A read transaction sees one
    snapshot of the file; a write transaction takes the write lock at once (IMMEDIATE), so it cannot fail half-way
    on a lock."""
    connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


@contextlib.contextmanager
def _damage_reported(path: Path):
    """SQLite's errors about the file become the tool's error naming it."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        raise VideoSearchError(
            f"{path} is damaged or unreadable as a video index ({error}). Rebuild it (`index --rebuild`)."
        ) from None


def _check_file_kind(path: Path) -> None:
    with open(path, "rb") as file:
        head = file.read(len(_SQLITE_MAGIC))
    if head == _SQLITE_MAGIC:
        return
    if _is_safetensors(path):
        raise VideoSearchError(
            f"{path} is an index written by an earlier version (safetensors). Import it once into the current format:"
            f" python -m modeling_stan.search.video_search import --from {path} --index {path.with_suffix('.sqlite')}"
        )
    raise VideoSearchError(f"{path}: not a video index written by modeling_stan.search.video_search.")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte length of a JSON header, then the header itself."""
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def _has_application_id(path: Path) -> bool:
    """Whether the file's header (read as bytes, so that a damaged index can still be replaced) carries this
    tool's application id (big-endian, at offset 68 of an SQLite file)."""
    with open(path, "rb") as file:
        file.seek(68)
        return file.read(4) == APPLICATION_ID.to_bytes(4, "big")


def _check_identity(path: Path, connection: sqlite3.Connection) -> None:
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    if application_id != APPLICATION_ID:
        raise VideoSearchError(f"{path}: an SQLite database, but not a video index written by video_search.")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise VideoSearchError(
            f"{path}: index schema version {version}; this version of video_search reads version {SCHEMA_VERSION}."
        )


def _quick_check(path: Path, connection: sqlite3.Connection) -> None:
    problems = [message for (message,) in connection.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise VideoSearchError(
            f"{path} is damaged: {'; '.join(problems[:_NAMED_IN_ERRORS])}. Rebuild it (`index --rebuild`)."
        )


# ----------------------------------------------------------------------------------------------------------------
# The one-time importer of the safetensors format


_SAFETENSORS_FORMAT = "stan-video-index/1"
_SAFETENSORS_METADATA_KEY = "stan_video_index"


def import_safetensors_index(source: str | os.PathLike, destination: str | os.PathLike) -> tuple[int, int]:
    """Writes the index of `source` (the safetensors file of the earlier version) into a new index `destination`.

    Returns (videos imported, videos left out): a row with a non-finite embedding is left out, so the next `index`
    run embeds that video again.
    """
    from safetensors import SafetensorError, safe_open

    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise VideoSearchError(f"{source}: no such index file.")
    try:
        with safe_open(str(source), framework="np") as file:
            metadata = json.loads((file.metadata() or {})[_SAFETENSORS_METADATA_KEY])
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        if metadata.get("format") != _SAFETENSORS_FORMAT:
            raise KeyError(f"format {metadata.get('format')!r}, expected {_SAFETENSORS_FORMAT!r}")
        videos = [VideoFile(*video) for video in metadata["videos"]]
        video_embeds, frame_embeds = tensors["video_embeds"], tensors.get("frame_embeds")
        failed = [FailedVideo(**failure) for failure in metadata["failed"]]
        settings = IndexSettings(
            root=metadata["root"],
            model=metadata["model"],
            num_frames=metadata["num_frames"],
            embed_dim=int(video_embeds.shape[1]),
            frame_embeds=frame_embeds is not None,
        )
    except (SafetensorError, KeyError, IndexError, TypeError, ValueError, OSError) as error:
        raise VideoSearchError(f"{source}: not a readable safetensors video index ({error}).") from error
    if len(video_embeds) != len(videos) or (frame_embeds is not None and len(frame_embeds) != len(videos)):
        raise VideoSearchError(
            f"{source} is damaged: {len(videos)} videos in its metadata but {len(video_embeds)} embedding rows."
        )
    finite = finite_rows(video_embeds, frame_embeds)
    embedded = [
        EmbeddedVideo(video, video_embeds[row], None if frame_embeds is None else frame_embeds[row])
        for row, video in enumerate(videos)
        if finite[row]
    ]
    with IndexStore.create(destination, settings) as store:
        store.add_batch(embedded, failed)
        store.add_queries(metadata.get("query_bank", []))
    return len(embedded), len(videos) - len(embedded)
