"""Tiny, fully offline CLIP checkpoints for tests, demos and the default training job.

Nothing here downloads anything: the tokenizer is a real CLIP BPE tokenizer whose vocabulary is built locally
(every lowercase character, alone and word-final, plus whole words for the captions our synthetic videos use),
and the model is a seeded random `CLIPModel` small enough to train on two CPU cores.
"""

import string
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer


BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Whole words get single tokens so that captions stay short; any other lowercase text still tokenizes
# character by character.
CAPTION_WORDS = (
    "a an the video of and is in on to from moves travels towards shape left right top bottom up down "
    "red green blue yellow purple orange white black cyan magenta square circle triangle"
).split()

TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=6, image_size=32, patch_size=8
)
TINY_TEXT = dict(
    hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=32
)
TINY_PROJECTION_DIM = 32


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right BPE merges that build `word` + end-of-word marker from its characters."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    merges, merged = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((merged, symbol))
        merged += symbol
    return merges


def build_tiny_clip_tokenizer(extra_words=None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase characters, digits and punctuation, with whole-word tokens for
    `CAPTION_WORDS` and `extra_words`. Any ASCII text tokenizes without unknown tokens and decodes back."""
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab: dict[str, int] = {}
    for token in [*characters, *(c + END_OF_WORD for c in characters)]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in dict.fromkeys([*CAPTION_WORDS, *(extra_words or ())]):
        for left, right in _word_merges(word.lower()):
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_TEXT["max_position_embeddings"])


def tiny_clip_config(tokenizer: CLIPTokenizer | None = None, **overrides) -> CLIPConfig:
    """A CLIP configuration small enough for CPU tests; special token ids match `build_tiny_clip_tokenizer`.

    `overrides` may replace top-level fields or update the tower configs, e.g.
    `tiny_clip_config(vision_config={"image_size": 64}, projection_dim=16)`.
    """
    tokenizer = tokenizer or build_tiny_clip_tokenizer()
    text_config = dict(
        TINY_TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_config.update(overrides.pop("text_config", {}))
    vision_config = dict(TINY_VISION, **overrides.pop("vision_config", {}))
    overrides.setdefault("projection_dim", TINY_PROJECTION_DIM)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, **overrides)


def save_tiny_clip(directory, seed: int = 0, **overrides) -> Path:
    """Saves a seeded random tiny `CLIPModel`, its tokenizer and a matching `StanProcessor` to `directory`."""
    from ..processing_stan import StanProcessor
    from ..video_processing_stan import StanVideoProcessor

    directory = Path(directory)
    tokenizer = build_tiny_clip_tokenizer()
    config = tiny_clip_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(directory)
    video_processor = StanVideoProcessor.for_image_size(config.vision_config.image_size)
    StanProcessor(video_processor=video_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
