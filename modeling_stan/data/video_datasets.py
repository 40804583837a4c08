"""`datasets.Dataset` builders for the standard video-text and video-classification annotation formats, and the lazy
decoding that feeds them to a model.

Every builder reads one annotation file (one split) in its public layout and returns a `datasets.Dataset` whose
`video` column holds absolute video paths as plain strings; nothing is decoded when building. Two schemas:

    retrieval       video: str, video_id: str, caption: str, video_index: int
    classification  video: str, video_id: str, label: ClassLabel (-1 where the split has no labels)

`video_index` numbers the distinct videos of a retrieval split in order of first appearance; with several captions
per video (MSR-VTT train, MSVD) it is the text-to-video ground truth, and `unique_video_rows` gives one row a video.

Videos listed in an annotation file but absent on disk (or broken links) are dropped, logged as one warning and
counted: `build_report(dataset)` returns a `BuildReport` (kept in `dataset.info.description` as JSON). An
annotation file that does not follow its format raises `AnnotationError`, naming the file, the line or entry, and
what was expected: text that is not UTF-8, CSV with broken quoting (read strictly: an unterminated quote is an
error, not a caption that swallows the rest of the file), and a video id whose path leaves `video_dir` (`..`) too.

Decoding happens on access: `dataset.set_transform(make_decode_transform(num_frames=8))` adds `frames` (or the
outputs of a video processor) and `decode_error`; a corrupt video gives `decode_error` = its message instead of
raising, and `SkipCorruptCollator` drops such samples from a batch and counts them in a `CorruptSampleCounter`.

| builder | annotation file(s) | video path |
| --- | --- | --- |
| `load_msrvtt` | `MSRVTT_data.json` (+ `split` or `MSRVTT_train.9k.csv`), `MSRVTT_JSFUSION_test.csv` | `{video_id}.mp4` |
| `load_didemo` | `{train,val,test}_data.json` (descriptions of a video joined into one paragraph) | `{video}` |
| `load_lsmdc` | `LSMDC16_annos_*.csv` (tab-separated) | `{movie}/{clip_id}.avi` |
| `load_msvd` | `AllVideoDescriptions.txt` (+ `train_list.txt`-style id list) | `{video_id}.avi` |
| `load_activitynet_captions` | `train.json`, `val_1.json`, `val_2.json` (sentences joined) | `{video_id}.mp4` |
| `load_webvid` | `results_2M_train.csv` (`videoid,contentUrl,duration,page_dir,name`) | `{page_dir}/{videoid}.mp4` |
| `load_kinetics` | `train.csv` (`label,youtube_id,time_start,time_end,split`) | `{youtube_id}_{start:06d}_{end:06d}.mp4` |
| `load_something_something_v2` | `something-something-v2-{train,validation}.json` + `-labels.json` | `{id}.webm` |
| `load_ucf101` | `classInd.txt`, `trainlist0{fold}.txt`, `testlist0{fold}.txt` | `{class}/{file}` |
| `load_hmdb51` | `{class}_test_split{fold}.txt` (1 = train, 2 = test, 0 = unused) | `{class}/{file}` |
| `load_video_folder` | none: `<root>/<class>/<video>` | as found |
"""

import csv
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetInfo, Features, Value

from ..video_io import VideoDecodeError, decode_video


logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".flv")
RETRIEVAL_FEATURES = Features(
    {"video": Value("string"), "video_id": Value("string"), "caption": Value("string"), "video_index": Value("int64")}
)
# How many missing paths a report keeps: enough to spot a wrong folder or extension, small enough to log.
_MISSING_EXAMPLES = 5


class AnnotationError(ValueError):
    """An annotation file does not follow its format. `path` is the file, `where` the line or entry."""

    def __init__(self, path: str | os.PathLike, where: str, expected: str):
        self.path, self.where = str(path), where
        super().__init__(f"{path}: {where}: {expected}")


@dataclass
class BuildReport:
    """What a builder read and what it dropped; `build_report(dataset)` returns it."""

    format: str
    annotation_files: list[str]
    video_dir: str
    num_rows: int
    num_missing_videos: int = 0
    missing_videos: list[str] = field(default_factory=list)


def build_report(dataset: Dataset) -> BuildReport:
    """The `BuildReport` of a dataset made by one of this module's builders."""
    try:
        return BuildReport(**json.loads(dataset.info.description))
    except (TypeError, ValueError) as error:
        raise ValueError(
            "build_report: the dataset was not made by a modeling_stan.data.video_datasets builder."
        ) from error


def unique_video_rows(dataset: Dataset) -> list[int]:
    """Row index of the first caption of each video of a retrieval dataset, in `video_index` order."""
    first_rows: dict[int, int] = {}
    # The plain format skips any decode transform: only the integer column is read.
    for row, video_index in enumerate(dataset.with_format(None)["video_index"]):
        first_rows.setdefault(video_index, row)
    return [first_rows[index] for index in sorted(first_rows)]


