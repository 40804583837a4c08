"""Text-to-video search end to end: a tiny STAN trained in the test on synthetic videos with known captions finds the
right video, re-indexing is incremental and resumable, unreadable videos are listed, DSL and Mug scores are right."""

import csv
import os
import shutil

import pytest
import torch
from test_readme import NUM_FRAMES, single_thread, tiny_processor  # noqa: F401  (single_thread: a fixture)

from modeling_stan import StanForVideoClassification, StanForVideoTextRetrieval
from modeling_stan.synthetic_videos import generate_synthetic_dataset
from modeling_stan.video_search import (
    VideoIndex,
    VideoSearchError,
    build_index,
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
        text=[captions[name] for name in names], videos=[str(videos / name) for name in names], padding=True,
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
    report = _build(tmp_path / "index.safetensors", searcher, trained_dir, videos, batch_size=5)
    assert (report.embedded, report.skipped, report.removed, report.failed) == (NUM_VIDEOS, 0, 0, [])
    index = VideoIndex.load(tmp_path / "index.safetensors")
    hits = {name: search(index, *searcher, caption, top_k=3) for name, caption in captions.items()}
    top1 = [name for name, results in hits.items() if results[0].path.name == name]
    assert len(top1) >= 0.75 * NUM_VIDEOS, f"right video first for only {sorted(top1)}"
    for results in hits.values():
        assert len(results) == 3 and results[0].score >= results[1].score >= results[2].score


def test_second_run_embeds_nothing(searcher, trained_dir, dataset, tmp_path, monkeypatch):
    videos, _ = dataset
    path = tmp_path / "index.safetensors"
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
    path = tmp_path / "index.safetensors"
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


def test_an_interrupted_run_resumes_where_it_stopped(searcher, trained_dir, dataset, tmp_path, monkeypatch):
    videos, _ = dataset
    path = tmp_path / "index.safetensors"
    model, _ = searcher
    real = model.get_video_features
    calls = []

    def crash_on_fourth_batch(pixel_values, **kwargs):
        calls.append(len(pixel_values))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(pixel_values, **kwargs)

    monkeypatch.setattr(model, "get_video_features", crash_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        _build(path, searcher, trained_dir, videos, batch_size=2, save_every=4)
    saved = len(VideoIndex.load(path).videos)
    assert saved == 4  # saved after two batches; the third batch's videos were lost with the crash
    monkeypatch.setattr(model, "get_video_features", real)
    report = _build(path, searcher, trained_dir, videos, batch_size=2)
    assert (report.embedded, report.skipped, report.total) == (NUM_VIDEOS - saved, saved, NUM_VIDEOS)


def test_dsl_scores_are_the_dual_softmax_over_the_query_bank(searcher, trained_dir, dataset, tmp_path):
    videos, captions = dataset
    bank = sorted(captions.values())[:5]
    path = tmp_path / "index.safetensors"
    _build(path, searcher, trained_dir, videos, queries=bank)
    index = VideoIndex.load(path)
    assert index.query_bank == bank
    model, processor = searcher
    query = "a red square moves from left to right"
    texts = [query, *bank]
    with torch.no_grad():
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        text = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    cosine = text @ torch.nn.functional.normalize(index.video_embeds, dim=-1).t()
    # DSL for text -> video: each video's column is a softmax over the queries, temperature 1/100.
    expected = cosine[0] * torch.exp(100 * cosine[0]) / torch.exp(100 * cosine).sum(dim=0)
    hits = search(index, model, processor, query, top_k=NUM_VIDEOS, dsl=True)
    by_path = {hit.path.name: hit.score for hit in hits}
    for row, video in enumerate(index.videos):
        assert by_path[video.path] == pytest.approx(expected[row].item(), abs=1e-5)
    plain = search(index, model, processor, query, top_k=1)[0]
    assert plain.score == pytest.approx(cosine[0].max().item(), abs=1e-5)


def test_mug_models_index_frames_and_score_with_mug(tiny_clip_dir, dataset, tmp_path):
    videos, captions = dataset
    torch.manual_seed(0)
    model = StanForVideoTextRetrieval.from_clip_pretrained(
        tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES, drop_path_rate=0.0, alignment="mug"
    ).eval()
    processor = tiny_processor(tiny_clip_dir)
    path = tmp_path / "index.safetensors"
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
    path = tmp_path / "index.safetensors"
    queries = tmp_path / "queries.txt"
    queries.write_text("a green circle moves from top to bottom\n\n")
    main(["index", "--model", str(trained_dir), "--videos", str(videos), "--index", str(path), "--queries",
          str(queries)])
    assert f"{NUM_VIDEOS} videos indexed ({NUM_VIDEOS} embedded now" in capsys.readouterr().out
    name, caption = sorted(captions.items())[0]
    main(["query", "--model", str(trained_dir), "--index", str(path), caption, "--top_k", "3", "--dsl"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1"
    assert VideoIndex.load(path).query_bank == ["a green circle moves from top to bottom", caption]
    main(["query", "--model", str(trained_dir), "--index", str(path), "a new sentence", "--no_remember"])
    assert "a new sentence" not in VideoIndex.load(path).query_bank


def test_unreadable_videos_are_printed(trained_dir, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "empty.mp4").write_bytes(b"")
    main(["index", "--model", str(trained_dir), "--videos", str(videos), "--index", str(tmp_path / "i.safetensors")])
    out = capsys.readouterr().out
    assert "0 videos indexed" in out and "unreadable: empty.mp4 (VideoDecodeError" in out


def test_errors_name_the_problem(searcher, dataset, tmp_path, tiny_clip_dir):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("video0.mp4", "video1.mp4"):
        shutil.copy(dataset[0] / name, videos / name)
    path = tmp_path / "index.safetensors"
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
    (tmp_path / "fake.safetensors").write_bytes(b"nonsense")
    with pytest.raises(VideoSearchError, match="not a video index"):
        VideoIndex.load(tmp_path / "fake.safetensors")
    with pytest.raises(SystemExit):
        main(["query", "--model", str(tiny_clip_dir), "--index", str(path), "anything"])

    classifier_dir = tmp_path / "classifier"
    classifier = StanForVideoClassification.from_clip_pretrained(tiny_clip_dir, stan_depth=1, class_names=["a", "b"])
    classifier.save_pretrained(classifier_dir)
    processor.save_pretrained(classifier_dir)
    with pytest.raises(VideoSearchError, match="no text tower"):
        load_search_model(classifier_dir)
