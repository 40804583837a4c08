"""PyAV decoding and frame sampling: strategies, exact seeking, container quirks, rotation, pixel formats, errors."""

import functools
import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import shared_path

from modeling_stan import video_io
from modeling_stan.video_io import VideoDecodeError, decode_video, sample_frame_indices


def numbered_frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """(count, H, W, 3) uint8 frames that differ from each other: a colour per frame and a bar that moves."""
    index = np.arange(count)
    frames = np.empty((count, height, width, 3), np.uint8)
    frames[...] = np.stack([(8 * index) % 256, 255 - (8 * index) % 256, (37 * index) % 256], axis=-1)[:, None, None]
    for i in range(count):
        left = (3 * i) % (width - 6)
        frames[i, :, left : left + 6] = 255
    return frames


def encode_video(
    path,
    frames,
    *,
    codec="libx264",
    fps=25,
    pix_fmt="yuv420p",
    options=None,
    input_format="rgb24",
    container_format=None,
    container_options=None,
    rotation=None,
    pts=None,
):
    """Encode `frames` with PyAV; `pts` (milliseconds, optional) gives each frame its own time (variable rate)."""
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for position, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format=input_format)
            if pts is not None:
                frame.pts, frame.time_base = pts[position], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def full_decode(source) -> np.ndarray:
    """Every frame, decoded from the start without seeking: the reference for frame indices."""
    with av.open(str(source)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def assert_frames_match_full_decode(frames, metadata, reference):
    indices = np.asarray(metadata.frame_indices)
    np.testing.assert_array_equal(frames, reference[indices.ravel()].reshape(frames.shape))


# Small GOPs and B-frames, so that sampling crosses many keyframes and reordered frames.
GOP_OPTIONS = {"g": "6", "bf": "3", "preset": "ultrafast"}


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory):
    return encode_video(tmp_path_factory.mktemp("gop") / "gop.mp4", numbered_frames(60), options=GOP_OPTIONS)


# Expected indices derived by hand from the sampling rules (see sample_frame_indices):
# test.mp4 has 300 frames at 30 fps; test.avi has 164 frames at 25 fps.
REAL_VIDEO_CASES = [
    ("test.mp4", "uniform", {}, [18, 55, 93, 130, 168, 205, 242, 280]),
    ("test.mp4", "dense", {}, [136, 140, 144, 148, 152, 156, 160, 164]),
    ("test.mp4", "fps", {"target_fps": 2.0}, [97, 112, 127, 142, 157, 172, 187, 202]),
    (
        "test.mp4",
        "uniform",
        {"num_clips": 3},
        [
            [9, 46, 84, 121, 159, 196, 233, 271],
            [18, 55, 93, 130, 168, 205, 242, 280],
            [28, 65, 103, 140, 178, 215, 252, 290],
        ],
    ),
    (
        "test.mp4",
        "dense",
        {"num_clips": 3, "frame_stride": 8},
        [[40 + 8 * i for i in range(8)], [122 + 8 * i for i in range(8)], [203 + 8 * i for i in range(8)]],
    ),
    ("test.avi", "uniform", {}, [10, 30, 51, 71, 92, 112, 132, 153]),
    ("test.avi", "dense", {}, [68, 72, 76, 80, 84, 88, 92, 96]),
    ("test.avi", "fps", {"target_fps": 2.0}, [37, 50, 62, 75, 87, 100, 112, 125]),
]
REAL_VIDEO_METADATA = {
    "test.mp4": dict(fps=30.0, duration=10.0, total_frames=300, width=340, height=256, codec="h264"),
    "test.avi": dict(fps=25.0, duration=6.56, total_frames=164, width=320, height=240, codec="mpeg4"),
}


@functools.lru_cache
def full_decode_of_shared(name: str) -> np.ndarray:
    return full_decode(shared_path("videos", name))


