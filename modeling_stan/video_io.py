"""Video decoding and frame sampling with PyAV alone (no torchvision, torchcodec or decord).

`decode_video` returns RGB uint8 frames sampled from a path, `bytes` or binary file-like object:

    frames, metadata = decode_video("video.mp4", num_frames=8, sampling="uniform", train=False)
    frames.shape  # (8, H, W, 3) for one clip; (num_clips, 8, H, W, 3) for num_clips > 1

How frames are found. A first opening demuxes every packet of the video stream (reading, not decoding) to count
the frames and list their presentation timestamps and the keyframes. Frame `i` is the `i`-th frame in presentation
order, the frame that a full decode from the start yields `i`-th. The count is therefore exact even where the
header has none (WebM), and indices map to timestamps exactly in variable frame rate videos. A second opening
decodes: for each wanted frame it seeks to the keyframe before it (by that keyframe's decoding timestamp, which
demuxers seek by) and decodes forward only as far as that frame, skipping the decoding of unwanted non-reference
frames; when the next wanted frame lies in the group of pictures already being decoded it continues instead of
seeking, so no frame is decoded twice. Decoded frames are identified by their timestamps, except in AVI, where
FFmpeg infers timestamps that can come out of order, and which is counted in decoding order from the keyframe.

Streams whose packets carry no timestamps (raw elementary streams) are decoded linearly from the start; their
packet count is only an estimate of the frame count (`VideoMetadata.frame_count_exact` is then `False`). Whenever a
stream ends before a wanted frame, its last decoded frame stands in for the rest and the metadata reports the real
count. Frames are always RGB uint8 (any pixel format is converted) and upright (the display matrix's rotation is
applied, rounded to a multiple of 90 degrees; flips are ignored). `bytes` and file-like sources are read into
memory once.

Memory: with `frame_transform` (e.g. a resize to the model's input size), each frame is transformed as soon as it is
decoded, so a clip is never held at the source resolution: a 4K video costs what its transformed frames cost.

Errors: a missing path raises `FileNotFoundError` (the builtin, so that dataset code can count missing files
apart from broken ones); empty, corrupt, truncated, non-video and audio-only inputs raise `VideoDecodeError`; a
path that is no regular file (directory, FIFO, device, socket), a symbolic link loop and a still image raise its
subclass `NotAVideoError` before anything is read from it, so a FIFO fails at once instead of blocking.
`InvalidFramesError`, also a `VideoDecodeError`, is what the video processor raises for unusable in-memory frames.
"""

import bisect
import collections
import errno
import io
import itertools
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import av
import numpy as np
import torch


SAMPLING_STRATEGIES = ("uniform", "dense", "fps")
# Timestamps computed in seconds may differ from frame times by float rounding; one microsecond is far below any
# frame duration, so it only absorbs that rounding.
_TIME_TOLERANCE = 1e-6


class VideoDecodeError(ValueError):
    """A video source could not be decoded: it is empty, corrupt, truncated, not a video, or has no video stream.

    Attributes:
        source (`str`): printable description of the source: its path, `"<bytes: N>"` or `"<file-like>"`.
        cause (`str` or `Exception`): what went wrong.
    """

    def __init__(self, source: str, cause):
        self.source = source
        self.cause = cause
        super().__init__(f"Cannot decode video {source}: {cause}")


class NotAVideoError(VideoDecodeError):
    """The source is not a video file: a path to a directory, FIFO, device or socket, a symbolic link loop, or a
    still image (a `.jpg`, `.png`, ...; pass an image as a one-frame video instead: `[image]` or `array[None]`)."""


class InvalidFramesError(VideoDecodeError):
    """A video given as frames (arrays, tensors or images) cannot be processed as given: non-finite values (NaN or
    inf), a dtype or value range that does not say how to read it (bool, uint16, float frames in [0, 1] where the
    0-255 scale is expected), or a layout without 1 or 3 channels. `source` describes the video, e.g.
    `"<video 0 of the batch: numpy.ndarray (8, 30, 40, 3) float32>"`."""


