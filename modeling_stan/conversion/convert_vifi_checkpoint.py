"""Convert a checkpoint of the ViFi-CLIP authors' code (muzairkhattak/ViFi-CLIP) into a `StanForVideoClassification`.

    stan-convert --checkpoint k400_clip_complete_finetuned_30_epochs.pth --clip openai/clip-vit-base-patch16 \
        --labels labels/kinetics_400_labels.csv --output vifi-clip-b16-k400

Their checkpoints (`utils/tools.py: epoch_saving`) hold the `ViFiCLIP` module's state dict under `model`, in OpenAI's
CLIP layout (`image_encoder.*`, `text_encoder.*`, `logit_scale`, `prompt_learner.*`, with DDP's `module.` prefix),
and no token-embedding table: the class prompts' token embeddings are a frozen buffer of the class names they were
trained with, which their own loader drops. So the conversion takes
- `--clip`: the CLIP the run started from (its token table, tokenizer and configuration; ViFi-CLIP's B/16 runs:
  `openai/clip-vit-base-patch16`), checked against the start-of-text embedding stored in the checkpoint;
- `--labels`: the classes to predict, in their `labels/*.csv` format (`id,name`, ids 0..n-1 in order), which may be
  another dataset's (zero-shot) or the novel classes (base-to-novel).
The result is CLIP with frame-mean pooling (`stan_depth=0`) and the text-encoder head, scoring
`exp(logit_scale) * cos(video, text("a photo of a {name}."))` as their `ViFiCLIP.forward`; checkpoints of their
prompting runs also get the vision prompts (`image_encoder.VPT`, `...resblocks.N.VPT_shallow`) and the text prompts
(`prompt_learner.ctx`, `text_encoder...resblocks.N.VPT_shallow`), and the class prompt "{name}." after them.

The saved processor normalises with their ImageNet mean and std and resizes the short side to 256/224 of the input
size (bilinear) before a centre crop: their single-view test pipeline (`datasets/build.py`). Two differences remain
in the processor: its test-time frame sampling is the STAN authors' (segment starts on `(n - 1) / T` steps) where
theirs takes frame `int((i + 1/2) * n / T)`, and it resizes in float with antialiasing where mmcv's OpenCV resize
does not; their multi-view test (4 clips x 3 crops, softmax averaged) is the processor's `num_clips` / `num_crops`.
"""

import csv
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.utils import logging

from ..configuration_stan import StanConfig
from ..modeling_stan import StanForVideoClassification
from .convert_original_checkpoint import CheckpointConversionError, checkpoint_state_dict, load_checkpoint


logger = logging.get_logger(__name__)

# Their `datasets/build.py` normalises on the 0-255 scale with (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375).
VIFI_IMAGE_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
VIFI_IMAGE_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
# Their default `TRAINER.ViFi_CLIP.CTX_INIT`, the class-prompt prefix of the runs without text prompts.
VIFI_CTX_INIT = "a photo of a"
VIFI_KEY_PREFIXES = ("image_encoder.", "text_encoder.", "prompt_learner.")

