"""Video processor of STAN: frame sampling, resizing, cropping and CLIP normalisation, in torch alone.

transformers' `BaseVideoProcessor` needs torchvision (its class is a placeholder that raises without it) and decodes
with torchcodec, so `StanVideoProcessor` builds on `VideoProcessorMixin`, the torchvision-free part of it that gives
`save_pretrained`/`from_pretrained` (`video_preprocessor_config.json`), `register_for_auto_class` and resolution by
`AutoVideoProcessor`. Decoding goes through `video_io.decode_video` (PyAV) and the image operations are plain torch.
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import validate_typed_dict
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    PILImageResampling,
    infer_channel_dimension_format,
    is_pil_image,
)
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoInput

from .video_io import SAMPLING_STRATEGIES, InvalidFramesError, decode_video, sample_frame_indices


_INTERPOLATION_MODES = {PILImageResampling.BILINEAR: "bilinear", PILImageResampling.BICUBIC: "bicubic"}
# Keyword arguments of `VideosKwargs` that this processor does not implement: refused rather than ignored.
_UNSUPPORTED_OPTIONS = {
    "do_pad": (None, False),
    "video_metadata": (None,),
    "data_format": (None, "channels_first"),
    "do_convert_rgb": (None, True),  # frames are always RGB
}
# Options that are whole numbers >= 1 (num_frames only when frames are sampled).
_COUNT_OPTIONS = ("num_frames", "num_clips", "frame_stride")
# Integer dtypes read as values on the 0-255 scale (after a range check); uint16 is refused: its bit depth is unknown.
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class StanVideoProcessorKwargs(VideosKwargs, total=False):
    r"""
    sampling (`str`, *optional*, defaults to `"uniform"`):
        Frame sampling strategy of `video_io.sample_frame_indices`: `"uniform"`, `"dense"` or `"fps"` (frames `1 / fps`
        seconds apart; decoded sources only).
    num_clips (`int`, *optional*, defaults to 1):
        Clips (temporal views) taken from each video.
    frame_stride (`int`, *optional*, defaults to 4):
        Frame distance within a `"dense"` clip.
    num_crops (`int`, *optional*, defaults to 1):
        Spatial views at test time: 1 (centre crop) or 3 (three crops along the long side).
    train (`bool`, *optional*, defaults to `False`):
        Training mode: random frame positions and, with `do_random_resized_crop`, a random resized crop.
    do_random_resized_crop (`bool`, *optional*, defaults to `True`):
        Whether training mode crops a random box (area fraction in `random_resized_crop_scale`, aspect ratio in
        `random_resized_crop_ratio`, the same box for all frames of a clip) resized to `crop_size`. When `False`,
        training uses the test-time resize and centre crop.
    random_resized_crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.08, 1.0)`):
        Range of the crop's area as a fraction of the frame's.
    random_resized_crop_ratio (`tuple[float, float]`, *optional*, defaults to `(3/4, 4/3)`):
        Range of the crop's width / height.
    multi_scale_crop_scales (`tuple[float, ...]`, *optional*):
        When given, training mode crops as ViFi-CLIP does instead (mmaction `MultiScaleCrop`, `random_crop=False`):
        after the test-time resize, a box whose sides are these fractions of the short side (at most one scale
        apart, snapped to `crop_size` within 3 pixels) at one of 5 fixed positions (corners, centre), resized to
        `crop_size`.
    generator (`torch.Generator`, *optional*):
        Randomness of training mode (frame positions and crops); torch's global generator when not given.
    """

    sampling: str | None
    num_clips: int | None
    frame_stride: int | None
    num_crops: int | None
    train: bool | None
    do_random_resized_crop: bool | None
    random_resized_crop_scale: list[int | float] | tuple[int | float, ...] | None
    random_resized_crop_ratio: list[int | float] | tuple[int | float, ...] | None
    multi_scale_crop_scales: list[int | float] | tuple[int | float, ...] | None
    generator: torch.Generator | None


class StanVideoProcessor(VideoProcessorMixin):
    r"""
    Turns videos into STAN's `pixel_values`: `num_frames` frames per clip, resized (short side to `size`), cropped
    to `crop_size` and normalised with CLIP's mean and std; or, with `train=True`, frames at random positions and a
    random resized crop.

    Accepted videos, alone or in a list (a batch, whose videos may differ in length and size):
        - a path (`str` or `os.PathLike`), `bytes` or a binary file-like object, decoded with PyAV. A path must be
          a regular file (a directory, FIFO, device or socket, or a symbolic link loop raises `NotAVideoError` before
          anything is opened), and a still image (`.jpg`, `.png`, ...) is refused with `NotAVideoError`: pass an
          image as a one-frame video, `[image]` or an array of shape `(1, H, W, C)`;
        - a `numpy.ndarray` or `torch.Tensor` of shape `(T, H, W, C)` or `(T, C, H, W)`, or a list of frames (PIL
          images, `(H, W)` grey arrays, 3-D arrays or tensors); `C` is 3 (RGB) or 1 (grey). Such frames are sampled
          to `num_frames` with the same rule as decoded videos, so a decoded video and its frames give equal outputs.
        A 5-D array or tensor is a batch of equally long videos.

    Channel axis: `input_data_format` (`"channels_last"` or `"channels_first"`) when given; otherwise inferred from
    the shape as transformers' image processors infer it (`infer_channel_dimension_format`): the axis of size 1 or 3
    among the first and last axes of a frame; when both are (e.g. 3x3 frames), channels first, with a warning.

    Frame values: uint8, or other integers in 0-255, or float on the 0-255 scale (`do_rescale=True` multiplies by
    `rescale_factor`, 1/255). Values that cannot be read without a guess raise `InvalidFramesError` (a
    `VideoDecodeError`) naming the video: non-finite values (NaN, inf), bool or uint16 frames, values outside
    0-255, and float frames within (0, 1], which look already rescaled (multiply by 255, or pass
    `do_rescale=False`; with `do_rescale=False` only finiteness is checked). Nothing is coerced silently.

    Output: `BatchFeature` with `pixel_values` of shape `(B * num_clips * num_crops, num_frames, 3, height, width)`,
    float32. The views of a video are consecutive, clip-major: row `(b * num_clips + k) * num_crops + c` is crop `c`
    of clip `k` of video `b`; average the scores of a video's `num_clips * num_crops` rows for multi-view testing.
    With `return_metadata=True`, `video_metadata` lists each video's `video_io.VideoMetadata` (None for frames).

    Options: `image_mean` / `image_std` are one number (for every channel) or one per channel. `fps` is used only
    with `sampling="fps"` and refused otherwise; options this processor does not implement (`do_pad=True`,
    `video_metadata`, `data_format="channels_last"`, `do_convert_rgb=False`) are refused rather than ignored.

    Memory: videos are processed one at a time, and a decoded video is resized frame by frame as it is decoded (in
    test mode; training crops a random box of the full frame first), so memory follows the output size rather than
    the sources' resolution. Frames given in memory are converted to float32 one frame at a time while resizing.

    Images are resized in float32 with antialiasing and not rounded back to integers, so uint8 and float inputs
    with the same values give the same output.
    """

    valid_kwargs = StanVideoProcessorKwargs
    model_input_names = ["pixel_values"]

    do_resize = True
    default_to_square = False  # an integer size is the short side
    size = {"shortest_edge": 224}
    resample = PILImageResampling.BILINEAR  # the authors' training and test pipelines resize bilinearly
    do_center_crop = True
    crop_size = {"height": 224, "width": 224}
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True  # frames always come out RGB: PIL images are converted, grey frames repeated
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_sample_frames = True
    num_frames = 8
    sampling = "uniform"
    num_clips = 1
    frame_stride = 4
    num_crops = 1
    train = False
    do_random_resized_crop = True
    random_resized_crop_scale = (0.08, 1.0)
    random_resized_crop_ratio = (3 / 4, 4 / 3)
    multi_scale_crop_scales = None

    def __init__(self, **kwargs: Unpack[StanVideoProcessorKwargs]):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)
        self._check_options({name: getattr(self, name, None) for name in self.valid_kwargs.__annotations__})

    @classmethod
    def for_image_size(
        cls, image_size: int, num_frames: int = 8, short_side: int | None = None, **kwargs
    ) -> "StanVideoProcessor":
        """A processor for a vision tower of input size `image_size`: a square crop of that size from frames
        resized to short side `short_side` (default `image_size`)."""
        return cls(
            size={"shortest_edge": short_side or image_size},
            crop_size={"height": image_size, "width": image_size},
            num_frames=num_frames,
            **kwargs,
        )

    def _standardize_kwargs(
        self, random_resized_crop_scale=None, random_resized_crop_ratio=None, multi_scale_crop_scales=None, **kwargs
    ) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        # JSON turns tuples into lists: one form keeps saved and loaded processors equal.
        for name, values in (
            ("random_resized_crop_scale", random_resized_crop_scale),
            ("random_resized_crop_ratio", random_resized_crop_ratio),
            ("multi_scale_crop_scales", multi_scale_crop_scales),
        ):
            kwargs[name] = None if values is None else tuple(values)
        return kwargs

    def preprocess(self, videos: VideoInput, **kwargs: Unpack[StanVideoProcessorKwargs]) -> BatchFeature:
        unknown = sorted(set(kwargs) - set(self.valid_kwargs.__annotations__))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {unknown}; valid ones are "
                f"{sorted(self.valid_kwargs.__annotations__)}."
            )
        validate_typed_dict(self.valid_kwargs, kwargs)
        options = {name: kwargs.get(name, getattr(self, name, None)) for name in self.valid_kwargs.__annotations__}
        options = self._standardize_kwargs(**options)
        self._check_options(options)

        # One video at a time, each reduced to its output views before the next is loaded: memory follows the
        # output size, not the sources' resolution.
        views, metadata = [], []
        for position, video in enumerate(_as_video_list(videos)):
            video_clips, video_metadata = self._load_clips(video, options, position)
            views.append(self._spatial_views(video_clips.to(options["device"] or "cpu"), options))
            metadata.append(video_metadata)
        if len({view.shape[1:] for view in views}) > 1:
            raise ValueError(
                f"The processed videos differ in shape {sorted({tuple(view.shape[1:]) for view in views})}: a batch "
                "needs equal frame counts (do_sample_frames=True) and sizes (do_center_crop=True, or training with "
                "do_random_resized_crop=True)."
            )
        data = {"pixel_values": self._rescale_and_normalize(torch.cat(views), options)}
        if options["return_metadata"]:
            data["video_metadata"] = metadata
        return BatchFeature(data, tensor_type=options["return_tensors"], skip_tensor_conversion=["video_metadata"])

    def _check_options(self, options: dict) -> None:
        self._validate_preprocess_kwargs(**options)
        for name, allowed in _UNSUPPORTED_OPTIONS.items():
            if options.get(name) not in allowed:
                raise ValueError(f"{type(self).__name__} does not support {name}={options[name]!r}.")
        for name in _COUNT_OPTIONS if options["do_sample_frames"] else _COUNT_OPTIONS[1:]:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        _check_sampling_options(options["sampling"], options["fps"])
        if options["num_crops"] not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {options['num_crops']!r}.")
        if options["num_crops"] == 3 and not options["do_center_crop"]:
            raise ValueError("num_crops=3 takes crops of crop_size: it needs do_center_crop=True.")
        if options["train"] and options["do_random_resized_crop"] and options["num_crops"] != 1:
            raise ValueError("num_crops is a test-time option: training with a random resized crop takes one crop.")
        if options["do_resize"] or options["do_center_crop"] or options["do_random_resized_crop"]:
            _interpolation_mode(options["resample"])
        if options["do_resize"]:
            _resized_shape((1, 1), options["size"])  # checks that size is complete and positive
        if options["do_center_crop"] or options["do_random_resized_crop"]:
            _check_positive_sizes("crop_size", options["crop_size"], ("height", "width"))
        if options["do_rescale"] and not _is_finite_number(options["rescale_factor"]):
            raise ValueError(f"rescale_factor must be a finite number, got {options['rescale_factor']!r}.")
        if options["do_normalize"]:
            _channel_values("image_mean", options["image_mean"])
            if (_channel_values("image_std", options["image_std"]) == 0).any():
                raise ValueError(f"image_std must not be 0, got {options['image_std']!r}.")
        for name in ("random_resized_crop_scale", "random_resized_crop_ratio"):
            low_high = options[name]
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"{name} must be two numbers 0 < low <= high, got {low_high!r}.")
        scales = options["multi_scale_crop_scales"]
        if scales is not None and (not scales or not all(_is_finite_number(x) and 0 < x <= 1 for x in scales)):
            raise ValueError(f"multi_scale_crop_scales must be numbers in (0, 1], got {scales!r}.")

    def _load_clips(self, video, options: dict, position: int):
        """The clips of one video as a `(num_clips, T, C, H, W)` tensor, and its metadata (None for frames).

        Decoded videos that the test-time pipeline resizes come out resized (float32): each frame is resized as it
        is decoded. Other clips keep their dtype and size until `_spatial_views`.
        """
        sampling = {name: options[name] for name in ("num_frames", "sampling", "train", "num_clips", "frame_stride")}
        if _is_source(video):
            if not options["do_sample_frames"]:
                raise ValueError("do_sample_frames=False needs decoded frames; a path or bytes is always sampled.")
            transform = self._decode_time_resize(options)
            frames, metadata = decode_video(
                video, target_fps=options["fps"], generator=options["generator"], frame_transform=transform, **sampling
            )
            clips = torch.from_numpy(frames.reshape(options["num_clips"], *frames.shape[-4:]))
            # Without a transform, frames are (H, W, 3) uint8; the transform gives (3, h, w) float32.
            return (clips if transform else clips.permute(0, 1, 4, 2, 3)), metadata
        description = _describe_frames(video, position)
        frames = _frames_to_tensor(video, options["input_data_format"], description)
        _check_frame_values(frames, options["do_rescale"], description)
        if not options["do_sample_frames"]:
            return frames[None], None
        if options["sampling"] == "fps":
            raise ValueError('sampling="fps" needs frame timestamps: pass the video as a path, bytes or file.')
        indices = sample_frame_indices(len(frames), generator=options["generator"], **sampling)
        return frames[torch.from_numpy(indices)], None

    @staticmethod
    def _decode_time_resize(options: dict):
        """The test-time resize as a per-frame `decode_video` transform; None where frames must stay whole (training
        crops a random box of the full frame first) or are not resized."""
        if not options["do_resize"] or _train_crop(options) == "random_resized":
            return None
        size, mode = options["size"], _interpolation_mode(options["resample"])

        def resize_frame(rgb: np.ndarray) -> np.ndarray:
            frame = torch.from_numpy(rgb).permute(2, 0, 1)
            return _resize(frame, _resized_shape(frame.shape[-2:], size), mode).numpy()

        return resize_frame

    def _spatial_views(self, clips: torch.Tensor, options: dict) -> torch.Tensor:
        """`(num_clips, T, C, H, W)` -> `(num_clips * num_views, T, C, h, w)` float32: resized and cropped views."""
        mode = _interpolation_mode(options["resample"])
        if _train_crop(options) == "multi_scale":
            crop_size = (options["crop_size"].height, options["crop_size"].width)
            if options["do_resize"]:
                clips = _resize(clips, _resized_shape(clips.shape[-2:], options["size"]), mode)
            views = []
            for clip in clips:
                top, left, height, width = _multi_scale_crop_box(
                    clip.shape[-2:], options["multi_scale_crop_scales"], crop_size, options["generator"]
                )
                views.append(_resize(clip[..., top : top + height, left : left + width], crop_size, mode))
            return torch.stack(views)
        if _train_crop(options) == "random_resized":
            crop_size = (options["crop_size"].height, options["crop_size"].width)
            scale, ratio = options["random_resized_crop_scale"], options["random_resized_crop_ratio"]
            generator, views = options["generator"], []
            for clip in clips:
                top, left, height, width = _random_resized_crop_box(clip.shape[-2:], scale, ratio, generator)
                views.append(_resize(clip[..., top : top + height, left : left + width], crop_size, mode))
            return torch.stack(views)
        if options["do_resize"]:
            # A no-op for decoded videos, resized while decoding (a resize to `size` is idempotent).
            clips = _resize(clips, _resized_shape(clips.shape[-2:], options["size"]), mode)
        if options["do_center_crop"]:
            crop_size = (options["crop_size"].height, options["crop_size"].width)
            boxes = _crop_boxes(clips.shape[-2:], crop_size, options["num_crops"])
            height, width = crop_size
            views = [clip[..., top : top + height, left : left + width] for clip in clips for top, left in boxes]
            clips = torch.stack(views)
        return clips.float()

    def _rescale_and_normalize(self, pixels: torch.Tensor, options: dict) -> torch.Tensor:
        if options["do_rescale"]:
            pixels = pixels * options["rescale_factor"]
        if options["do_normalize"]:
            mean = _channel_values("image_mean", options["image_mean"]).to(pixels).view(3, 1, 1)
            std = _channel_values("image_std", options["image_std"]).to(pixels).view(3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.contiguous()


def _train_crop(options: dict) -> str | None:
    """The training crop: "multi_scale" (ViFi-CLIP's), "random_resized", or None (the test-time crop)."""
    if not options["train"]:
        return None
    if options["multi_scale_crop_scales"]:
        return "multi_scale"
    return "random_resized" if options["do_random_resized_crop"] else None


def _is_source(video) -> bool:
    """A video still to decode: a path, bytes or a binary file-like object."""
    return isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(video, "read")


def _is_frame(item) -> bool:
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim in (2, 3)
    return is_pil_image(item)


def _as_video_list(videos) -> list:
    """A list of single videos from one video or a batch (see `StanVideoProcessor` for the accepted forms)."""
    if _is_source(videos) or (isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, (list, tuple)) and videos:
        if all(_is_frame(item) for item in videos):
            return [list(videos)]
        if not any(_is_frame(item) for item in videos):
            return list(videos)
        raise ValueError("A list of videos mixes single frames and whole videos; pass a list of one or the other.")
    if _is_frame(videos):
        raise TypeError(
            "videos got a single image; pass an image as a one-frame video: [image], or an array of shape "
            "(1, H, W, C) / a tensor of shape (1, C, H, W)."
        )
    raise TypeError(
        "videos must be a path, bytes, a file-like object, a (T, H, W, C) or (T, C, H, W) array or tensor, a list of "
        f"frames, or a list (batch) of those; got {type(videos).__name__}"
        + (f" of shape {tuple(videos.shape)}" if hasattr(videos, "shape") else "")
        + "."
    )


def _describe_frames(video, position: int) -> str:
    """Printable description of a video given as frames, for error messages."""
    if isinstance(video, (np.ndarray, torch.Tensor)):
        kind = f"{type(video).__module__.split('.')[0]}.{type(video).__name__} {tuple(video.shape)} {video.dtype}"
    else:
        kind = f"list of {len(video)} frames"
    return f"<video {position} of the batch: {kind}>"


def _frames_to_tensor(video, input_data_format, description: str) -> torch.Tensor:
    """A `(T, 3, H, W)` tensor from a video given as frames, in its own dtype (converted to float32 frame by frame,
    later, by `_resize`). The channel axis is `input_data_format`'s, or inferred as transformers infers it."""
    if isinstance(video, (list, tuple)):
        frames = [_frame_to_tensor(frame, input_data_format, description) for frame in video]
        if len({frame.shape for frame in frames}) > 1:
            shapes = sorted({tuple(frame.shape) for frame in frames})
            raise InvalidFramesError(description, f"the frames differ in shape: {shapes}")
        tensor = torch.stack(frames)
    else:
        tensor = _as_tensor(video, description)
        if _channel_dimension(tensor, input_data_format, description) == ChannelDimension.LAST:
            tensor = tensor.permute(0, 3, 1, 2)
    if len(tensor) == 0:
        raise InvalidFramesError(description, "the video has no frames")
    if tensor.shape[1] not in (1, 3):
        raise InvalidFramesError(
            description,
            f"video frames must have 1 (grey) or 3 (RGB) channels, got shape {tuple(tensor.shape)} read as (T, C, H, "
            "W) (input_data_format sets where the channels are; convert RGBA or other layouts to RGB first)",
        )
    return tensor.expand(-1, 3, -1, -1)


def _frame_to_tensor(frame, input_data_format, description: str) -> torch.Tensor:
    """A `(C, H, W)` tensor from one frame: a PIL image, a `(H, W)` grey array or a 3-D array or tensor."""
    if is_pil_image(frame):
        frame = np.asarray(frame.convert("RGB"))
    tensor = _as_tensor(frame, description)
    if tensor.ndim == 2:
        return tensor[None]
    if _channel_dimension(tensor, input_data_format, description) == ChannelDimension.LAST:
        return tensor.permute(2, 0, 1)
    return tensor


def _as_tensor(array, description: str) -> torch.Tensor:
    if not isinstance(array, np.ndarray):
        return array
    try:
        # torch shares numpy memory only for C-contiguous, writable arrays (not flipped views or PIL buffers).
        return torch.from_numpy(np.require(array, requirements=["C", "W"]))
    except TypeError:  # object, string and other dtypes torch has no counterpart for
        raise InvalidFramesError(description, f"frames of dtype {array.dtype} are not pixel values") from None


def _channel_dimension(frames: torch.Tensor, input_data_format, description: str) -> ChannelDimension:
    """The channel axis of a `(T, ?, ?, ?)` video or `(?, ?, ?)` frame: the given one, else inferred from the shape
    like transformers' image processors: the axis of size 1 or 3, the first one when both are (with a warning)."""
    if input_data_format is not None:
        return ChannelDimension(input_data_format)
    try:
        return infer_channel_dimension_format(frames)
    except ValueError:
        raise InvalidFramesError(
            description,
            f"video frames must have 1 (grey) or 3 (RGB) channels, got shape {tuple(frames.shape)}: no channel axis "
            "(first or last after the frame axis) of size 1 or 3",
        ) from None


def _check_frame_values(frames: torch.Tensor, do_rescale: bool, description: str) -> None:
    """Refuse frame values whose reading would be a guess: non-finite values, bool or uint16 frames, integers outside
    0-255, and (when `do_rescale` expects the 0-255 scale) float frames outside it or seemingly already in [0, 1]."""
    dtype = frames.dtype
    if dtype == torch.uint8:
        return
    if dtype == torch.bool:
        raise InvalidFramesError(description, "bool frames are not pixel values; convert them to uint8 (0 or 255)")
    if dtype == torch.uint16:
        raise InvalidFramesError(
            description,
            "uint16 frames do not say their bit depth (16, 12 or 10 bits); convert them to uint8 (e.g. frames >> 8 "
            "for 16 bits) or to float on the 0-255 scale",
        )
    if dtype not in _INTEGER_DTYPES and not dtype.is_floating_point:
        raise InvalidFramesError(description, f"frames of dtype {dtype} are not pixel values")
    if dtype.is_floating_point:
        non_finite = frames.numel() - int(torch.isfinite(frames).sum())
        if non_finite:
            raise InvalidFramesError(description, f"{non_finite} non-finite values (NaN or inf) in the frames")
    low, high = (float(value) for value in frames.aminmax())
    if not do_rescale:
        return  # the caller has already scaled the values as the model expects
    if low < 0 or high > 255:
        raise InvalidFramesError(
            description,
            f"frame values range over [{low:g}, {high:g}], outside the 0-255 scale that do_rescale=True expects "
            "(pass do_rescale=False for values already rescaled)",
        )
    if dtype.is_floating_point and 0 < high <= 1:
        raise InvalidFramesError(
            description,
            f"float frames range over [{low:g}, {high:g}]: they look already rescaled to [0, 1], but do_rescale=True "
            "expects the 0-255 scale; multiply them by 255 or pass do_rescale=False",
        )


def _check_sampling_options(sampling, fps) -> None:
    if sampling not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling must be one of {SAMPLING_STRATEGIES}, got {sampling!r}.")
    if sampling == "fps" and not (_is_finite_number(fps) and fps > 0):
        raise ValueError(f'sampling="fps" needs fps, the frames per second to sample, a number > 0; got {fps!r}.')
    if sampling != "fps" and fps is not None:
        raise ValueError(
            f'fps={fps!r} applies only with sampling="fps" (frames 1 / fps seconds apart); with sampling={sampling!r} '
            'it would be ignored. Pass sampling="fps" too, or leave fps out.'
        )


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_sizes(name: str, size, keys) -> None:
    values = [getattr(size, key) for key in keys]
    if any(isinstance(value, bool) or not isinstance(value, int) or value < 1 for value in values):
        raise ValueError(f"{name} must give {' and '.join(keys)} as integers >= 1; got {dict(size)}.")


def _channel_values(name: str, value) -> torch.Tensor:
    """`image_mean` / `image_std` as three float64 values: one number is used for every channel."""
    values = [value] if _is_finite_number(value) else value
    if (
        not isinstance(values, (list, tuple))
        or len(values) not in (1, 3)
        or not all(_is_finite_number(item) for item in values)
    ):
        raise ValueError(f"{name} must be a number or a list of 1 or 3 numbers (one per RGB channel), got {value!r}.")
    return torch.tensor(values, dtype=torch.float64).expand(3)


def _interpolation_mode(resample) -> str:
    try:
        return _INTERPOLATION_MODES[PILImageResampling(resample)]
    except (ValueError, KeyError):
        raise ValueError(
            f"resample must be PILImageResampling.BILINEAR or BICUBIC (2 or 3), got {resample!r}."
        ) from None


def _resized_shape(shape, size) -> tuple[int, int]:
    """Output (height, width) of a resize to `size`: `shortest_edge` keeps the aspect ratio, `height`/`width` not."""
    height, width = shape
    if size.shortest_edge is not None:
        _check_positive_sizes("size", size, ("shortest_edge",))
        short, long = sorted((height, width))
        new_long = int(long * size.shortest_edge / short + 0.5)
        return (size.shortest_edge, new_long) if height <= width else (new_long, size.shortest_edge)
    if size.height is not None and size.width is not None:
        _check_positive_sizes("size", size, ("height", "width"))
        return size.height, size.width
    raise ValueError(f"size must give shortest_edge, or height and width; got {dict(size)}.")


def _resize(pixels: torch.Tensor, shape: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize the last two dimensions of a tensor of any leading shape and dtype to float32.

    Frame by frame: only one frame at a time is held in float32 at the source resolution.
    """
    if tuple(pixels.shape[-2:]) == tuple(shape):
        return pixels.float()
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    resized = torch.empty(len(flat), flat.shape[1], *shape, dtype=torch.float32, device=pixels.device)
    for index, frame in enumerate(flat):
        resized[index] = F.interpolate(frame[None].float(), size=shape, mode=mode, antialias=True, align_corners=False)
    if mode == "bicubic":  # bicubic overshoots; keep values in the pixel range as PIL does
        resized = resized.clamp(0, 255)
    return resized.reshape(*pixels.shape[:-2], *shape)


def _crop_boxes(shape, crop_size, num_crops: int) -> list[tuple[int, int]]:
    """(top, left) of the centre crop, or of three crops spread along the long side (start, centre, end)."""
    (height, width), (crop_height, crop_width) = shape, crop_size
    if crop_height > height or crop_width > width:
        raise ValueError(f"crop_size {crop_size} is larger than the resized frames {tuple(shape)}.")
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if num_crops == 1:
        return [(top, left)]
    if width >= height:
        return [(top, 0), (top, left), (top, width - crop_width)]
    return [(0, left), (top, left), (height - crop_height, left)]


def _multi_scale_crop_box(shape, scales, crop_size, generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of ViFi-CLIP's training crop (mmaction `MultiScaleCrop`, `max_wh_scale_gap=1`,
    `random_crop=False`, 5 fixed crops): sides from `scales` of the short side, at most one scale apart, each snapped
    to `crop_size` within 3 pixels, at a corner or the centre of a grid of quarter steps."""
    height, width = shape
    sides = [int(min(height, width) * scale) for scale in scales]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    box_height, box_width = pairs[int(torch.randint(len(pairs), (), generator=generator))]
    box_height = crop_size[0] if abs(box_height - crop_size[0]) < 3 else box_height
    box_width = crop_size[1] if abs(box_width - crop_size[1]) < 3 else box_width
    step_y, step_x = (height - box_height) // 4, (width - box_width) // 4
    positions = [(0, 0), (0, 4 * step_x), (4 * step_y, 0), (4 * step_y, 4 * step_x), (2 * step_y, 2 * step_x)]
    top, left = positions[int(torch.randint(len(positions), (), generator=generator))]
    return top, left, box_height, box_width


def _random_resized_crop_box(shape, scale, ratio, generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random box with area fraction in `scale` and width/height in `ratio`.

    Up to ten draws; when none fits in the frame, the largest centred box whose aspect ratio is within `ratio`.
    """
    height, width = shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(draws[2] * (height - box_height + 1))
            left = int(draws[3] * (width - box_width + 1))
            return top, left, box_height, box_width
    # Fallback: the whole frame, narrowed to the nearest allowed aspect ratio.
    box_height, box_width = height, width
    if width / height < ratio[0]:
        box_height = round(width / ratio[0])
    elif width / height > ratio[1]:
        box_width = round(height * ratio[1])
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


__all__ = ["StanVideoProcessor", "StanVideoProcessorKwargs"]