@pytest.mark.parametrize(("name", "sampling", "options", "expected"), REAL_VIDEO_CASES)
def test_real_videos_sampling_indices_shapes_and_metadata(name, sampling, options, expected):
    path = shared_path("videos", name)
    frames, metadata = decode_video(path, num_frames=8, sampling=sampling, **options)
    expected_meta = REAL_VIDEO_METADATA[name]
    clips = options.get("num_clips", 1)
    leading = (8,) if clips == 1 else (clips, 8)
    assert frames.shape == (*leading, expected_meta["height"], expected_meta["width"], 3)
    assert frames.dtype == np.uint8
    assert metadata.frame_indices == expected
    assert metadata.source == str(path)
    assert metadata.frame_count_exact and metadata.rotation == 0
    for field, value in expected_meta.items():
        assert getattr(metadata, field) == pytest.approx(value), field
    assert_frames_match_full_decode(frames, metadata, full_decode_of_shared(name))


@pytest.mark.parametrize("sampling", ["uniform", "dense"])
@pytest.mark.parametrize("train", [False, True])
def test_seeking_gives_the_frames_of_a_full_decode(gop_video, sampling, train):
    reference = full_decode(gop_video)
    generator = torch.Generator().manual_seed(3)
    frames, metadata = decode_video(gop_video, 8, sampling, train=train, num_clips=3, generator=generator)
    assert frames.shape == (3, 8, 48, 64, 3)
    assert_frames_match_full_decode(frames, metadata, reference)


def test_every_frame_is_reachable_by_seeking(gop_video):
    reference = full_decode(gop_video)
    # 60 one-frame clips, one per frame, in one call: every keyframe, B-frame and GOP boundary is a target.
    frames, metadata = decode_video(gop_video, 1, "dense", num_clips=60, frame_stride=1)
    assert np.asarray(metadata.frame_indices).ravel().tolist() == list(range(60))
    np.testing.assert_array_equal(frames[:, 0], reference)


def test_sparse_samples_seek_instead_of_decoding_everything(tmp_path, monkeypatch):
    # Keyframes exactly every 10 frames, with B-frames (so decoding and presentation timestamps differ).
    options = {"x264-params": "keyint=10:min-keyint=10:scenecut=0:bframes=2"}
    path = encode_video(tmp_path / "long.mp4", numbered_frames(200), options=options)
    yielded = []
    look_up = video_io._look_up_decoded_frames

    def counting_look_up(*args):
        for item in look_up(*args):
            yielded.append(item[0])
            yield item

    monkeypatch.setattr(video_io, "_look_up_decoded_frames", counting_look_up)
    frames, metadata = decode_video(path, 4, "uniform")
    assert metadata.frame_indices == [24, 74, 124, 173]
    # From keyframes 20, 70, 120 and 170: at most 5 + 5 + 5 + 4 frames, against 174 when decoding from the start.
    assert len(yielded) <= 19
    assert_frames_match_full_decode(frames, metadata, full_decode(path))


@pytest.mark.parametrize(
    ("suffix", "codec", "options", "container_format"),
    [
        ("avi", "mpeg4", {"g": "5", "bf": "2"}, None),  # AVI: frames are counted, seeking goes by DTS
        ("mkv", "mpeg4", {"g": "5", "bf": "2"}, None),
        ("ts", "libx264", GOP_OPTIONS, "mpegts"),
    ],
)
def test_other_containers_match_full_decode(tmp_path, suffix, codec, options, container_format):
    path = encode_video(
        tmp_path / f"video.{suffix}",
        numbered_frames(40),
        codec=codec,
        options=options,
        container_format=container_format,
    )
    frames, metadata = decode_video(path, 1, "dense", num_clips=40, frame_stride=1)
    assert metadata.total_frames == 40 and metadata.frame_count_exact
    np.testing.assert_array_equal(frames[:, 0], full_decode(path))


