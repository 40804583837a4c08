"""Processor of STAN: a CLIP tokenizer for captions and a `StanVideoProcessor` for videos, saved and loaded as one."""

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoInput

from .video_processing_stan import StanVideoProcessor, StanVideoProcessorKwargs


class StanProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments of `StanProcessor.__call__`: the tokenizer's and `StanVideoProcessorKwargs`."""

    videos_kwargs: StanVideoProcessorKwargs


class StanProcessor(ProcessorMixin):
    r"""
    Wraps a [`StanVideoProcessor`] and a CLIP tokenizer into a single processor.

    `processor(text=captions, videos=videos, return_tensors="pt", padding=True, truncation=True, max_length=32)`
    returns `input_ids` and `attention_mask` for the text and `pixel_values` for the videos (see
    [`StanVideoProcessor`] for the accepted videos and the layout of `pixel_values`); either input may be omitted.
    Video options (`num_frames`, `train`, `num_crops`, ...) and text options (`padding`, `max_length`, ...) are
    passed the same way and reach the component they belong to.

    Args:
        video_processor ([`StanVideoProcessor`]): turns videos into `pixel_values`.
        tokenizer ([`CLIPTokenizer`]): turns captions into `input_ids` and `attention_mask`.
    """

    valid_processor_kwargs = StanProcessorKwargs

    def __init__(self, video_processor=None, tokenizer=None, **kwargs):
        super().__init__(video_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        videos: VideoInput | None = None,
        **kwargs: Unpack[StanProcessorKwargs],
    ) -> BatchFeature:
        for modality in ("images", "audio"):
            if kwargs.get(modality) is not None:
                raise TypeError(f"{type(self).__name__} takes text= and videos=, not {modality}=.")
        return super().__call__(text=text, videos=videos, **kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        # transformers exports `VideoProcessorMixin` (where the base method looks it up) only when torchvision is
        # installed; checking against the class itself keeps this processor torchvision-free.
        if argument_name != "video_processor":
            return super().check_argument_for_proper_class(argument_name, argument)
        if not isinstance(argument, VideoProcessorMixin):
            raise TypeError(f"video_processor must be a video processor, got {type(argument).__name__}.")
        return VideoProcessorMixin

    def to_dict(self):
        # `save_pretrained` writes the remote-code `auto_map` entry and `from_pretrained` drops it again; naming it
        # here keeps a processor's dict the same before saving and after loading.
        output = super().to_dict()
        if self._auto_class is not None:
            output["auto_map"] = {
                self._auto_class: f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            }
        return output

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Also registers the video processor: `AutoVideoProcessor` finds remote code only in its own `auto_map`."""
        super().register_for_auto_class(auto_class)
        StanVideoProcessor.register_for_auto_class("AutoVideoProcessor")


# Every saved processor names itself (and its video processor) in `auto_map` and carries its code, so that a checkpoint
# folder loads through AutoProcessor / AutoVideoProcessor where this package is not installed.
StanProcessor.register_for_auto_class()

__all__ = ["StanProcessor", "StanProcessorKwargs"]