@dataclass
class VideoMetadata:
    """What `decode_video` learnt about a video and which frames it took.

    Attributes:
        source (`str`): printable description of the source (path, `"<bytes: N>"` or `"<file-like>"`).
        fps (`float`): average frame rate (NaN when the container gives none and frames carry no timestamps).
        duration (`float`): duration of the video stream in seconds.
        total_frames (`int`): number of frames of the video stream.
        frame_count_exact (`bool`): `True` when `total_frames` was counted from timestamped packets, `False` when
            it is an estimate (timestamp-less streams, or a stream that ended earlier than its packets promised).
        width (`int`), height (`int`): size of the returned (upright) frames.
        codec (`str`): decoder name, e.g. `"h264"`.
        rotation (`int`): counter-clockwise rotation in degrees (a multiple of 90) applied to make frames upright.
        frame_indices (`list[int]` or `list[list[int]]`): sampled frame indices, one list per clip when
            `num_clips > 1`.
    """

    source: str
    fps: float
    duration: float
    total_frames: int
    frame_count_exact: bool
    width: int
    height: int
    codec: str
    rotation: int
    frame_indices: list


class _SeekPoint(NamedTuple):
    """Where decoding can start: the packet to land on, and the timestamps to try seeking to.

    `timestamps` holds the packet's presentation and decoding timestamps, as demuxers seek by one (MP4) or the
    other (AVI); a seek landed right when the first packet demuxed is not after `packet_pts`.
    """

    packet_pts: int
    timestamps: tuple


@dataclass
class _Timeline:
    """Frames of a video stream as listed by the demuxer.

    `pts` holds the sorted presentation timestamps of all frames, or is `None` when packets carry no (or duplicate)
    timestamps. `seek_points` maps the index of each frame where decoding can start (the keyframes, and always
    frame 0) to a `_SeekPoint` (`None` for frame 0 of a stream without timestamps).
    `count_frames` says that decoded frames are numbered by counting the decoder's output, because their timestamps
    are missing or unreliable; otherwise each decoded frame is numbered by looking its timestamp up in `pts`.
    """

    pts: list | None
    seek_points: dict
    total_frames: int
    count_frames: bool
    keyframes: list = field(init=False)

    def __post_init__(self):
        self.keyframes = sorted(self.seek_points)

    def decode_start(self, index: int) -> int:
        """Index of the keyframe from which decoding must start to reach frame `index`."""
        return self.keyframes[bisect.bisect_right(self.keyframes, index) - 1]