def test_webm_vp9_without_frame_count_is_counted(tmp_path):
    path = encode_video(
        tmp_path / "video.webm",
        numbered_frames(45),
        codec="libvpx-vp9",
        options={"deadline": "realtime", "cpu-used": "8", "g": "10"},
    )
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the header gives no frame count
    frames, metadata = decode_video(path, 8, "uniform")
    assert (metadata.total_frames, metadata.frame_count_exact, metadata.codec) == (45, True, "vp9")
    assert metadata.frame_indices == [2, 8, 13, 18, 24, 30, 35, 40]
    assert_frames_match_full_decode(frames, metadata, full_decode(path))


def test_timestampless_raw_stream_is_decoded_linearly_with_an_estimated_count(tmp_path):
    path = encode_video(tmp_path / "video.h264", numbered_frames(30), options=GOP_OPTIONS, container_format="h264")
    frames, metadata = decode_video(path, 8, "uniform")
    assert metadata.total_frames == 30 and not metadata.frame_count_exact
    assert_frames_match_full_decode(frames, metadata, full_decode(path))


def test_stream_shorter_than_its_packets_falls_back_to_its_last_frame(gop_video):
    timeline = video_io._Timeline(pts=None, seek_points={0: None}, total_frames=100, count_frames=True)
    with av.open(str(gop_video)) as container:
        decoded, _, _ = video_io._decode_frames(container, container.streams.video[0], timeline, [10, 80, 95], "x")
    assert sorted(decoded) == [10, 59]  # the stream really ends at frame 59
    frames, indices, total = video_io._gather(decoded, np.array([[10, 80, 95]]), 100)
    assert indices.tolist() == [[10, 59, 59]] and total == 60
    np.testing.assert_array_equal(frames[0, 2], full_decode(gop_video)[59])


def test_a_seek_landing_after_its_keyframe_falls_back_to_an_earlier_keyframe(gop_video):
    with av.open(str(gop_video)) as container:
        timeline = video_io._read_timeline(container, container.streams.video[0], "x")
    keyframe, later_keyframe = timeline.keyframes[3:5]
    # Make every timestamp of `keyframe` land on the next keyframe, as a demuxer seeking by the wrong clock would.
    timeline.seek_points[keyframe] = timeline.seek_points[keyframe]._replace(
        timestamps=timeline.seek_points[later_keyframe].timestamps
    )
    targets = [keyframe + 1, keyframe + 2]
    with av.open(str(gop_video)) as container:
        decoded, _, _ = video_io._decode_frames(container, container.streams.video[0], timeline, targets, "x")
    reference = full_decode(gop_video)
    for target in targets:
        np.testing.assert_array_equal(decoded[target], reference[target])
    # When no keyframe can be reached, the failure is an error, not a wrong frame.
    for index in timeline.keyframes:
        timeline.seek_points[index] = timeline.seek_points[index]._replace(timestamps=(10**9,))
    with av.open(str(gop_video)) as container, pytest.raises(VideoDecodeError, match="cannot seek back to frame"):
        video_io._decode_frames(container, container.streams.video[0], timeline, targets, "x")


def test_variable_frame_rate_maps_fps_sampling_through_timestamps(tmp_path):
    # 10 frames 20 ms apart, then 10 frames 100 ms apart: frame i starts at times[i].
    times = [20 * i for i in range(10)] + [200 + 100 * i for i in range(10)]
    path = encode_video(tmp_path / "vfr.mp4", numbered_frames(20), pts=times, options=GOP_OPTIONS)
    frames, metadata = decode_video(path, 4, "fps", target_fps=10)
    # Last frame at 1.1 s; a 4-frame clip at 10 fps spans 0.3 s; centred start 0.4 s: times 0.4, 0.5, 0.6, 0.7.
    assert metadata.frame_indices == [12, 13, 14, 15]
    assert metadata.total_frames == 20 and 10 < metadata.fps < 50  # an average of the two rates
    assert_frames_match_full_decode(frames, metadata, full_decode(path))
    # Uniform sampling still works on frame indices, across the rate change.
    frames, metadata = decode_video(path, 4, "uniform")
    assert metadata.frame_indices == [2, 7, 12, 16]
    assert_frames_match_full_decode(frames, metadata, full_decode(path))


