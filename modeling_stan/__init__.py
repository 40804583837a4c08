"""STAN and Mug-STAN video-text models for Hugging Face transformers."""

from .configuration_stan import StanConfig

__all__ = ["StanConfig"]
