"""Time to sample 8 frames (test mode) with `modeling_stan.video_io.decode_video` against transformers' `load_video`.

Contenders, timed in one run, alternating call by call (order reversed every other round) after warm-up:

- ours: `decode_video(path, num_frames=8, sampling="uniform", train=False)` -- seeks to the keyframe before each
  wanted frame and decodes forward only to it, skipping unwanted non-reference frames, with frame threads;
- load_video: `transformers.video_utils.load_video(path, num_frames=8, backend="pyav")` given ours' frame indices
  through `sample_indices_fn`, so both return the same frames (pixels are compared); it decodes every frame from
  the start of the video up to the last wanted one;
- load_video (own indices), unless `--quick`: the same call with its default sampler (`i * total // 8`, the first
  frame of each segment, as the call is written in practice); the same shape, other frames.

Videos: `../shared/videos/test.mp4` (skipped with a message where absent) and a 60-second 1280x720 H.264 video
that the script encodes once with PyAV/libx264 into `--cache_dir` (moving textured background, camera pan,
coloured shapes, light grain; x264 defaults of a typical web/phone encode: B-frames, keyframe interval 250).

Each cell is the median over `--repeats` calls; the ratios are load_video / ours of those medians, in wall time
and in CPU time of the process (all threads; less sensitive to other load on the machine).

Usage (from the repository root): `python -m benchmarks.decode [--repeats 5] [--warmup 1] [--quick]`
"""

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from transformers.video_utils import load_video

from modeling_stan.video_io import decode_video

from ._common import machine_summary, markdown_table


NUM_FRAMES = 8
SHARED_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "videos" / "test.mp4"


# ------------------------------------------------------------------------------------------------ the generated video


@dataclass(frozen=True)
class EncodeSettings:
    width: int = 1280
    height: int = 720
    fps: int = 30
    seconds: int = 60
    preset: str = "veryfast"
    crf: int = 23
    bframes: int = 3
    keyint: int = 250

    @property
    def file_name(self) -> str:
        return (
            f"synthetic-{self.height}p{self.fps}-{self.seconds}s-x264-{self.preset}-crf{self.crf}"
            f"-bf{self.bframes}-keyint{self.keyint}-v1.mp4"
        )

    def describe(self) -> str:
        return (
            f"{self.seconds} s {self.width}x{self.height} at {self.fps} fps, H.264 (libx264 preset {self.preset}, "
            f"crf {self.crf}, profile high, yuv420p, {self.bframes} B-frames with b-pyramid, keyint {self.keyint}, "
            f"scenecut on, MP4 +faststart)"
        )


