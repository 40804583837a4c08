"""STAN and Mug-STAN video-text models for Hugging Face transformers.

Importing this package registers the STAN classes with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification, AutoProcessor

# Not `from transformers import AutoVideoProcessor`: that top-level name needs torchvision.
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from .configuration_stan import StanConfig
from .modeling_stan import (
    NonFiniteInputError,
    StanForVideoClassification,
    StanForVideoTextRetrieval,
    StanModel,
    StanPreTrainedModel,
    StanVisionModel,
    video_text_contrastive_loss,
)
from .metrics import (
    aggregate_views,
    dual_softmax,
    gallery_to_query_metrics,
    querybank_normalize,
    retrieval_metrics,
    text_to_video_and_video_to_text,
    topk_accuracy,
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


AutoConfig.register(StanConfig.model_type, StanConfig, exist_ok=True)
AutoModel.register(StanConfig, StanModel, exist_ok=True)
AutoModelForVideoClassification.register(StanConfig, StanForVideoClassification, exist_ok=True)
AutoVideoProcessor.register(StanConfig, StanVideoProcessor, exist_ok=True)
AutoProcessor.register(StanConfig, StanProcessor, exist_ok=True)
StanConfig.register_for_auto_class()
register_pipelines()

__all__ = [
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
