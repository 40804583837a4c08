"""Convert the authors' checkpoints into this package's models (console script `stan-convert`).

- STAN / Mug-STAN (farewellthree/STAN, an mmaction2 fork; the current `STAN_` and the older `timesFPN_` key
  prefixes) into a `StanForVideoTextRetrieval`:

    stan-convert --checkpoint stan_msrvtt_b32.pth --clip openai/clip-vit-base-patch32 --output stan-msrvtt-b32 \
        --temperature 0.01

- ViFi-CLIP (muzairkhattak/ViFi-CLIP; fine-tuned or prompted) into a `StanForVideoClassification` with the
  text-encoder head, given the classes to predict (see `convert_vifi_checkpoint`):

    stan-convert --checkpoint k400_clip_complete_finetuned_30_epochs.pth --clip openai/clip-vit-base-patch16 \
        --labels labels/kinetics_400_labels.csv --output vifi-clip-b16-k400

The layout is recognised from the keys (`--format` to insist). Files are read with `torch.load(weights_only=True)`
(a ViFi-CLIP run's yacs configuration is read as plain dicts, never unpickled as a yacs object). The conversion is
strict: every key of the source is mapped or dropped by name (or the conversion fails naming the keys it could not
map), and every weight of the target model is filled.
"""

import argparse
import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel
from transformers.utils import logging

from ..configuration_stan import StanConfig
from ..modeling_stan import StanForVideoTextRetrieval


logger = logging.get_logger(__name__)


class CheckpointConversionError(ValueError):
    """A checkpoint that cannot be converted: the message names the file and the problem."""


# Source prefix (after `backbone.` / `text_backbone.`) -> target prefix, tried in order.
_KEY_RULES = [
    # STAN-conv's Conv3d is called `layers` in the authors' code (`CLIPLayer_ConvTime`).
    (r"^backbone\.(?:STAN|timesFPN)_T_layers\.(\d+)\.layers\.", r"vision_model.stan.layers.\1.temporal.conv."),
    (r"^backbone\.(?:STAN|timesFPN)_S_layers\.(\d+)\.", r"vision_model.stan.layers.\1.spatial."),
    (r"^backbone\.(?:STAN|timesFPN)_T_layers\.(\d+)\.", r"vision_model.stan.layers.\1.temporal."),
    (r"^backbone\.(?:STAN|timesFPN)_time_embed\.", "vision_model.stan.time_embedding."),
    (r"^backbone\.(class_embedding|patch_embedding\.|position_embedding\.)", r"vision_model.embeddings.\1"),
    (r"^backbone\.layers\.", "vision_model.encoder.layers."),
    (r"^backbone\.(pre_layrnorm|post_layernorm)\.", r"vision_model.\1."),
    (r"^backbone\.visual_projection\.", "visual_projection."),
    (r"^text_backbone\.text_model\.", "text_model."),
    (r"^text_backbone\.text_projection\.", "text_projection."),
]
_IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)position_ids$")
# The authors' older `timesFPN_` backbone (38de624, `VITCLIPPretrained_STAN`) registers a branch position embedding
# (an `nn.Embedding`, hence `.weight`) and a [CLS] parameter that its forward pass never reads (the branch re-uses
# CLIP's own): exactly these two names are dropped, and the log says so.
_UNUSED_SOURCE_KEYS = re.compile(r"^backbone\.timesFPN_(pos_embed\.weight|cls_token)$")
_CONV_TEMPORAL_LAYER = re.compile(r"^backbone\.(?:STAN|timesFPN)_T_layers\.\d+\.layers\.")
_SPATIAL_LAYER = re.compile(r"^backbone\.(?:STAN|timesFPN)_S_layers\.(\d+)\.")


