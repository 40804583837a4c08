"""A small synthetic video-text dataset of coloured shapes moving across a plain background.

Every clip shows one shape (square, circle or triangle) of one colour travelling in a straight line in one of
four directions. Each video has two captions ("a red square moves from left to right", "the red square travels
towards the right") and a class label: its **motion direction**, one of `DIRECTIONS`:

    0 bottom_to_top   1 left_to_right   2 right_to_left   3 top_to_bottom

Shape, colour, size and the position across the motion axis vary freely, so no single frame tells the class (the
shape is anywhere along its path in some video of every class). An order-invariant model (mean of frame
embeddings) can tell horizontal from vertical motion but cannot separate a direction from its reverse: the label is
learnable, yet it needs temporal order, which is what STAN adds to CLIP.

`generate_synthetic_dataset` writes, under `output_dir`:

    videos/video{i}.mp4                      H.264 (libx264, yuv420p) clips; train ids first, then val, then test
    metadata.csv                             video_id,split,shape,colour,direction,radius,offset,caption
    msrvtt/MSRVTT_data.json                  MSR-VTT layout: {"videos": [{video_id, split, category}],
                                             "sentences": [{caption, video_id, sen_id}]}, split in
                                             {"train", "validate", "test"}, category = label id, 2 captions each
    msrvtt/MSRVTT_JSFUSION_val.csv           JSFusion layout `key,vid_key,video_id,sentence`, one caption a video
    msrvtt/MSRVTT_JSFUSION_test.csv          same, for the test videos
    folders/{train,validation,test}/<direction>/video{i}.mp4
                                             class-per-folder layout; relative symlinks into videos/ (no second
                                             copy, and the tree stays valid when output_dir is moved as a whole)

Within a split, the (shape, colour, direction) combinations are drawn without replacement until all 72 are used, so
splits of at most 72 videos have distinct captions (retrieval has a single right answer), and the four labels are
dealt in turn, so their counts in a split differ by at most one.
Everything is a function of `seed`: the same seed gives byte-identical annotation files and identical frames.

CLI: `python -m modeling_stan.demo.synthetic_videos --output_dir DIR [--seed 0] [--num_train 160] ...`
"""

import argparse
import csv
import io
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np


SHAPES = ("square", "circle", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
# Alphabetical, so that the class-per-folder builder's default (sorted folder names) gives the same label ids.
DIRECTIONS = ("bottom_to_top", "left_to_right", "right_to_left", "top_to_bottom")
BACKGROUND = (16, 16, 16)

SPLITS = ("train", "validation", "test")
# The MSR-VTT annotation file names its validation split "validate".
MSRVTT_SPLIT_NAMES = {"train": "train", "validation": "validate", "test": "test"}

_TOWARDS = {
    "bottom_to_top": "upwards",
    "left_to_right": "towards the right",
    "right_to_left": "towards the left",
    "top_to_bottom": "downwards",
}
# Radius range as a fraction of the frame side: small enough to travel, large enough to survive yuv420p chroma.
_RADIUS_RANGE = (0.12, 0.18)
_MARGIN = 1.0
_X264_OPTIONS = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}


@dataclass(frozen=True)
class SyntheticVideo:
    """One clip's recipe: everything `render_clip` needs, plus where it belongs."""

    video_id: str
    split: str
    shape: str
    colour: str
    direction: str
    radius: float
    offset: float

    @property
    def label(self) -> int:
        return DIRECTIONS.index(self.direction)

    @property
    def captions(self) -> tuple[str, str]:
        return caption_for(self.shape, self.colour, self.direction), paraphrase_for(
            self.shape, self.colour, self.direction
        )


def caption_for(shape: str, colour: str, direction: str) -> str:
    """The main caption, e.g. "a red square moves from left to right"."""
    start, end = direction.split("_to_")
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} moves from {start} to {end}"


def paraphrase_for(shape: str, colour: str, direction: str) -> str:
    """A second wording of the same content, e.g. "the red square travels towards the right"."""
    return f"the {colour} {shape} travels {_TOWARDS[direction]}"


