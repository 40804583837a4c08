"""ViFi-CLIP's "bridge and prompt": learnable vision and text prompt tokens (remote code; what trains and the
prompt-only checkpoints are tools, in `modeling_stan.tuning.prompts`).

Definitions follow the ViFi-CLIP authors' code (muzairkhattak/ViFi-CLIP, `clip/model.py`, `trainers/vificlip.py`):

- vision prompts: `length` tokens appended after the patch tokens once the position embedding is added (before
  CLIP's pre-layer norm); before each vision layer `1 .. depth-1` the outputs at those positions are replaced by
  that layer's own fresh tokens; after the last prompted layer they are carried along and dropped at the end;
- text prompts: `length` tokens after the start token of each class prompt, replaced the same way before text
  layers `1 .. depth-1`; pooled at the (shifted) end-of-text token;
- every prompt token starts from a normal(0, 0.02) draw; the first-layer text tokens may start from the token
  embeddings of a phrase ("a photo of a") when it has at least `length` tokens, as the authors do.
"""

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask


PROMPT_INIT_STD = 0.02
PROMPT_CONFIG_FIELDS = (
    "vision_prompt_depth",
    "vision_prompt_length",
    "text_prompt_depth",
    "text_prompt_length",
    "text_prompt_init",
)


class PromptTokens(nn.Module):
    """`depth` sets of `length` learnable tokens: set `i` enters before layer `i` of its tower."""

    def __init__(self, depth: int, length: int, hidden_size: int):
        super().__init__()
        self.depth, self.length = depth, length
        self.tokens = nn.Parameter(torch.empty(depth, length, hidden_size))

    def layer_tokens(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        return self.tokens[layer].to(like.dtype).expand(like.shape[0], -1, -1)

    def replaces_before(self, layer: int) -> bool:
        # Layer 0 reads the tokens added to the embeddings; deeper layers up to the depth get fresh ones.
        return 0 < layer < self.depth

    def extra_repr(self) -> str:
        return f"depth={self.depth}, length={self.length}"


class VisionPrompts(PromptTokens):
    """Prompt tokens after the patch tokens of every frame."""

    def append(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.cat([embeddings, self.layer_tokens(0, embeddings)], dim=1)

    def before_layer(self, hidden_states: torch.Tensor, layer: int) -> torch.Tensor:
        if not self.replaces_before(layer):
            return hidden_states
        return torch.cat([self.strip(hidden_states), self.layer_tokens(layer, hidden_states)], dim=1)

    def strip(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The [CLS] and patch tokens alone (what the STAN branch and the outputs see)."""
        return hidden_states[:, : -self.length]


class TextPrompts(PromptTokens):
    """Prompt tokens after the start token of every class prompt."""

    def insert(self, token_embeds: torch.Tensor) -> torch.Tensor:
        return torch.cat([token_embeds[:, :1], self.layer_tokens(0, token_embeds), token_embeds[:, 1:]], dim=1)

    def before_layer(self, hidden_states: torch.Tensor, layer: int) -> torch.Tensor:
        if not self.replaces_before(layer):
            return hidden_states
        start, end = 1, 1 + self.length
        return torch.cat(
            [hidden_states[:, :start], self.layer_tokens(layer, hidden_states), hidden_states[:, end:]], dim=1
        )

    @torch.no_grad()
    def init_from_phrase(self, phrase_ids: torch.Tensor, token_embedding: nn.Embedding) -> bool:
        """Starts the first-layer tokens from the embeddings of the phrase's first `length` tokens (`phrase_ids`
        without start/end tokens); returns False (tokens left as they are) when the phrase is too short."""
        if phrase_ids.numel() < self.length:
            return False
        self.tokens[0].copy_(token_embedding(phrase_ids[: self.length].to(self.tokens.device)))
        return True


def encode_prompted_text(
    text_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompts: TextPrompts
) -> torch.Tensor:
    """The pooled (end-of-text) states of `text_model` (a `CLIPTextModel`) with `prompts` after the start token.

    The same computation as `CLIPTextModel.forward` (token plus position embedding, causal masked layers, final
    norm, pooled at the first end-of-text token) with the prompt tokens inserted and replaced per layer. The
    sequence keeps its length: the inserted tokens push out as many trailing positions, which must be padding.
    """
    length = input_ids.shape[1]
    if int(attention_mask.sum(dim=1).max()) > length - prompts.length:
        raise ValueError(
            f"A class prompt uses more than the {length - prompts.length} of {length} text positions "
            f"that {prompts.length} text prompt tokens leave."
        )
    embeddings = text_model.embeddings
    inputs_embeds = prompts.insert(embeddings.token_embedding(input_ids))[:, :length]
    hidden_states = embeddings(inputs_embeds=inputs_embeds)
    prompt_mask = attention_mask.new_ones(attention_mask.shape[0], prompts.length)
    attention_mask = torch.cat([attention_mask[:, :1], prompt_mask, attention_mask[:, 1:]], dim=1)[:, :length]
    causal_mask = create_causal_mask(
        config=text_model.config, inputs_embeds=hidden_states, attention_mask=attention_mask, past_key_values=None
    )
    for index, layer in enumerate(text_model.encoder.layers):
        hidden_states = layer(prompts.before_layer(hidden_states, index), causal_mask, is_causal=True)
    hidden_states = text_model.final_layer_norm(hidden_states)
    end_of_text = end_of_text_positions(input_ids, text_model.config.eos_token_id) + prompts.length
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), end_of_text]


def end_of_text_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where `CLIPTextModel` pools: the first end-of-text token (the largest id for configs with the legacy id 2)."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


__all__ = [
    "PromptTokens",
    "VisionPrompts",
    "TextPrompts",
    "PROMPT_INIT_STD",
    "PROMPT_CONFIG_FIELDS",
    "encode_prompted_text",
    "end_of_text_positions",
]