def decode_video(
    source,
    num_frames: int = 8,
    sampling: str = "uniform",
    *,
    train: bool = False,
    num_clips: int = 1,
    frame_stride: int = 4,
    target_fps: float | None = None,
    generator: torch.Generator | None = None,
    frame_transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode `num_frames` frames (per clip) sampled from a video.

    Args:
        source (`str`, `os.PathLike`, `bytes` or binary file-like object): the video.
        num_frames (`int`, defaults to 8): frames per clip, `T`.
        sampling (`str`, defaults to `"uniform"`): one of `SAMPLING_STRATEGIES`, see `sample_frame_indices`.
        train (`bool`, defaults to `False`): random frame positions (training) instead of fixed ones (testing).
        num_clips (`int`, defaults to 1): clips to take, e.g. several temporal views for multi-view testing.
        frame_stride (`int`, defaults to 4): distance in frames between the frames of a `"dense"` clip.
        target_fps (`float`, *optional*): frames per second of an `"fps"` clip.
        generator (`torch.Generator`, *optional*): source of randomness when `train=True`; torch's global
            generator otherwise, which `DataLoader` seeds differently in every worker.
        frame_transform (`Callable`, *optional*): applied to each decoded `(H, W, 3)` uint8 frame as soon as it is
            decoded (each distinct frame once); it returns a numpy array of a fixed shape, e.g. a frame resized to
            the model's input size, so that the full-resolution frames are never held together.

    Returns:
        `tuple[np.ndarray, VideoMetadata]`: RGB uint8 frames of shape `(T, H, W, 3)` when `num_clips == 1`, else
        `(num_clips, T, H, W, 3)` (with `frame_transform`, its outputs in place of the `(H, W, 3)` frames), and
        the video's metadata.

    Raises:
        `FileNotFoundError`: `source` is a path to nothing.
        `NotAVideoError`: `source` is a path to no regular file, a symbolic link loop, or a still image.
        `VideoDecodeError`: the video cannot be decoded.
        `TypeError`, `ValueError`: bad argument types or values.
    """
    description = describe_source(source)
    data = _readable(source, description)
    with _open_container(data, description) as container:
        stream = _video_stream(container, description)
        timeline = _read_timeline(container, stream, description)
        fps = _frame_rate(stream, timeline)
        duration = _duration(container, stream, timeline, fps)
        frame_times = _frame_times(stream, timeline, fps) if sampling == "fps" else None
    indices = sample_frame_indices(
        timeline.total_frames,
        num_frames,
        sampling,
        train=train,
        num_clips=num_clips,
        frame_stride=frame_stride,
        target_fps=target_fps,
        frame_times=frame_times,
        generator=generator,
    )
    # Decoding starts on a fresh opening, at the start of the file: timestamp-less streams cannot seek back there.
    with _open_container(data, description) as container:
        stream = _video_stream(container, description)
        decoded, rotation, (height, width) = _decode_frames(
            container, stream, timeline, indices.ravel().tolist(), description, frame_transform
        )
        codec = stream.codec_context.name

    frames, indices, total_frames = _gather(decoded, indices, timeline.total_frames)
    metadata = VideoMetadata(
        source=description,
        fps=fps,
        duration=duration,
        total_frames=total_frames,
        frame_count_exact=timeline.pts is not None and total_frames == timeline.total_frames,
        width=width,
        height=height,
        codec=codec,
        rotation=rotation,
        frame_indices=indices[0].tolist() if num_clips == 1 else indices.tolist(),
    )
    return (frames[0] if num_clips == 1 else frames), metadata


def _gather(decoded: dict, indices: np.ndarray, total_frames: int):
    """Stack the decoded frames in sampling order: `(frames, indices, total_frames)`.

    A stream that ended before frame `total_frames - 1` left its last frame as the largest key of `decoded`: later
    indices fall back to that frame, and the real frame count replaces the counted one.
    """
    last_index = max(decoded)
    if last_index < indices.max():
        total_frames = last_index + 1
        indices = np.minimum(indices, last_index)
    frames = np.stack([decoded[index] for index in indices.ravel()])
    return frames.reshape(*indices.shape, *frames.shape[1:]), indices, total_frames


def sample_frame_indices(
    total_frames: int,
    num_frames: int = 8,
    sampling: str = "uniform",
    *,
    train: bool = False,
    num_clips: int = 1,
    frame_stride: int = 4,
    target_fps: float | None = None,
    frame_times=None,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Indices of the frames to take from a video of `total_frames` frames, shape `(num_clips, num_frames)`.

    Strategies:
        - `"uniform"` (STAN's sampler): the frame range is cut into `num_frames` equal segments (segment length
          `(total_frames - 1) / num_frames`) and one frame is taken per segment: a random one in training, in
          testing the frame at fraction `(k + 1) / (num_clips + 1)` of the segment for clip `k` (the middle for
          one clip). Videos shorter than `num_frames` repeat frames: segments shorter than a frame share frames,
          so each frame appears about `num_frames / total_frames` times, in temporal order.
        - `"dense"`: `num_frames` consecutive frames `frame_stride` apart. Training clips start at random; testing
          clips start at the centres of `num_clips` equal parts of the range of possible starts, so they spread
          over the video. A clip longer than the video repeats the last frame.
        - `"fps"`: `num_frames` frames `1 / target_fps` seconds apart, the frame shown at each time; clips are
          placed in time as `"dense"` clips are in frames. Needs `frame_times`.

    Args:
        total_frames (`int`): frames in the video.
        num_frames (`int`, defaults to 8): frames per clip.
        sampling (`str`, defaults to `"uniform"`): `"uniform"`, `"dense"` or `"fps"`.
        train (`bool`, defaults to `False`): random (training) or fixed (testing) positions.
        num_clips (`int`, defaults to 1): number of clips.
        frame_stride (`int`, defaults to 4): frame distance for `"dense"`.
        target_fps (`float`, *optional*): frame rate of `"fps"` clips.
        frame_times (array of `float`, *optional*): start time in seconds of every frame, sorted; for `"fps"`.
        generator (`torch.Generator`, *optional*): randomness for `train=True`.
    """
    _check_sampling_arguments(total_frames, num_frames, sampling, num_clips, frame_stride, target_fps, frame_times)
    if sampling == "uniform":
        return _uniform_indices(total_frames, num_frames, train, num_clips, generator)
    offsets = _clip_offsets(num_clips, train, generator)
    if sampling == "dense":
        room = max(total_frames - (num_frames - 1) * frame_stride - 1, 0)
        starts = np.floor(offsets * (room + 1)).astype(np.int64)
        indices = starts[:, None] + frame_stride * np.arange(num_frames)
        return np.minimum(indices, total_frames - 1)
    frame_times = np.asarray(frame_times, dtype=np.float64)
    step = 1.0 / target_fps
    room = max(frame_times[-1] - (num_frames - 1) * step, 0.0)
    times = (offsets * room)[:, None] + step * np.arange(num_frames)
    # The frame shown at time t is the last one that starts at or before t.
    indices = np.searchsorted(frame_times, times + _TIME_TOLERANCE, side="right") - 1
    return np.clip(indices, 0, total_frames - 1)


def describe_source(source) -> str:
    """Printable description of a video source for messages: its path, `"<bytes: N>"` or `"<file-like>"`."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes: {len(source)}>"
    return "<file-like>"


def _check_sampling_arguments(total_frames, num_frames, sampling, num_clips, frame_stride, target_fps, frame_times):
    if sampling not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling must be one of {SAMPLING_STRATEGIES}, got {sampling!r}.")
    for name, value in (
        ("total_frames", total_frames),
        ("num_frames", num_frames),
        ("num_clips", num_clips),
        ("frame_stride", frame_stride),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if sampling == "fps":
        if target_fps is None or not target_fps > 0:
            raise ValueError(f'sampling="fps" needs target_fps > 0, got {target_fps!r}.')
        if frame_times is None or len(frame_times) != total_frames or not np.all(np.isfinite(frame_times)):
            raise ValueError(
                'sampling="fps" needs frame_times, the finite start time of each of the total_frames frames; got '
                f"{None if frame_times is None else len(frame_times)} times for {total_frames} frames."
            )


def _random_fractions(count: int, generator: torch.Generator | None) -> np.ndarray:
    """`count` uniform draws in [0, 1) from torch's RNG, so that DataLoader worker seeding applies."""
    return torch.rand(count, generator=generator, dtype=torch.float64).numpy()


def _clip_offsets(num_clips: int, train: bool, generator: torch.Generator | None) -> np.ndarray:
    """Where each clip starts, as a fraction of the room for its start: random, or centres of equal parts."""
    if train:
        return _random_fractions(num_clips, generator)
    return (2 * np.arange(num_clips) + 1) / (2 * num_clips)


def _uniform_indices(total_frames, num_frames, train, num_clips, generator) -> np.ndarray:
    segment = (total_frames - 1) / num_frames
    # Python's round() rounds half to even, as numpy's does in the authors' sampler.
    starts = np.array([round(segment * i) for i in range(num_frames)])
    if train:
        ends = np.array([round(segment * (i + 1)) for i in range(num_frames)])
        draws = _random_fractions(num_clips * num_frames, generator).reshape(num_clips, num_frames)
        return starts + np.floor(draws * (ends - starts + 1)).astype(np.int64)
    offsets = [int(segment / (num_clips + 1) * (clip + 1)) for clip in range(num_clips)]
    return starts[None, :] + np.array(offsets)[:, None]


def _readable(source, description: str):
    """The path of a path source, or the bytes of an in-memory or file-like source (read once, opened twice)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        _check_regular_file(path, description)
        return path
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if hasattr(source, "read"):
        return source.read()
    raise TypeError(
        f"A video source must be a path (str or os.PathLike), bytes or a binary file-like object, got "
        f"{type(source).__name__}."
    )


_FILE_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def _check_regular_file(path: str, description: str) -> None:
    """Refuse what is not a regular file before opening it: opening a FIFO or a device can block forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "Video file not found", path) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotAVideoError(description, "the path is a symbolic link loop") from error
        raise
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _FILE_KINDS.items() if is_kind(mode)), "not a regular file")
        raise NotAVideoError(description, f"the path is {kind}, not a video file")


