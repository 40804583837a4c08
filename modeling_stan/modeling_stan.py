"""PyTorch STAN: CLIP towers plus the Spatial-Temporal Auxiliary Network branch (CVPR 2023) and Mug-STAN."""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPMLP,
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionEmbeddings,
)
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_stan import StanConfig
from .mug_alignment import mug_similarity
from .pipeline_zero_shot_video_classification import custom_pipelines
from .vifi_prompts import PROMPT_INIT_STD, PromptTokens, TextPrompts, VisionPrompts, encode_prompted_text


# Written into every saved config so that a directory loads through the Auto classes as remote code (the processor
# classes write their own `auto_map` into the processor configs).
AUTO_MAP = {
    "AutoConfig": "configuration_stan.StanConfig",
    "AutoModel": "modeling_stan.StanModel",
    "AutoModelForVideoClassification": "modeling_stan.StanForVideoClassification",
}


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StanVisionOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_frames, 1 + num_patches, hidden_size)`):
        Output of the last CLIP vision layer for every frame.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, num_frames, hidden_size)`):
        Per-frame [CLS] states fused with the STAN branch's video [CLS], after `post_layernorm`.
    branch_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches * num_frames, hidden_size)`):
        Output of the last STAN layer (video [CLS], then patch tokens in patch-major, time-minor order);
        `None` when `stan_depth == 0`.
    hidden_states / attentions (returned with `output_hidden_states` / `output_attentions`):
        Those of the CLIP vision layers only, per frame: shapes `(batch_size * num_frames, 1 + num_patches, ...)`.
    branch_attentions (`tuple(torch.FloatTensor)`, returned with `output_branch_attentions=True`):
        The attention weights of the STAN branch, two per STAN layer in order (temporal, then spatial) with
        `temporal_module="attention"`, one per layer (spatial) with `"conv"`. Temporal: `(batch_size * num_patches,
        num_heads, num_frames, num_frames)`; spatial: `(batch_size * num_frames, num_heads, 1 + num_patches,
        1 + num_patches)`.
    """

    branch_last_hidden_state: torch.FloatTensor | None = None
    branch_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class StanVideoFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        Projected video embedding (mean of `frame_embeds`), not normalised.
    frame_embeds (`torch.FloatTensor` of shape `(batch_size, num_frames, projection_dim)`):
        Projected per-frame embeddings, not normalised.
    hidden_states / attentions / branch_attentions: as in [`StanVisionOutput`].
    """

    frame_embeds: torch.FloatTensor | None = None
    branch_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class StanTextFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        Projected EOS-token embedding, not normalised.
    token_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, projection_dim)`):
        The text projection applied to every final-layer-normed token state, not normalised.
    """

    token_embeds: torch.FloatTensor | None = None


@dataclass
class StanOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss=True`):
        Symmetric video-text InfoNCE loss.
    logits_per_video (`torch.FloatTensor` of shape `(video_batch_size, text_batch_size)`):
        Scaled video-text similarity scores.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, video_batch_size)`):
        Scaled text-video similarity scores (`logits_per_video.T`).
    video_embeds (`torch.FloatTensor` of shape `(video_batch_size, projection_dim)`):
        L2-normalised video embeddings.
    text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
        L2-normalised text embeddings.
    frame_embeds (`torch.FloatTensor` of shape `(video_batch_size, num_frames, projection_dim)`):
        Projected per-frame embeddings (not normalised), used by Mug alignment.
    token_embeds (`torch.FloatTensor` of shape `(text_batch_size, sequence_length, projection_dim)`):
        Projected per-token embeddings (not normalised), used by Mug alignment.
    text_model_output / vision_model_output: the tower outputs.
    """

    loss: torch.FloatTensor | None = None
    logits_per_video: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    frame_embeds: torch.FloatTensor | None = None
    token_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: StanVisionOutput | None = None

    def to_tuple(self) -> tuple[Any]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class StanVideoClassifierOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is given): cross-entropy loss.
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): classification scores.
    video_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): projected video embedding.
    hidden_states / attentions: as requested with `output_hidden_states` / `output_attentions`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Losses and similarities
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteInputError(ValueError):
    """The model's input holds NaN or infinite values."""


def l2_normalize(embeds: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeds, dim=-1, eps=1e-8)


def _logit_scale_value(logit_scale: nn.Parameter, config: StanConfig) -> torch.Tensor:
    if config.fixed_logit_scale is not None:
        return logit_scale.new_tensor(config.fixed_logit_scale)
    return logit_scale.exp()