def map_key(source_key: str) -> str | None:
    """The target (Hugging Face) name of a source key, or None if no rule maps it."""
    for pattern, replacement in _KEY_RULES:
        if re.match(pattern, source_key):
            return re.sub(pattern, replacement, source_key, count=1)
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Reads `.safetensors`, or `.pth`/`.bin`/`.pt` with `torch.load(weights_only=True)` (never full unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointConversionError(f"{path}: no such checkpoint file.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointConversionError(f"{path}: not a readable safetensors file ({error}).") from error
    return _torch_load_weights_only(path)


def checkpoint_state_dict(checkpoint, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint: under `state_dict` (mmengine), under `model` (ViFi-CLIP), or the dict itself."""
    state_dict = None
    if isinstance(checkpoint, dict):
        state_dict = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointConversionError(
            f"{path}: expected a state dict (or a dict with 'state_dict' or 'model'), found none."
        )
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointConversionError(f"{path}: these entries of the state dict are not tensors: {not_tensors[:10]}")
    return state_dict


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file: an mmengine checkpoint (a dict with `state_dict`), a ViFi-CLIP one (with
    `model`) or a bare state dict."""
    return checkpoint_state_dict(load_checkpoint(path), path)


def checkpoint_format(state_dict: dict, path: str | Path) -> str:
    """`"stan"` or `"vifi"`, from the key layout; anything else is refused in one line."""
    from .convert_vifi_checkpoint import is_vifi_state_dict

    if is_vifi_state_dict(state_dict):
        return "vifi"
    if any(key.startswith(("backbone.", "text_backbone.")) for key in state_dict):
        return "stan"
    raise CheckpointConversionError(
        f"{path}: not a layout stan-convert knows (STAN: backbone.*, text_backbone.*; ViFi-CLIP: image_encoder.*, "
        f"text_encoder.*, prompt_learner.*); its first keys: {sorted(state_dict)[:5]}"
    )


# A ViFi-CLIP checkpoint stores its run configuration, a yacs `CfgNode` (a dict subclass): it loads as an
# OrderedDict (keys, values and attributes as stored), so that no yacs code runs and yacs need not be installed.
_PLAIN_STAND_INS = [(OrderedDict, "yacs.config.CfgNode")]


def _torch_load_weights_only(path: Path):
    try:
        with torch.serialization.safe_globals(_PLAIN_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointConversionError(
            f"{path}: refused by torch.load(weights_only=True); it holds objects other than tensors and plain "
            f"containers, which are never unpickled here ({str(error).splitlines()[0]})."
        ) from error
    except Exception as error:  # torch.load fails in arbitrary ways on bytes that are not a checkpoint
        raise CheckpointConversionError(
            f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})."
        ) from error


def infer_stan_depth(state_dict: dict[str, torch.Tensor]) -> int:
    """K = the number of STAN spatial layers in the checkpoint."""
    layers = {int(m.group(1)) for key in state_dict if (m := _SPATIAL_LAYER.match(key))}
    return max(layers) + 1 if layers else 0


def infer_temporal_module(state_dict: dict[str, torch.Tensor]) -> str:
    """Both temporal modules end in a `temporal_fc`; only STAN-conv's has a convolution called `layers`."""
    return "conv" if any(_CONV_TEMPORAL_LAYER.match(key) for key in state_dict) else "attention"


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], model: StanForVideoTextRetrieval, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Maps every source key onto `model`'s weights, checking names and shapes; fails on anything left over."""
    target_shapes = {k: v.shape for k, v in model.state_dict().items()}
    converted, unmapped, mismatched, unused = {}, [], [], []
    for key, tensor in state_dict.items():
        if _IGNORED_SOURCE_KEYS.search(key):
            continue
        if _UNUSED_SOURCE_KEYS.match(key):
            unused.append(key)
            continue
        target = map_key(key)
        if target is None or target not in target_shapes:
            unmapped.append(key)
        elif tensor.shape != target_shapes[target]:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target_shapes[target])}")
        else:
            converted[target] = tensor
    if unmapped:
        raise CheckpointConversionError(f"{source}: {len(unmapped)} keys could not be mapped: {sorted(unmapped)}")
    if mismatched:
        raise CheckpointConversionError(
            f"{source}: shapes do not match the CLIP config (wrong --clip?): " + "; ".join(mismatched)
        )
    if unused:
        logger.warning(f"{source}: dropped {sorted(unused)}, which the authors' forward pass never reads.")
    return converted


