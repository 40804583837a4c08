"""Tests of the synthetic moving-shapes dataset: determinism, real H.264 files, real motion, both layouts."""

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

from modeling_stan.demo.synthetic_videos import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    generate_synthetic_dataset,
    main,
    render_clip,
    write_mp4,
)
from modeling_stan.video_io import decode_video


SMALL = dict(num_train=8, num_val=4, num_test=4, num_frames=8, size=32)
ANNOTATIONS = (
    "metadata.csv",
    "msrvtt/MSRVTT_data.json",
    "msrvtt/MSRVTT_JSFUSION_val.csv",
    "msrvtt/MSRVTT_JSFUSION_test.csv",
)


def _decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _metadata(root: Path) -> list[dict]:
    with open(root / "metadata.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("first") / "data", seed=3, **SMALL)


def test_same_seed_gives_identical_files_and_frames(dataset_root, tmp_path):
    again = generate_synthetic_dataset(tmp_path / "again", seed=3, **SMALL)
    for name in ANNOTATIONS:
        assert (dataset_root / name).read_bytes() == (again / name).read_bytes(), name
    for video in sorted((dataset_root / "videos").glob("*.mp4")):
        np.testing.assert_array_equal(_decode_all(video), _decode_all(again / "videos" / video.name))
        assert video.read_bytes() == (again / "videos" / video.name).read_bytes(), video.name
    other = generate_synthetic_dataset(tmp_path / "other", seed=4, **SMALL)
    assert (other / "metadata.csv").read_bytes() != (dataset_root / "metadata.csv").read_bytes()


def test_videos_are_h264_with_expected_frames_and_size(dataset_root):
    videos = sorted((dataset_root / "videos").glob("*.mp4"))
    assert len(videos) == 16
    for video in videos:
        with av.open(str(video)) as container:
            context = container.streams.video[0].codec_context
            assert (context.name, context.pix_fmt) == ("h264", "yuv420p")
        assert _decode_all(video).shape == (8, 32, 32, 3)
    frames, metadata = decode_video(videos[0], num_frames=4)
    assert frames.shape == (4, 32, 32, 3) and metadata.total_frames == 8


def _centroids(frames: np.ndarray) -> np.ndarray:
    """(T, 2) x, y centroid of the pixels clearly different from the background."""
    foreground = np.abs(frames.astype(int) - np.array(BACKGROUND)).sum(axis=-1) > 60
    ys, xs = np.indices(frames.shape[1:3])
    return np.array([[xs[mask].mean(), ys[mask].mean()] for mask in foreground])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_encoded_shape_moves_in_the_caption_direction(tmp_path, shape, direction):
    path = tmp_path / "clip.mp4"
    write_mp4(path, render_clip(shape, "green", direction, num_frames=8, size=48, offset=0.3))
    x, y = _centroids(_decode_all(path)).T
    moving, still = (x, y) if direction in ("left_to_right", "right_to_left") else (y, x)
    sign = 1 if direction in ("left_to_right", "top_to_bottom") else -1
    assert np.all(sign * np.diff(moving) > 1.0), moving
    assert abs(moving[-1] - moving[0]) > 20
    assert np.ptp(still) < 1.0, still


def test_reversed_clip_is_the_opposite_direction():
    forward = render_clip("triangle", "blue", "left_to_right", radius=6.5, offset=0.8)
    backward = render_clip("triangle", "blue", "right_to_left", radius=6.5, offset=0.8)
    np.testing.assert_array_equal(forward[::-1], backward)


def test_shapes_have_their_areas_on_a_plain_background():
    radius, counts = 10.0, {}
    for shape in SHAPES:
        first = render_clip(shape, "red", "left_to_right", size=64, radius=radius)[0]
        coloured = (first == COLOURS["red"]).all(axis=-1)
        assert (coloured | (first == BACKGROUND).all(axis=-1)).all()
        counts[shape] = int(coloured.sum())
    assert counts["square"] == pytest.approx(4 * radius**2, rel=0.15)
    assert counts["circle"] == pytest.approx(np.pi * radius**2, rel=0.1)
    assert counts["triangle"] == pytest.approx(2 * radius**2, rel=0.15)


def test_annotations_agree_with_the_metadata(dataset_root):
    rows = _metadata(dataset_root)
    data = json.loads((dataset_root / "msrvtt/MSRVTT_data.json").read_text())
    categories = {video["video_id"]: video["category"] for video in data["videos"]}
    splits = {video["video_id"]: video["split"] for video in data["videos"]}
    for row in rows:
        assert categories[row["video_id"]] == DIRECTIONS.index(row["direction"])
        assert splits[row["video_id"]] == {"validation": "validate"}.get(row["split"], row["split"])
        assert row["caption"].endswith(row["direction"].replace("_", " "))
        assert f" {row['colour']} {row['shape']} " in row["caption"]
        link = dataset_root / "folders" / row["split"] / row["direction"] / f"{row['video_id']}.mp4"
        assert link.is_symlink() and link.resolve() == (dataset_root / "videos" / link.name).resolve()
    captions = [s["caption"] for s in data["sentences"]]
    assert len(captions) == 2 * len(rows)
    with open(dataset_root / "msrvtt/MSRVTT_JSFUSION_test.csv", newline="") as file:
        test = list(csv.DictReader(file))
    assert [r["video_id"] for r in test] == [r["video_id"] for r in rows if r["split"] == "test"]


def test_splits_are_balanced_and_test_captions_distinct(tmp_path):
    root = generate_synthetic_dataset(tmp_path / "data", num_train=90, num_val=10, num_test=72, num_frames=2, size=16)
    rows = _metadata(root)
    for split in ("train", "validation", "test"):
        counts = [sum(r["split"] == split and r["direction"] == d for r in rows) for d in DIRECTIONS]
        assert max(counts) - min(counts) <= 1, (split, counts)
    test_captions = [r["caption"] for r in rows if r["split"] == "test"]
    assert len(set(test_captions)) == 72


def test_cli_writes_the_dataset(tmp_path):
    root = main(
        [
            "--output_dir",
            str(tmp_path / "cli"),
            "--num_train",
            "2",
            "--num_val",
            "1",
            "--num_test",
            "1",
            "--num_frames",
            "4",
            "--size",
            "16",
            "--seed",
            "5",
        ]
    )
    assert len(list((root / "videos").glob("*.mp4"))) == 4
    assert (root / "msrvtt/MSRVTT_JSFUSION_val.csv").read_text().count("\n") == 2


def test_refuses_non_empty_folder_and_bad_arguments(dataset_root):
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic_dataset(dataset_root)
    with pytest.raises(ValueError, match="shape must be one of"):
        render_clip("hexagon", "red", "left_to_right")
    with pytest.raises(ValueError, match="num_frames must be >= 2"):
        render_clip("circle", "red", "left_to_right", num_frames=1)
    with pytest.raises(ValueError, match="even frame sides"):
        write_mp4(dataset_root / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