def video_text_contrastive_loss(logits_per_text: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Symmetric InfoNCE over a square (text, video) score matrix whose diagonal holds the positives.

    The two directions' mean cross-entropies are summed (`"sum"`, the STAN authors' form) or averaged (`"mean"`, CLIP's).
    """
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    text_to_video = F.cross_entropy(logits_per_text, targets)
    video_to_text = F.cross_entropy(logits_per_text.t(), targets)
    total = text_to_video + video_to_text
    return total if reduction == "sum" else total / 2


# ----------------------------------------------------------------------------------------------------------------
# The STAN branch
# ----------------------------------------------------------------------------------------------------------------


class StanDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample (first dimension) while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.rate
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(mask_shape).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class StanZeroInitLinear(nn.Linear):
    """A linear layer that starts at zero: the residual module it ends is the identity at initialisation."""


class StanTimeEmbedding(nn.Embedding):
    """The learned temporal embedding E_time[t] of the STAN branch (one row per frame index)."""


class StanTemporalAttention(nn.Module):
    """STAN-self temporal module: attention across the frames of each patch position, identity at initialisation."""

    def __init__(self, config: StanConfig, drop_path_rate: float):
        super().__init__()
        vision_config = config.vision_config
        self.layer_norm1 = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.self_attn = CLIPAttention(vision_config)
        self.drop_path = StanDropPath(drop_path_rate)
        self.temporal_fc = StanZeroInitLinear(vision_config.hidden_size, vision_config.hidden_size)

    def forward(self, patch_tokens: torch.Tensor, num_frames: int, **kwargs) -> torch.Tensor:
        batch_size, num_tokens, hidden_size = patch_tokens.shape
        # Tokens are patch-major, time-minor, so each patch's frames are contiguous. (unflatten + flatten, not
        # `reshape(-1, num_frames, ...)`: torch.export cannot prove the latter's guard for a dynamic frame count.)
        sequences = patch_tokens.unflatten(1, (-1, num_frames)).flatten(0, 1)
        attended, _ = self.self_attn(self.layer_norm1(sequences), **kwargs)
        update = self.temporal_fc(self.drop_path(attended))
        return patch_tokens + update.reshape(batch_size, num_tokens, hidden_size)


class StanTemporalConv(nn.Module):
    """STAN-conv temporal module, as the authors define it (`CLIPLayer_ConvTime`, mode "origin", farewellthree/STAN
    commit 38de624): a full-width 3x3x3 convolution over (time, rows, cols) of the patch tokens, DropPath, then a
    zero-initialised D x D `temporal_fc` and the residual. No activation; the module is the identity at
    initialisation. (The paper's text describes a D/8 bottleneck with a (3, 1, 1) kernel instead; the paper's FLOPs
    tables match this module, see BENCHMARKS.md.)"""

    def __init__(self, config: StanConfig, drop_path_rate: float):
        super().__init__()
        vision_config = config.vision_config
        hidden_size = vision_config.hidden_size
        self.grid_rows = vision_config.image_size // vision_config.patch_size
        self.conv = nn.Conv3d(hidden_size, hidden_size, kernel_size=3, stride=1, padding=1)
        self.drop_path = StanDropPath(drop_path_rate)
        self.temporal_fc = StanZeroInitLinear(hidden_size, hidden_size)

    def forward(self, patch_tokens: torch.Tensor, num_frames: int, **kwargs) -> torch.Tensor:
        batch_size, num_tokens, hidden_size = patch_tokens.shape
        # (B, P*T, D) in (p t) order, p = row * cols + col -> (B, D, T, rows, cols) for the convolution. The column
        # count is left to reshape so that no size is computed in Python from the data (export-friendly).
        grid = patch_tokens.reshape(batch_size, self.grid_rows, -1, num_frames, hidden_size).permute(0, 4, 3, 1, 2)
        mixed = self.conv(grid).permute(0, 3, 4, 2, 1).reshape(batch_size, num_tokens, hidden_size)
        return patch_tokens + self.temporal_fc(self.drop_path(mixed))


TEMPORAL_MODULE_CLASSES = {"attention": StanTemporalAttention, "conv": StanTemporalConv}


class StanSpatialLayer(nn.Module):
    """A CLIP encoder layer whose attention runs within each frame, the video [CLS] shared by all frames.

    Sub-module names equal `CLIPEncoderLayer`'s so the weights of a CLIP layer copy over one to one.
    """

    def __init__(self, config: StanConfig, drop_path_rate: float):
        super().__init__()
        vision_config = config.vision_config
        self.layer_norm1 = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.self_attn = CLIPAttention(vision_config)
        self.layer_norm2 = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.mlp = CLIPMLP(vision_config)
        self.drop_path = StanDropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, num_frames: int, **kwargs) -> torch.Tensor:
        batch_size, _, hidden_size = hidden_states.shape
        video_cls, patch_tokens = hidden_states[:, :1], hidden_states[:, 1:]
        per_frame = _patch_major_to_frames(patch_tokens, num_frames)
        # expand + reshape, not repeat_interleave: ONNX exports of the latter fix the frame count.
        frame_cls = (
            video_cls.unsqueeze(1).expand(-1, num_frames, -1, -1).reshape(batch_size * num_frames, 1, hidden_size)
        )
        attended, _ = self.self_attn(self.layer_norm1(torch.cat([frame_cls, per_frame], dim=1)), **kwargs)
        attended = self.drop_path(attended)
        # The per-frame copies of the video [CLS] are averaged back into one token.
        cls_update = attended[:, :1].reshape(batch_size, num_frames, 1, hidden_size).mean(dim=1)
        patch_update = _frames_to_patch_major(attended[:, 1:], num_frames)
        hidden_states = hidden_states + torch.cat([cls_update, patch_update], dim=1)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class StanLayer(GradientCheckpointingLayer):
    """One STAN layer: the temporal module, then the spatial module."""

    def __init__(self, config: StanConfig, drop_path_rate: float):
        super().__init__()
        self.temporal = TEMPORAL_MODULE_CLASSES[config.temporal_module](config, drop_path_rate)
        self.spatial = StanSpatialLayer(config, drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, num_frames: int, **kwargs) -> torch.Tensor:
        # The video [CLS] passes the temporal module untouched.
        patch_tokens = self.temporal(hidden_states[:, 1:], num_frames, **kwargs)
        hidden_states = torch.cat([hidden_states[:, :1], patch_tokens], dim=1)
        return self.spatial(hidden_states, num_frames, **kwargs)


def _patch_major_to_frames(patch_tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, P*T, D) in (p t) order -> (B*T, P, D)."""
    batch_size, num_tokens, hidden_size = patch_tokens.shape
    grid = patch_tokens.reshape(batch_size, num_tokens // num_frames, num_frames, hidden_size)
    return grid.transpose(1, 2).reshape(batch_size * num_frames, -1, hidden_size)


def _frames_to_patch_major(frame_tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*T, P, D) -> (B, P*T, D) in (p t) order."""
    _, num_patches, hidden_size = frame_tokens.shape
    grid = frame_tokens.reshape(-1, num_frames, num_patches, hidden_size)
    return grid.transpose(1, 2).reshape(grid.shape[0], num_patches * num_frames, hidden_size)


class StanBranch(nn.Module):
    """The K STAN layers that run beside the last K CLIP vision layers, reading their outputs."""

    def __init__(self, config: StanConfig):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, config.stan_depth, device="cpu").tolist()
        self.time_embedding = StanTimeEmbedding(config.max_frames, config.vision_config.hidden_size)
        self.layers = nn.ModuleList([StanLayer(config, rate) for rate in rates])

    def forward(
        self,
        clip_states: list[torch.Tensor],
        class_embedding: torch.Tensor,
        position_embedding: torch.Tensor,
        **kwargs,
    ) -> torch.Tensor:
        """`clip_states[k]` is the output of CLIP layer L-K+k+1, shape (B, T, 1+P, D)."""
        hidden_states = None
        for layer, clip_state in zip(self.layers, clip_states):
            num_frames = clip_state.shape[1]
            if hidden_states is None:
                hidden_states = self._first_input(clip_state, class_embedding, position_embedding)
            else:
                hidden_states = hidden_states + _branch_tokens(clip_state)
            hidden_states = layer(hidden_states, num_frames, **kwargs)
        return hidden_states

    def _first_input(
        self, clip_state: torch.Tensor, class_embedding: torch.Tensor, position_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Patch tokens re-embedded with CLIP's own position table plus a temporal embedding; the video [CLS]
        averages the frames' [CLS] with CLIP's embedded class token."""
        batch_size, num_frames, _, hidden_size = clip_state.shape
        position_embedding = position_embedding.to(clip_state.dtype)
        frame_ids = torch.arange(num_frames, device=clip_state.device)
        time_embedding = self.time_embedding(frame_ids).to(clip_state.dtype)
        patches = clip_state[:, :, 1:] + position_embedding[1:] + time_embedding[None, :, None, :]
        patches = patches.transpose(1, 2).reshape(batch_size, -1, hidden_size)
        embedded_class = (class_embedding.to(clip_state.dtype) + position_embedding[0]).expand(batch_size, 1, -1)
        video_cls = (clip_state[:, :, 0].mean(dim=1, keepdim=True) + embedded_class) / 2
        return torch.cat([video_cls, patches], dim=1)


def _branch_tokens(clip_state: torch.Tensor) -> torch.Tensor:
    """A CLIP layer's output as branch tokens: mean frame [CLS], then patches in (p t) order."""
    batch_size, _, _, hidden_size = clip_state.shape
    patches = clip_state[:, :, 1:].transpose(1, 2).reshape(batch_size, -1, hidden_size)
    return torch.cat([clip_state[:, :, 0].mean(dim=1, keepdim=True), patches], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------------------------


class StanPreTrainedModel(CLIPPreTrainedModel):
    config: StanConfig
    config_class = StanConfig
    # Like CLIP's "clip", a name no sub-module has: the towers are peers, not a base model with a head, so every STAN
    # class is its own `base_model` (the branch is `StanVisionModel.stan`, which must not be taken for one).
    base_model_prefix = "stan_model"
    main_input_name = "pixel_values"
    input_modalities = ("video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "StanLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"position_ids"]
    # CLIP weights that `from_clip_pretrained` may leave out of this model (the dual encoder keeps them all).
    _clip_prefixes_not_kept: tuple[str, ...] = ()
    _can_record_outputs = {
        # Only the CLIP tower's layers: the branch's tokens have another layout.
        "hidden_states": OutputRecorder(CLIPEncoderLayer, layer_name="encoder.layers"),
        "attentions": OutputRecorder(CLIPAttention, index=1, layer_name="encoder.layers"),
        # The branch's attentions, on their own request (`output_branch_attentions=True`).
        "branch_attentions": OutputRecorder(CLIPAttention, index=1, layer_name="stan.layers"),
    }

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # Every attention here is CLIP's, which dispatches through the attention interface; transformers' source
        # heuristic takes `StanTemporalAttention` (a wrapper around CLIPAttention) for a hand-written attention.
        return True

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        # The STAN layers and (in the vision model) CLIP's vision layers read the implementation from the sub-configs,
        # which no sub-model of their own owns: transformers would set them blind, with a warning. A single requested
        # implementation is checked here and set on them first.
        if isinstance(attn_implementation, str):
            implementation = self._check_and_adjust_attn_implementation(
                attn_implementation, is_init_check=False, allow_all_kernels=allow_all_kernels
            )
            for sub_config in (self.config.text_config, self.config.vision_config):
                sub_config._attn_implementation_internal = implementation
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers skips the parameterless modules of custom code when initialising (CLIPAttention and CLIPMLP, in
        # our towers and in the CLIP text tower alike: their Linear children hold the weights). That guards against an
        # `_init_weights` that would overwrite loaded weights, and it would leave the weights a checkpoint lacks at the
        # generic N(0, initializer_range) instead of CLIP's scaled initialisation. Ours, as CLIP's, only uses
        # `transformers.initialization`, which never touches a loaded weight, so these models are initialised as
        # transformers' own are, imported from this package or loaded as remote code. (No checkpoint conversion is
        # registered for our classes or model type, the flag's other use.)
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, StanZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, StanTimeEmbedding):
            # The authors keep torch's default N(0, 1) for the temporal embedding.
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, PromptTokens):
            init.normal_(module.tokens, mean=0.0, std=PROMPT_INIT_STD)
        else:
            # CLIP's initialisation; other linear and conv layers get N(0, config.initializer_range).
            super()._init_weights(module)
        if isinstance(module, (StanModel, StanForVideoClassification)):
            # CLIP's scaled initialisation of the projections (keyed there on CLIPModel's own class):
            # N(0, in_features**-0.5 * initializer_factor). A linear classifier keeps N(0, initializer_range), as the
            # heads of transformers' video classifiers (VideoMAE, ViViT, TimeSformer) start.
            for projection in (module.visual_projection, getattr(module, "text_projection", None)):
                if projection is not None:
                    init.normal_(projection.weight, std=projection.in_features**-0.5 * self.config.initializer_factor)
            if module.logit_scale is not None:
                init.constant_(module.logit_scale, self.config.logit_scale_init_value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves the model as a complete Hub repository (saved next to its processor, as `processor.save_pretrained`
        does): the weights, `config.json` naming every Auto class in `auto_map`, and the model code; a dual encoder
        also lists the `zero-shot-video-classification` pipeline under `custom_pipelines`, its code copied with the
        model's. `pipeline(model=save_directory, trust_remote_code=True)` then works with or without this package."""
        self.config.auto_map = dict(AUTO_MAP)
        if hasattr(self, "get_text_features"):
            self.config.custom_pipelines = custom_pipelines()
        # `custom_object_save` (called by the base class for a class with an Auto class) copies this file and every
        # file it imports relatively, the pipeline's included, and points this class's own Auto class at it.
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _check_video(self, pixel_values: torch.Tensor) -> None:
        if pixel_values is None or pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"pixel_values must have shape (batch, frames, 3, height, width), got {shape}.")
        # Skipped while tracing or exporting, where a data-dependent branch cannot be captured, and on the meta
        # device (FLOP counting), where there are no values.
        checkable = not (torch.compiler.is_compiling() or torch.jit.is_tracing() or pixel_values.is_meta)
        if checkable and not torch.isfinite(pixel_values).all():
            raise NonFiniteInputError(
                "pixel_values contain NaN or infinite values: the embeddings and scores would be NaN. Check the "
                "frames given to the processor."
            )
        num_frames = pixel_values.shape[1]
        if not 1 <= num_frames <= self.config.max_frames:
            raise ValueError(
                f"pixel_values has {num_frames} frames; this model takes 1 to max_frames={self.config.max_frames} "
                "frames per clip (the rows of its temporal embedding)."
            )

    @classmethod
    def from_clip_pretrained(cls, clip_name_or_path, *, clip_kwargs: dict | None = None, **stan_kwargs):
        """Builds a STAN model around a pre-trained CLIP checkpoint (a local directory or a Hub id).

        Every CLIP weight is loaded; each STAN spatial module starts as a copy of the CLIP layer whose output it
        reads (layer L-K+k+1), and every temporal module starts as the identity. `stan_kwargs` are `StanConfig`
        fields (e.g. `stan_depth=4, temporal_module="conv"`, or `id2label` for classification).
        """
        clip = CLIPModel.from_pretrained(clip_name_or_path, **(clip_kwargs or {}))
        model = cls(StanConfig.from_clip_config(clip.config, **stan_kwargs))
        model._start_from_clip(clip, clip_name_or_path)
        model.eval()
        return model

    def _start_from_clip(self, clip: CLIPModel, clip_name_or_path) -> None:
        """Loads the CLIP weights this model keeps and starts the STAN branch from CLIP's layers."""
        clip_state = clip.state_dict()
        own_state = self.state_dict()
        unused = sorted(k for k in set(clip_state) - set(own_state) if not k.startswith(self._clip_prefixes_not_kept))
        if unused:
            raise ValueError(f"{type(self).__name__} has no place for these CLIP weights: {unused}")
        self.load_state_dict({k: v for k, v in clip_state.items() if k in own_state}, strict=False)
        if self.config.stan_depth:
            self.vision_model.copy_clip_layers_to_branch()


# ----------------------------------------------------------------------------------------------------------------
# Towers and heads
# ----------------------------------------------------------------------------------------------------------------


class StanVisionModel(StanPreTrainedModel):
    """The CLIP vision tower applied to every frame, with the STAN branch beside its last `stan_depth` layers."""

    input_modalities = ("video",)

    def __init__(self, config: StanConfig):
        super().__init__(config)
        vision_config = config.vision_config
        if vision_config._attn_implementation is None:
            # The CLIP and STAN attentions read the implementation from the vision sub-config.
            vision_config._attn_implementation = config._attn_implementation
        self.embeddings = CLIPVisionEmbeddings(vision_config)
        self.pre_layrnorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.encoder = CLIPEncoder(vision_config)
        self.post_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.stan = StanBranch(config) if config.stan_depth > 0 else None
        self.prompts = None
        if config.vision_prompt_depth:
            self.prompts = VisionPrompts(
                config.vision_prompt_depth, config.vision_prompt_length, vision_config.hidden_size
            )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        # As CLIPVisionModel: the patch embedding (e.g. for `enable_input_require_grads`).
        return self.embeddings.patch_embedding

    def copy_clip_layers_to_branch(self) -> None:
        """Initialises spatial module k with the weights of CLIP layer L-K+k+1 (the layer it reads)."""
        first = len(self.encoder.layers) - self.config.stan_depth
        for k, layer in enumerate(self.stan.layers):
            layer.spatial.load_state_dict(self.encoder.layers[first + k].state_dict())

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> StanVisionOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, 3, height, width)`): video clips.
        output_hidden_states / output_attentions (`bool`, *optional*): those of the CLIP vision layers.
        output_branch_attentions (`bool`, *optional*): the STAN branch's attention maps, as `branch_attentions`.
        """
        self._check_video(pixel_values)
        batch_size, num_frames = pixel_values.shape[:2]
        with _eager_attention_if_requested(self.config, self.config.vision_config, kwargs):
            hidden_states = self.embeddings(pixel_values.flatten(0, 1))
            if self.prompts is not None:
                hidden_states = self.prompts.append(hidden_states)
            hidden_states = self.pre_layrnorm(hidden_states)
            branch_inputs = []
            first_branch_input = len(self.encoder.layers) - self.config.stan_depth
            for index, layer in enumerate(self.encoder.layers):
                if self.prompts is not None:
                    hidden_states = self.prompts.before_layer(hidden_states, index)
                hidden_states = layer(hidden_states, None, **kwargs)
                if index >= first_branch_input:
                    branch_inputs.append(self._without_prompts(hidden_states).unflatten(0, (batch_size, num_frames)))
            frame_states = self._without_prompts(hidden_states).unflatten(0, (batch_size, num_frames))
            frame_cls = frame_states[:, :, 0]
            branch_state = None
            if self.stan is not None:
                branch_state = self.stan(
                    branch_inputs, self.embeddings.class_embedding, self.embeddings.position_embedding.weight, **kwargs
                )
                frame_cls = frame_cls + branch_state[:, :1]
        return StanVisionOutput(
            last_hidden_state=frame_states,
            pooler_output=self.post_layernorm(frame_cls),
            branch_last_hidden_state=branch_state,
        )

    def _without_prompts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states if self.prompts is None else self.prompts.strip(hidden_states)


@contextmanager
def _eager_attention_if_requested(model_config: StanConfig, sub_config, kwargs: dict):
    """SDPA returns no attention weights: a call that asks for them runs with eager attention."""
    wants_attentions = kwargs.get("output_attentions", model_config.output_attentions) or kwargs.get(
        "output_branch_attentions", False
    )
    previous = sub_config._attn_implementation
    switch = bool(wants_attentions) and previous not in (None, "eager")
    if switch:
        sub_config._attn_implementation = "eager"
    try:
        yield
    finally:
        if switch:
            sub_config._attn_implementation = previous


class StanModel(StanPreTrainedModel):
    """The STAN video-text dual encoder: CLIP's text tower and the STAN video tower in a joint embedding space."""

    main_input_name = "input_ids"

    def __init__(self, config: StanConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = StanVisionModel._from_config(config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        if config.text_prompt_depth:
            raise ValueError(
                "StanModel has no class prompts for text prompts to precede: text prompts belong to "
                "StanForVideoClassification with classifier_type='text_encoder'."
            )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        if config.fixed_logit_scale is not None:
            # A fixed temperature (the authors' recipe) is not trained.
            self.logit_scale.requires_grad_(False)
        self.post_init()

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> StanTextFeaturesOutput:
        """Projected text embeddings: `pooler_output` (B, E) from the EOS token and `token_embeds` (B, N, E)."""
        with _eager_attention_if_requested(self.config, self.config.text_config, kwargs):
            text_outputs = self.text_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                return_dict=True,
                **kwargs,
            )
        return StanTextFeaturesOutput(
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=self.text_projection(text_outputs.pooler_output),
            hidden_states=text_outputs.hidden_states,
            attentions=text_outputs.attentions,
            token_embeds=self.text_projection(text_outputs.last_hidden_state),
        )

    @can_return_tuple
    def get_video_features(self, pixel_values: torch.Tensor, **kwargs) -> StanVideoFeaturesOutput:
        """Projected video embeddings: `pooler_output` (B, E), the mean of `frame_embeds` (B, T, E)."""
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        frame_embeds = self.visual_projection(vision_outputs.pooler_output)
        return StanVideoFeaturesOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=frame_embeds.mean(dim=1),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            frame_embeds=frame_embeds,
            branch_attentions=vision_outputs.branch_attentions,
        )

    def logit_scale_value(self) -> torch.Tensor:
        """The multiplier of the similarity scores: the fixed scale if configured, else exp(logit_scale)."""
        return _logit_scale_value(self.logit_scale, self.config)

    def similarity(
        self,
        text_embeds: torch.Tensor,
        video_embeds: torch.Tensor,
        token_embeds: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        frame_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unscaled (text, video) similarity under `config.alignment` (Mug needs token and frame embeddings)."""
        if self.config.alignment == "mean":
            return l2_normalize(text_embeds) @ l2_normalize(video_embeds).t()
        if token_embeds is None or frame_embeds is None:
            raise ValueError("alignment='mug' needs token_embeds and frame_embeds.")
        if text_attention_mask is None:
            text_attention_mask = torch.ones(token_embeds.shape[:2], dtype=torch.long, device=token_embeds.device)
        return mug_similarity(
            token_embeds,
            text_attention_mask,
            frame_embeds,
            variant=self.config.mug_variant,
            lam=self.config.mug_lambda,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> StanOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`): token ids.
        pixel_values (`torch.FloatTensor` of shape `(video_batch_size, num_frames, 3, height, width)`): video clips.
        return_loss (`bool`, *optional*): whether to return the symmetric InfoNCE loss (needs equal batch sizes).
        """
        video_outputs = self.get_video_features(pixel_values, return_dict=True, **kwargs)
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, return_dict=True, **kwargs)
        similarity = self.similarity(
            text_outputs.pooler_output,
            video_outputs.pooler_output,
            token_embeds=text_outputs.token_embeds,
            text_attention_mask=attention_mask,
            frame_embeds=video_outputs.frame_embeds,
        )
        logits_per_text = similarity * self.logit_scale_value()
        loss = None
        if return_loss:
            loss = video_text_contrastive_loss(logits_per_text, self.config.loss_reduction)
        return StanOutput(
            loss=loss,
            logits_per_video=logits_per_text.t(),
            logits_per_text=logits_per_text,
            video_embeds=l2_normalize(video_outputs.pooler_output),
            text_embeds=l2_normalize(text_outputs.pooler_output),
            frame_embeds=video_outputs.frame_embeds,
            token_embeds=text_outputs.token_embeds,
            text_model_output=text_outputs,
            vision_model_output=video_outputs,
        )


class StanForVideoTextRetrieval(StanModel):
    """The STAN dual encoder set up for retrieval training: `forward` returns the symmetric InfoNCE loss (summed
    directions by default) under the configured alignment and temperature. Weights are laid out as `StanModel`'s."""

    def forward(self, *args, return_loss: bool | None = True, **kwargs) -> StanOutput:
        return super().forward(*args, return_loss=return_loss, **kwargs)