def _open_container(data, description: str):
    try:
        return av.open(data if isinstance(data, str) else io.BytesIO(data), mode="r", metadata_errors="ignore")
    except av.FFmpegError as error:
        raise VideoDecodeError(description, error) from error


def _is_still_image_format(format_name: str) -> bool:
    """FFmpeg reads single images with the `image2` demuxer (by file name) or an `*_pipe` one (by content)."""
    return any(name == "image2" or name.endswith("_pipe") for name in format_name.split(","))


def _video_stream(container, description: str):
    if _is_still_image_format(container.format.name):
        raise NotAVideoError(
            description,
            f"it is a still image ({container.format.name}), not a video; pass an image as a one-frame video: a "
            "list with one PIL image, or an array of shape (1, H, W, 3)",
        )
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["none"]
        raise VideoDecodeError(description, f"no video stream (streams found: {', '.join(kinds)})")
    stream = container.streams.video[0]
    # Frame and slice threads: decoding dominates the cost of sampling.
    stream.thread_type = "AUTO"
    return stream


def _read_timeline(container, stream, description: str) -> _Timeline:
    """Demux (without decoding) every packet of the stream to count frames and find timestamps and keyframes."""
    pts, keyframe_seeks, count, timestamps_seen = [], {}, 0, []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            count += 1
            if packet.pts is None:
                continue
            pts.append(packet.pts)
            seek_point = _SeekPoint(packet.pts, (packet.pts,) if packet.dts is None else (packet.pts, packet.dts))
            timestamps_seen.extend(seek_point.timestamps)
            if packet.is_keyframe:
                keyframe_seeks[packet.pts] = seek_point
    except av.FFmpegError as error:
        raise VideoDecodeError(description, error) from error
    if count == 0:
        raise VideoDecodeError(description, "the video stream has no frames")
    declared = stream.frames
    if declared and count < declared:
        raise VideoDecodeError(description, f"truncated: the header declares {declared} frames, found {count}")
    if len(pts) < count or len(set(pts)) < count:
        return _Timeline(pts=None, seek_points={0: None}, total_frames=count, count_frames=True)
    first_packet_pts = pts[0]
    pts.sort()
    seek_points = {bisect.bisect_left(pts, value): point for value, point in keyframe_seeks.items()}
    # Frame 0 starts at the first packet (whose frame may not be frame 0): seek to the stream's earliest timestamp.
    seek_points[0] = _SeekPoint(first_packet_pts, (min(timestamps_seen),))
    # AVI stores no presentation timestamps; FFmpeg infers them, and with packed B-frames the decoder outputs
    # frames whose timestamps are out of order. The output order is right, so AVI frames are counted.
    count_frames = "avi" in container.format.name.split(",")
    return _Timeline(pts=pts, seek_points=seek_points, total_frames=count, count_frames=count_frames)