def render_clip(
    shape: str,
    colour: str,
    direction: str,
    *,
    num_frames: int = 16,
    size: int = 64,
    radius: float | None = None,
    offset: float = 0.5,
    background: tuple[int, int, int] = BACKGROUND,
) -> np.ndarray:
    """Renders a clip of `shape` moving in `direction` as a `(num_frames, size, size, 3)` uint8 RGB array.

    The shape's centre travels linearly from one edge to the opposite one (frame 0 at the start, the last frame at
    the end), so `render_clip(..., "left_to_right")[::-1]` equals the `"right_to_left"` clip with the same
    `radius` and `offset`: the pair the temporal-order benchmark needs.

    Args:
        shape: one of `SHAPES`.
        colour: one of `COLOURS`.
        direction: one of `DIRECTIONS`.
        num_frames: number of frames, at least 2 (motion needs two positions).
        size: side of the square frame in pixels, at least 16.
        radius: half-extent of the shape in pixels; defaults to 15% of `size`.
        offset: position across the motion axis, 0 (top/left edge) to 1 (bottom/right edge).
        background: RGB of the plain background.
    """
    _check_choice("shape", shape, SHAPES)
    _check_choice("colour", colour, tuple(COLOURS))
    _check_choice("direction", direction, DIRECTIONS)
    if num_frames < 2:
        raise ValueError(f"render_clip: num_frames must be >= 2 for motion, got {num_frames}.")
    if size < 16:
        raise ValueError(f"render_clip: size must be >= 16 pixels, got {size}.")
    radius = 0.15 * size if radius is None else float(radius)
    if not 1.0 <= radius < size / 2 - _MARGIN:
        raise ValueError(f"render_clip: radius must be in [1, {size / 2 - _MARGIN}) for size {size}, got {radius}.")
    if not 0.0 <= offset <= 1.0:
        raise ValueError(f"render_clip: offset must be in [0, 1], got {offset}.")

    centre_x, centre_y = _trajectory(direction, num_frames, size, radius, offset)
    mask = _shape_mask(shape, centre_x, centre_y, size, radius)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = np.asarray(background, dtype=np.uint8)
    frames[mask] = np.asarray(COLOURS[colour], dtype=np.uint8)
    return frames


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"render_clip: {name} must be one of {list(allowed)}, got {value!r}.")


def _trajectory(direction: str, num_frames: int, size: int, radius: float, offset: float):
    """Per-frame centre coordinates (x, y), each of shape (T,)."""
    low, high = radius + _MARGIN, size - 1 - radius - _MARGIN
    along = np.linspace(low, high, num_frames)
    if direction in ("right_to_left", "bottom_to_top"):
        along = along[::-1]
    across = np.full(num_frames, low + offset * (high - low))
    if direction in ("left_to_right", "right_to_left"):
        return along, across
    return across, along


def _shape_mask(shape: str, centre_x: np.ndarray, centre_y: np.ndarray, size: int, radius: float) -> np.ndarray:
    """Boolean (T, size, size) mask of the pixels whose centre lies inside the shape."""
    grid = np.arange(size, dtype=np.float64)
    dx = grid[None, None, :] - centre_x[:, None, None]
    dy = grid[None, :, None] - centre_y[:, None, None]
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    # Upward-pointing isosceles triangle inscribed in the square: apex (0, -r), base corners (-r, +r) and (+r, +r);
    # its half-width grows linearly from 0 at the apex to r at the base.
    return (np.abs(dx) * 2 <= dy + radius) & (dy <= radius)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """Encodes `(T, H, W, 3)` uint8 RGB frames as an H.264 (libx264, yuv420p) MP4 at `path`.

    Deterministic: one encoder thread, and no macroblock-tree rate control (its lookahead made the bitstream
    differ from one process to the next here), so a given libx264 build always writes the same bytes.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"write_mp4({path}): frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}."
        )
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_mp4({path}): yuv420p needs even frame sides, got {width}x{height}.")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=_X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def plan_videos(*, num_train: int, num_val: int, num_test: int, size: int, seed: int) -> list[SyntheticVideo]:
    """Draws every clip's recipe from `seed`: train videos first, then validation, then test."""
    rng = np.random.default_rng(seed)
    videos = []
    for split, count in zip(SPLITS, (num_train, num_val, num_test)):
        if count < 0:
            raise ValueError(f"generate_synthetic_dataset: the number of {split} videos must be >= 0, got {count}.")
        for shape, colour, direction in _balanced_draw(rng, count):
            radius = round(float(rng.uniform(*_RADIUS_RANGE)) * size, 3)
            offset = round(float(rng.uniform(0.0, 1.0)), 3)
            videos.append(SyntheticVideo(f"video{len(videos)}", split, shape, colour, direction, radius, offset))
    return videos