def _smooth_noise(rng, height: int, width: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1): random values on a coarse grid, bilinearly interpolated to `height x width`."""
    grid = rng.random((height // cell + 2, width // cell + 2))
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class _SceneRenderer:
    """RGB frames of a camera panning over a textured colour gradient, with coloured shapes moving over it."""

    def __init__(self, settings: EncodeSettings, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.settings = settings
        w, h = settings.width, settings.height
        self.pan = 320  # pixels of travel of the camera in each direction
        big_h, big_w = h + 2 * self.pan, w + 2 * self.pan
        yy, xx = np.mgrid[0:big_h, 0:big_w].astype(np.float32)
        texture = 0.6 * _smooth_noise(rng, big_h, big_w, 48) + 0.4 * _smooth_noise(rng, big_h, big_w, 3)
        gradient = np.stack(
            [
                0.5 + 0.5 * np.sin(xx / 260.0),
                0.5 + 0.5 * np.sin(yy / 190.0 + 1.0),
                0.5 + 0.5 * np.sin((xx + yy) / 330.0 + 2.0),
            ],
            axis=-1,
        )
        self.background = np.clip(255 * (0.55 * gradient + 0.45 * texture[..., None]), 0, 255).astype(np.uint8)
        # Sensor grain: a few noise fields, cycled.
        self.grain = [rng.integers(-6, 7, size=(h, w, 1), dtype=np.int16) for _ in range(7)]
        self.shapes = []
        for index in range(7):
            size = int(rng.integers(60, 180))
            yy, xx = np.mgrid[0:size, 0:size]
            mask = (
                (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
                if index % 2
                else np.ones((size, size), dtype=bool)
            )
            shade = 0.75 + 0.25 * _smooth_noise(rng, size, size, 12)[..., None]
            colour = rng.integers(40, 256, size=3)
            patch = np.clip(shade * colour, 0, 255).astype(np.uint8)
            position = rng.random(2) * (np.array([h, w]) - size)
            velocity = (rng.random(2) - 0.5) * 16  # pixels per frame
            self.shapes.append([mask, patch, position, velocity])

    def frame(self, index: int) -> np.ndarray:
        s = self.settings
        t = index / s.fps
        dy = int(self.pan + self.pan * 0.8 * np.sin(t / 7.0))
        dx = int(self.pan + self.pan * 0.9 * np.sin(t / 5.0 + 0.5))
        image = self.background[dy : dy + s.height, dx : dx + s.width].astype(np.int16)
        image += self.grain[index % len(self.grain)]
        np.clip(image, 0, 255, out=image)
        image = image.astype(np.uint8)
        limits = np.array([s.height, s.width])
        for shape in self.shapes:
            mask, patch, position, velocity = shape
            size = mask.shape[0]
            position += velocity
            for axis in range(2):  # bounce off the edges
                if not 0 <= position[axis] <= limits[axis] - size:
                    velocity[axis] = -velocity[axis]
                    position[axis] = np.clip(position[axis], 0, limits[axis] - size)
            y, x = int(position[0]), int(position[1])
            region = image[y : y + size, x : x + size]
            region[mask] = patch[mask]
        return image


def generated_video(cache_dir: Path, settings: EncodeSettings) -> tuple[Path, float | None]:
    """The cached synthetic video, encoded first if absent: `(path, seconds spent encoding or None if cached)`."""
    path = cache_dir / settings.file_name
    if path.exists():
        return path, None
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}.mp4")
    start = time.perf_counter()
    renderer = _SceneRenderer(settings)
    try:
        with av.open(str(partial), mode="w", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=settings.fps)
            stream.width, stream.height, stream.pix_fmt = settings.width, settings.height, "yuv420p"
            stream.options = {
                "preset": settings.preset,
                "crf": str(settings.crf),
                "profile": "high",
                "x264-params": f"keyint={settings.keyint}:bframes={settings.bframes}:b-pyramid=normal",
            }
            for index in range(settings.fps * settings.seconds):
                frame = av.VideoFrame.from_ndarray(renderer.frame(index), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return path, time.perf_counter() - start


def describe_stream(path: Path) -> str:
    """Measured facts of the file: size, frames, frame rate, keyframes and B-frames, from its packets."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keyframes, packets, bframes, latest_pts = 0, 0, 0, None
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            packets += 1
            keyframes += bool(packet.is_keyframe)
            # In decoding order, a frame shown before one decoded earlier is a B-frame.
            if packet.pts is not None:
                if latest_pts is not None and packet.pts < latest_pts:
                    bframes += 1
                latest_pts = packet.pts if latest_pts is None else max(latest_pts, packet.pts)
        return (
            f"{path.stat().st_size / 2**20:.1f} MiB, {stream.codec_context.name} {stream.width}x{stream.height}, "
            f"{packets} frames at {float(stream.average_rate):g} fps, {keyframes} keyframes "
            f"(one every {packets / keyframes:.0f} frames on average), {bframes} B-frames"
        )


# ------------------------------------------------------------------------------------------------ timing


def _ours(path: str):
    return decode_video(path, num_frames=NUM_FRAMES, sampling="uniform", train=False)


def _load_video_with(indices: list[int]):
    def sample_indices_fn(metadata, **kwargs):
        return np.array(indices)

    return lambda path: load_video(path, backend="pyav", sample_indices_fn=sample_indices_fn)


def _load_video_default(path: str):
    return load_video(path, num_frames=NUM_FRAMES, backend="pyav")


