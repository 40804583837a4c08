"""Text-to-video search end to end: a tiny STAN trained in the test on synthetic videos with known captions finds the
right video, re-indexing is incremental and resumable, unreadable videos are listed, DSL and Mug scores are right;
and the reliability battery: interruptions, concurrent commands, damaged files, non-finite embeddings, the importer."""

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_readme import NUM_FRAMES, single_thread, tiny_processor  # noqa: F401  (single_thread: a fixture)

from modeling_stan import StanForVideoClassification, StanForVideoTextRetrieval
from modeling_stan.demo.synthetic_videos import generate_synthetic_dataset
from modeling_stan.search import video_search
from modeling_stan.search.video_index import EmbeddedVideo, IndexSettings, IndexStore, VideoFile
from modeling_stan.search.video_search import (
    VideoIndex,
    VideoSearchError,
    build_index,
    dsl_rerank,
    load_search_model,
    main,
    model_identity,
    search,
)


NUM_VIDEOS = 12
TRAIN_STEPS = 80


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_train=NUM_VIDEOS, num_val=0, num_test=0, num_frames=8, size=32
    )
    with open(root / "metadata.csv", newline="") as file:
        captions = {row["video_id"] + ".mp4": row["caption"] for row in csv.DictReader(file)}
    assert len(set(captions.values())) == NUM_VIDEOS  # one right answer per query
    return root / "videos", captions


