"""What trains in a ViFi-CLIP run, and prompt-only checkpoints saved and loaded on top of a base checkpoint the way
PEFT adapters are (a tool: it does not travel with checkpoints as remote code).

Prompt-only checkpoints use PEFT's file names (`adapter_config.json`, `adapter_model.safetensors`) but not PEFT's
loader: PEFT's prompt-learning methods prepend virtual tokens to the inputs of a language model and have no notion
of per-layer tokens inside a vision tower, so the weights are saved and loaded here, and the config names its own
`adapter_type` so PEFT does not mistake the folder for one of its adapters.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..vifi_prompts import PROMPT_CONFIG_FIELDS, PromptTokens


ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TYPE = "stan_vifi_prompts"
# What `set_trainable_parts` may leave trainable: ViFi-CLIP's `USE` ("both", "text", "image") and `PROMPT_MODEL`.
TRAINABLE_PARTS = ("all", "text", "vision", "prompts")


# ----------------------------------------------------------------------------------------------------------------
# What trains
# ----------------------------------------------------------------------------------------------------------------


def prompt_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prompt tokens of `model` by parameter name."""
    return {
        f"{name}.tokens": module.tokens for name, module in model.named_modules() if isinstance(module, PromptTokens)
    }


def set_trainable_parts(model: nn.Module, parts: str, train_token_embedding: bool = True) -> list[str]:
    """Freezes all but `parts` of `model`; returns the names of the parameters left trainable.

    `train_token_embedding=False` also freezes the text tower's token-embedding table, as ViFi-CLIP's `TextEncoder`
    holds none (the class names' token embeddings are a fixed buffer there).

    - `"all"`: everything stays as built (a frozen class matrix or fixed scale stays frozen);
    - `"vision"` / `"text"`: only that tower and its projection (ViFi-CLIP's image- / text-tuned variants);
    - `"prompts"`: only the prompt tokens (ViFi-CLIP's prompting stage), which the model must have.
    """
    if parts not in TRAINABLE_PARTS:
        raise ValueError(f"trainable parts must be one of {list(TRAINABLE_PARTS)}, got {parts!r}.")
    if parts != "all":
        prompts = prompt_parameters(model)
        if parts == "prompts" and not prompts:
            raise ValueError(
                "Training only the prompts needs a model with prompts: set vision_prompt_depth and/or "
                "text_prompt_depth > 0."
            )
        prefixes = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}
        for name, parameter in model.named_parameters():
            if parts == "prompts":
                parameter.requires_grad_(name in prompts)
            else:
                parameter.requires_grad_(name.startswith(prefixes[parts]) and name not in prompts)
    if not train_token_embedding:
        for name, parameter in model.named_parameters():
            if name.endswith("embeddings.token_embedding.weight"):
                parameter.requires_grad_(False)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not trainable:
        raise ValueError(f"Training only {parts!r} leaves no trainable parameter in {type(model).__name__}.")
    return trainable


# ----------------------------------------------------------------------------------------------------------------
# Prompt-only checkpoints
# ----------------------------------------------------------------------------------------------------------------


def save_prompts(
    model: nn.Module, save_directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> None:
    """Writes the prompt tokens of `model` alone: `adapter_model.safetensors` and `adapter_config.json` (the prompt
    fields of its config, and the base checkpoint they were trained on)."""
    weights = {name: parameter.detach().cpu().contiguous() for name, parameter in prompt_parameters(model).items()}
    if not weights:
        raise ValueError(f"{type(model).__name__} has no prompt tokens to save.")
    os.makedirs(save_directory, exist_ok=True)
    save_file(weights, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    adapter_config = {
        "adapter_type": ADAPTER_TYPE,
        "base_model_name_or_path": base_model_name_or_path,
        **{field: getattr(model.config, field) for field in PROMPT_CONFIG_FIELDS},
    }
    with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as file:
        json.dump(adapter_config, file, indent=2)


def read_prompt_config(prompts_directory: str | os.PathLike) -> dict:
    """The prompt config fields saved by `save_prompts`."""
    path = os.path.join(prompts_directory, ADAPTER_CONFIG_NAME)
    with open(path, encoding="utf-8") as file:
        adapter_config = json.load(file)
    if adapter_config.get("adapter_type") != ADAPTER_TYPE:
        raise ValueError(
            f"{path} is not a STAN prompt checkpoint: adapter_type is {adapter_config.get('adapter_type')!r}, "
            f"expected {ADAPTER_TYPE!r}."
        )
    missing = [field for field in PROMPT_CONFIG_FIELDS if field not in adapter_config]
    if missing:
        raise ValueError(f"{path} lacks the prompt fields {missing}.")
    return {field: adapter_config[field] for field in PROMPT_CONFIG_FIELDS}


def load_with_prompts(
    model_class: type, base_model_name_or_path: str | os.PathLike, prompts_directory: str | os.PathLike, **kwargs
) -> nn.Module:
    """`model_class.from_pretrained(base, **kwargs)` with the prompts saved in `prompts_directory` on top.

    The base checkpoint gives every other weight; the prompt tokens must match the saved prompt fields exactly.
    """
    model = model_class.from_pretrained(base_model_name_or_path, **read_prompt_config(prompts_directory), **kwargs)
    weights_path = os.path.join(prompts_directory, ADAPTER_WEIGHTS_NAME)
    saved = load_file(weights_path)
    expected = prompt_parameters(model)
    if set(saved) != set(expected):
        raise ValueError(
            f"{weights_path} holds the prompts {sorted(saved)}, but the model built from its config has "
            f"{sorted(expected)}."
        )
    with torch.no_grad():
        for name, parameter in expected.items():
            if saved[name].shape != parameter.shape:
                raise ValueError(
                    f"{weights_path}: {name} has shape {tuple(saved[name].shape)}, the model expects "
                    f"{tuple(parameter.shape)}."
                )
            parameter.copy_(saved[name])
    return model


__all__ = [
    "TRAINABLE_PARTS",
    "prompt_parameters",
    "set_trainable_parts",
    "save_prompts",
    "read_prompt_config",
    "load_with_prompts",
]