def alternate(functions: dict, path: str, warmup: int, repeats: int) -> dict:
    """Median wall and CPU seconds of each function over `repeats` rounds after `warmup` rounds, alternating.

    Each round calls every function once; the order is reversed every other round, so that no contender always runs
    right after another one.
    """
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(warmup + repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            gc.collect()
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            functions[name](path)
            wall_end, cpu_end = time.perf_counter(), time.process_time()
            if round_index >= warmup:
                wall[name].append(wall_end - wall_start)
                cpu[name].append(cpu_end - cpu_start)
    return {
        name: {
            "wall": statistics.median(wall[name]),
            "cpu": statistics.median(cpu[name]),
            "wall_range": (min(wall[name]), max(wall[name])),
        }
        for name in names
    }


def compare_outputs(path: str) -> tuple[list[int], str]:
    """Ours' indices, and a line saying whether ours and load_video (same indices, then its own) agree."""
    ours_frames, ours_meta = _ours(path)
    indices = list(ours_meta.frame_indices)
    theirs_frames, theirs_meta = _load_video_with(indices)(path)
    default_frames, default_meta = _load_video_default(path)
    same_shape = ours_frames.shape == theirs_frames.shape
    equal = same_shape and [bool(np.array_equal(a, b)) for a, b in zip(ours_frames, theirs_frames)]
    theirs_indices = [int(i) for i in theirs_meta.frames_indices]
    default_indices = [int(i) for i in default_meta.frames_indices]
    parts = [
        f"ours: indices {indices} of {ours_meta.total_frames} frames, shape {tuple(ours_frames.shape)}",
        f"load_video (same indices): indices {theirs_indices} of {theirs_meta.total_num_frames} frames, "
        f"shape {tuple(theirs_frames.shape)}",
    ]
    if not same_shape:
        verdict = "MISMATCH: shapes differ"
    elif all(equal):
        verdict = f"MATCH: same shape, pixels identical in {len(equal)}/{len(equal)} frames"
    else:
        verdict = f"MISMATCH: same shape, pixels identical in {sum(equal)}/{len(equal)} frames only"
    parts.append(f"-> {verdict}")
    default_shape = "same shape" if default_frames.shape == ours_frames.shape else "DIFFERENT shape"
    parts.append(
        f"load_video (own indices): indices {default_indices}, shape {tuple(default_frames.shape)} ({default_shape}; "
        "other frames, pixels not compared)"
    )
    return indices, "\n  ".join(parts)


# ------------------------------------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per video (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument(
        "--cache_dir", type=Path, default=Path.home() / ".cache" / "stan-benchmarks", help="where the video is kept"
    )
    parser.add_argument("--preset", default="veryfast", help="x264 preset of the generated video")
    parser.add_argument(
        "--quick", action="store_true", help="1 timed round, no warm-up, without the load_video (own indices) row"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 1, 0

    settings = EncodeSettings(preset=args.preset)
    print("Sampling 8 frames, test mode (uniform: middle frame of each of 8 equal segments)")
    print(machine_summary(torch.device("cpu")))
    print(f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info})")
    print(f"Rounds: {args.warmup} warm-up + {args.repeats} timed per video, contenders alternating; medians")

    videos = []
    if SHARED_VIDEO.exists():
        videos.append(("test.mp4 (shared)", SHARED_VIDEO))
    else:
        print(f"SKIPPED test.mp4: {SHARED_VIDEO} not found")
    path, encode_seconds = generated_video(args.cache_dir, settings)
    print(f"Generated video: {settings.describe()}")
    print(f"  {path} ({'cached' if encode_seconds is None else f'encoded now in {encode_seconds:.1f} s'})")
    videos.append((f"synthetic {settings.seconds} s {settings.height}p", path))

    same_rows, own_rows = [], []
    for label, video_path in videos:
        video = str(video_path)
        print(f"\n{label}: {describe_stream(video_path)}")
        indices, verdict = compare_outputs(video)
        print(f"  {verdict}")
        functions = {"ours": _ours, "load_video": _load_video_with(indices)}
        if not args.quick:
            functions["load_video (own indices)"] = _load_video_default
        result = alternate(functions, video, args.warmup, args.repeats)
        for name, numbers in result.items():
            low, high = numbers["wall_range"]
            print(f"  {name}: median {numbers['wall']:.3f} s (range {low:.3f}-{high:.3f}), CPU {numbers['cpu']:.3f} s")
        ours = result["ours"]
        for rows, name in ((same_rows, "load_video"), (own_rows, "load_video (own indices)")):
            if name not in result:
                continue
            theirs = result[name]
            rows.append(
                [
                    label,
                    f"{ours['wall']:.3f}",
                    f"{theirs['wall']:.3f}",
                    f"{theirs['wall'] / ours['wall']:.2f}x",
                    f"{ours['cpu']:.3f}",
                    f"{theirs['cpu']:.3f}",
                    f"{theirs['cpu'] / ours['cpu']:.2f}x",
                ]
            )

    headers = [
        "video",
        "ours (s)",
        "load_video (s)",
        "ratio (load_video / ours)",
        "ours CPU (s)",
        "load_video CPU (s)",
        "CPU-time ratio",
    ]
    print("\nload_video given ours' frame indices (same frames; pixels compared above):\n")
    print(markdown_table(headers, same_rows))
    if own_rows:
        print("\nload_video with its own default indices (i * total // 8), as `load_video(path, num_frames=8)`:\n")
        print(markdown_table(headers, own_rows))


if __name__ == "__main__":
    main()