def _frame_rate(stream, timeline: _Timeline) -> float:
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return float(rate)
    if timeline.pts is not None and timeline.total_frames > 1:
        span = (timeline.pts[-1] - timeline.pts[0]) * stream.time_base
        return float((timeline.total_frames - 1) / span)
    return math.nan


def _frame_times(stream, timeline: _Timeline, fps: float) -> np.ndarray:
    """Start time in seconds of every frame, relative to the first one."""
    if timeline.pts is not None:
        return (np.array(timeline.pts) - timeline.pts[0]) * float(stream.time_base)
    return np.arange(timeline.total_frames) / fps


def _duration(container, stream, timeline: _Timeline, fps: float) -> float:
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return timeline.total_frames / fps


def _decode_frames(container, stream, timeline: _Timeline, indices: list, description: str, transform=None):
    """Decode the frames at `indices`: a dict from frame index to RGB array (passed through `transform`), the
    rotation applied, and the (height, width) of the upright frames.

    Seeks to a keyframe only when the next wanted frame's keyframe lies beyond what was already decoded, so the
    frames of one group of pictures are decoded once, in one forward pass. A wanted frame that the decoder never
    outputs is replaced by the next frame it does output. When the stream ends early, the dict also holds the
    last decoded frame under its own index, which tells the caller where the stream really ended.
    """
    pending = collections.deque(sorted(set(indices)))
    wanted_pts = set() if timeline.pts is None else {timeline.pts[index] for index in pending}
    frames, rotation, size = {}, 0, None
    run, position, last_frame = None, -1, None

    def convert(frame):
        nonlocal rotation, size
        rotation = _upright_rotation(frame)
        image = _to_upright_rgb(frame, rotation)
        size = image.shape[:2]
        return image if transform is None else transform(image)

    try:
        while pending:
            start = timeline.decode_start(pending[0])
            if run is None or start > position + 1:
                # The container is freshly opened: the first run from frame 0 needs no seek.
                packets = container.demux(stream) if run is None and start == 0 else None
                run = _decode_from(container, stream, timeline, start, wanted_pts, packets)
            for position, frame in run:
                last_frame = frame
                if position >= pending[0]:
                    image = convert(frame)
                    while pending and pending[0] <= position:
                        frames[pending.popleft()] = image
                    break
            else:
                if last_frame is not None and position not in frames:
                    frames[position] = convert(last_frame)
                break
    except av.FFmpegError as error:
        raise VideoDecodeError(description, error) from error
    if not frames:
        raise VideoDecodeError(description, "no frame could be decoded")
    return frames, rotation, size


