"""`zero-shot-video-classification`: score a video against free-text labels with a STAN video-text model.

    from transformers import pipeline

    classifier = pipeline("zero-shot-video-classification", model="path/to/stan-checkpoint", trust_remote_code=True)
    classifier("video.mp4", candidate_labels=["cooking", "dancing"], hypothesis_template="a video of {}.")
    # [{"label": "cooking", "score": 0.93}, {"label": "dancing", "score": 0.07}]

Videos may be paths (plain or `file://` URLs), `bytes`, or decoded frames (a `(T, H, W, C)` array, a `(T, C, H, W)`
tensor, or a list of frames); a list of videos is a batch (`batch_size` groups them into model calls). Each label
becomes `hypothesis_template.format(label)`; the scores are the softmax over labels of the model's scaled video-text
similarity (Mug-STAN checkpoints use their mutual-guided alignment).

A video that cannot be used (unreadable, missing, NaN or infinite frames or pixel values, or scores that come out
non-finite) raises its error when it is given alone. In a batch it does not cost the others their results: its place
in the returned list holds `{"error": "<ErrorType>: <message>"}` instead of the label scores, and a warning is logged
(`on_error="raise"` raises instead). `classifier([])` returns `[]`.

Every saved STAN dual-encoder checkpoint carries this file as remote code and lists the task under
`custom_pipelines` (see `StanPreTrainedModel.save_pretrained`), so `pipeline(model=directory, trust_remote_code=True)`
works where this package is not installed. This module is shipped as remote code: it imports nothing from the package.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from transformers import AutoModel, Pipeline
from transformers.image_utils import is_pil_image
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging


logger = logging.get_logger(__name__)

TASK = "zero-shot-video-classification"
DEFAULT_HYPOTHESIS_TEMPLATE = "a video of {}."
# What one unusable video raises while it is read and processed (decoders raise ValueError subclasses, missing or
# unreadable files OSError): reported for that video in a batch. Anything else is a bug and stops the call.
_VIDEO_ERRORS = (OSError, ValueError)
_ON_ERROR = ("raise", "report")
_NON_FINITE_SCORES = "the model produced non-finite scores for this video."


@dataclass
class _PreparedVideo:
    """One video's model input, or why there is none. A plain object, not a tensor: transformers' batch collation
    passes it through as a list, so the videos of a batch that failed need no placeholder tensor."""

    pixel_values: torch.Tensor | None = None
    error: str | None = None


@dataclass
class _VideoScores:
    """One video's label logits, or why there are none."""

    logits: torch.Tensor | None = None
    error: str | None = None


