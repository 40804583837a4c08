"""`zero-shot-video-classification`: score a video against free-text labels with a STAN video-text model.

    from transformers import pipeline

    classifier = pipeline("zero-shot-video-classification", model="path/to/stan-checkpoint", trust_remote_code=True)
    classifier("video.mp4", candidate_labels=["cooking", "dancing"], hypothesis_template="a video of {}.")
    # [{"label": "cooking", "score": 0.93}, {"label": "dancing", "score": 0.07}]

Videos may be paths (plain or `file://` URLs), `bytes`, or decoded frames (a `(T, H, W, C)` array, a `(T, C, H, W)`
tensor, or a list of frames); a list of videos is a batch (`batch_size` groups them into model calls). Each label
becomes `hypothesis_template.format(label)`; the scores are the softmax over labels of the model's scaled video-text
similarity (Mug-STAN checkpoints use their mutual-guided alignment).

Every saved STAN dual-encoder checkpoint carries this file as remote code and lists the task under
`custom_pipelines` (see `StanPreTrainedModel.save_pretrained`), so `pipeline(model=directory, trust_remote_code=True)`
works where this package is not installed. This module is shipped as remote code: it imports nothing from the package.
"""

import os
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from transformers import AutoModel, Pipeline
from transformers.image_utils import is_pil_image
from transformers.pipelines import PIPELINE_REGISTRY


TASK = "zero-shot-video-classification"
DEFAULT_HYPOTHESIS_TEMPLATE = "a video of {}."


class ZeroShotVideoClassificationPipeline(Pipeline):
    """Zero-shot video classification with a STAN dual encoder (`StanModel` / `StanForVideoTextRetrieval`) and its
    `StanProcessor`.

    Call arguments:
        videos: one video or a list of videos (see the module docstring for the accepted forms).
        candidate_labels (`list[str]`): the labels to score.
        hypothesis_template (`str`, defaults to `"a video of {}."`): turns a label into the sentence that is scored.
        top_k (`int`, *optional*): keep only the `top_k` best labels.
        num_frames (`int`, *optional*): frames sampled per video, defaults to the model's `config.num_frames`.

    Returns, per video, `[{"label": str, "score": float}, ...]` sorted by decreasing score.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None or getattr(self.processor, "video_processor", None) is None:
            raise ValueError(
                f"The {TASK} pipeline needs a processor with a video processor and a tokenizer (a StanProcessor); "
                "save one next to the model or pass processor=."
            )
        if not hasattr(self.model, "get_text_features"):
            raise TypeError(
                f"The {TASK} pipeline needs a video-text model (StanModel or StanForVideoTextRetrieval), got "
                f"{type(self.model).__name__}."
            )

    def __call__(self, videos, **kwargs):
        if _is_single_video(videos):
            # `Pipeline.__call__` runs a list as a batch: one video given as a list of frames goes in as a tuple.
            return super().__call__(tuple(videos) if isinstance(videos, list) else videos, **kwargs)
        return super().__call__(list(videos), **kwargs)

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None, top_k=None, num_frames=None):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if num_frames is not None:
            preprocess_params["num_frames"] = num_frames
        if candidate_labels is not None:
            forward_params["candidate_labels"] = _checked_labels(candidate_labels)
            postprocess_params["candidate_labels"] = forward_params["candidate_labels"]
        if hypothesis_template is not None:
            if not isinstance(hypothesis_template, str) or "{}" not in hypothesis_template:
                raise ValueError(
                    f"hypothesis_template must be a string containing '{{}}', got {hypothesis_template!r}."
                )
            forward_params["hypothesis_template"] = hypothesis_template
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, video, num_frames=None):
        num_frames = num_frames or self.model.config.num_frames
        inputs = self.processor.video_processor(
            videos=[_as_local_source(video)], num_frames=num_frames, return_tensors="pt"
        )
        # Not "pixel_values": the pipeline's batch collation pads that key with a feature extractor's padding value,
        # which a video processor does not have; other keys are stacked along the batch dimension.
        return {"pixel_values_videos": inputs["pixel_values"].to(self.dtype)}

    def _forward(self, model_inputs, candidate_labels=None, hypothesis_template=DEFAULT_HYPOTHESIS_TEMPLATE):
        if candidate_labels is None:
            raise ValueError(
                f"The {TASK} pipeline needs candidate_labels, e.g. candidate_labels=['cooking', 'dancing']."
            )
        # The labels are the same for every video of a call, so they are encoded with each batch, not per video.
        prompts = [hypothesis_template.format(label) for label in candidate_labels]
        text_inputs = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        outputs = self.model(
            input_ids=text_inputs["input_ids"],
            attention_mask=text_inputs["attention_mask"],
            pixel_values=model_inputs["pixel_values_videos"],
            return_loss=False,
        )
        return {"logits": outputs.logits_per_video}

    def postprocess(self, model_outputs, candidate_labels=None, top_k=None):
        scores = model_outputs["logits"][0].float().softmax(dim=-1).tolist()
        ranked = sorted(zip(scores, candidate_labels), key=lambda pair: -pair[0])
        return [{"label": label, "score": score} for score, label in ranked[:top_k]]


def _checked_labels(candidate_labels) -> list[str]:
    if isinstance(candidate_labels, str) or not isinstance(candidate_labels, (list, tuple)):
        raise TypeError(
            "candidate_labels must be a list of strings (the scores are a softmax over them), got "
            f"{candidate_labels!r}."
        )
    labels = list(candidate_labels)
    if not labels or not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"candidate_labels must be a non-empty list of non-empty strings, got {candidate_labels!r}.")
    return labels


def _is_frame(item) -> bool:
    """A single decoded frame: an (H, W[, C]) array, a ([C,] H, W) tensor or a PIL image."""
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim in (2, 3)
    return is_pil_image(item)


def _is_single_video(videos) -> bool:
    """A list is a batch of videos unless it is the frames of one video."""
    if not isinstance(videos, (list, tuple)):
        return True
    return len(videos) > 0 and _is_frame(videos[0])


def _as_local_source(video):
    """`file://` URLs become paths; web URLs are refused (this pipeline does not download)."""
    if isinstance(video, Path):
        return os.fspath(video)
    if not isinstance(video, str):
        return video
    scheme = urlparse(video).scheme
    if scheme == "file":
        return url2pathname(unquote(urlparse(video).path))
    if scheme in ("http", "https"):
        raise ValueError(f"{TASK} does not download videos; save {video} locally and pass its path.")
    return video


def custom_pipelines() -> dict:
    """The `custom_pipelines` entry of a checkpoint's `config.json` that names this file's pipeline. transformers then
    loads it from the checkpoint (and requires `trust_remote_code=True` for it even where this package is imported)."""
    pipeline_class = ZeroShotVideoClassificationPipeline
    return {
        TASK: {
            "impl": f"{pipeline_class.__module__.rsplit('.', 1)[-1]}.{pipeline_class.__name__}",
            "pt": ["AutoModel"],
            "type": "multimodal",
        }
    }


def register_pipelines() -> None:
    """Registers `zero-shot-video-classification` with transformers' `pipeline()` (idempotent)."""
    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl")
    if registered is not ZeroShotVideoClassificationPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=ZeroShotVideoClassificationPipeline, pt_model=AutoModel, type="multimodal"
        )