def convert_original_checkpoint(
    checkpoint: str | Path,
    clip: str | Path,
    output: str | Path | None = None,
    *,
    temporal_module: str | None = None,
    stan_depth: int | None = None,
    alignment: str = "mean",
    temperature: float | None = None,
    num_frames: int = 8,
    dtype: torch.dtype = torch.float32,
) -> StanForVideoTextRetrieval:
    """Converts the authors' checkpoint into a `StanForVideoTextRetrieval` (saved to `output` when given).

    `clip` is the CLIP checkpoint the model was trained from (local directory or Hub id): it gives the tower
    configuration, the tokenizer for the saved processor and, without `temperature`, the learnable logit scale.
    `temperature` is the authors' fixed tau (0.01 for B/32, 0.02 for B/16): the model then uses scale 1 / tau.
    """
    state_dict = load_original_state_dict(checkpoint)
    if checkpoint_format(state_dict, checkpoint) == "vifi":
        raise CheckpointConversionError(
            f"{checkpoint}: a ViFi-CLIP checkpoint; convert it with `convert_vifi_checkpoint` (stan-convert --labels)."
        )
    depth = infer_stan_depth(state_dict) if stan_depth is None else stan_depth
    module = infer_temporal_module(state_dict) if temporal_module is None else temporal_module
    clip_config = CLIPConfig.from_pretrained(clip)
    config = StanConfig.from_clip_config(
        clip_config,
        stan_depth=depth,
        temporal_module=module,
        alignment=alignment,
        num_frames=num_frames,
        fixed_logit_scale=None if temperature is None else 1.0 / temperature,
    )
    model = StanForVideoTextRetrieval(config)
    weights = convert_state_dict(state_dict, model, source=str(checkpoint))
    weights["logit_scale"] = _logit_scale(clip, temperature)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise CheckpointConversionError(f"{checkpoint}: the checkpoint has no weights for {missing}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    model = model.to(dtype).eval()
    if output is not None:
        _save(model, clip, Path(output))
    return model


def _logit_scale(clip: str | Path, temperature: float | None) -> torch.Tensor:
    if temperature is not None:
        if temperature <= 0:
            raise CheckpointConversionError(f"--temperature must be > 0, got {temperature}.")
        return torch.tensor(math.log(1.0 / temperature))
    return CLIPModel.from_pretrained(clip).logit_scale.detach().clone()


def _save(model: StanForVideoTextRetrieval, clip: str | Path, output: Path) -> None:
    model.save_pretrained(output)
    processor = _processor_for(clip, model.config)
    if processor is not None:
        processor.save_pretrained(output)


def _processor_for(clip: str | Path, config: StanConfig):
    """A `StanProcessor` with the CLIP checkpoint's tokenizer, or None when the checkpoint ships no tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(clip)
    except (OSError, ValueError, TypeError):
        return None
    from ..processing_stan import StanProcessor
    from ..video_processing_stan import StanVideoProcessor

    size = config.vision_config.image_size
    return StanProcessor(
        video_processor=StanVideoProcessor.for_image_size(size, config.num_frames), tokenizer=tokenizer
    )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STAN_ONLY_OPTIONS = ("temporal_module", "stan_depth", "alignment", "temperature")
_VIFI_ONLY_OPTIONS = ("labels", "template")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="the authors' checkpoint: .pth, .bin or .safetensors")
    parser.add_argument("--clip", required=True, help="CLIP checkpoint it was trained from (directory or Hub id)")
    parser.add_argument("--output", required=True, help="directory to write the converted model to")
    parser.add_argument(
        "--format", choices=["auto", "stan", "vifi"], default="auto", help="key layout; default: recognised"
    )
    parser.add_argument("--num-frames", type=int, help="frames per clip (default: the run's, else 8)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    stan = parser.add_argument_group("STAN / Mug-STAN checkpoints")
    stan.add_argument("--temporal-module", choices=["attention", "conv"], help="default: inferred")
    stan.add_argument("--stan-depth", type=int, help="K; default: inferred from the checkpoint")
    stan.add_argument("--alignment", choices=["mean", "mug"], help="default: mean")
    stan.add_argument("--temperature", type=float, help="fixed tau of the authors' config (0.01 B/32, 0.02 B/16)")
    vifi = parser.add_argument_group("ViFi-CLIP checkpoints")
    vifi.add_argument("--labels", help="classes to predict, their labels/*.csv format (id,name); required")
    vifi.add_argument("--template", help="class prompt (default: the run's, 'a photo of a {}.' without text prompts)")
    args = parser.parse_args(argv)
    try:
        model = _convert(args, parser)
    except CheckpointConversionError as error:
        parser.exit(2, f"error: {error}\n")
    config = model.config
    if config.classifier_type == "text_encoder":
        print(
            f"Converted {args.checkpoint} -> {args.output}: ViFi-CLIP, {config.num_labels} classes, "
            f"template {config.hypothesis_template!r}, prompts vision {config.vision_prompt_depth} / text "
            f"{config.text_prompt_depth} layers"
        )
    else:
        print(
            f"Converted {args.checkpoint} -> {args.output}: stan_depth={config.stan_depth}, "
            f"temporal_module={config.temporal_module}, alignment={config.alignment}"
        )


def _convert(args, parser):
    checkpoint = load_checkpoint(args.checkpoint)
    state_dict = checkpoint_state_dict(checkpoint, args.checkpoint)
    found = checkpoint_format(state_dict, args.checkpoint)
    if args.format != "auto" and args.format != found:
        raise CheckpointConversionError(f"{args.checkpoint}: --format {args.format}, but its keys are {found}'s.")
    other_options = _STAN_ONLY_OPTIONS if found == "vifi" else _VIFI_ONLY_OPTIONS
    misplaced = [f"--{name.replace('_', '-')}" for name in other_options if getattr(args, name) is not None]
    if misplaced:
        parser.error(f"{', '.join(misplaced)} do not apply to a {found} checkpoint ({args.checkpoint}).")
    if found == "vifi":
        from .convert_vifi_checkpoint import convert_vifi_checkpoint, read_labels

        if args.labels is None:
            parser.error("a ViFi-CLIP checkpoint needs --labels (the classes to predict, their id,name csv format).")
        return convert_vifi_checkpoint(
            checkpoint,
            args.clip,
            read_labels(args.labels),
            args.output,
            template=args.template,
            num_frames=args.num_frames,
            dtype=_DTYPES[args.dtype],
            source=str(args.checkpoint),
        )
    return convert_original_checkpoint(
        args.checkpoint,
        args.clip,
        args.output,
        temporal_module=args.temporal_module,
        stan_depth=args.stan_depth,
        alignment=args.alignment or "mean",
        temperature=args.temperature,
        num_frames=args.num_frames or 8,
        dtype=_DTYPES[args.dtype],
    )


if __name__ == "__main__":
    main()