@pytest.mark.parametrize(("rotation", "white_side"), [(90, "bottom"), (180, "right"), (270, "top"), (-90, "top")])
def test_rotation_metadata_makes_frames_upright(tmp_path, rotation, white_side):
    frames = np.zeros((6, 32, 64, 3), np.uint8)
    frames[:, :, :16] = 255  # a white band on the left of the stored (landscape) picture
    path = encode_video(tmp_path / "rotated.mp4", frames, rotation=rotation)
    decoded, metadata = decode_video(path, 2)
    quarter_turn = rotation % 180 == 90
    assert decoded.shape == ((2, 64, 32, 3) if quarter_turn else (2, 32, 64, 3))
    assert metadata.rotation == rotation % 360
    assert (metadata.width, metadata.height) == ((32, 64) if quarter_turn else (64, 32))
    sides = {"top": decoded[:, :8], "bottom": decoded[:, -8:], "left": decoded[:, :, :8], "right": decoded[:, :, -8:]}
    for side, pixels in sides.items():
        assert (pixels.mean() > 200) == (side == white_side), side


def test_grey_video_becomes_rgb(tmp_path):
    grey = (np.arange(12 * 32 * 48) % 256).astype(np.uint8).reshape(12, 32, 48)
    path = encode_video(tmp_path / "grey.mkv", grey, codec="ffv1", pix_fmt="gray", input_format="gray")
    frames, metadata = decode_video(path, 4)
    assert frames.shape == (4, 32, 48, 3)
    for channel in range(3):  # ffv1 is lossless: each channel is the grey picture
        np.testing.assert_array_equal(frames[..., channel], grey[metadata.frame_indices])


def test_ten_bit_video_becomes_rgb24(tmp_path):
    path = encode_video(tmp_path / "p10.mkv", numbered_frames(10), pix_fmt="yuv420p10le")
    frames, _ = decode_video(path, 4)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8


def test_short_video_repeats_frames(tmp_path):
    path = encode_video(tmp_path / "short.mp4", numbered_frames(3))
    reference = full_decode(path)
    expectations = {"uniform": [0, 0, 0, 1, 1, 1, 2, 2], "dense": [0, 2, 2, 2, 2, 2, 2, 2]}
    for sampling, expected in expectations.items():
        frames, metadata = decode_video(path, 8, sampling)
        assert metadata.frame_indices == expected and frames.shape == (8, 48, 64, 3)
        assert_frames_match_full_decode(frames, metadata, reference)


def test_frame_transform_sees_each_decoded_frame_once_and_metadata_keeps_the_source_size(gop_video):
    frames, metadata = decode_video(gop_video, num_frames=8, num_clips=2)
    seen = []

    def halve(rgb):
        seen.append(rgb.shape)
        return rgb[::2, ::2].copy()

    halved, halved_metadata = decode_video(gop_video, num_frames=8, num_clips=2, frame_transform=halve)
    np.testing.assert_array_equal(halved, frames[..., ::2, ::2, :])
    assert (halved_metadata.height, halved_metadata.width) == (metadata.height, metadata.width) == (48, 64)
    assert seen == [(48, 64, 3)] * len(set(np.ravel(metadata.frame_indices)))


def test_bytes_file_like_and_path_sources_agree(gop_video):
    data = gop_video.read_bytes()
    expected, _ = decode_video(gop_video, 4)
    for source, description in [
        (data, f"<bytes: {len(data)}>"),
        (memoryview(data), f"<bytes: {len(data)}>"),
        (io.BytesIO(data), "<file-like>"),
        (str(gop_video), str(gop_video)),
    ]:
        frames, metadata = decode_video(source, 4)
        assert metadata.source == description
        np.testing.assert_array_equal(frames, expected)