# ----------------------------------------------------------------------------------------------------------------
# Reading annotation files


def _read_text(path: str | os.PathLike) -> str:
    """The file's text, without a leading byte-order mark (spreadsheet exports write one; it would otherwise stick
    to the first column's name); a byte sequence that is not UTF-8 is an `AnnotationError` naming its line."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise AnnotationError(
            path, f"line {line}", f"not UTF-8 text (byte {data[error.start]:#04x}); save the file as UTF-8"
        ) from None


def _read_json(path: str | os.PathLike, expected_type: type) -> Any:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise AnnotationError(path, where, f"invalid JSON ({error.msg})") from error
    if not isinstance(data, expected_type):
        raise AnnotationError(
            path, "top level", f"expected a JSON {expected_type.__name__}, got {type(data).__name__}"
        )
    return data


def _field(entry: Any, key: str, path: str | os.PathLike, where: str, expected_type: type = str) -> Any:
    """`entry[key]`, checked to be an `expected_type`."""
    expected = f"field {key!r} must be a {expected_type.__name__}"
    if not isinstance(entry, dict):
        raise AnnotationError(path, where, f"expected an object with field {key!r}, got a {type(entry).__name__}")
    if key not in entry:
        raise AnnotationError(path, where, f"{expected}; the field is missing")
    if not isinstance(entry[key], expected_type):
        raise AnnotationError(path, where, f"{expected}, got {type(entry[key]).__name__} {entry[key]!r}")
    return entry[key]


def _read_csv(
    path: str | os.PathLike, required: Sequence[str], delimiter: str = ","
) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV file with a header that has at least the `required` columns.

    Quoting is strict: an unterminated quote is an error, not a field that swallows the rest of the file."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, strict=True)
    rows, last_line = [], 0
    try:
        absent = [column for column in required if column not in (reader.fieldnames or [])]
        if absent:
            raise AnnotationError(path, "line 1 (header)", f"expected columns {list(required)}, missing {absent}")
        last_line = reader.line_num
        for row in reader:
            empty = [column for column in required if not row.get(column)]
            if empty:
                raise AnnotationError(path, f"line {reader.line_num}", f"empty or missing value for {empty}")
            rows.append((reader.line_num, row))
            last_line = reader.line_num
    except csv.Error as error:
        # The reader has not counted the lines of the record it failed on: it starts after the last good one.
        raise AnnotationError(path, f"line {last_line + 1}", f"malformed CSV ({error})") from None
    return rows


def _read_lines(path: str | os.PathLike, comment: str | None = None) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines, without those starting with `comment`."""
    # newline=None: universal newlines, as `open` in text mode would read them.
    lines = [(number, line.strip()) for number, line in enumerate(io.StringIO(_read_text(path), newline=None), 1)]
    return [(number, line) for number, line in lines if line and not (comment and line.startswith(comment))]


def _split_line(
    path: str | os.PathLike, number: int, line: str, sep: str | None, fields: int, expected: str
) -> list[str]:
    parts = line.split(sep, fields - 1)
    if len(parts) != fields:
        raise AnnotationError(path, f"line {number}", f"expected {expected}, got {line!r}")
    return parts


def _read_id_list(path: str | os.PathLike) -> set[str]:
    """Video ids, one a line; a first line `video_id` is the header of the MSR-VTT split CSVs."""
    ids = [line for _, line in _read_lines(path)]
    return set(ids[1:] if ids[:1] == ["video_id"] else ids)


