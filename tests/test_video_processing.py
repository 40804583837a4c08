"""StanVideoProcessor and StanProcessor: inputs, sampling, crops, normalisation, batching, save/load, remote code."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image
from test_video_io import encode_video, full_decode, numbered_frames
from transformers import AutoProcessor
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from modeling_stan import StanConfig
from modeling_stan.demo.tiny_clip import build_tiny_clip_tokenizer
from modeling_stan.processing_stan import StanProcessor
from modeling_stan.video_processing_stan import StanVideoProcessor, StanVideoProcessorKwargs


# CLIP's normalisation constants, written out so that the tests do not read them from the code under test.
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
CAPTIONS = ["a red square moves from left to right", "a blue circle"]


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return encode_video(
        tmp_path_factory.mktemp("videos") / "video.mp4", numbered_frames(30, 48, 64), options={"g": "6", "bf": "2"}
    )


@pytest.fixture
def processor():
    return StanVideoProcessor(num_frames=4, size=32, crop_size=32)


def raw_processor(**kwargs):
    """A processor that keeps pixel values as they are (no rescale, no normalisation) to check geometry."""
    return StanVideoProcessor(do_rescale=False, do_normalize=False, **kwargs)


def test_default_output_is_clip_normalised_224_crops(video_path):
    pixel_values = StanVideoProcessor()(video_path, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 8, 3, 224, 224) and pixel_values.dtype == torch.float32


def test_constant_colour_is_rescaled_and_normalised():
    video = np.empty((5, 40, 60, 3), np.uint8)
    video[...] = (255, 0, 128)
    pixel_values = StanVideoProcessor(num_frames=2, size=32, crop_size=32)(video)["pixel_values"]
    expected = ((torch.tensor([255.0, 0.0, 128.0]).view(3, 1, 1) / 255 - CLIP_MEAN) / CLIP_STD).expand(3, 32, 32)
    torch.testing.assert_close(pixel_values[0, 1], expected)


def test_path_bytes_file_numpy_torch_and_frame_lists_give_identical_outputs(video_path, processor):
    frames = full_decode(video_path)  # (T, H, W, 3) uint8
    channels_first = torch.from_numpy(frames).permute(0, 3, 1, 2)
    # The channel axis is inferred for numpy and torch alike when input_data_format is not given.
    expected = processor(video_path)["pixel_values"]
    assert expected.shape == (1, 4, 3, 32, 32)
    with open(video_path, "rb") as file:
        inputs = {
            "path": (str(video_path), {}),
            "bytes": (video_path.read_bytes(), {}),
            "file": (file, {}),
            "numpy (T, H, W, C)": (frames, {}),
            "numpy (T, C, H, W)": (channels_first.numpy(), {}),
            "torch (T, C, H, W)": (channels_first, {}),
            "torch (T, H, W, C)": (torch.from_numpy(frames), {}),
            "torch float": (channels_first.float(), {}),
            "numpy frames": (list(frames), {}),
            "PIL frames": ([Image.fromarray(frame) for frame in frames], {}),
            "channels-last tensor, explicit": (torch.from_numpy(frames), {"input_data_format": "channels_last"}),
            "channels-first numpy, explicit": (channels_first.numpy(), {"input_data_format": "channels_first"}),
            "(C, H, W) tensor frames": (list(channels_first), {}),
        }
        for name, (video, options) in inputs.items():
            output = processor(video, **options)["pixel_values"]
            torch.testing.assert_close(output, expected, rtol=0, atol=0, msg=name)


def test_ambiguous_channel_axis_is_read_as_transformers_reads_it_and_the_explicit_one_is_honoured():
    # Frames of 3 x 3 pixels: both axes could hold the channels. transformers' infer_channel_dimension_format takes
    # the first; input_data_format overrides it.
    video = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    processor = raw_processor(do_sample_frames=False, size={"height": 3, "width": 3}, crop_size=3)
    inferred = processor(video)["pixel_values"][0]
    torch.testing.assert_close(inferred, torch.from_numpy(video).float(), rtol=0, atol=0)
    channels_last = processor(video, input_data_format="channels_last")["pixel_values"][0]
    torch.testing.assert_close(channels_last, torch.from_numpy(video).permute(0, 3, 1, 2).float(), rtol=0, atol=0)


def test_scalar_image_mean_and_std_apply_to_every_channel():
    video = np.empty((2, 8, 8, 3), np.uint8)
    video[...] = (255, 0, 51)
    pixel_values = StanVideoProcessor(num_frames=1, size=8, crop_size=8, image_mean=0.5, image_std=0.25)(video)
    expected = ((torch.tensor([1.0, 0.0, 0.2]) - 0.5) / 0.25).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(pixel_values["pixel_values"][0, 0], expected)
    one_item_lists = StanVideoProcessor(num_frames=1, size=8, crop_size=8, image_mean=[0.5], image_std=[0.25])
    torch.testing.assert_close(one_item_lists(video)["pixel_values"], pixel_values["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fps": 2}, 'fps=2 applies only with sampling="fps"'),
        ({"sampling": "fps"}, 'sampling="fps" needs fps'),
        ({"sampling": "fps", "fps": -1.0}, 'sampling="fps" needs fps'),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be a number or a list of 1 or 3 numbers"),
        ({"image_std": 0.0}, "image_std must not be 0"),
        ({"image_std": float("nan")}, "image_std must be a number or a list of 1 or 3 numbers"),
        ({"num_frames": 0}, "num_frames must be an integer >= 1"),
        ({"num_clips": 0}, "num_clips must be an integer >= 1"),
        ({"frame_stride": 0}, "frame_stride must be an integer >= 1"),
        ({"size": {"shortest_edge": 0}}, "size must give shortest_edge as integers >= 1"),
        ({"crop_size": {"height": 0, "width": 4}}, "crop_size must give height and width as integers >= 1"),
        ({"rescale_factor": float("inf")}, "rescale_factor must be a finite number"),
    ],
)
def test_option_values_are_validated_at_construction_and_call(video_path, options, message):
    with pytest.raises(ValueError, match=message):
        StanVideoProcessor(**options)
    with pytest.raises(ValueError, match=message):
        StanVideoProcessor(num_frames=2, size=32, crop_size=32)(video_path, **options)


def test_fps_sampling_takes_frames_fps_apart(video_path):
    # 30 frames at 25 fps (test_video_io.encode_video's default); 5 fps is every fifth frame.
    output = StanVideoProcessor(num_frames=3, size=32, crop_size=32, sampling="fps", fps=5)(
        video_path, return_metadata=True
    )
    indices = output["video_metadata"][0].frame_indices
    assert [later - earlier for earlier, later in zip(indices, indices[1:])] == [5, 5]


def test_given_frames_are_sampled_with_the_decoding_rule(processor):
    frames = numbered_frames(30, 32, 32)
    # Uniform test-time sampling of 4 out of 30 frames: segment 29 / 4 = 7.25, middle offset 3.
    expected = raw_processor(size=32, crop_size=32, do_sample_frames=False)(frames[[3, 10, 17, 25]])["pixel_values"]
    got = raw_processor(size=32, crop_size=32, num_frames=4)(frames)["pixel_values"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mixed_length_batch(video_path, processor):
    batch = [str(video_path), numbered_frames(5, 20, 30), numbered_frames(13, 64, 48), list(numbered_frames(2))]
    output = processor(batch, return_metadata=True)
    assert output["pixel_values"].shape == (4, 4, 3, 32, 32)
    metadata = output["video_metadata"]
    assert metadata[0].frame_indices == [3, 10, 17, 25] and metadata[1:] == [None, None, None]
    # Each row is the video processed alone.
    for row, video in enumerate(batch):
        torch.testing.assert_close(output["pixel_values"][row], processor(video)["pixel_values"][0], rtol=0, atol=0)


def test_five_dimensional_batch(processor):
    batch = np.stack([numbered_frames(6), numbered_frames(6)[::-1]])
    output = processor(batch)["pixel_values"]
    assert output.shape == (2, 4, 3, 32, 32) and not torch.equal(output[0], output[1])


def test_short_side_resize_and_centre_crop_geometry():
    # Frames whose red value is the column index: after a resize by 1 (short side already 32), a 32-wide centre crop
    # of a 96-wide frame starts at column 32.
    video = np.zeros((3, 32, 96, 3), np.uint8)
    video[..., 0] = np.arange(96)
    output = raw_processor(num_frames=1, size=32, crop_size=32)(video)["pixel_values"]
    assert output.shape == (1, 1, 3, 32, 32)
    torch.testing.assert_close(output[0, 0, 0, 0], torch.arange(32, 64, dtype=torch.float32))


@pytest.mark.parametrize(("height", "width", "axis"), [(32, 96, "width"), (96, 32, "height")])
def test_three_crops_span_the_long_side(height, width, axis):
    video = np.zeros((2, height, width, 3), np.uint8)
    position = np.arange(max(height, width))
    if axis == "width":
        video[..., 0] = position
    else:
        video[..., 0] = position[:, None]
    output = raw_processor(num_frames=1, size=32, crop_size=32, num_crops=3)(video)["pixel_values"]
    assert output.shape == (3, 1, 3, 32, 32)
    first_line = output[:, 0, 0, 0, :] if axis == "width" else output[:, 0, 0, :, 0]
    assert first_line[:, 0].tolist() == [0.0, 32.0, 64.0]  # start, centre, end of the long side


def test_multi_view_layout_is_clip_major(video_path):
    processor = StanVideoProcessor(num_frames=2, size=32, crop_size=32)
    views = processor(video_path, num_clips=2, num_crops=3)["pixel_values"]
    centres = processor(video_path, num_clips=2)["pixel_values"]
    assert views.shape == (6, 2, 3, 32, 32) and centres.shape == (2, 2, 3, 32, 32)
    # Row (clip * 3 + crop): the centre crop of clip k is row 3k + 1.
    torch.testing.assert_close(views[[1, 4]], centres, rtol=0, atol=0)
    two_videos = processor([video_path, video_path], num_clips=2, num_crops=3)["pixel_values"]
    torch.testing.assert_close(two_videos, torch.cat([views, views]), rtol=0, atol=0)


def test_training_random_resized_crop_is_seeded_and_shared_by_a_clip(video_path):
    processor = StanVideoProcessor(num_frames=4, size=32, crop_size=(24, 20), train=True)
    static = np.repeat(numbered_frames(1, 64, 80), 10, axis=0)  # ten identical frames
    first = processor(static, generator=torch.Generator().manual_seed(0))["pixel_values"]
    again = processor(static, generator=torch.Generator().manual_seed(0))["pixel_values"]
    other = processor(static, generator=torch.Generator().manual_seed(1))["pixel_values"]
    assert first.shape == (1, 4, 3, 24, 20)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    for frame in first[0, 1:]:  # one box for the whole clip
        torch.testing.assert_close(frame, first[0, 0], rtol=0, atol=0)
    # Random frame positions come from the same generator.
    decoded = processor(video_path, generator=torch.Generator().manual_seed(0), return_metadata=True)
    redecoded = processor(video_path, generator=torch.Generator().manual_seed(0), return_metadata=True)
    assert decoded["video_metadata"][0].frame_indices == redecoded["video_metadata"][0].frame_indices


def test_random_resized_crop_box_stays_within_scale_and_ratio():
    from modeling_stan.video_processing_stan import _random_resized_crop_box

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, height, width = _random_resized_crop_box((120, 160), (0.08, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= top <= 120 - height and 0 <= left <= 160 - width
        assert 0.07 <= height * width / (120 * 160) <= 1.0
        assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05
    # A ratio range no box of the frame can meet falls back to the whole frame narrowed to the nearest ratio.
    assert _random_resized_crop_box((100, 100), (1.5, 2.0), (4.0, 5.0), generator) == (37, 0, 25, 100)


def test_shared_real_video_through_the_processor():
    path = shared_path("videos", "test.mp4")
    output = StanVideoProcessor(num_frames=8)(path, return_metadata=True)
    assert output["pixel_values"].shape == (1, 8, 3, 224, 224)
    assert output["video_metadata"][0].frame_indices == [18, 55, 93, 130, 168, 205, 242, 280]


def test_bad_inputs_raise_clear_errors(processor, video_path):
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['frames'\\]"):
        processor(video_path, frames=8)
    with pytest.raises(ValueError, match="num_crops must be 1 or 3"):
        processor(video_path, num_crops=2)
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        processor(np.zeros((4, 16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        processor(np.zeros((4, 16, 16, 4), np.uint8), input_data_format="channels_last")
    with pytest.raises(ValueError, match='sampling="fps" needs frame timestamps'):
        processor(numbered_frames(8), sampling="fps", fps=2)
    with pytest.raises(ValueError, match="mixes single frames and whole videos"):
        processor([numbered_frames(1)[0], numbered_frames(4)])
    with pytest.raises(ValueError, match="crop_size .* is larger than the resized frames"):
        processor(numbered_frames(4), do_resize=False, crop_size=100)
    with pytest.raises(ValueError, match="does not support do_pad=True"):
        processor(video_path, do_pad=True)
    with pytest.raises(TypeError, match="videos must be"):
        processor(3.5)
    with pytest.raises(ValueError, match="sampling must be one of"):
        StanVideoProcessor(sampling="random")


def test_video_processor_save_load_round_trip_and_auto_registration(tmp_path, video_path):
    processor = StanVideoProcessor(num_frames=3, size=40, crop_size=36, sampling="dense", frame_stride=2, num_crops=3)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert saved["video_processor_type"] == "StanVideoProcessor" and saved["size"] == {"shortest_edge": 40}
    loaded = StanVideoProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    expected = processor(video_path)["pixel_values"]
    assert expected.shape == (3, 3, 3, 36, 36)
    torch.testing.assert_close(loaded(video_path)["pixel_values"], expected, rtol=0, atol=0)
    # The registration the package makes; AutoVideoProcessor then resolves the saved type without torchvision.
    AutoVideoProcessor.register(StanConfig, StanVideoProcessor)
    auto_loaded = AutoVideoProcessor.from_pretrained(tmp_path)
    assert type(auto_loaded) is StanVideoProcessor and auto_loaded.to_dict() == processor.to_dict()


def test_for_image_size():
    processor = StanVideoProcessor.for_image_size(32, num_frames=6)
    assert processor(numbered_frames(10))["pixel_values"].shape == (1, 6, 3, 32, 32)


@pytest.fixture
def stan_processor():
    return StanProcessor(
        video_processor=StanVideoProcessor(num_frames=4, size=32, crop_size=32), tokenizer=build_tiny_clip_tokenizer()
    )


def test_processor_combines_text_and_videos(stan_processor, video_path):
    # One token more than the short caption needs: the long caption is truncated, the short one padded.
    max_length = len(stan_processor.tokenizer(CAPTIONS[1])["input_ids"]) + 1
    output = stan_processor(
        text=CAPTIONS,
        videos=[video_path, video_path],
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_length,
    )
    assert set(output) == {"input_ids", "attention_mask", "pixel_values"}
    assert output["input_ids"].shape == output["attention_mask"].shape == (2, max_length)
    assert output["pixel_values"].shape == (2, 4, 3, 32, 32)
    assert output["attention_mask"].sum(dim=1).tolist() == [max_length, max_length - 1]
    assert stan_processor.batch_decode(output["input_ids"], skip_special_tokens=True)[1] == CAPTIONS[1]
    padded = stan_processor(text=CAPTIONS, return_tensors="pt", padding=True)
    assert stan_processor.batch_decode(padded["input_ids"], skip_special_tokens=True) == CAPTIONS
    assert "pixel_values" not in padded
    videos_only = stan_processor(videos=video_path, return_tensors="pt", num_frames=2)
    assert set(videos_only) == {"pixel_values"} and videos_only["pixel_values"].shape == (1, 2, 3, 32, 32)
    with pytest.raises(TypeError, match="not images="):
        stan_processor(text=CAPTIONS, images=np.zeros((8, 8, 3)))


def test_processor_call_is_annotated_for_transformers_introspection():
    # transformers reads which inputs a processor takes from the annotated parameters of __call__.
    parameters = inspect.signature(StanProcessor.__call__).parameters
    annotated = [name for name, parameter in parameters.items() if parameter.annotation is not parameter.empty]
    assert annotated == ["text", "videos", "kwargs"]
    assert StanProcessor.valid_processor_kwargs.__annotations__["videos_kwargs"] is StanVideoProcessorKwargs


def test_processor_checks_its_components():
    with pytest.raises(TypeError, match="video_processor must be a video processor, got NoneType"):
        StanProcessor(video_processor=None, tokenizer=build_tiny_clip_tokenizer())
    with pytest.raises(TypeError, match="Received a StanVideoProcessor for argument tokenizer"):
        StanProcessor(video_processor=StanVideoProcessor(), tokenizer=StanVideoProcessor())


def test_processor_save_load_round_trip_and_auto_processor(tmp_path, stan_processor, video_path):
    stan_processor.save_pretrained(tmp_path)
    assert {"processor_config.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    expected = stan_processor(text=CAPTIONS, videos=[video_path] * 2, return_tensors="pt", padding=True)
    AutoVideoProcessor.register(StanConfig, StanVideoProcessor)
    AutoProcessor.register(StanConfig, StanProcessor)
    for loader in (StanProcessor, AutoProcessor):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is StanProcessor and type(loaded.video_processor) is StanVideoProcessor
        assert loaded.video_processor.to_dict() == stan_processor.video_processor.to_dict()
        output = loaded(text=CAPTIONS, videos=[video_path] * 2, return_tensors="pt", padding=True)
        for key in expected:
            torch.testing.assert_close(output[key], expected[key], rtol=0, atol=0)


_FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from transformers import AutoProcessor

    directory, video, out_path, *captions = sys.argv[1:]
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    assert type(processor.video_processor).__module__.startswith("transformers_modules")
    output = processor(text=captions, videos=[video, video], return_tensors="pt", padding=True)
    torch.save(dict(output), out_path)
    """
)


def test_remote_code_processor_loads_in_a_fresh_process(tmp_path, stan_processor, video_path, monkeypatch):
    # register_for_auto_class sets class attributes; monkeypatch restores them for the other tests.
    monkeypatch.setattr(StanProcessor, "_auto_class", None)
    monkeypatch.setattr(StanVideoProcessor, "_auto_class", None)
    StanProcessor.register_for_auto_class("AutoProcessor")
    directory = tmp_path / "processor"
    stan_processor.save_pretrained(directory)
    assert {"processing_stan.py", "video_processing_stan.py", "video_io.py"} <= set(os.listdir(directory))
    config = json.loads((directory / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_stan.StanProcessor"}
    assert config["video_processor"]["auto_map"]["AutoVideoProcessor"] == "video_processing_stan.StanVideoProcessor"

    script = tmp_path / "load.py"
    script.write_text(_FRESH_PROCESS_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-I", str(script), str(directory), str(video_path), str(tmp_path / "out.pt"), *CAPTIONS],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    expected = stan_processor(text=CAPTIONS, videos=[video_path] * 2, return_tensors="pt", padding=True)
    got = torch.load(tmp_path / "out.pt")
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
