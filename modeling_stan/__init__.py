"""STAN and Mug-STAN video-text models for Hugging Face transformers.

Importing this package registers the STAN classes with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification

from .configuration_stan import StanConfig
from .modeling_stan import (
    StanForVideoClassification,
    StanForVideoTextRetrieval,
    StanModel,
    StanPreTrainedModel,
    StanVisionModel,
    video_text_contrastive_loss,
)


AutoConfig.register(StanConfig.model_type, StanConfig, exist_ok=True)
AutoModel.register(StanConfig, StanModel, exist_ok=True)
AutoModelForVideoClassification.register(StanConfig, StanForVideoClassification, exist_ok=True)
StanConfig.register_for_auto_class()

__all__ = [
    "StanConfig",
    "StanPreTrainedModel",
    "StanVisionModel",
    "StanModel",
    "StanForVideoTextRetrieval",
    "StanForVideoClassification",
    "video_text_contrastive_loss",
]
