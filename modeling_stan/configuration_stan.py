"""Configuration of STAN (Spatial-Temporal Auxiliary Network) video-text models."""

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.configuration_utils import PreTrainedConfig


TEMPORAL_MODULES = ("attention", "conv")
ALIGNMENTS = ("mean", "mug")
MUG_VARIANTS = ("simple", "full")
# Recognition heads of `StanForVideoClassification`, see `StanConfig.classifier_type`.
CLASSIFIER_TYPES = ("linear", "class_embeddings", "frozen_class_embeddings", "text_encoder")
# The STAN authors' recognition head multiplies cosines by a fixed 100 (their text classifier, `logit_scale=100`).
AUTHORS_CLASSIFIER_LOGIT_SCALE = 100.0


class StanConfig(PreTrainedConfig):
    r"""
    Configuration of a STAN video-text model: a CLIP text tower, a CLIP vision tower, and the STAN
    branch that runs beside the last `stan_depth` vision layers.

    The CLIP fields (`text_config`, `vision_config`, `projection_dim`, `logit_scale_init_value`,
    `initializer_factor`) have the names and defaults of [`CLIPConfig`], so any CLIP checkpoint's
    configuration maps onto this one field for field.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*): the CLIP text tower.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*): the CLIP vision tower.
        projection_dim (`int`, defaults to 512): size of the joint embedding space.
        logit_scale_init_value (`float`, defaults to 2.6592): initial log of the logit scale.
        initializer_range (`float`, defaults to 0.02): as CLIP's: standard deviation of the patch and position
            embeddings and of the layers CLIP's scaled initialisation does not cover (a linear classifier, the
            STAN temporal convolution), where no weights are loaded.
        stan_depth (`int`, defaults to 4): number K of STAN layers. `0` removes the branch: the video
            embedding is then the mean of the CLIP frame embeddings (the ViFi-CLIP baseline).
        temporal_module (`str`, defaults to `"attention"`): `"attention"` (STAN-self) or `"conv"`
            (STAN-conv: the authors' full-width 3x3x3 convolution over time, rows and columns).
        num_frames (`int`, defaults to 8): frames per clip by default (processor and docs).
        max_frames (`int`, defaults to 64): rows of the temporal embedding, the most frames a clip may have.
        drop_path_rate (`float`, defaults to 0.1): stochastic depth of the last STAN layer (linear from 0).
        alignment (`str`, defaults to `"mean"`): video-text score of the retrieval head: `"mean"`
            (cosine of the mean-pooled embeddings) or `"mug"` (Mug-STAN's mutual-guided alignment).
        mug_variant (`str`, defaults to `"simple"`): `"simple"` or `"full"` Mug.
        mug_lambda (`float`, defaults to 100.0): inverse temperature of Mug's softmax weights.
        fixed_logit_scale (`float`, *optional*): if set, the retrieval head uses this fixed scale
            (e.g. 100.0 for tau = 0.01) instead of the learnable `logit_scale`.
        classifier_type (`str`, defaults to `"linear"`): head of the classification model:
            - `"linear"`: a linear layer on the video embedding;
            - `"class_embeddings"`: logits = scale * cos(video, class embedding), a class matrix initialised from the
              text embeddings of the class prompts and trained;
            - `"frozen_class_embeddings"`: the same with the class matrix frozen and the scale fixed
              (`fixed_logit_scale`, 100 when unset): the STAN authors' recognition head;
            - `"text_encoder"`: the class embeddings are computed at every forward pass by the text tower from the
              class prompts, which it keeps (ViFi-CLIP's; works for any `stan_depth`).
        hypothesis_template (`str`, defaults to `"a video of {}."`): the class prompt of the text-based classifiers.
        vision_prompt_depth (`int`, defaults to 0): ViFi-CLIP vision prompts: number of vision layers that get fresh
            learnable prompt tokens (appended after the position embedding, replaced before each later layer up to
            this depth). `0`: no vision prompts.
        vision_prompt_length (`int`, defaults to 16): vision prompt tokens per layer (ViFi-CLIP's `N_CTX_VISION`).
        text_prompt_depth (`int`, defaults to 0): the same for the text tower of a `"text_encoder"` classifier; the
            tokens follow the start token of each class prompt. `0`: no text prompts.
        text_prompt_length (`int`, defaults to 16): text prompt tokens per layer (ViFi-CLIP's `N_CTX_TEXT`).
        text_prompt_init (`str`, *optional*, defaults to `"a photo of a"`): phrase whose token embeddings initialise
            the first-layer text prompts when `text_prompt_length` is at most its token count (as ViFi-CLIP does);
            otherwise, or when `None`, the prompts start random (normal, std 0.02).
        loss_reduction (`str`, defaults to `"sum"`): how the two directions of the symmetric InfoNCE loss combine:
            `"sum"` (the STAN authors' form) or `"mean"` (CLIP's).
    """

    model_type = "stan"
    # Output fields that `Trainer` leaves out of its predictions, so that `predictions` is the logits alone (as
    # `compute_metrics` with `np.argmax(predictions, -1)` expects).
    keys_to_ignore_at_inference = [
        "video_embeds",
        "text_embeds",
        "frame_embeds",
        "token_embeds",
        "text_model_output",
        "vision_model_output",
    ]
    sub_configs_defaults = {"text_config": CLIPTextConfig, "vision_config": CLIPVisionConfig}

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0
    initializer_range: float = 0.02
    stan_depth: int = 4
    temporal_module: str = "attention"
    num_frames: int = 8
    max_frames: int = 64
    drop_path_rate: float = 0.1
    alignment: str = "mean"
    mug_variant: str = "simple"
    mug_lambda: float = 100.0
    fixed_logit_scale: float | None = None
    classifier_type: str = "linear"
    hypothesis_template: str = "a video of {}."
    vision_prompt_depth: int = 0
    vision_prompt_length: int = 16
    text_prompt_depth: int = 0
    text_prompt_length: int = 16
    text_prompt_init: str | None = "a photo of a"
    loss_reduction: str = "sum"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_stan_fields()

    def _check_stan_fields(self):
        vision_depth = self.vision_config.num_hidden_layers
        if not isinstance(self.stan_depth, int) or not 0 <= self.stan_depth <= vision_depth:
            raise ValueError(
                f"StanConfig.stan_depth must be an integer in [0, {vision_depth}] (the vision tower has "
                f"{vision_depth} layers), got {self.stan_depth!r}."
            )
        _check_choice("temporal_module", self.temporal_module, TEMPORAL_MODULES)
        _check_choice("alignment", self.alignment, ALIGNMENTS)
        _check_choice("mug_variant", self.mug_variant, MUG_VARIANTS)
        _check_choice("classifier_type", self.classifier_type, CLASSIFIER_TYPES)
        if self.classifier_type == "frozen_class_embeddings" and self.fixed_logit_scale is None:
            self.fixed_logit_scale = AUTHORS_CLASSIFIER_LOGIT_SCALE
        self._check_prompt_fields()
        _check_choice("loss_reduction", self.loss_reduction, ("sum", "mean"))
        if not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"StanConfig.max_frames must be an integer >= 1, got {self.max_frames!r}.")
        if not isinstance(self.num_frames, int) or not 1 <= self.num_frames <= self.max_frames:
            raise ValueError(
                f"StanConfig.num_frames must be an integer in [1, max_frames={self.max_frames}], got {self.num_frames!r}."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"StanConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}.")
        if self.mug_lambda <= 0:
            raise ValueError(f"StanConfig.mug_lambda must be > 0, got {self.mug_lambda!r}.")
        if self.fixed_logit_scale is not None and self.fixed_logit_scale <= 0:
            raise ValueError(f"StanConfig.fixed_logit_scale must be > 0 or None, got {self.fixed_logit_scale!r}.")

    def _check_prompt_fields(self):
        for tower, sub_config in (("vision", self.vision_config), ("text", self.text_config)):
            depth, length = getattr(self, f"{tower}_prompt_depth"), getattr(self, f"{tower}_prompt_length")
            layers = sub_config.num_hidden_layers
            if not isinstance(depth, int) or not 0 <= depth <= layers:
                raise ValueError(
                    f"StanConfig.{tower}_prompt_depth must be an integer in [0, {layers}] (the {tower} "
                    f"tower has {layers} layers), got {depth!r}."
                )
            if not isinstance(length, int) or length < 1:
                raise ValueError(f"StanConfig.{tower}_prompt_length must be an integer >= 1, got {length!r}.")
        if self.text_prompt_depth and self.classifier_type != "text_encoder":
            raise ValueError(
                "StanConfig.text_prompt_depth > 0 needs classifier_type='text_encoder' (text prompts "
                f"precede the class prompts the text tower encodes), got {self.classifier_type!r}."
            )
        if self.text_prompt_depth and self.text_prompt_length >= self.text_config.max_position_embeddings - 2:
            raise ValueError(
                f"StanConfig.text_prompt_length={self.text_prompt_length} leaves no room for a class "
                f"prompt in {self.text_config.max_position_embeddings} text positions."
            )

    @classmethod
    def from_clip_config(cls, clip_config: CLIPConfig, **stan_kwargs) -> "StanConfig":
        """Builds a STAN configuration with the towers of `clip_config` and the given STAN fields."""
        return cls(
            text_config=clip_config.text_config.to_dict(),
            vision_config=clip_config.vision_config.to_dict(),
            projection_dim=clip_config.projection_dim,
            logit_scale_init_value=clip_config.logit_scale_init_value,
            initializer_factor=clip_config.initializer_factor,
            **stan_kwargs,
        )


def _check_choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"StanConfig.{field} must be one of {list(allowed)}, got {value!r}.")


__all__ = ["StanConfig", "CLASSIFIER_TYPES"]
