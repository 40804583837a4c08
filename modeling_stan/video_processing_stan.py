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
    is_pil_image,
)
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin

from .video_io import SAMPLING_STRATEGIES, decode_video, sample_frame_indices


_INTERPOLATION_MODES = {PILImageResampling.BILINEAR: "bilinear", PILImageResampling.BICUBIC: "bicubic"}
# Keyword arguments of `VideosKwargs` that this processor does not implement: refused rather than ignored.
_UNSUPPORTED_OPTIONS = {
    "do_pad": (None, False),
    "video_metadata": (None,),
    "data_format": (None, "channels_first"),
    "do_convert_rgb": (None, True),  # frames are always RGB
}


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
    generator: torch.Generator | None


class StanVideoProcessor(VideoProcessorMixin):
    r"""
    Turns videos into STAN's `pixel_values`: `num_frames` frames per clip, resized (short side to `size`), cropped
    to `crop_size` and normalised with CLIP's mean and std; or, with `train=True`, frames at random positions and a
    random resized crop.

    Accepted videos, alone or in a list (a batch, whose videos may differ in length and size):
        - a path (`str` or `os.PathLike`), `bytes` or a binary file-like object, decoded with PyAV;
        - a `numpy.ndarray` of shape `(T, H, W, C)`, a `torch.Tensor` of shape `(T, C, H, W)` (uint8 or float on
          the 0-255 scale; `input_data_format` overrides the channel position), or a list of frames (PIL images,
          `(H, W, C)` arrays or `(C, H, W)` tensors); `C` is 3 (RGB) or 1 (grey). Such frames are sampled to
          `num_frames` with the same rule as decoded videos, so a decoded video and its frames give equal outputs.
        A 5-D array or tensor is a batch of equally long videos.

    Output: `BatchFeature` with `pixel_values` of shape `(B * num_clips * num_crops, num_frames, 3, height, width)`,
    float32. The views of a video are consecutive, clip-major: row `(b * num_clips + k) * num_crops + c` is crop `c`
    of clip `k` of video `b`; average the scores of a video's `num_clips * num_crops` rows for multi-view testing.
    With `return_metadata=True`, `video_metadata` lists each video's `video_io.VideoMetadata` (None for frames).

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

    def __init__(self, **kwargs: Unpack[StanVideoProcessorKwargs]):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)
        self._check_options({name: getattr(self, name, None) for name in self.valid_kwargs.__annotations__})

    @classmethod
    def for_image_size(cls, image_size: int, num_frames: int = 8, **kwargs) -> "StanVideoProcessor":
        """A processor for a vision tower of input size `image_size`: short side and square crop of that size."""
        return cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            num_frames=num_frames,
            **kwargs,
        )

    def _standardize_kwargs(self, random_resized_crop_scale=None, random_resized_crop_ratio=None, **kwargs) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        # JSON turns tuples into lists: one form keeps saved and loaded processors equal.
        for name, low_high in (("random_resized_crop_scale", random_resized_crop_scale),
                               ("random_resized_crop_ratio", random_resized_crop_ratio)):
            kwargs[name] = None if low_high is None else tuple(low_high)
        return kwargs

    def preprocess(self, videos, **kwargs: Unpack[StanVideoProcessorKwargs]) -> BatchFeature:
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

        clips, metadata = [], []
        for video in _as_video_list(videos):
            video_clips, video_metadata = self._load_clips(video, options)
            clips.append(video_clips.to(options["device"] or "cpu", torch.float32))
            metadata.append(video_metadata)
        views = [self._spatial_views(video_clips, options) for video_clips in clips]
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
        if options["sampling"] not in SAMPLING_STRATEGIES:
            raise ValueError(f"sampling must be one of {SAMPLING_STRATEGIES}, got {options['sampling']!r}.")
        if options["num_crops"] not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {options['num_crops']!r}.")
        if options["num_crops"] == 3 and not options["do_center_crop"]:
            raise ValueError("num_crops=3 takes crops of crop_size: it needs do_center_crop=True.")
        if options["train"] and options["do_random_resized_crop"] and options["num_crops"] != 1:
            raise ValueError("num_crops is a test-time option: training with a random resized crop takes one crop.")
        if options["do_resize"] or options["do_center_crop"] or options["do_random_resized_crop"]:
            _interpolation_mode(options["resample"])
        for name in ("random_resized_crop_scale", "random_resized_crop_ratio"):
            low_high = options[name]
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"{name} must be two numbers 0 < low <= high, got {low_high!r}.")

    def _load_clips(self, video, options: dict):
        """The clips of one video as a `(num_clips, T, C, H, W)` tensor, and its metadata (None for frames)."""
        sampling = {name: options[name] for name in ("num_frames", "sampling", "train", "num_clips", "frame_stride")}
        if _is_source(video):
            if not options["do_sample_frames"]:
                raise ValueError("do_sample_frames=False needs decoded frames; a path or bytes is always sampled.")
            frames, metadata = decode_video(
                video, target_fps=options["fps"], generator=options["generator"], **sampling
            )
            clips = torch.from_numpy(frames.reshape(options["num_clips"], *frames.shape[-4:]))
            return clips.permute(0, 1, 4, 2, 3), metadata
        frames = _frames_to_tensor(video, options["input_data_format"])
        if not options["do_sample_frames"]:
            return frames[None], None
        if options["sampling"] == "fps":
            raise ValueError('sampling="fps" needs frame timestamps: pass the video as a path, bytes or file.')
        indices = sample_frame_indices(len(frames), generator=options["generator"], **sampling)
        return frames[torch.from_numpy(indices)], None

    def _spatial_views(self, clips: torch.Tensor, options: dict) -> torch.Tensor:
        """`(num_clips, T, C, H, W)` -> `(num_clips * num_views, T, C, h, w)`: resized and cropped views."""
        mode = _interpolation_mode(options["resample"])
        if options["train"] and options["do_random_resized_crop"]:
            crop_size = (options["crop_size"].height, options["crop_size"].width)
            scale, ratio = options["random_resized_crop_scale"], options["random_resized_crop_ratio"]
            generator, views = options["generator"], []
            for clip in clips:
                top, left, height, width = _random_resized_crop_box(clip.shape[-2:], scale, ratio, generator)
                views.append(_resize(clip[..., top : top + height, left : left + width], crop_size, mode))
            return torch.stack(views)
        if options["do_resize"]:
            clips = _resize(clips, _resized_shape(clips.shape[-2:], options["size"]), mode)
        if options["do_center_crop"]:
            crop_size = (options["crop_size"].height, options["crop_size"].width)
            boxes = _crop_boxes(clips.shape[-2:], crop_size, options["num_crops"])
            height, width = crop_size
            views = [clip[..., top : top + height, left : left + width] for clip in clips for top, left in boxes]
            clips = torch.stack(views)
        return clips

    def _rescale_and_normalize(self, pixels: torch.Tensor, options: dict) -> torch.Tensor:
        if options["do_rescale"]:
            pixels = pixels * options["rescale_factor"]
        if options["do_normalize"]:
            mean = torch.tensor(options["image_mean"], dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
            std = torch.tensor(options["image_std"], dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.contiguous()


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
    raise TypeError(
        "videos must be a path, bytes, a file-like object, a (T, H, W, C) array, a (T, C, H, W) tensor, a list of "
        f"frames, or a list (batch) of those; got {type(videos).__name__}"
        + (f" of shape {tuple(videos.shape)}" if hasattr(videos, "shape") else "")
        + "."
    )


def _frames_to_tensor(video, input_data_format) -> torch.Tensor:
    """A `(T, 3, H, W)` tensor from a video given as frames (uint8 stays uint8, other types become float32)."""
    if isinstance(video, (list, tuple)):
        frames = [_frame_to_tensor(frame, input_data_format) for frame in video]
        if len({frame.shape for frame in frames}) > 1:
            raise ValueError(f"The frames of a video differ in shape: {sorted({tuple(f.shape) for f in frames})}.")
        tensor = torch.stack(frames)
    else:
        tensor = _as_tensor(video)
        if _channels_last(video, input_data_format):
            tensor = tensor.permute(0, 3, 1, 2)
    if len(tensor) == 0:
        raise ValueError("A video given as frames has no frames.")
    if tensor.shape[1] not in (1, 3):
        raise ValueError(
            f"Video frames must have 1 (grey) or 3 (RGB) channels, got a video of shape {tuple(tensor.shape)} "
            "read as (T, C, H, W): numpy arrays are read as (T, H, W, C) and tensors as (T, C, H, W) unless "
            "input_data_format says otherwise."
        )
    if tensor.dtype != torch.uint8:
        tensor = tensor.float()
    return tensor.expand(-1, 3, -1, -1)


def _frame_to_tensor(frame, input_data_format) -> torch.Tensor:
    """A `(C, H, W)` tensor from one frame: a PIL image, a `(H, W[, C])` array or a `([C,] H, W)` tensor."""
    if is_pil_image(frame):
        frame = np.asarray(frame.convert("RGB"))
    tensor = _as_tensor(frame)
    if tensor.ndim == 2:
        return tensor[None]
    return tensor.permute(2, 0, 1) if _channels_last(frame, input_data_format) else tensor


def _as_tensor(array) -> torch.Tensor:
    # torch shares numpy memory only for C-contiguous, writable arrays (not flipped views or PIL buffers): copy others.
    return torch.from_numpy(np.require(array, requirements=["C", "W"])) if isinstance(array, np.ndarray) else array


def _channels_last(video, input_data_format) -> bool:
    if input_data_format is None:
        return isinstance(video, np.ndarray)
    return ChannelDimension(input_data_format) == ChannelDimension.LAST


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
        short, long = sorted((height, width))
        new_long = int(long * size.shortest_edge / short + 0.5)
        return (size.shortest_edge, new_long) if height <= width else (new_long, size.shortest_edge)
    if size.height is not None and size.width is not None:
        return size.height, size.width
    raise ValueError(f"size must give shortest_edge, or height and width; got {dict(size)}.")


def _resize(pixels: torch.Tensor, shape: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize the last two dimensions of a float tensor of any leading shape."""
    if tuple(pixels.shape[-2:]) == tuple(shape):
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    resized = F.interpolate(flat, size=shape, mode=mode, antialias=True, align_corners=False)
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
