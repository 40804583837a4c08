"""Inputs that must fail fast and clearly, or be bounded in memory: non-regular files, symbolic link loops, still images,
frame dtypes and value ranges, non-finite frames, and 4K sources."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_readme import NUM_FRAMES, tiny_processor
from test_video_io import numbered_frames

from modeling_stan import StanForVideoTextRetrieval
from modeling_stan.pipeline_zero_shot_video_classification import TASK, ZeroShotVideoClassificationPipeline
from modeling_stan.video_io import InvalidFramesError, NotAVideoError, VideoDecodeError, decode_video
from modeling_stan.video_processing_stan import StanVideoProcessor


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def processor():
    return StanVideoProcessor(num_frames=4, size=32, crop_size=32)


@pytest.fixture
def fifo(tmp_path):
    """A named pipe. Should anything open it for reading, a writer opening it after 10 s unblocks that reader, so a
    regression fails the timing assertion instead of hanging the test run."""
    path = tmp_path / "pipe.mp4"
    os.mkfifo(path)
    done = threading.Event()

    def unblock():
        if not done.wait(10):
            with open(path, "wb"):
                pass

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()


def _pipeline(tiny_clip_dir):
    model = StanForVideoTextRetrieval.from_clip_pretrained(tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES)
    return ZeroShotVideoClassificationPipeline(model=model.eval(), processor=tiny_processor(tiny_clip_dir), task=TASK)


def test_a_fifo_fails_at_once_in_decoding_the_processor_and_the_pipeline(fifo, processor, tiny_clip_dir):
    pipeline = _pipeline(tiny_clip_dir)
    for name, call in {
        "decode_video": lambda: decode_video(fifo),
        "processor": lambda: processor(str(fifo)),
        "pipeline": lambda: pipeline(str(fifo), candidate_labels=["a", "b"]),
    }.items():
        start = time.monotonic()
        with pytest.raises(NotAVideoError, match="is a FIFO"):
            call()
        assert time.monotonic() - start < 5, name


def test_directories_devices_and_symlink_loops_are_not_videos(tmp_path):
    with pytest.raises(NotAVideoError, match="is a directory"):
        decode_video(tmp_path)
    with pytest.raises(NotAVideoError, match="is a character device"):
        decode_video(os.devnull)
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    with pytest.raises(NotAVideoError, match="symbolic link loop"):
        decode_video(tmp_path / "a.mp4")
    # A dangling link is still a missing file.
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "nothing.mp4")
    with pytest.raises(FileNotFoundError):
        decode_video(tmp_path / "dangling.mp4")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_still_image_is_refused_with_how_to_pass_an_image(tmp_path, processor, suffix):
    path = tmp_path / f"image{suffix}"
    image = Image.fromarray(numbered_frames(1, 32, 48)[0])
    image.save(path)
    for source in (path, path.read_bytes()):
        with pytest.raises(NotAVideoError, match="still image .*one-frame video"):
            processor(source)
    with pytest.raises(TypeError, match="single image; pass an image as a one-frame video"):
        processor(image)
    # The ways the message names work, and agree.
    one_frame = processor([image])["pixel_values"]
    assert one_frame.shape == (1, 4, 3, 32, 32)
    torch.testing.assert_close(processor(np.asarray(image)[None])["pixel_values"], one_frame, rtol=0, atol=0)


def test_an_animated_gif_is_a_video(tmp_path, processor):
    frames = [Image.fromarray(frame) for frame in numbered_frames(3, 32, 48)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    assert decode_video(tmp_path / "clip.gif", num_frames=3)[1].total_frames == 3


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.full((4, 16, 16, 3), np.nan, np.float32), "3072 non-finite values"),
        (np.full((4, 16, 16, 3), np.inf, np.float64), "non-finite values"),
        (np.ones((4, 16, 16, 3), bool), "bool frames"),
        (np.full((4, 16, 16, 3), 1000, np.uint16), "uint16 frames do not say their bit depth"),
        (np.full((4, 16, 16, 3), 300, np.int64), "outside the 0-255 scale"),
        (np.full((4, 16, 16, 3), -1.0, np.float32), "outside the 0-255 scale"),
        (np.full((4, 16, 16, 3), 0.5, np.float32), "look already rescaled to \\[0, 1\\]"),
        (np.full((4, 16, 16, 3), "x"), "dtype <U1 are not pixel values"),
    ],
    ids=["nan", "inf", "bool", "uint16", "int above 255", "negative float", "float in 0-1", "strings"],
)
def test_frames_that_need_a_guess_are_refused(processor, values, match):
    with pytest.raises(InvalidFramesError, match=match) as caught:
        processor([numbered_frames(4, 16, 16), values])
    assert isinstance(caught.value, VideoDecodeError) and caught.value.source.startswith("<video 1 of the batch")


def test_frame_lists_of_mixed_sizes_and_empty_videos_are_refused(processor):
    frames = list(numbered_frames(3, 16, 16)) + [numbered_frames(1, 16, 20)[0]]
    with pytest.raises(InvalidFramesError, match="the frames differ in shape"):
        processor(frames)
    with pytest.raises(InvalidFramesError, match="the video has no frames"):
        processor(np.zeros((0, 16, 16, 3), np.uint8))


def test_one_nan_pixel_is_enough(processor):
    frames = numbered_frames(6, 16, 16).astype(np.float32)
    frames[5, 3, 2, 1] = np.nan
    with pytest.raises(InvalidFramesError, match="1 non-finite values"):
        processor(frames)


def test_frames_on_the_0_255_scale_in_any_dtype_give_the_uint8_output(processor):
    frames = numbered_frames(6, 24, 40)
    expected = processor(frames)["pixel_values"]
    for dtype in (np.int64, np.int16, np.float16, np.float64):
        torch.testing.assert_close(processor(frames.astype(dtype))["pixel_values"], expected, msg=str(dtype))
    # Frames already in [0, 1] are accepted when rescaling is switched off, and are then what rescaling gives.
    rescaled = processor(frames / 255.0, do_rescale=False)["pixel_values"]
    torch.testing.assert_close(rescaled, expected)


def _encode_4k_video(path: Path) -> None:
    """Two seconds at 4 frames per second of 3840x2160, near-constant frames: quick to encode and to decode."""
    width, height, fps = 3840, 2160, 4
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "45"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        planes = np.full((height * 3 // 2, width), 128, np.uint8)  # yuv420p: luma rows, then chroma rows
        for index in range(2 * fps):
            planes[:height] = 40 + 20 * index
            for packet in stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


_PEAK_RSS_SCRIPT = """
import json, resource, sys
from modeling_stan.video_processing_stan import StanVideoProcessor