_DIRECT = {
    "image_encoder.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "image_encoder.class_embedding": "vision_model.embeddings.class_embedding",
    "image_encoder.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "image_encoder.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "image_encoder.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "image_encoder.ln_post.weight": "vision_model.post_layernorm.weight",
    "image_encoder.ln_post.bias": "vision_model.post_layernorm.bias",
    "text_encoder.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text_encoder.ln_final.weight": "text_model.final_layer_norm.weight",
    "text_encoder.ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# OpenAI's projections multiply from the right (`x @ proj`): a linear layer's weight is their transpose.
_TRANSPOSED = {
    "image_encoder.proj": "visual_projection.weight",
    "text_encoder.text_projection": "text_projection.weight",
}
_LAYER = re.compile(r"^(image|text)_encoder\.transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER_TARGET = {"image": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
_LAYER_PARTS = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# `nn.MultiheadAttention` stacks the query, key and value projections in one matrix, in that order.
_IN_PROJECTION = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
# The class prompts' token embeddings of the training classes: their `load_checkpoint` drops them too.
_CLASS_PROMPT_BUFFERS = (
    "prompt_learner.token_prefix",
    "prompt_learner.token_suffix",
    "prompt_learner.complete_text_embeddings",
)


def is_vifi_state_dict(state_dict: dict) -> bool:
    return any(_strip_ddp(key).startswith(VIFI_KEY_PREFIXES) for key in state_dict)


def _strip_ddp(key: str) -> str:
    return key.removeprefix("module.")


def read_labels(path: str | Path) -> list[str]:
    """Class names from their `labels/*.csv` format: a header `id,name`, then one row per class, ids 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointConversionError(f"--labels {path}: no such file.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or [cell.strip() for cell in rows[0]] != ["id", "name"]:
        raise CheckpointConversionError(f"--labels {path}: expected a header 'id,name' (their labels/*.csv format).")
    names = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or row[0].strip() != str(len(names)) or not row[1].strip():
            raise CheckpointConversionError(
                f"--labels {path}, line {line}: expected '{len(names)},<class name>', got {','.join(row)!r}."
            )
        names.append(row[1].strip())
    if not names:
        raise CheckpointConversionError(f"--labels {path}: no classes.")
    return names


def vifi_config_fields(checkpoint: dict) -> dict:
    """The fields of their run configuration (`checkpoint['config']`, a yacs node read as nested dicts) used here."""
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict):
        return {}
    data, trainer = config.get("DATA", {}), config.get("TRAINER", {}).get("ViFi_CLIP", {})
    fields = {
        "num_frames": data.get("NUM_FRAMES"),
        "input_size": data.get("INPUT_SIZE"),
        "ctx_init": trainer.get("CTX_INIT"),
    }
    return {name: value for name, value in fields.items() if value is not None}


def map_vifi_state_dict(state_dict: dict[str, torch.Tensor], source: str = "checkpoint"):
    """Their keys onto ours: returns (weights, vision prompt tokens by layer, text prompt tokens by layer, class
    prompt buffers); fails naming every key it does not know."""
    weights, vision_prompts, text_prompts, class_prompts, unmapped = {}, {}, {}, {}, []
    for raw_key, tensor in state_dict.items():
        key = _strip_ddp(raw_key)
        layer = _LAYER.match(key)
        if key in _DIRECT:
            weights[_DIRECT[key]] = tensor
        elif key in _TRANSPOSED:
            weights[_TRANSPOSED[key]] = tensor.t()
        elif key == "image_encoder.VPT":
            vision_prompts[0] = tensor
        elif key == "prompt_learner.ctx":
            text_prompts[0] = tensor
        elif key in _CLASS_PROMPT_BUFFERS:
            class_prompts[key] = tensor
        elif layer and layer.group(3) == "VPT_shallow":
            (vision_prompts if layer.group(1) == "image" else text_prompts)[int(layer.group(2))] = tensor
        elif layer and layer.group(3) in _LAYER_PARTS:
            weights[f"{_LAYER_TARGET[layer.group(1)]}.{layer.group(2)}.{_LAYER_PARTS[layer.group(3)]}"] = tensor
        elif layer and layer.group(3) in _IN_PROJECTION:
            target = f"{_LAYER_TARGET[layer.group(1)]}.{layer.group(2)}.self_attn"
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                weights[f"{target}.{projection}.{_IN_PROJECTION[layer.group(3)]}"] = part
        else:
            unmapped.append(raw_key)
    if unmapped:
        raise CheckpointConversionError(f"{source}: {len(unmapped)} keys could not be mapped: {sorted(unmapped)}")
    for tower, prompts in (("vision", vision_prompts), ("text", text_prompts)):
        if sorted(prompts) != list(range(len(prompts))):
            first = "image_encoder.VPT" if tower == "vision" else "prompt_learner.ctx"
            raise CheckpointConversionError(
                f"{source}: {tower} prompt tokens for layers {sorted(prompts)}; their code always has layers "
                f"0..depth-1 (layer 0 being {first})."
            )
    return weights, vision_prompts, text_prompts, class_prompts


def _stacked(prompts: dict[int, torch.Tensor]) -> torch.Tensor:
    return torch.stack([prompts[layer] for layer in range(len(prompts))])


def vifi_class_template(ctx_init: str, text_prompt_length: int, tokenizer) -> str:
    """The class prompt their `VLPromptLearner` builds, as a template of our text-encoder head.

    Without text prompts: "<CTX_INIT> {name}.". With `n` text prompt tokens, their prompt is "<prefix> {name}." whose
    first `n` tokens are replaced by the prompts; the prefix is `CTX_INIT` when `n <= 4` (its tokens beyond the
    first `n` stay), else `n` placeholder words: what follows the prompts is the template.
    """
    ctx_init = ctx_init.replace("_", " ")
    if not text_prompt_length:
        return f"{ctx_init} {{}}."
    if not ctx_init or text_prompt_length > 4:
        return "{}."
    words = ctx_init.split()
    tokens = tokenizer(ctx_init, add_special_tokens=False)["input_ids"]
    if len(tokens) < text_prompt_length:
        raise CheckpointConversionError(
            f"CTX_INIT {ctx_init!r} has {len(tokens)} tokens, fewer than the {text_prompt_length} text prompt "
            "tokens: their prompt would overwrite the first tokens of each class name, which this model cannot do."
        )
    for start in range(len(words) + 1):
        rest = " ".join(words[start:])
        if tokenizer(rest, add_special_tokens=False)["input_ids"] == tokens[text_prompt_length:]:
            return f"{rest} {{}}." if rest else "{}."
    raise CheckpointConversionError(f"CTX_INIT {ctx_init!r}: its tokens after the prompts are not whole words.")


def _check_base_clip(clip, clip_config: CLIPConfig, token_embedding, bos_token_id, class_prompts, source) -> None:
    for tower in (clip_config.vision_config, clip_config.text_config):
        if tower.hidden_act != "quick_gelu":
            raise CheckpointConversionError(
                f"--clip {clip}: its activation is {tower.hidden_act!r}; ViFi-CLIP is OpenAI's CLIP (quick_gelu): "
                "pass the CLIP the run started from (ViT-B/16: openai/clip-vit-base-patch16)."
            )
    stored = next((class_prompts[name] for name in _CLASS_PROMPT_BUFFERS if name in class_prompts), None)
    if stored is None:
        return
    expected = token_embedding[bos_token_id]
    if stored.shape[-1] != expected.shape[-1] or not torch.allclose(
        stored[:, 0].float(), expected.float().expand_as(stored[:, 0]), rtol=1e-3, atol=1e-4
    ):
        raise CheckpointConversionError(
            f"{source}: its class prompts were not embedded with --clip {clip}'s token table (start-of-text token "
            "differs): pass the CLIP the run started from (ViT-B/16: openai/clip-vit-base-patch16)."
        )


def convert_vifi_checkpoint(
    checkpoint: str | Path | dict,
    clip: str | Path,
    labels: list[str],
    output: str | Path | None = None,
    *,
    template: str | None = None,
    num_frames: int | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> StanForVideoClassification:
    """Converts a ViFi-CLIP checkpoint: a file, the dict their `epoch_saving` writes, or its `model` state dict.

    `labels` are the classes to predict; `template` the class prompt (default: the one their run built).

    >>> labels = read_labels("labels/kinetics_400_labels.csv")
    >>> model = convert_vifi_checkpoint("vifi_b16_k400.pth", "openai/clip-vit-base-patch16", labels)
    """
    if not isinstance(checkpoint, dict):
        source, checkpoint = str(checkpoint), load_checkpoint(checkpoint)
    state_dict = checkpoint_state_dict(checkpoint, source)
    run = vifi_config_fields(checkpoint)
    weights, vision_prompts, text_prompts, class_prompts = map_vifi_state_dict(state_dict, source)
    clip_config = CLIPConfig.from_pretrained(clip)
    tokenizer = AutoTokenizer.from_pretrained(clip)
    token_embedding = CLIPModel.from_pretrained(clip).text_model.embeddings.token_embedding.weight.detach()
    _check_base_clip(clip, clip_config, token_embedding, tokenizer.bos_token_id, class_prompts, source)
    image_size = clip_config.vision_config.image_size
    if run.get("input_size", image_size) != image_size:
        raise CheckpointConversionError(
            f"{source}: trained on {run['input_size']}px inputs, but --clip {clip} takes {image_size}px."
        )
    text_prompt_length = text_prompts[0].shape[0] if text_prompts else 0
    if template is None:
        template = vifi_class_template(run.get("ctx_init", VIFI_CTX_INIT), text_prompt_length, tokenizer)
    if not text_prompts and any("_" in name for name in labels):
        logger.warning("Class names with '_' read as spaces here; their runs without text prompts keep the '_'.")
    config = StanConfig.from_clip_config(
        clip_config,
        stan_depth=0,
        classifier_type="text_encoder",
        hypothesis_template=template,
        vision_prompt_depth=len(vision_prompts),
        vision_prompt_length=vision_prompts[0].shape[0] if vision_prompts else 1,
        text_prompt_depth=len(text_prompts),
        text_prompt_length=text_prompt_length or 1,
        text_prompt_init=None,
        num_frames=num_frames or run.get("num_frames", 8),
        drop_path_rate=0.0,
        id2label=dict(enumerate(labels)),
    )
    model = StanForVideoClassification(config)
    try:
        model.set_class_names(labels, tokenizer)
    except ValueError as error:
        raise CheckpointConversionError(f"--labels: {error}") from error
    weights["text_model.embeddings.token_embedding.weight"] = token_embedding
    weights["class_input_ids"], weights["class_attention_mask"] = model.class_input_ids, model.class_attention_mask
    if vision_prompts:
        weights["vision_model.prompts.tokens"] = _stacked(vision_prompts)
    if text_prompts:
        weights["text_prompts.tokens"] = _stacked(text_prompts)
    _load_strictly(model, weights, clip, source)
    model = model.to(dtype).eval()
    if output is not None:
        save_vifi_model(model, tokenizer, Path(output))
    return model


def _load_strictly(model: StanForVideoClassification, weights: dict, clip, source: str) -> None:
    target = model.state_dict()
    mismatched = [
        f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target[name].shape)}"
        for name, tensor in weights.items()
        if tensor.shape != target[name].shape
    ]
    if mismatched:
        raise CheckpointConversionError(
            f"{source}: shapes do not match --clip {clip}'s configuration (wrong --clip?): " + "; ".join(mismatched)
        )
    missing = sorted(set(target) - set(weights))
    if missing:
        raise CheckpointConversionError(f"{source}: the checkpoint has no weights for {missing}")
    model.load_state_dict({name: tensor.to(target[name].dtype) for name, tensor in weights.items()}, strict=True)


def vifi_processor(tokenizer, config: StanConfig):
    """A `StanProcessor` normalising as their pipelines do; short side 256/224 of the input size, centre crop."""
    from ..processing_stan import StanProcessor
    from ..video_processing_stan import StanVideoProcessor

    size = config.vision_config.image_size
    video_processor = StanVideoProcessor(
        size={"shortest_edge": int(256 / 224 * size)},
        crop_size={"height": size, "width": size},
        num_frames=config.num_frames,
        image_mean=VIFI_IMAGE_MEAN,
        image_std=VIFI_IMAGE_STD,
    )
    return StanProcessor(video_processor=video_processor, tokenizer=tokenizer)


def save_vifi_model(model: StanForVideoClassification, tokenizer, output: Path) -> None:
    model.save_pretrained(output)
    vifi_processor(tokenizer, model.config).save_pretrained(output)


__all__ = ["convert_vifi_checkpoint", "is_vifi_state_dict", "read_labels", "VIFI_IMAGE_MEAN", "VIFI_IMAGE_STD"]
