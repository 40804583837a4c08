"""STAN and Mug-STAN video-text models for Hugging Face transformers.

Importing this package registers the STAN classes with the transformers Auto classes.

Layout: the modules at the top level of this package are exactly the remote code a saved checkpoint carries
(`REMOTE_CODE_MODULES`, checked against `save_pretrained` by the tests); tools live in subpackages named for their
job: `conversion/`, `data/`, `demo/`, `evaluation/`, `hub/`, `search/`, `tuning/`.
"""

import importlib.abc
import sys

from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification, AutoProcessor

# Not `from transformers import AutoVideoProcessor`: that top-level name needs torchvision.
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from .configuration_stan import StanConfig
from .evaluation.metrics import (
    aggregate_views,
    dual_softmax,
    gallery_to_query_metrics,
    querybank_normalize,
    retrieval_metrics,
    text_to_video_and_video_to_text,
    topk_accuracy,
)
from .modeling_stan import (
    NonFiniteInputError,
    StanForVideoClassification,
    StanForVideoTextRetrieval,
    StanModel,
    StanPreTrainedModel,
    StanVisionModel,
    video_text_contrastive_loss,
)
from .mug_alignment import mug_similarity
from .pipeline_zero_shot_video_classification import ZeroShotVideoClassificationPipeline, register_pipelines
from .processing_stan import StanProcessor
from .video_io import (
    InvalidFramesError,
    NotAVideoError,
    VideoDecodeError,
    VideoMetadata,
    decode_video,
    sample_frame_indices,
)
from .video_processing_stan import StanVideoProcessor


# The files `save_pretrained` copies into every checkpoint: the flat top level of this package, nothing else.
REMOTE_CODE_MODULES = (
    "configuration_stan",
    "modeling_stan",
    "mug_alignment",
    "vifi_prompts",
    "pipeline_zero_shot_video_classification",
    "processing_stan",
    "video_processing_stan",
    "video_io",
)

# Tools that moved into subpackages: importing (or `python -m`) the old path names the new one.
MOVED_MODULES = {
    "convert_original_checkpoint": ("modeling_stan.conversion.convert_original_checkpoint", "stan-convert"),
    "metrics": ("modeling_stan.evaluation.metrics", None),
    "model_card": ("modeling_stan.hub.model_card", "stan-cards"),
    "video_datasets": ("modeling_stan.data.video_datasets", None),
    "synthetic_videos": ("modeling_stan.demo.synthetic_videos", "stan-synthetic-videos"),
    "testing_utils": ("modeling_stan.demo.tiny_clip", None),
    "video_search": ("modeling_stan.search.video_search", "stan-search"),
    "video_index": ("modeling_stan.search.video_index", None),
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers an import of a moved tool with one line naming its new module (and console script)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED_MODULES:
            return None
        new_module, script = MOVED_MODULES[name]
        command = f" (or the `{script}` command)" if script else ""
        raise ModuleNotFoundError(f"{fullname} moved to {new_module}{command}.", name=fullname)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

AutoConfig.register(StanConfig.model_type, StanConfig, exist_ok=True)
AutoModel.register(StanConfig, StanModel, exist_ok=True)
AutoModelForVideoClassification.register(StanConfig, StanForVideoClassification, exist_ok=True)
AutoVideoProcessor.register(StanConfig, StanVideoProcessor, exist_ok=True)
AutoProcessor.register(StanConfig, StanProcessor, exist_ok=True)
StanConfig.register_for_auto_class()
register_pipelines()

__all__ = [
    "REMOTE_CODE_MODULES",
    "StanConfig",
    "StanPreTrainedModel",
    "StanVisionModel",
    "StanModel",
    "StanForVideoTextRetrieval",
    "StanForVideoClassification",
    "video_text_contrastive_loss",
    "NonFiniteInputError",
    "StanVideoProcessor",
    "StanProcessor",
    "VideoDecodeError",
    "NotAVideoError",
    "InvalidFramesError",
    "VideoMetadata",
    "decode_video",
    "sample_frame_indices",
    "ZeroShotVideoClassificationPipeline",
    "mug_similarity",
    "retrieval_metrics",
    "gallery_to_query_metrics",
    "text_to_video_and_video_to_text",
    "dual_softmax",
    "querybank_normalize",
    "topk_accuracy",
    "aggregate_views",
]