def test_training_sampling_is_random_within_segments_and_seeded():
    first = sample_frame_indices(300, 8, train=True, num_clips=4, generator=torch.Generator().manual_seed(0))
    again = sample_frame_indices(300, 8, train=True, num_clips=4, generator=torch.Generator().manual_seed(0))
    other = sample_frame_indices(300, 8, train=True, num_clips=4, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Segment i of 300 frames in 8 segments covers frames round(37.375 * i) ... round(37.375 * (i + 1)).
    bounds = [0, 37, 75, 112, 150, 187, 224, 262, 299]
    for clip in np.concatenate([first, other]):
        assert all(bounds[i] <= index <= bounds[i + 1] for i, index in enumerate(clip))
    generator = torch.Generator().manual_seed(0)
    dense = sample_frame_indices(300, 8, "dense", train=True, frame_stride=4, generator=generator)
    assert np.all(np.diff(dense[0]) == 4) and 0 <= dense[0, 0] <= 300 - 29


def test_sampling_arguments_are_checked():
    with pytest.raises(ValueError, match="sampling must be one of"):
        sample_frame_indices(10, 4, "random")
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        sample_frame_indices(10, 0)
    with pytest.raises(ValueError, match="target_fps"):
        sample_frame_indices(10, 4, "fps", frame_times=np.arange(10) / 25)
    with pytest.raises(ValueError, match="frame_times"):
        sample_frame_indices(10, 4, "fps", target_fps=5)


@pytest.fixture
def broken_files(tmp_path, gop_video):
    files = {}
    files["zero-byte"] = tmp_path / "empty.mp4"
    files["zero-byte"].write_bytes(b"")
    files["text renamed .mp4"] = tmp_path / "notes.mp4"
    files["text renamed .mp4"].write_text("this is not a video\n" * 40)
    data = gop_video.read_bytes()
    files["truncated (index at the end lost)"] = tmp_path / "truncated.mp4"
    files["truncated (index at the end lost)"].write_bytes(data[: len(data) // 2])
    faststart = encode_video(
        tmp_path / "faststart.mp4",
        numbered_frames(60),
        options=GOP_OPTIONS,
        container_options={"movflags": "faststart"},
    )
    files["truncated (frames missing)"] = tmp_path / "truncated_faststart.mp4"
    files["truncated (frames missing)"].write_bytes(faststart.read_bytes()[: len(faststart.read_bytes()) * 2 // 3])
    files["corrupt"] = tmp_path / "corrupt.mp4"
    files["corrupt"].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    audio = tmp_path / "audio.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for index in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    files["audio-only"] = audio
    zero_frames = tmp_path / "zero_frames.avi"
    with av.open(str(zero_frames), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height = 64, 48
        container.start_encoding()
    files["zero frames"] = zero_frames
    return files


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("zero-byte", "Invalid data"),
        ("text renamed .mp4", "Invalid data"),
        ("truncated (index at the end lost)", "Invalid data"),
        ("truncated (frames missing)", "truncated: the header declares 60 frames"),
        ("corrupt", "Invalid data"),
        ("audio-only", "no video stream (streams found: audio)"),
        ("zero frames", "no frames"),
    ],
)
def test_undecodable_files_raise_video_decode_error(broken_files, kind, cause):
    path = broken_files[kind]
    with pytest.raises(VideoDecodeError, match="Cannot decode video") as caught:
        decode_video(path, 4)
    assert caught.value.source == str(path) and str(path) in str(caught.value)
    assert cause in str(caught.value.cause)
    # The same content given as bytes is described as such.
    with pytest.raises(VideoDecodeError) as caught:
        decode_video(path.read_bytes(), 4)
    assert caught.value.source == f"<bytes: {path.stat().st_size}>"


def test_missing_file_and_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        decode_video(tmp_path / "missing.mp4")
    assert caught.value.filename == str(tmp_path / "missing.mp4")
    with pytest.raises(VideoDecodeError, match="directory"):
        decode_video(tmp_path)
    with pytest.raises(TypeError, match="must be a path .* got int"):
        decode_video(3)