def _int(value: str, path: str | os.PathLike, where: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AnnotationError(path, where, f"{name} must be an integer, got {value!r}") from None


# ----------------------------------------------------------------------------------------------------------------
# Assembling datasets


class _Record(NamedTuple):
    """One row before the missing-file check: `target` is a caption (retrieval) or a label id (classification)."""

    video_id: str
    path: str
    target: str | int


def _video_root(video_dir: str | os.PathLike) -> str:
    if not os.path.isdir(video_dir):
        raise FileNotFoundError(f"Video folder {video_dir} does not exist or is not a folder.")
    return os.path.abspath(video_dir)


def _check_inside(records: list[_Record], video_dir: str, annotation_files: Sequence) -> None:
    """Video paths built from annotations must stay inside `video_dir` (a `..` in an id would read elsewhere)."""
    inside = os.path.join(video_dir, "")
    for record in records:
        if not os.path.normpath(record.path).startswith(inside):
            raise AnnotationError(
                annotation_files[0] if annotation_files else video_dir,
                f"video {record.video_id!r}",
                f"its path {record.path} leaves the video folder {video_dir}",
            )


def _extensions_of(paths: Sequence[str]) -> str:
    """The file extensions looked for, as a message says them: "extension .mp4" or "extensions .avi, .mp4"."""
    extensions = sorted({Path(path).suffix or "(none)" for path in paths})
    return f"extension{'s' if len(extensions) > 1 else ''} {', '.join(extensions)}"


def _drop_missing(records: list[_Record]) -> tuple[list[_Record], list[str]]:
    """The records whose video file exists, and the distinct missing paths in order of first appearance."""
    exists: dict[str, bool] = {}
    for record in records:
        if record.path not in exists:
            exists[record.path] = os.path.isfile(record.path)
    return [r for r in records if exists[r.path]], [path for path, found in exists.items() if not found]


def _assemble(
    format_name: str,
    annotation_files: Sequence[str | os.PathLike],
    video_dir: str,
    records: list[_Record],
    features: Features,
) -> Dataset:
    """The dataset of the records whose video exists, with its `BuildReport`; `features` picks the schema."""
    _check_inside(records, video_dir, annotation_files)
    kept, missing = _drop_missing(records)
    if records and not kept:
        raise FileNotFoundError(
            f"{format_name}: no video found for any annotation of {', '.join(map(str, annotation_files))}: looked "
            f"for {_extensions_of(missing)} under {video_dir} (first: {missing[0]}). Check --video_dir, or pass "
            "--video_ext with the extension the videos have."
        )
    if missing:
        logger.warning(
            "%s: %d video(s) listed in %s are missing under %s (looked for %s); their %d row(s) were dropped. "
            "First missing: %s",
            format_name,
            len(missing),
            ", ".join(map(str, annotation_files)),
            video_dir,
            _extensions_of(missing),
            len(records) - len(kept),
            ", ".join(missing[:_MISSING_EXAMPLES]),
        )
    target_column = "caption" if "caption" in features else "label"
    columns = {
        "video": [r.path for r in kept],
        "video_id": [r.video_id for r in kept],
        target_column: [r.target for r in kept],
    }
    if "video_index" in features:
        # Numbered after dropping missing videos, so the indices stay contiguous.
        index_of: dict[str, int] = {}
        columns["video_index"] = [index_of.setdefault(r.path, len(index_of)) for r in kept]
    report = BuildReport(
        format=format_name,
        annotation_files=[str(path) for path in annotation_files],
        video_dir=video_dir,
        num_rows=len(kept),
        num_missing_videos=len(missing),
        missing_videos=missing[:_MISSING_EXAMPLES],
    )
    info = DatasetInfo(description=json.dumps(asdict(report)), features=features)
    return Dataset.from_dict(columns, features=features, info=info)


def _retrieval_dataset(
    format_name: str, annotation_files: Sequence, video_dir: str, records: list[_Record]
) -> Dataset:
    return _assemble(format_name, annotation_files, video_dir, records, RETRIEVAL_FEATURES)


def _classification_dataset(
    format_name: str, annotation_files: Sequence, video_dir: str, records: list[_Record], class_names: Sequence[str]
) -> Dataset:
    features = Features(
        {"video": Value("string"), "video_id": Value("string"), "label": ClassLabel(names=list(class_names))}
    )
    return _assemble(format_name, annotation_files, video_dir, records, features)


def _joined_by_video(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Texts of each video joined with spaces into one paragraph, videos in order of first appearance."""
    texts: dict[str, list[str]] = {}
    for video_id, text in pairs:
        texts.setdefault(video_id, []).append(text.strip())
    return {video_id: " ".join(parts) for video_id, parts in texts.items()}


def _class_index(names: Sequence[str]) -> dict[str, int]:
    return {name: index for index, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------------------------
# Retrieval builders


def load_msrvtt(
    annotation_file: str | os.PathLike,
    video_dir: str | os.PathLike,
    *,
    split: str | None = None,
    video_ids_file: str | os.PathLike | None = None,
    video_ext: str = ".mp4",
) -> Dataset:
    """MSR-VTT, one row per (video, caption).

    Args:
        annotation_file: either `MSRVTT_data.json` / `*_videodatainfo.json` (`{"videos": [...], "sentences":
            [{"video_id", "caption"}, ...]}`), or a JSFusion CSV (`key,vid_key,video_id,sentence`, the 1k-A test).
        video_dir: folder of `{video_id}{video_ext}` files.
        split: with the JSON, keep the videos whose `split` field is this (`"train"`, `"validate"`, `"test"`).
        video_ids_file: with the JSON, keep the videos listed in this file (`MSRVTT_train.9k.csv` or `.7k.csv`:
            a `video_id` header, then one id a line).
    """
    root = _video_root(video_dir)
    files = [annotation_file] + ([video_ids_file] if video_ids_file else [])
    if str(annotation_file).endswith(".csv"):
        if split is not None or video_ids_file is not None:
            raise ValueError(
                f"load_msrvtt: {annotation_file} is a JSFusion CSV, which is one split already; "
                "split and video_ids_file apply to the JSON annotations only."
            )
        pairs = [(row["video_id"], row["sentence"]) for _, row in _read_csv(annotation_file, ["video_id", "sentence"])]
    else:
        pairs = _msrvtt_json_pairs(annotation_file, split, video_ids_file)
    records = [_Record(video_id, os.path.join(root, video_id + video_ext), caption) for video_id, caption in pairs]
    return _retrieval_dataset("msrvtt", files, root, records)


def _msrvtt_json_pairs(
    path: str | os.PathLike, split: str | None, video_ids_file: str | os.PathLike | None
) -> list[tuple[str, str]]:
    data = _read_json(path, dict)
    sentences = _field(data, "sentences", path, "top level", list)
    keep: set[str] | None = None
    if split is not None:
        videos = _field(data, "videos", path, "top level", list)
        splits = {
            _field(v, "video_id", path, f"videos[{i}]"): _field(v, "split", path, f"videos[{i}]")
            for i, v in enumerate(videos)
        }
        keep = {video_id for video_id, video_split in splits.items() if video_split == split}
        if not keep:
            found = sorted(set(splits.values()))
            raise ValueError(f"load_msrvtt: no video of {path} has split {split!r}; found {found}.")
    if video_ids_file is not None:
        listed = _read_id_list(video_ids_file)
        keep = listed if keep is None else keep & listed
    pairs = [
        (_field(s, "video_id", path, f"sentences[{i}]"), _field(s, "caption", path, f"sentences[{i}]"))
        for i, s in enumerate(sentences)
    ]
    return [pair for pair in pairs if keep is None or pair[0] in keep]


def load_didemo(
    annotation_file: str | os.PathLike, video_dir: str | os.PathLike, *, video_ext: str | None = None
) -> Dataset:
    """DiDeMo paragraph-to-video retrieval: one row per video, its descriptions joined in file order.

    Args:
        annotation_file: `train_data.json`, `val_data.json` or `test_data.json`: a list of
            `{"annotation_id", "description", "video", "times", ...}`.
        video_dir: folder of the videos, named as the `video` field (e.g. `..._d8b58466fa.mov`).
        video_ext: if set, replaces the extension of the `video` field (for videos transcoded to, say, `.mp4`).
    """
    root = _video_root(video_dir)
    entries = _read_json(annotation_file, list)
    pairs = [
        (_field(e, "video", annotation_file, f"entry {i}"), _field(e, "description", annotation_file, f"entry {i}"))
        for i, e in enumerate(entries)
    ]
    records = [
        _Record(video, os.path.join(root, str(Path(video).with_suffix(video_ext)) if video_ext else video), paragraph)
        for video, paragraph in _joined_by_video(pairs).items()
    ]
    return _retrieval_dataset("didemo", [annotation_file], root, records)


def load_lsmdc(
    annotation_file: str | os.PathLike, video_dir: str | os.PathLike, *, video_ext: str = ".avi"
) -> Dataset:
    """LSMDC, one row per clip.

    Args:
        annotation_file: `LSMDC16_annos_{training,val,test}.csv` or `LSMDC16_challenge_1000_publictect.csv`:
            tab-separated `clip_id, start, end, start_aligned, end_aligned, sentence`, no header.
        video_dir: folder of `{movie}/{clip_id}{video_ext}`, where `movie` is `clip_id` up to its last `_`
            (`0001_American_Beauty_00.00.51.926-00.00.54.129` is in `0001_American_Beauty/`).
    """
    root = _video_root(video_dir)
    records = []
    for number, line in _read_lines(annotation_file):
        parts = _split_line(annotation_file, number, line, "\t", 6, "6 tab-separated fields ending with the sentence")
        clip_id, sentence = parts[0], parts[5]
        movie = clip_id.rsplit("_", 1)[0]
        records.append(_Record(clip_id, os.path.join(root, movie, clip_id + video_ext), sentence))
    return _retrieval_dataset("lsmdc", [annotation_file], root, records)


def load_msvd(
    annotation_file: str | os.PathLike,
    video_dir: str | os.PathLike,
    *,
    video_ids_file: str | os.PathLike | None = None,
    video_ext: str = ".avi",
) -> Dataset:
    """MSVD (YouTube2Text), one row per caption; `video_index` maps each caption to its video.

    Args:
        annotation_file: `AllVideoDescriptions.txt`: `#` comment lines, then `{video_id} {caption}` a line.
        video_dir: folder of `{video_id}{video_ext}` (`YouTubeClips/`).
        video_ids_file: keep the videos listed in this file, one id a line (`train_list.txt`, `test_list.txt`).
    """
    root = _video_root(video_dir)
    keep = _read_id_list(video_ids_file) if video_ids_file else None
    records = []
    for number, line in _read_lines(annotation_file, comment="#"):
        video_id, caption = _split_line(annotation_file, number, line, None, 2, "'<video_id> <caption>'")
        if keep is None or video_id in keep:
            records.append(_Record(video_id, os.path.join(root, video_id + video_ext), caption))
    files = [annotation_file] + ([video_ids_file] if video_ids_file else [])
    return _retrieval_dataset("msvd", files, root, records)


def load_activitynet_captions(
    annotation_file: str | os.PathLike, video_dir: str | os.PathLike, *, video_ext: str = ".mp4"
) -> Dataset:
    """ActivityNet Captions paragraph-to-video retrieval: one row per video, its sentences joined in order.

    Args:
        annotation_file: `train.json`, `val_1.json` or `val_2.json`:
            `{"v_QOlSCBRmfWY": {"duration": ..., "timestamps": [...], "sentences": [...]}, ...}`.
        video_dir: folder of `{video_id}{video_ext}` (ids keep their `v_` prefix).
    """
    root = _video_root(video_dir)
    pairs = []
    for video_id, entry in _read_json(annotation_file, dict).items():
        where = f"video {video_id!r}"
        for sentence in _field(entry, "sentences", annotation_file, where, list):
            if not isinstance(sentence, str):
                raise AnnotationError(annotation_file, where, f"sentences must be strings, got {sentence!r}")
            pairs.append((video_id, sentence))
    records = [
        _Record(video_id, os.path.join(root, video_id + video_ext), paragraph)
        for video_id, paragraph in _joined_by_video(pairs).items()
    ]
    return _retrieval_dataset("activitynet_captions", [annotation_file], root, records)


def load_webvid(
    annotation_file: str | os.PathLike, video_dir: str | os.PathLike, *, video_ext: str = ".mp4"
) -> Dataset:
    """WebVid-2M/10M, one row per video.

    Args:
        annotation_file: `results_2M_train.csv` / `results_2M_val.csv`: `videoid,contentUrl,duration,page_dir,name`.
        video_dir: folder of `{page_dir}/{videoid}{video_ext}` (the layout of the WebVid download script).
    """
    root = _video_root(video_dir)
    records = [
        _Record(row["videoid"], os.path.join(root, row["page_dir"], row["videoid"] + video_ext), row["name"])
        for _, row in _read_csv(annotation_file, ["videoid", "page_dir", "name"])
    ]
    return _retrieval_dataset("webvid", [annotation_file], root, records)


# ----------------------------------------------------------------------------------------------------------------
# Classification builders


def load_kinetics(
    annotation_file: str | os.PathLike,
    video_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    video_ext: str = ".mp4",
) -> Dataset:
    """Kinetics-400/600/700, one row per clip.

    Args:
        annotation_file: `train.csv`, `validate.csv` or `test.csv`: `label,youtube_id,time_start,time_end,split`
            (the test CSV may have no `label` column; its labels are then -1).
        video_dir: folder of `{youtube_id}_{time_start:06d}_{time_end:06d}{video_ext}`.
        class_names: the class list, to share label ids between splits; defaults to the sorted labels of the file.
    """
    root = _video_root(video_dir)
    rows = _read_csv(annotation_file, ["youtube_id", "time_start", "time_end"])
    if class_names is None:
        class_names = sorted({row["label"] for _, row in rows if row.get("label")})
    index = _class_index(class_names)
    records = []
    for number, row in rows:
        where = f"line {number}"
        start = _int(row["time_start"], annotation_file, where, "time_start")
        end = _int(row["time_end"], annotation_file, where, "time_end")
        label = row.get("label")
        if label and label not in index:
            raise AnnotationError(
                annotation_file, where, f"label {label!r} is not one of the {len(index)} class_names"
            )
        name = f"{row['youtube_id']}_{start:06d}_{end:06d}"
        records.append(_Record(name, os.path.join(root, name + video_ext), index[label] if label else -1))
    return _classification_dataset("kinetics", [annotation_file], root, records, class_names)


def load_something_something_v2(
    annotation_file: str | os.PathLike,
    labels_file: str | os.PathLike,
    video_dir: str | os.PathLike,
    *,
    video_ext: str = ".webm",
) -> Dataset:
    """Something-Something v2, one row per clip; the label is the entry's template without its brackets.

    Args:
        annotation_file: `something-something-v2-{train,validation,test}.json`: a list of
            `{"id", "label", "template": "Putting [something] on a surface", "placeholders"}` (test: `{"id"}` only,
            labels -1).
        labels_file: `something-something-v2-labels.json`: `{"Putting something on a surface": "101", ...}`.
        video_dir: folder of `{id}{video_ext}`.
    """
    root = _video_root(video_dir)
    class_names = _ssv2_class_names(labels_file)
    index = _class_index(class_names)
    records = []
    for i, entry in enumerate(_read_json(annotation_file, list)):
        where = f"entry {i}"
        video_id = _field(entry, "id", annotation_file, where)
        label = -1
        if "template" in entry:
            name = _field(entry, "template", annotation_file, where).replace("[", "").replace("]", "")
            if name not in index:
                raise AnnotationError(
                    annotation_file, f"{where} (id {video_id})", f"template {name!r} is not in {labels_file}"
                )
            label = index[name]
        records.append(_Record(video_id, os.path.join(root, video_id + video_ext), label))
    return _classification_dataset(
        "something_something_v2", [annotation_file, labels_file], root, records, class_names
    )


def _ssv2_class_names(labels_file: str | os.PathLike) -> list[str]:
    labels = _read_json(labels_file, dict)
    by_id = {_int(str(value), labels_file, f"label {name!r}", "its id"): name for name, value in labels.items()}
    if sorted(by_id) != list(range(len(labels))):
        raise AnnotationError(labels_file, "top level", f"label ids must be 0..{len(labels) - 1}, each once")
    return [by_id[i] for i in range(len(labels))]


def load_ucf101(
    split_dir: str | os.PathLike, video_dir: str | os.PathLike, *, split: str = "train", fold: int = 1
) -> Dataset:
    """UCF101, one row per clip; the label is the folder part of its path, numbered as in `classInd.txt` (1-based
    there, 0-based here).

    Args:
        split_dir: the `ucfTrainTestlist/` folder: `classInd.txt` (`1 ApplyEyeMakeup`), `trainlist0{fold}.txt`
            (`ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1`), `testlist0{fold}.txt` (path only; the class is its
            folder).
        video_dir: the `UCF-101/` folder, with `{class}/{file}`.
        split: `"train"` or `"test"`.
        fold: 1, 2 or 3.
    """
    _check_split_fold("load_ucf101", split, fold)
    root = _video_root(video_dir)
    class_file = Path(split_dir, "classInd.txt")
    class_names = _ucf101_class_names(class_file)
    index = _class_index(class_names)
    list_file = Path(split_dir, f"{split}list0{fold}.txt")
    records = []
    for number, line in _read_lines(list_file):
        relative = line.split()[0]
        class_name = relative.split("/")[0]
        if class_name not in index:
            raise AnnotationError(list_file, f"line {number}", f"folder {class_name!r} is not a class of {class_file}")
        records.append(_Record(Path(relative).stem, os.path.join(root, relative), index[class_name]))
    return _classification_dataset("ucf101", [class_file, list_file], root, records, class_names)


def _ucf101_class_names(class_file: Path) -> list[str]:
    names = []
    for number, line in _read_lines(class_file):
        class_id, name = _split_line(class_file, number, line, None, 2, "'<1-based id> <class name>'")
        if _int(class_id, class_file, f"line {number}", "the class id") != len(names) + 1:
            raise AnnotationError(class_file, f"line {number}", f"expected class id {len(names) + 1}, got {class_id}")
        names.append(name)
    return names


_HMDB51_MARKS = {"train": "1", "test": "2"}


def load_hmdb51(
    split_dir: str | os.PathLike, video_dir: str | os.PathLike, *, split: str = "train", fold: int = 1
) -> Dataset:
    """HMDB51, one row per clip; classes are the sorted names of the split files.

    Args:
        split_dir: the `testTrainMulti_7030_splits/` folder of `{class}_test_split{fold}.txt`, each line
            `{file} {mark}` with mark 1 = train, 2 = test, 0 = not used in this fold.
        video_dir: folder of `{class}/{file}`.
        split: `"train"` or `"test"`.
        fold: 1, 2 or 3.
    """
    _check_split_fold("load_hmdb51", split, fold)
    root = _video_root(video_dir)
    suffix = f"_test_split{fold}.txt"
    split_files = sorted(Path(split_dir).glob(f"*{suffix}"))
    if not split_files:
        raise FileNotFoundError(f"load_hmdb51: no '*{suffix}' files in {split_dir}.")
    class_names = [path.name[: -len(suffix)] for path in split_files]
    records = []
    for label, (class_name, split_file) in enumerate(zip(class_names, split_files)):
        for number, line in _read_lines(split_file):
            name, mark = _split_line(split_file, number, line, None, 2, "'<video file> <0|1|2>'")
            if mark not in ("0", "1", "2"):
                raise AnnotationError(split_file, f"line {number}", f"mark must be 0, 1 or 2, got {mark!r}")
            if mark == _HMDB51_MARKS[split]:
                records.append(_Record(Path(name).stem, os.path.join(root, class_name, name), label))
    return _classification_dataset("hmdb51", split_files, root, records, class_names)


def _check_split_fold(builder: str, split: str, fold: int) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"{builder}: split must be 'train' or 'test', got {split!r}.")
    if fold not in (1, 2, 3):
        raise ValueError(f"{builder}: fold must be 1, 2 or 3, got {fold!r}.")


def load_vifi_split(
    split_file: str | os.PathLike, labels_file: str | os.PathLike, video_dir: str | os.PathLike
) -> Dataset:
    """One split in ViFi-CLIP's layout (`datasets_splits/` and `labels/` of muzairkhattak/ViFi-CLIP), one row per
    listed video; the label names come from the labels file, so base and novel class sets number their classes
    independently, as the authors do.

    Args:
        split_file: lines `<video path relative to video_dir> <0-based label id>`, e.g. `v_ApplyEyeMakeup_g01_c01.avi 0`
            or `val/0wR5jVB-WPk_000417_000427.mp4 0`.
        labels_file: a CSV `id,name` with ids 0, 1, ... in order (`0,brush hair`).
        video_dir: the folder the split file's paths are relative to (their `DATA.ROOT`).
    """
    root = _video_root(video_dir)
    class_names = []
    for number, row in _read_csv(labels_file, ("id", "name")):
        if _int(row["id"], labels_file, f"line {number}", "the class id") != len(class_names):
            raise AnnotationError(
                labels_file, f"line {number}", f"expected class id {len(class_names)}, got {row['id']}"
            )
        class_names.append(row["name"])
    records = []
    for number, line in _read_lines(split_file):
        relative, label = _split_line(split_file, number, line, None, 2, "'<video path> <label id>'")
        label_id = _int(label, split_file, f"line {number}", "the label id")
        if not 0 <= label_id < len(class_names):
            raise AnnotationError(
                split_file,
                f"line {number}",
                f"label id {label_id} is not a class of {labels_file} (0 to {len(class_names) - 1})",
            )
        records.append(_Record(Path(relative).stem, os.path.join(root, relative), label_id))
    return _classification_dataset("vifi", [labels_file, split_file], root, records, class_names)


def load_video_folder(
    root: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Dataset:
    """A class-per-folder video directory `<root>/<class>/<video>`, one row per video file (sorted by name).

    Args:
        root: the folder of class folders (one split, e.g. `folders/train` of the synthetic dataset).
        class_names: the class list, to share label ids between splits; defaults to the sorted sub-folder names.
            Sub-folders not in the list are ignored.
        extensions: file name endings counted as videos (case-insensitive).

    Broken symbolic links count as missing videos.
    """
    video_root = _video_root(root)
    if class_names is None:
        class_names = sorted(entry.name for entry in os.scandir(video_root) if entry.is_dir())
    suffixes = tuple(ext.lower() for ext in extensions)
    records = [
        _Record(Path(name).stem, os.path.join(video_root, class_name, name), label)
        for label, class_name in enumerate(class_names)
        if os.path.isdir(os.path.join(video_root, class_name))
        for name in sorted(os.listdir(os.path.join(video_root, class_name)))
        if name.lower().endswith(suffixes)
    ]
    if not records:
        raise FileNotFoundError(
            f"video_folder: no video found in the class folders of {video_root}: looked for extensions "
            f"{', '.join(suffixes)}."
        )
    return _classification_dataset("video_folder", [], video_root, records, class_names)


# ----------------------------------------------------------------------------------------------------------------
# Lazy decoding and corrupt-sample handling


@dataclass
class VideoDecodeTransform:
    """Batch transform for `Dataset.set_transform`: decodes the `video_column` paths; see `make_decode_transform`."""

    num_frames: int = 8
    sampling: str = "uniform"
    train: bool = False
    video_processor: Callable | None = None
    video_column: str = "video"
    seed: int | None = None
    decode_options: dict = field(default_factory=dict)
    processor_options: dict = field(default_factory=dict)

    def __post_init__(self):
        # One generator for the transform's lifetime: reproducible runs, yet a new clip each epoch when training.
        # Without a seed, decode_video draws from torch's global generator, which DataLoader seeds per worker.
        self._generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.video_column not in batch:
            # A column query (`dataset["label"]`) passes only that column; leaving it untouched keeps it working.
            return batch
        decoded = [self._decode(source) for source in batch[self.video_column]]
        clips = [clip for clip, _ in decoded]
        outputs = {"frames": clips} if self.video_processor is None else self._process(clips)
        return {**batch, **outputs, "decode_error": [error for _, error in decoded]}

    def _decode(self, source: str) -> tuple[np.ndarray | None, str | None]:
        try:
            frames, _ = decode_video(
                source,
                self.num_frames,
                self.sampling,
                train=self.train,
                generator=self._generator,
                **self.decode_options,
            )
        except (VideoDecodeError, OSError) as error:  # OSError: a file deleted or unreadable since the build
            return None, f"{type(error).__name__}: {error}"
        return frames, None

    def _process(self, clips: list[np.ndarray | None]) -> dict[str, list]:
        """Runs the processor once on the decoded clips; each of its outputs becomes a column, None where corrupt."""
        good = [i for i, clip in enumerate(clips) if clip is not None]
        if not good:
            return {}
        # The clips hold exactly the sampled frames already: sampling them again would drop and repeat frames.
        options = {**self.processor_options, "do_sample_frames": False}
        processed = self.video_processor([clips[i] for i in good], return_tensors="pt", **options)
        columns = {}
        for key, values in processed.items():
            column = [None] * len(clips)
            for position, row in zip(good, values):
                column[position] = row
            columns[key] = column
        return columns


def make_decode_transform(
    num_frames: int = 8,
    sampling: str = "uniform",
    train: bool = False,
    video_processor: Callable | None = None,
    *,
    video_column: str = "video",
    seed: int | None = None,
    decode_options: dict | None = None,
    processor_options: dict | None = None,
) -> VideoDecodeTransform:
    """A transform for `dataset.set_transform(...)` / `dataset.with_transform(...)` that decodes videos on access.

    Each batch keeps its columns and gains `decode_error` (None, or the error message of a video that could not be
    decoded), plus either `frames` (`(num_frames, H, W, 3)` uint8 arrays) or, with `video_processor`, the
    processor's outputs (e.g. `pixel_values`), one tensor per sample: exactly what the processor returns for the
    video given as a path with the same `num_frames` and `sampling` (the frames are sampled once, when decoding).
    Corrupt samples get None there instead of raising; `SkipCorruptCollator` drops and counts them. The transform
    is picklable (DataLoader workers).

    Args:
        num_frames, sampling, train: passed to `decode_video`.
        video_processor: called as `video_processor(list_of_clips, return_tensors="pt", do_sample_frames=False,
            **processor_options)` (a transformers video processor, or any callable taking those arguments and
            returning a mapping of batched outputs).
        video_column: the column of video paths.
        seed: seeds a generator of the transform's own for training-time sampling (reproducible runs).
        decode_options: more keyword arguments of `decode_video` (`frame_stride`, `target_fps`, `num_clips`).
        processor_options: more keyword arguments of the processor call.
    """
    return VideoDecodeTransform(
        num_frames,
        sampling,
        train,
        video_processor,
        video_column,
        seed,
        dict(decode_options or {}),
        dict(processor_options or {}),
    )


class CorruptSampleCounter:
    """Counts skipped corrupt samples, also across DataLoader worker processes (the count lives in shared memory)."""

    def __init__(self):
        self._count = multiprocessing.Value("q", 0)

    def add(self, number: int = 1) -> None:
        with self._count.get_lock():
            self._count.value += number

    @property
    def count(self) -> int:
        return self._count.value

    def report(self) -> str:
        return f"{self.count} corrupt video sample(s) skipped"


class SkipCorruptCollator:
    """DataLoader `collate_fn` that drops samples with a `decode_error`, counts and logs them, and collates the rest.

    Returns None when every sample of a batch is corrupt: skip such batches in the training loop.

    Args:
        collate_fn: collates the good samples (without their `decode_error`); defaults to torch's `default_collate`.
        counter: where skipped samples are counted; a new `CorruptSampleCounter` if not given.
        video_column: the column named in the warning of each skipped sample.
        max_warnings: list at most this many skipped samples per process (None: all); the count has them all.
    """

    def __init__(
        self,
        collate_fn: Callable[[list[dict]], Any] | None = None,
        counter: CorruptSampleCounter | None = None,
        video_column: str = "video",
        max_warnings: int | None = None,
    ):
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.counter = counter or CorruptSampleCounter()
        self.video_column = video_column
        self.max_warnings = max_warnings
        self._warned = 0

    def __call__(self, samples: list[dict]) -> Any:
        batch, num_corrupt = self.collate_usable(samples)
        if num_corrupt:
            self.counter.add(num_corrupt)
        return batch

    def collate_usable(self, samples: list[dict]) -> tuple[Any, int]:
        """The collated good samples (None if there are none) and the number of corrupt ones, each logged."""
        good = []
        for sample in samples:
            if sample.get("decode_error") is None:
                good.append({key: value for key, value in sample.items() if key != "decode_error"})
            else:
                self._warn(sample)
        return (self.collate_fn(good) if good else None), len(samples) - len(good)

    def _warn(self, sample: dict) -> None:
        if self.max_warnings is not None and self._warned >= self.max_warnings:
            return
        self._warned += 1
        last = self._warned == self.max_warnings
        logger.warning(
            "Skipping corrupt video %s: %s%s",
            sample.get(self.video_column),
            sample["decode_error"],
            " (further ones are counted, not listed)" if last else "",
        )


__all__ = [
    "AnnotationError",
    "BuildReport",
    "CorruptSampleCounter",
    "RETRIEVAL_FEATURES",
    "SkipCorruptCollator",
    "VIDEO_EXTENSIONS",
    "VideoDecodeTransform",
    "build_report",
    "load_activitynet_captions",
    "load_didemo",
    "load_hmdb51",
    "load_kinetics",
    "load_lsmdc",
    "load_msrvtt",
    "load_msvd",
    "load_something_something_v2",
    "load_ucf101",
    "load_video_folder",
    "load_vifi_split",
    "load_webvid",
    "make_decode_transform",
    "unique_video_rows",
]