@pytest.fixture(scope="module")
def trained_dir(tiny_clip_dir, dataset, tmp_path_factory):
    """A tiny STAN trained for a few dozen steps to match the synthetic videos with their captions."""
    videos, captions = dataset
    processor = tiny_processor(tiny_clip_dir)
    torch.manual_seed(0)
    model = StanForVideoTextRetrieval.from_clip_pretrained(
        tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES, drop_path_rate=0.0, fixed_logit_scale=20.0
    )
    names = sorted(captions)
    inputs = processor(
        text=[captions[name] for name in names],
        videos=[str(videos / name) for name in names],
        padding=True,
        return_tensors="pt",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def searcher(trained_dir):
    return load_search_model(trained_dir, device="cpu")


def _build(index_path, searcher, trained_dir, videos, **kwargs):
    model, processor = searcher
    return build_index(
        index_path, model, processor, videos, model_name=model_identity(trained_dir), progress=False, **kwargs
    )


def test_trained_model_finds_the_right_video(searcher, trained_dir, dataset, tmp_path):
    videos, captions = dataset
    report = _build(tmp_path / "index.sqlite", searcher, trained_dir, videos, batch_size=5)
    assert (report.embedded, report.skipped, report.removed, report.failed) == (NUM_VIDEOS, 0, 0, [])
    index = VideoIndex.load(tmp_path / "index.sqlite")
    hits = {name: search(index, *searcher, caption, top_k=3) for name, caption in captions.items()}
    top1 = [name for name, results in hits.items() if results[0].path.name == name]
    assert len(top1) >= 0.75 * NUM_VIDEOS, f"right video first for only {sorted(top1)}"
    for results in hits.values():
        assert len(results) == 3 and results[0].score >= results[1].score >= results[2].score


def test_second_run_embeds_nothing(searcher, trained_dir, dataset, tmp_path, monkeypatch):
    videos, _ = dataset
    path = tmp_path / "index.sqlite"
    _build(path, searcher, trained_dir, videos)
    first = VideoIndex.load(path)

    def must_not_embed(*args, **kwargs):
        raise AssertionError("the second run computed an embedding")

    monkeypatch.setattr(searcher[0], "get_video_features", must_not_embed)
    report = _build(path, searcher, trained_dir, videos)
    assert (report.embedded, report.skipped, report.total) == (0, NUM_VIDEOS, NUM_VIDEOS)
    second = VideoIndex.load(path)
    assert second.videos == first.videos
    assert torch.equal(second.video_embeds, first.video_embeds)


def test_new_changed_removed_and_unreadable_videos(searcher, trained_dir, dataset, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(dataset[0], videos)
    path = tmp_path / "index.sqlite"
    _build(path, searcher, trained_dir, videos)
    before = VideoIndex.load(path)

    (videos / "nested").mkdir()
    shutil.copy(videos / "video0.mp4", videos / "nested" / "copy.mp4")  # new
    (videos / "broken.avi").write_bytes(b"this is not a video")  # unreadable
    (videos / "notes.txt").write_text("not a video extension")  # ignored
    os.utime(videos / "video1.mp4", ns=(1, 1))  # changed (other mtime)
    (videos / "video2.mp4").unlink()  # removed
    report = _build(path, searcher, trained_dir, videos)
    assert (report.embedded, report.removed, report.total) == (2, 1, NUM_VIDEOS)
    assert [failure.path for failure in report.failed] == ["broken.avi"]
    assert "VideoDecodeError" in report.failed[0].error

    index = VideoIndex.load(path)
    assert [failure.path for failure in index.failed] == ["broken.avi"]
    paths = [video.path for video in index.videos]
    assert "nested/copy.mp4" in paths and "video2.mp4" not in paths
    copy_row, original_row = paths.index("nested/copy.mp4"), [v.path for v in before.videos].index("video0.mp4")
    assert torch.allclose(index.video_embeds[copy_row], before.video_embeds[original_row], atol=1e-5)

    again = _build(path, searcher, trained_dir, videos)
    assert again.embedded == 0  # the unreadable file is not retried while it is unchanged
    assert [failure.path for failure in again.failed] == ["broken.avi"]


def test_ctrl_c_at_75_percent_of_a_first_run_keeps_the_embedded_videos(
    searcher, trained_dir, dataset, tmp_path, monkeypatch
):
    videos, _ = dataset
    path = tmp_path / "index.sqlite"
    model, _ = searcher
    real = model.get_video_features
    calls = []

    def interrupt_the_fourth_batch(pixel_values, **kwargs):
        calls.append(len(pixel_values))
        if len(calls) == 4:  # 9 of 12 videos (75%) embedded and committed
            raise KeyboardInterrupt
        return real(pixel_values, **kwargs)

    monkeypatch.setattr(model, "get_video_features", interrupt_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        _build(path, searcher, trained_dir, videos, batch_size=3)
    assert len(VideoIndex.load(path).videos) == 9
    monkeypatch.setattr(model, "get_video_features", real)
    report = _build(path, searcher, trained_dir, videos, batch_size=3)
    assert (report.embedded, report.skipped, report.total) == (3, 9, NUM_VIDEOS)


def test_dsl_scores_are_the_shifted_dual_softmax_over_the_query_bank(searcher, trained_dir, dataset, tmp_path):
    videos, captions = dataset
    bank = sorted(captions.values())[:5]
    path = tmp_path / "index.sqlite"
    _build(path, searcher, trained_dir, videos, queries=bank)
    index = VideoIndex.load(path)
    assert index.query_bank == bank
    model, processor = searcher
    query = "a red square moves from left to right"
    texts = [query, *bank]
    with torch.no_grad():
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        text = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    cosine = (text @ torch.nn.functional.normalize(index.video_embeds, dim=-1).t()).double()
    # For text -> video, each video's column is a softmax over the queries (temperature 1/100), times the
    # similarity shifted by its lower bound -1.
    expected = (1 + cosine[0]) * torch.exp(100 * cosine[0]) / torch.exp(100 * cosine).sum(dim=0)
    hits = search(index, model, processor, query, top_k=NUM_VIDEOS, dsl=True)
    by_path = {hit.path.name: hit.score for hit in hits}
    for row, video in enumerate(index.videos):
        assert by_path[video.path] == pytest.approx(expected[row].item(), rel=1e-4, abs=1e-12)
    plain = search(index, model, processor, query, top_k=1)[0]
    assert plain.score == pytest.approx(cosine[0].max().item(), abs=1e-5)


def test_dsl_cannot_reward_a_negative_similarity():
    # Video 0 is unrelated to the query (-0.5) and matches a bank sentence (0.9); video 1 is less unrelated (-0.1)
    # and matches nothing. Unshifted DSL ranks video 0 first (-0.5 * ~0 = -0.0 > -0.1).
    scores = torch.tensor([[-0.5, -0.1], [0.9, -0.9]])
    reranked = dsl_rerank(scores)
    assert reranked[0, 1] > reranked[0, 0] >= 0


def test_dsl_with_an_empty_query_bank_is_explained(searcher, trained_dir, dataset, tmp_path):
    videos, captions = dataset
    path = tmp_path / "index.sqlite"
    _build(path, searcher, trained_dir, videos, queries=[captions["video0.mp4"]])
    # The bank holds only the query itself: nothing to normalise against.
    with pytest.raises(VideoSearchError, match="holds none.*--queries"):
        search(VideoIndex.load(path), *searcher, captions["video0.mp4"], dsl=True)


def test_mug_models_index_frames_and_score_with_mug(tiny_clip_dir, dataset, tmp_path):
    videos, captions = dataset
    torch.manual_seed(0)
    model = StanForVideoTextRetrieval.from_clip_pretrained(
        tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES, drop_path_rate=0.0, alignment="mug"
    ).eval()
    processor = tiny_processor(tiny_clip_dir)
    path = tmp_path / "index.sqlite"
    build_index(path, model, processor, videos, model_name="mug", progress=False)
    index = VideoIndex.load(path)
    assert index.frame_embeds.shape == (NUM_VIDEOS, NUM_FRAMES, model.config.projection_dim)
    query = next(iter(captions.values()))
    hits = search(index, model, processor, query, top_k=NUM_VIDEOS)
    paths = [str(videos / video.path) for video in index.videos]
    with torch.no_grad():
        outputs = model(**processor(text=[query], videos=paths, padding=True, return_tensors="pt"), return_loss=False)
    expected = (outputs.logits_per_text[0] / model.logit_scale_value()).tolist()
    by_path = {hit.path.name: hit.score for hit in hits}
    for row, video in enumerate(index.videos):
        assert by_path[video.path] == pytest.approx(expected[row], abs=1e-4)


def test_cli_index_and_query(trained_dir, dataset, tmp_path, capsys):
    videos, captions = dataset
    path = tmp_path / "index.sqlite"
    queries = tmp_path / "queries.txt"
    queries.write_text("a green circle moves from top to bottom\n\n")
    main(
        [
            "index",
            "--model",
            str(trained_dir),
            "--videos",
            str(videos),
            "--index",
            str(path),
            "--queries",
            str(queries),
        ]
    )
    assert f"{NUM_VIDEOS} videos indexed ({NUM_VIDEOS} embedded now" in capsys.readouterr().out
    name, caption = sorted(captions.items())[0]
    main(["query", "--model", str(trained_dir), "--index", str(path), caption, "--top_k", "3", "--dsl", "--remember"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1"
    printed = [line.split()[1] for line in lines]
    assert len(set(printed)) == 3 and "-0.0000" not in printed  # the printed scores tell the results apart
    assert VideoIndex.load(path).query_bank == ["a green circle moves from top to bottom", caption]
    before = path.stat().st_mtime_ns
    main(["query", "--model", str(trained_dir), "--index", str(path), "a new sentence"])
    assert "a new sentence" not in VideoIndex.load(path).query_bank
    assert path.stat().st_mtime_ns == before  # a plain query writes nothing


def test_unreadable_videos_are_printed(trained_dir, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "empty.mp4").write_bytes(b"")
    main(["index", "--model", str(trained_dir), "--videos", str(videos), "--index", str(tmp_path / "i.sqlite")])
    out = capsys.readouterr().out
    assert "0 videos indexed" in out and "not indexed: empty.mp4 (VideoDecodeError" in out


def test_errors_name_the_problem(searcher, dataset, tmp_path, tiny_clip_dir):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("video0.mp4", "video1.mp4"):
        shutil.copy(dataset[0] / name, videos / name)
    path = tmp_path / "index.sqlite"
    model, processor = searcher
    build_index(path, model, processor, videos, model_name="model-a", progress=False)
    with pytest.raises(VideoSearchError, match="built with model 'model-a'"):
        build_index(path, model, processor, videos, model_name="model-b", progress=False)
    rebuilt = build_index(path, model, processor, videos, model_name="model-b", rebuild=True, progress=False)
    assert rebuilt.embedded == 2
    with pytest.raises(VideoSearchError, match="not a directory"):
        build_index(path, model, processor, tmp_path / "nowhere", model_name="model-b", progress=False)
    with pytest.raises(VideoSearchError, match="non-empty sentence"):
        search(VideoIndex.load(path), model, processor, "  ")
    (tmp_path / "fake.sqlite").write_bytes(b"nonsense")
    with pytest.raises(VideoSearchError, match="not a video index"):
        VideoIndex.load(tmp_path / "fake.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(VideoSearchError, match="not a video index"):
        VideoIndex.load(other)
    with pytest.raises(VideoSearchError, match="not a video index"):
        build_index(other, model, processor, videos, model_name="model-b", progress=False)
    with pytest.raises(VideoSearchError, match="not replacing it"):
        build_index(other, model, processor, videos, model_name="model-b", rebuild=True, progress=False)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(VideoSearchError, match="index schema version 99; this version of video_search reads"):
        VideoIndex.load(path)
    with pytest.raises(SystemExit):
        main(["query", "--model", str(tiny_clip_dir), "--index", str(path), "anything"])

    classifier_dir = tmp_path / "classifier"
    classifier = StanForVideoClassification.from_clip_pretrained(tiny_clip_dir, stan_depth=1, class_names=["a", "b"])
    classifier.save_pretrained(classifier_dir)
    processor.save_pretrained(classifier_dir)
    with pytest.raises(VideoSearchError, match="no text tower"):
        load_search_model(classifier_dir)


# ----------------------------------------------------------------------------------------------------------------
# Reliability: concurrent commands, interruptions, damage, non-finite values, the importer
# ----------------------------------------------------------------------------------------------------------------


def _folder_of(dataset, tmp_path, names):
    folder = tmp_path / "videos"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(dataset[0] / name, folder / name)
    return folder


def test_a_slow_query_loses_nothing_that_index_adds_meanwhile(searcher, trained_dir, dataset, tmp_path, monkeypatch):
    videos = _folder_of(dataset, tmp_path, [f"video{i}.mp4" for i in range(6)])
    path = tmp_path / "index.sqlite"
    main(["index", "--model", str(trained_dir), "--videos", str(videos), "--index", str(path)])

    def load_while_index_adds_videos(model_dir, device=None):
        # The query has read its snapshot; while its model loads, an `index` run adds four videos.
        _folder_of(dataset, tmp_path, [f"video{i}.mp4" for i in range(6, 10)])
        _build(path, searcher, trained_dir, videos)
        return searcher

    monkeypatch.setattr(video_search, "load_search_model", load_while_index_adds_videos)
    main(["query", "--model", str(trained_dir), "--index", str(path), "a red square", "--remember"])
    index = VideoIndex.load(path)
    assert len(index.videos) == 10
    assert index.query_bank == ["a red square"]


_KILLED_WRITER = r"""
import importlib.util, os, signal, sys
import numpy as np

# The module alone (it has no package imports), so the process does not pay for importing transformers.
spec = importlib.util.spec_from_file_location("video_index", sys.argv[2])
video_index = importlib.util.module_from_spec(spec)
spec.loader.exec_module(video_index)
EmbeddedVideo, IndexSettings, IndexStore, VideoFile = (
    video_index.EmbeddedVideo, video_index.IndexSettings, video_index.IndexStore, video_index.VideoFile
)

store = IndexStore.create(sys.argv[1], IndexSettings("/videos", "model", 4, 8, False))
for batch in range(4):
    rows = [EmbeddedVideo(VideoFile(f"{batch}-{i}.mp4", 1, 1), np.full(8, batch + i, np.float32)) for i in range(5)]
    if batch == 3:  # killed inside the fourth batch's transaction, after its rows were written
        store._connection.execute("BEGIN IMMEDIATE")
        store._connection.executemany(
            "INSERT INTO videos VALUES (?, 1, 1, ?, NULL, 0)", [(r.video.path, r.video_embed.tobytes()) for r in rows]
        )
        os.kill(os.getpid(), signal.SIGKILL)
    store.add_batch(rows, [])
"""


def test_sigkill_loses_at_most_the_batch_in_flight(tmp_path):
    path = tmp_path / "index.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module = Path(video_search.__file__).with_name("video_index.py")
    completed = subprocess.run(
        [sys.executable, str(script), str(path), str(module)], env=env, capture_output=True, timeout=120
    )
    assert completed.returncode == -9, completed.stderr.decode()[-2000:]
    index = VideoIndex.load(path)
    assert sorted(video.path for video in index.videos) == sorted(f"{b}-{i}.mp4" for b in range(3) for i in range(5))
    assert torch.equal(index.video_embeds[0], torch.zeros(8))


def test_overwritten_bytes_make_query_exit_with_the_tools_error(trained_dir, dataset, tmp_path, capsys):
    path = tmp_path / "index.sqlite"
    main(["index", "--model", str(trained_dir), "--videos", str(dataset[0]), "--index", str(path)])
    # One page's worth (SQLite's default page size) always covers the start of a page, so it damages data, not
    # only the unused space inside pages (which holds nothing to refuse).
    page_size = 4096
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2 - page_size // 2)
        file.write(b"\xa5" * page_size)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["query", "--model", str(trained_dir), "--index", str(path), "a red square"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {path} is damaged") and "Traceback" not in error


def test_a_changed_embedding_fails_its_checksum_and_names_the_video(searcher, trained_dir, dataset, tmp_path):
    videos = _folder_of(dataset, tmp_path, ["video0.mp4", "video1.mp4"])
    path = tmp_path / "index.sqlite"
    _build(path, searcher, trained_dir, videos)
    connection = sqlite3.connect(path)
    blob = connection.execute("SELECT video_embed FROM videos WHERE path = 'video1.mp4'").fetchone()[0]
    connection.execute("UPDATE videos SET video_embed = ? WHERE path = 'video1.mp4'", (blob[:-1] + b"\x7f",))
    connection.commit()
    connection.close()
    with pytest.raises(VideoSearchError, match=r"fail their checksum \(first: video1.mp4\)"):
        VideoIndex.load(path)


def test_a_non_finite_embedding_is_reported_never_stored(searcher, trained_dir, dataset, tmp_path, monkeypatch):
    videos = _folder_of(dataset, tmp_path, ["video0.mp4", "video1.mp4", "video2.mp4"])
    model, _ = searcher
    real = model.get_video_features

    def nan_for_the_second_video(pixel_values, **kwargs):
        outputs = real(pixel_values, **kwargs)
        outputs.pooler_output[1] = float("nan")
        return outputs

    monkeypatch.setattr(model, "get_video_features", nan_for_the_second_video)
    report = _build(tmp_path / "index.sqlite", searcher, trained_dir, videos)
    assert (report.embedded, report.total) == (2, 2)
    assert [(f.path, f.error) for f in report.failed] == [
        ("video1.mp4", "the model produced a non-finite embedding (NaN or inf) for the video video1.mp4")
    ]
    monkeypatch.setattr(model, "get_video_features", real)
    hits = search(VideoIndex.load(tmp_path / "index.sqlite"), *searcher, "a red square", top_k=5)
    assert [hit.path.name for hit in hits if hit.path.name == "video1.mp4"] == []


def _nan_for_the_last_text(model, monkeypatch):
    real = model.get_text_features

    def nan_for_the_last_text(input_ids, attention_mask=None, **kwargs):
        outputs = real(input_ids, attention_mask, **kwargs)
        outputs.pooler_output[-1] = float("nan")
        return outputs

    monkeypatch.setattr(model, "get_text_features", nan_for_the_last_text)


def test_a_non_finite_query_embedding_is_refused_by_name(searcher, trained_dir, dataset, tmp_path, monkeypatch):
    videos = _folder_of(dataset, tmp_path, ["video0.mp4", "video1.mp4"])
    _build(tmp_path / "index.sqlite", searcher, trained_dir, videos, queries=["a blue circle"])
    index = VideoIndex.load(tmp_path / "index.sqlite")
    _nan_for_the_last_text(searcher[0], monkeypatch)
    with pytest.raises(VideoSearchError, match=r"non-finite embedding \(NaN or inf\) for the query 'a red square'$"):
        search(index, *searcher, "a red square")
    # With DSL the bank's sentences are encoded after the query: the one that came out NaN is named.
    with pytest.raises(VideoSearchError, match=r"non-finite embedding \(NaN or inf\) for the query 'a blue circle'$"):
        search(index, *searcher, "a red square", dsl=True)


def _write_safetensors_index(path, root, model, embeds, names, query_bank):
    """An index in the earlier safetensors format, as that version wrote it."""
    from safetensors.torch import save_file

    metadata = {
        "format": "stan-video-index/1",
        "root": str(root),
        "model": model,
        "num_frames": NUM_FRAMES,
        "videos": [[name, 1, 1] for name in names],
        "failed": [{"path": "bad.mp4", "size": 3, "mtime_ns": 4, "error": "VideoDecodeError: broken"}],
        "query_bank": query_bank,
    }
    save_file({"video_embeds": embeds}, str(path), metadata={"stan_video_index": json.dumps(metadata)})


def test_the_importer_converts_a_safetensors_index_once(searcher, trained_dir, tmp_path, capsys):
    embeds = torch.randn(3, searcher[0].config.projection_dim)
    embeds[2, 0] = float("nan")
    old = tmp_path / "videos.safetensors"
    _write_safetensors_index(old, tmp_path, model_identity(trained_dir), embeds, ["a.mp4", "b.mp4", "c.mp4"], ["q"])
    with pytest.raises(SystemExit):
        main(["query", "--model", str(trained_dir), "--index", str(old), "a red square"])
    assert "earlier version (safetensors)" in capsys.readouterr().err
    new = tmp_path / "videos.sqlite"
    main(["import", "--from", str(old), "--index", str(new)])
    assert "2 videos imported" in capsys.readouterr().out
    index = VideoIndex.load(new)
    assert [video.path for video in index.videos] == ["a.mp4", "b.mp4"]
    assert torch.equal(index.video_embeds, embeds[:2])
    assert [failure.path for failure in index.failed] == ["bad.mp4"] and index.query_bank == ["q"]
    with pytest.raises(VideoSearchError, match="already exists"):
        video_search.import_safetensors_index(old, new)


def test_faiss_search_finds_what_brute_force_finds_and_refuses_a_stale_index(
    searcher, trained_dir, dataset, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("faiss")
    videos = _folder_of(dataset, tmp_path, [f"video{i}.mp4" for i in range(8)])
    path = tmp_path / "index.sqlite"
    _build(path, searcher, trained_dir, videos)
    query = "a red square moves from left to right"
    with pytest.raises(VideoSearchError, match="no FAISS index"):
        video_search.search_faiss(path, *searcher, query)
    brute = search(VideoIndex.load(path), *searcher, query, top_k=8)
    for factory in ("Flat", "HNSW32"):
        main(["faiss", "--index", str(path), "--factory", factory])
        assert f"FAISS index '{factory}' of 8 videos stored" in capsys.readouterr().out
        hits = video_search.search_faiss(path, *searcher, query, top_k=8)
        assert [hit.path for hit in hits] == [hit.path for hit in brute]
        assert [hit.score for hit in hits] == pytest.approx([hit.score for hit in brute], abs=1e-5)
    main(["query", "--model", str(trained_dir), "--index", str(path), query, "--faiss", "--top_k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[-1] for line in lines] == [str(hit.path) for hit in brute[:2]]
    with monkeypatch.context() as patch:
        _nan_for_the_last_text(searcher[0], patch)
        with pytest.raises(VideoSearchError, match=r"non-finite embedding \(NaN or inf\) for the query 'a red"):
            video_search.search_faiss(path, *searcher, query)

    _folder_of(dataset, tmp_path, ["video8.mp4"])
    _build(path, searcher, trained_dir, videos)
    with pytest.raises(VideoSearchError, match="FAISS index is older"):
        video_search.search_faiss(path, *searcher, query)
    with pytest.raises(VideoSearchError, match="could not build 'IVF64,Flat' over 9 videos"):
        video_search.build_faiss_index(path, "IVF64,Flat")


def test_a_read_transaction_sees_one_snapshot_while_index_commits(tmp_path):
    path = tmp_path / "index.sqlite"
    settings = IndexSettings("/videos", "model", 4, 8, False)

    def batch(first):
        return [EmbeddedVideo(VideoFile(f"{i}.mp4", 1, 1), np.ones(8, np.float32)) for i in range(first, first + 3)]

    with IndexStore.create(path, settings) as writer, IndexStore.open(path) as reader:
        writer.add_batch(batch(0), [])
        with reader.reading():
            before = reader.row_ids()
            writer.add_batch(batch(3), [])  # committed while the reader is inside its transaction
            assert reader.row_ids() == before and len(before) == 3
        assert len(reader.row_ids()) == 6