class ZeroShotVideoClassificationPipeline(Pipeline):
    """Zero-shot video classification with a STAN dual encoder (`StanModel` / `StanForVideoTextRetrieval`) and its
    `StanProcessor`.

    Call arguments:
        videos: one video or a list of videos (see the module docstring for the accepted forms).
        candidate_labels (`list[str]`): the labels to score.
        hypothesis_template (`str`, defaults to `"a video of {}."`): turns a label into the sentence that is scored.
        top_k (`int`, *optional*): keep only the `top_k` best labels.
        num_frames (`int`, *optional*): frames sampled per video (>= 1), defaults to the model's `config.num_frames`.
        on_error (`str`, *optional*): `"raise"` (the default for one video) or `"report"` (the default for a batch):
            a video that cannot be used gets `{"error": message}` in place of its scores.

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
            kwargs.setdefault("on_error", "raise")
            # `Pipeline.__call__` runs a list as a batch: one video given as a list of frames goes in as a tuple.
            return super().__call__(tuple(videos) if isinstance(videos, list) else videos, **kwargs)
        kwargs.setdefault("on_error", "report")
        if not videos:
            # Checked all the same, so that a wrong argument fails whether or not the batch is empty.
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            return []
        return super().__call__(list(videos), **kwargs)

    def _sanitize_parameters(
        self, candidate_labels=None, hypothesis_template=None, top_k=None, num_frames=None, on_error=None
    ):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if num_frames is not None:
            if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
                raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}.")
            preprocess_params["num_frames"] = num_frames
        if on_error is not None:
            if on_error not in _ON_ERROR:
                raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}.")
            preprocess_params["on_error"] = postprocess_params["on_error"] = on_error
        if candidate_labels is not None:
            forward_params["candidate_labels"] = _checked_labels(candidate_labels)
            postprocess_params["candidate_labels"] = forward_params["candidate_labels"]
        if hypothesis_template is not None:
            forward_params["hypothesis_template"] = _checked_template(hypothesis_template)
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
            postprocess_params["top_k"] = top_k
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, video, num_frames=None, on_error="raise"):
        try:
            return {"video": _PreparedVideo(pixel_values=self._pixel_values(video, num_frames))}
        except _VIDEO_ERRORS as error:
            if on_error == "raise":
                raise
            return {"video": _PreparedVideo(error=f"{type(error).__name__}: {error}")}

    def _pixel_values(self, video, num_frames) -> torch.Tensor:
        inputs = self.processor.video_processor(
            videos=[_as_local_source(video)],
            num_frames=self.model.config.num_frames if num_frames is None else num_frames,
            return_tensors="pt",
        )
        pixel_values = inputs["pixel_values"].to(self.dtype)
        # The processor refuses NaN or infinite frames, but finite frames can still overflow: in its normalisation
        # (e.g. float frames of a do_rescale=False processor) or in the cast to a float16 model. The model refuses
        # such pixel values too, but for its whole batch: checked here, only this video is reported.
        if not torch.isfinite(pixel_values).all():
            raise ValueError(
                f"the video's pixel values, once processed and cast to the model's {self.dtype}, are NaN or "
                "infinite: its frame values are too large for the processor's scale and that dtype."
            )
        return pixel_values

    def _forward(self, model_inputs, candidate_labels=None, hypothesis_template=DEFAULT_HYPOTHESIS_TEMPLATE):
        if candidate_labels is None:
            raise ValueError(
                f"The {TASK} pipeline needs candidate_labels, e.g. candidate_labels=['cooking', 'dancing']."
            )
        # One video (batch_size=1), or the list that batch collation makes of the videos' `_PreparedVideo`s.
        videos = model_inputs["video"] if isinstance(model_inputs["video"], list) else [model_inputs["video"]]
        good = [video for video in videos if video.error is None]
        logits = iter(self._logits(good, candidate_labels, hypothesis_template) if good else ())
        scores = [_VideoScores(error=video.error) if video.error else _VideoScores(next(logits)) for video in videos]
        return {"scores": scores}

    def _logits(self, videos: list[_PreparedVideo], candidate_labels, hypothesis_template) -> torch.Tensor:
        # The labels are the same for every video of a call, so they are encoded with each batch, not per video.
        prompts = [hypothesis_template.format(label) for label in candidate_labels]
        text_inputs = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        outputs = self.model(
            input_ids=text_inputs["input_ids"],
            attention_mask=text_inputs["attention_mask"],
            pixel_values=torch.cat([video.pixel_values for video in videos]).to(self.device),
            return_loss=False,
        )
        return outputs.logits_per_video.float().cpu()

    def postprocess(self, model_outputs, candidate_labels=None, top_k=None, on_error="raise"):
        # A list of one with batch_size=1; batched outputs are split per video by transformers, which unwraps it.
        scores = model_outputs["scores"][0] if isinstance(model_outputs["scores"], list) else model_outputs["scores"]
        if scores.error is None and not torch.isfinite(scores.logits).all():
            if on_error == "raise":
                raise ValueError(_NON_FINITE_SCORES)
            scores = _VideoScores(error=f"ValueError: {_NON_FINITE_SCORES}")
        if scores.error is not None:  # reported: with on_error="raise", preprocess raised it
            logger.warning(f"{TASK}: a video of the batch could not be classified: {scores.error}")
            return {"error": scores.error}
        probabilities = scores.logits.softmax(dim=-1).tolist()
        ranked = sorted(zip(probabilities, candidate_labels), key=lambda pair: -pair[0])
        return [{"label": label, "score": score} for score, label in ranked[:top_k]]


def _checked_template(hypothesis_template) -> str:
    """A template with exactly one positional placeholder, which the label fills."""
    try:
        fields = [name for _, name, _, _ in Formatter().parse(hypothesis_template) if name is not None]
    except (TypeError, ValueError, AttributeError):
        fields = None
    if fields is None or fields not in ([""], ["0"]):
        raise ValueError(
            "hypothesis_template must be a string containing '{}' exactly once (the label is put there), got "
            f"{hypothesis_template!r}."
        )
    return hypothesis_template


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