def _balanced_draw(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """`count` (shape, colour, direction) triples, in passes that each use all combinations once.

    A pass deals rounds of one triple per direction (directions in random order, appearances shuffled per
    direction), so every prefix, hence every split, has direction counts within one of each other.
    """
    appearances = list(itertools.product(SHAPES, COLOURS))
    drawn = []
    while len(drawn) < count:
        per_direction = [
            [(*appearances[i], direction) for i in rng.permutation(len(appearances))] for direction in DIRECTIONS
        ]
        for round_ in zip(*per_direction):
            drawn.extend(round_[i] for i in rng.permutation(len(DIRECTIONS)))
    return drawn[:count]


def generate_synthetic_dataset(
    output_dir: str | os.PathLike,
    *,
    num_train: int = 160,
    num_val: int = 40,
    num_test: int = 40,
    num_frames: int = 16,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
) -> Path:
    """Writes the synthetic dataset (videos and both annotation layouts, see the module doc) and returns its root.

    `output_dir` must be new or empty. With the defaults (240 clips of 16 frames at 64x64) this takes a few seconds.
    """
    root = Path(output_dir)
    if root.exists() and any(root.iterdir()):
        # Leftovers of a larger earlier run would silently join the class folders.
        raise FileExistsError(f"generate_synthetic_dataset: {root} is not empty; give a new or empty folder.")
    videos = plan_videos(num_train=num_train, num_val=num_val, num_test=num_test, size=size, seed=seed)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for video in videos:
        frames = render_clip(
            video.shape,
            video.colour,
            video.direction,
            num_frames=num_frames,
            size=size,
            radius=video.radius,
            offset=video.offset,
        )
        write_mp4(root / "videos" / f"{video.video_id}.mp4", frames, fps=fps)
    _write_metadata(root / "metadata.csv", videos)
    _write_msrvtt(root / "msrvtt", videos)
    _link_class_folders(root, videos)
    return root


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_metadata(path: Path, videos: list[SyntheticVideo]) -> None:
    header = ["video_id", "split", "shape", "colour", "direction", "radius", "offset", "caption"]
    rows = [[v.video_id, v.split, v.shape, v.colour, v.direction, v.radius, v.offset, v.captions[0]] for v in videos]
    _write_text(path, _csv_text(header, rows))


def _write_msrvtt(directory: Path, videos: list[SyntheticVideo]) -> None:
    pairs = [(v.video_id, caption) for v in videos for caption in v.captions]
    data = {
        "videos": [
            {"video_id": v.video_id, "split": MSRVTT_SPLIT_NAMES[v.split], "category": v.label} for v in videos
        ],
        "sentences": [
            {"caption": caption, "video_id": video_id, "sen_id": sen_id}
            for sen_id, (video_id, caption) in enumerate(pairs)
        ],
    }
    _write_text(directory / "MSRVTT_data.json", json.dumps(data, indent=1) + "\n")
    for split, name in (("validation", "val"), ("test", "test")):
        rows = [
            [f"ret{i}", f"msr{v.video_id.removeprefix('video')}", v.video_id, v.captions[0]]
            for i, v in enumerate(v for v in videos if v.split == split)
        ]
        header = ["key", "vid_key", "video_id", "sentence"]
        _write_text(directory / f"MSRVTT_JSFUSION_{name}.csv", _csv_text(header, rows))


def _link_class_folders(root: Path, videos: list[SyntheticVideo]) -> None:
    for video in videos:
        link = root / "folders" / video.split / video.direction / f"{video.video_id}.mp4"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "videos" / link.name, link.parent))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="an empty or new folder for videos/ and the annotations")
    # One option per keyword of the generator, with its default, so the two cannot drift apart.
    for name, default in generate_synthetic_dataset.__kwdefaults__.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = vars(parser.parse_args(argv))
    root = generate_synthetic_dataset(args.pop("output_dir"), **args)
    print(f"Wrote the synthetic dataset to {root}")
    return root


if __name__ == "__main__":
    main()