processor = StanVideoProcessor(num_frames=int(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
pixel_values = processor(sys.argv[2:], return_tensors="pt")["pixel_values"]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"added_gib": (after - before) / 2**20, "shape": list(pixel_values.shape)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
@pytest.mark.parametrize(
    ("num_frames", "limit_gib"),
    [
        # Resizing while decoding, measured on 2 cores: 0.28 GiB (8 frames) and 0.26 GiB (2 frames), 0.49 and 0.47 GiB
        # with 16 decoder threads (FFmpeg's frame threads hold frames too); converting whole videos to float32 before
        # resizing took 3.36 and 0.96 GiB on 2 cores.
        pytest.param(8, 1.5, marks=pytest.mark.slow, id="8 frames"),  # ~20 s on a busy 2-core machine
        pytest.param(2, 0.8, id="2 frames"),
    ],
)
def test_four_4k_videos_add_little_peak_memory(tmp_path, num_frames, limit_gib):
    _encode_4k_video(tmp_path / "video0.mp4")
    paths = [tmp_path / "video0.mp4"]
    for index in range(1, 4):  # four videos; each is decoded on its own, so equal contents cost as much
        paths.append(tmp_path / f"video{index}.mp4")
        shutil.copy(paths[0], paths[-1])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(num_frames), *map(str, paths)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["shape"] == [4, num_frames, 3, 224, 224]
    assert measured["added_gib"] < limit_gib, measured