class StanForVideoClassification(StanPreTrainedModel):
    """The STAN video tower with a recognition head on the projected video embedding (`config.classifier_type`):

    - `"linear"`: a linear layer;
    - `"class_embeddings"`: logits = scale * cos(video, class embedding), the class matrix initialised from the text
      embeddings of the class prompts (`config.hypothesis_template`) and trained;
    - `"frozen_class_embeddings"`: the same, the class matrix frozen and the scale fixed (the STAN authors' head);
    - `"text_encoder"`: the class embeddings computed at every forward pass by the model's own text tower from the
      tokenized class prompts it keeps (ViFi-CLIP), optionally with learnable text prompts.
    """

    # The text tower only initialises the class-embedding heads; only the text-encoder head keeps it.
    _clip_prefixes_not_kept = ("text_model.", "text_projection.", "logit_scale")

    def __init__(self, config: StanConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = StanVisionModel._from_config(config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        head = config.classifier_type
        # As CLIPForImageClassification, a head without the text tower has no text attributes at all.
        self.classifier = self.logit_scale = None
        if self.has_text_tower:
            self.text_model = CLIPTextModel._from_config(config.text_config)
            self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
            self.text_prompts = (
                TextPrompts(config.text_prompt_depth, config.text_prompt_length, config.text_config.hidden_size)
                if config.text_prompt_depth
                else None
            )
            # The tokenized class prompts, padded to every text position as ViFi-CLIP does, so that their shape
            # follows from the config (with or without prompts) and they are saved with the weights.
            shape = (config.num_labels, config.text_config.max_position_embeddings)
            self.register_buffer("class_input_ids", torch.zeros(shape, dtype=torch.long))
            self.register_buffer("class_attention_mask", torch.zeros(shape, dtype=torch.long))
        else:
            self.classifier = nn.Linear(config.projection_dim, config.num_labels, bias=head == "linear")
            if head == "frozen_class_embeddings":
                self.classifier.weight.requires_grad_(False)
        if head != "linear":
            self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
            if config.fixed_logit_scale is not None:
                self.logit_scale.requires_grad_(False)
        self.post_init()

    @property
    def has_text_tower(self) -> bool:
        """Whether the head computes its class embeddings with the text tower (`classifier_type="text_encoder"`)."""
        return self.config.classifier_type == "text_encoder"

    def _class_prompt_budget(self) -> int:
        """Tokens a class prompt may use: the text positions the text prompts leave."""
        prompt_tokens = self.config.text_prompt_length if self.config.text_prompt_depth else 0
        return self.config.text_config.max_position_embeddings - prompt_tokens

    @classmethod
    def from_clip_pretrained(cls, clip_name_or_path, *, clip_kwargs=None, class_names=None, **stan_kwargs):
        """As `StanPreTrainedModel.from_clip_pretrained`, with the classes named by `class_names` (else `id2label`).
        The class-embedding heads start from the CLIP text embeddings of the class prompts; the text-encoder head
        keeps CLIP's text tower and the tokenized class prompts (and starts its text prompts from
        `text_prompt_init` where the config asks for it)."""
        if class_names is not None:
            stan_kwargs.setdefault("id2label", dict(enumerate(class_names)))
        return super().from_clip_pretrained(clip_name_or_path, clip_kwargs=clip_kwargs, **stan_kwargs)

    def _start_from_clip(self, clip: CLIPModel, clip_name_or_path) -> None:
        super()._start_from_clip(clip, clip_name_or_path)
        if self.config.classifier_type == "linear":
            return
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(clip_name_or_path)
        if self.has_text_tower:
            self.set_class_names(self.class_names(), tokenizer)
            if self.text_prompts is not None:
                self.init_text_prompts_from_phrase(tokenizer)
        else:
            self.init_class_embeddings(clip, tokenizer)

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    def class_names(self) -> list[str]:
        return [self.config.id2label[i] for i in range(self.config.num_labels)]

    @torch.no_grad()
    def init_class_embeddings(self, dual_encoder: nn.Module, tokenizer) -> None:
        """Starts a class-embedding head from `dual_encoder`'s (a `CLIPModel` or `StanModel`) text embeddings of the
        class prompts, and from its logit scale unless the scale is fixed."""
        inputs = tokenize_class_prompts(tokenizer, self.class_names(), self.config.hypothesis_template)
        inputs = {name: tensor.to(dual_encoder.device) for name, tensor in inputs.items()}
        self.init_classifier_from_text(dual_encoder.get_text_features(**inputs).pooler_output)
        if self.config.fixed_logit_scale is None:
            self.logit_scale.copy_(dual_encoder.logit_scale)

    def init_classifier_from_text(self, text_embeds: torch.Tensor) -> None:
        """Sets the class embeddings of a class-embedding head, shape (num_labels, projection_dim)."""
        if self.classifier is None or self.config.classifier_type == "linear":
            raise ValueError(f"classifier_type={self.config.classifier_type!r} has no class embeddings to set.")
        expected = (self.config.num_labels, self.config.projection_dim)
        if tuple(text_embeds.shape) != expected:
            raise ValueError(f"text_embeds must have shape {expected}, got {tuple(text_embeds.shape)}.")
        with torch.no_grad():
            self.classifier.weight.copy_(text_embeds.to(self.classifier.weight.dtype))

    def set_class_names(self, class_names: list[str], tokenizer) -> None:
        """Points the text-encoder head at a new class list (e.g. another dataset's, for zero-shot recognition):
        `id2label` and the tokenized class prompts."""
        if not self.has_text_tower:
            raise ValueError(
                f"classifier_type={self.config.classifier_type!r} cannot change its classes: only the "
                "'text_encoder' head computes class embeddings from class names."
            )
        inputs = tokenize_class_prompts(
            tokenizer,
            class_names,
            self.config.hypothesis_template,
            length=self.config.text_config.max_position_embeddings,
            budget=self._class_prompt_budget(),
        )
        self.config.id2label = dict(enumerate(class_names))
        self.config.label2id = {name: index for index, name in enumerate(class_names)}
        self.num_labels = len(class_names)
        device = self.text_projection.weight.device
        self.class_input_ids = inputs["input_ids"].to(device)
        self.class_attention_mask = inputs["attention_mask"].to(device)

    def init_text_prompts_from_phrase(self, tokenizer) -> bool:
        """Starts the first-layer text prompts from `config.text_prompt_init`; False if the phrase is too short."""
        if self.config.text_prompt_init is None:
            return False
        phrase_ids = tokenizer(self.config.text_prompt_init, add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ][0]
        return self.text_prompts.init_from_phrase(phrase_ids, self.text_model.embeddings.token_embedding)

    def class_embeddings(self) -> torch.Tensor:
        """The (num_labels, projection_dim) class embeddings, not normalised."""
        if not self.has_text_tower:
            return self.classifier.weight
        if not bool(self.class_attention_mask.any(dim=1).all()):
            # A folder without class prompts (e.g. a StanModel's) loads with empty ones: never score against those.
            raise ValueError(
                "The text-encoder head has no class prompt for some classes: call "
                "set_class_names(class_names, tokenizer) first."
            )
        if self.text_prompts is None:
            pooled = self.text_model(
                input_ids=self.class_input_ids, attention_mask=self.class_attention_mask
            ).pooler_output
        else:
            pooled = encode_prompted_text(
                self.text_model, self.class_input_ids, self.class_attention_mask, self.text_prompts
            )
        return self.text_projection(pooled)

    @can_return_tuple
    def forward(
        self, pixel_values: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None, **kwargs
    ) -> StanVideoClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, 3, height, width)`): video clips.
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices for the cross-entropy loss.
        """
        kwargs = _without_absent_text_inputs(type(self).__name__, kwargs)
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        video_embeds = self.visual_projection(vision_outputs.pooler_output).mean(dim=1)
        if self.logit_scale is None:
            logits = self.classifier(video_embeds)
        else:
            scale = _logit_scale_value(self.logit_scale, self.config)
            logits = scale * l2_normalize(video_embeds) @ l2_normalize(self.class_embeddings()).t()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device))
        return StanVideoClassifierOutput(
            loss=loss,
            logits=logits,
            video_embeds=video_embeds,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
        )


def tokenize_class_prompts(
    tokenizer, class_names: list[str], template: str, length: int | None = None, budget: int | None = None
) -> dict:
    """`template.format(name)` for each class, tokenized; padded to `length` tokens if given (longest otherwise).
    Underscores in names read as spaces ("brush_hair": "brush hair"), as ViFi-CLIP writes its prompts. A prompt of
    more than `budget` (default `length`) tokens is an error, never silently cut."""
    prompts = [template.format(name.replace("_", " ")) for name in class_names]
    padding = {"padding": True} if length is None else {"padding": "max_length", "max_length": length}
    inputs = tokenizer(prompts, return_tensors="pt", **padding)
    budget = budget or length
    if budget is not None:
        too_long = [p for p, mask in zip(prompts, inputs["attention_mask"]) if int(mask.sum()) > budget]
        if too_long:
            raise ValueError(
                f"These class prompts have more than the {budget} tokens the text tower leaves them: {too_long[:5]}"
            )
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


# PEFT's sequence-classification wrapper (`task_type="SEQ_CLS"`) calls the model with a text classifier's inputs, None.
_TEXT_CLASSIFIER_INPUTS = ("input_ids", "attention_mask", "inputs_embeds")


def _without_absent_text_inputs(model_name: str, kwargs: dict) -> dict:
    given = [name for name in _TEXT_CLASSIFIER_INPUTS if kwargs.get(name) is not None]
    if given:
        raise TypeError(f"{model_name} classifies videos given as pixel_values; it takes no {', '.join(given)}.")
    return {key: value for key, value in kwargs.items() if key not in _TEXT_CLASSIFIER_INPUTS}


StanVisionModel._auto_class = "AutoModel"
StanModel._auto_class = "AutoModel"
StanForVideoTextRetrieval._auto_class = "AutoModel"
StanForVideoClassification._auto_class = "AutoModelForVideoClassification"

__all__ = [
    "StanPreTrainedModel",
    "StanVisionModel",
    "StanModel",
    "StanForVideoTextRetrieval",
    "StanForVideoClassification",
    "video_text_contrastive_loss",
]