def _decode_from(container, stream, timeline: _Timeline, start: int, wanted_pts: set, packets=None):
    """Yield `(index, frame)` for the frames decoded from the keyframe at `start` on (seeking unless `packets`)."""
    if packets is None:
        packets = _packets_from_keyframe(container, stream, timeline, start)
    if timeline.count_frames:
        return _count_decoded_frames(stream, packets, timeline, start)
    return _look_up_decoded_frames(stream, packets, timeline, wanted_pts)


def _packets_from_keyframe(container, stream, timeline: _Timeline, start: int):
    """Seek to the keyframe at `start` and return the packets from there on.

    A demuxer that lands after the keyframe for one timestamp is tried with the other; one that lands after it
    for both is tried with earlier keyframes (decoding more, but never missing frames).
    """
    for keyframe in reversed(timeline.keyframes[: bisect.bisect_right(timeline.keyframes, start)]):
        point = timeline.seek_points[keyframe]
        for timestamp in point.timestamps:
            container.seek(timestamp, stream=stream, backward=True, any_frame=False)
            packets = container.demux(stream)
            first = next(packets, None)
            if first is not None and first.pts is not None and first.pts <= point.packet_pts:
                return itertools.chain([first], packets)
    raise av.FFmpegError(0, f"the demuxer cannot seek back to frame {start}")


def _decode_packets(stream, packets, wanted_pts: set | None = None):
    """Decode `packets`; with `wanted_pts`, skip the decoding of non-reference frames whose timestamp is not wanted.

    No other frame depends on a non-reference frame, so skipping unwanted ones (about half of the frames of a
    stream with B-frames) changes no other frame.
    """
    codec = stream.codec_context
    for packet in packets:
        if wanted_pts is not None:
            codec.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
        yield from codec.decode(packet)


def _look_up_decoded_frames(stream, packets, timeline: _Timeline, wanted_pts: set):
    """Number decoded frames by looking their timestamps up in the timeline."""
    for frame in _decode_packets(stream, packets, wanted_pts):
        if frame.pts is not None:
            yield bisect.bisect_left(timeline.pts, frame.pts), frame


def _count_decoded_frames(stream, packets, timeline: _Timeline, start: int):
    """Number decoded frames by counting them from the keyframe at `start`, in the decoder's output order.

    Frames before the keyframe's timestamp (leading pictures of an open GOP, or frames of an earlier keyframe the
    seek landed on) are skipped. Without timestamps, decoding runs from the start of the stream.
    """
    frames = _decode_packets(stream, packets)
    if timeline.pts is None:
        yield from enumerate(frames)
        return
    index = None
    for frame in frames:
        if index is None:
            if frame.pts is None or frame.pts < timeline.pts[start]:
                continue
            index = bisect.bisect_left(timeline.pts, frame.pts)
        yield index, frame
        index += 1


def _upright_rotation(frame) -> int:
    """The frame's display-matrix rotation (counter-clockwise degrees), rounded to a multiple of 90."""
    rotation = frame.rotation
    if rotation is None or math.isnan(rotation):
        return 0
    return int(round(rotation / 90)) % 4 * 90


def _to_upright_rgb(frame, rotation: int) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return rgb


__all__ = [
    "SAMPLING_STRATEGIES",
    "InvalidFramesError",
    "NotAVideoError",
    "VideoDecodeError",
    "VideoMetadata",
    "decode_video",
    "describe_source",
    "sample_frame_indices",
]
