"""What users' tools rely on beyond transformers' common tests: `return_dict=False`, `Trainer` with the usual
`compute_metrics`, PEFT LoRA (`task_type="SEQ_CLS"`), input gradients under gradient checkpointing, CLIP's scaled
initialisation of weights a checkpoint lacks, switching the attention implementation after loading, and every saved
checkpoint being a complete Hub repository."""

import json
import logging

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_modeling_common_suite import StanModelTester
from test_readme import single_thread, tiny_processor  # noqa: F401  (single_thread is a fixture)
from transformers import AutoModel, CLIPConfig, CLIPModel, Trainer, TrainingArguments

from modeling_stan import StanForVideoClassification, StanForVideoTextRetrieval, StanModel, StanVisionModel


pytestmark = pytest.mark.usefixtures("single_thread")

NUM_LABELS = 3


def _tester(**kwargs) -> StanModelTester:
    return StanModelTester(None, num_labels=NUM_LABELS, **kwargs)


def _inputs(tester: StanModelTester, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    input_ids, attention_mask = tester.prepare_text()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": tester.prepare_video()}


def _flat(values) -> list[torch.Tensor]:
    """The tensors of a (nested) tuple or ModelOutput, in order."""
    tensors = []
    for value in values.to_tuple() if hasattr(values, "to_tuple") else values:
        tensors.extend([value] if isinstance(value, torch.Tensor) else _flat(value))
    return tensors


def _assert_same_tensors(first, second) -> None:
    first, second = _flat(first), _flat(second)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- return_dict


@pytest.mark.parametrize("setting", ["argument", "config"])
def test_return_dict_false_gives_tuples_everywhere(setting):
    tester = _tester()
    inputs = _inputs(tester)
    video = {"pixel_values": inputs["pixel_values"]}
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    dual = StanModel(tester.get_config()).eval()
    classifier = StanForVideoClassification(tester.get_config()).eval()
    calls = [
        (dual, dual.forward, inputs),
        (dual, dual.get_video_features, video),
        (dual, dual.get_text_features, text),
        (classifier, classifier.forward, {**video, "labels": torch.tensor([0, 1, 2])}),
    ]
    for model, method, call_inputs in calls:
        with torch.no_grad():
            as_dict = method(**call_inputs)
            if setting == "argument":
                as_tuple = method(**call_inputs, return_dict=False)
            else:
                model.config.return_dict = False
                as_tuple = method(**call_inputs)
                model.config.return_dict = True
        assert isinstance(as_tuple, tuple), method.__qualname__
        _assert_same_tensors(as_dict, as_tuple)


# ----------------------------------------------------------------------------------------------- base model, init


@pytest.mark.parametrize("stan_depth", [0, 1])
def test_every_class_is_its_own_base_model(stan_depth):
    config = _tester(stan_depth=stan_depth).get_config()
    for model_class in (StanVisionModel, StanModel, StanForVideoClassification):
        model = model_class(config)
        assert model.base_model is model


def test_weights_missing_from_a_checkpoint_get_clips_initialisation(tmp_path):
    # Wide towers, so that each weight's sample standard deviation is close to the intended one.
    tester = _tester(hidden_size=128, intermediate_size=256, projection_dim=64)
    config = tester.get_config()
    StanModel(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = (
        "text_model.encoder.layers.0.",
        "vision_model.encoder.layers.0.",
        "vision_model.stan.",
        "visual_projection.",
        "text_projection.",
    )
    save_file(
        {k: v for k, v in weights.items() if not k.startswith(missing)},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    torch.manual_seed(0)
    in_process = StanModel.from_pretrained(tmp_path).state_dict()
    torch.manual_seed(0)
    remote_code = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).state_dict()
    # transformers' own CLIP initialisation of the same towers is the reference.
    clip = CLIPModel(
        CLIPConfig(
            text_config=config.text_config.to_dict(),
            vision_config=config.vision_config.to_dict(),
            projection_dim=config.projection_dim,
        )
    ).state_dict()
    # Every Linear weight the checkpoint lacks, but the zero-initialised temporal modules' (STAN's own rule); a STAN
    # spatial layer is a CLIP vision layer.
    checked = [
        key
        for key in in_process
        if key.startswith(missing)
        and key.endswith("weight")
        and "temporal" not in key
        and "time_embedding" not in key
        and in_process[key].ndim == 2
    ]
    assert len(checked) == 3 * 6 + 2
    for key in checked:
        expected = clip[key.replace("stan.layers.0.spatial.", "encoder.layers.0.")].std().item()
        assert in_process[key].std().item() == pytest.approx(expected, rel=0.1), key
    # STAN's own rules: the temporal module starts as the identity, the time embedding as torch's N(0, 1).
    assert not in_process["vision_model.stan.layers.0.temporal.temporal_fc.weight"].any()
    assert in_process["vision_model.stan.time_embedding.weight"].std().item() == pytest.approx(1.0, rel=0.1)
    # The same initialisation whether the model's code is imported or loaded from the checkpoint.
    for key, value in in_process.items():
        torch.testing.assert_close(remote_code[key], value, rtol=0, atol=0, msg=key)
    # Weights the checkpoint has are loaded, not initialised.
    key = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(in_process[key], weights[key], rtol=0, atol=0)


def test_a_linear_classifier_missing_from_a_checkpoint_starts_as_video_classifiers_do(tmp_path):
    # A dual encoder's folder loaded as a classifier: the head is new. As the heads of transformers' video
    # classifiers (VideoMAE, ViViT), it starts at N(0, initializer_range); the projection keeps CLIP's scale.
    tester = _tester(hidden_size=128, intermediate_size=256, projection_dim=64)
    config = tester.get_config()
    config.initializer_factor = 3.0  # tells the two rules apart
    StanModel(config).save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = StanForVideoClassification.from_pretrained(tmp_path, classifier_type="linear", num_labels=400)
    assert model.classifier.weight.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    assert not model.classifier.bias.any()
    assert not hasattr(model, "text_model")  # as CLIPForImageClassification: no text tower, no attribute


# ---------------------------------------------------------------------------------------------- attention switch


def test_set_attn_implementation_after_loading_switches_every_tower(tmp_path, caplog):
    tester = _tester()
    StanModel(tester.get_config()).save_pretrained(tmp_path)
    model = StanModel.from_pretrained(tmp_path).eval()
    configs = [model.config, model.config.vision_config, model.config.text_config, model.text_model.config]
    assert {config._attn_implementation for config in configs} == {"sdpa"}
    inputs = _inputs(tester)
    with torch.no_grad():
        sdpa_logits = model(**inputs).logits_per_text
    with caplog.at_level(logging.WARNING, logger="transformers"):
        model.set_attn_implementation("eager")
    assert not caplog.records, [record.getMessage() for record in caplog.records]
    assert {config._attn_implementation for config in configs} == {"eager"}
    assert model.vision_model.encoder.layers[0].self_attn.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits_per_text, sdpa_logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ training integrations


def test_input_gradients_reach_checkpointed_layers_of_a_frozen_tower():
    tester = _tester()
    model = StanForVideoClassification(tester.get_config()).train()
    model.requires_grad_(False)
    adapted = model.vision_model.encoder.layers[0].mlp.fc1.weight
    adapted.requires_grad_(True)
    # The reentrant variant only differentiates through a checkpointed layer whose input requires grad.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.get_input_embeddings() is model.vision_model.embeddings.patch_embedding
    model.enable_input_require_grads()
    model(pixel_values=tester.prepare_video(), labels=torch.tensor([0, 1, 2])).loss.backward()
    assert adapted.grad is not None and adapted.grad.abs().sum() > 0


def test_trainer_evaluates_with_argmax_compute_metrics(tmp_path):
    tester = _tester()
    model = StanForVideoClassification(tester.get_config())
    torch.manual_seed(0)
    dataset = [{"pixel_values": tester.prepare_video()[0], "labels": label} for label in (0, 1, 2, 0)]
    seen = {}

    def compute_metrics(eval_pred):
        seen["shape"] = np.shape(eval_pred.predictions)
        predictions = np.argmax(eval_pred.predictions, axis=-1)
        return {"accuracy": float((predictions == eval_pred.label_ids).mean())}

    args = TrainingArguments(tmp_path, per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    metrics = Trainer(model=model, args=args, eval_dataset=dataset, compute_metrics=compute_metrics).evaluate()
    assert seen["shape"] == (len(dataset), NUM_LABELS)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([row["pixel_values"] for row in dataset])).logits
    expected = float((logits.argmax(-1) == torch.tensor([row["labels"] for row in dataset])).float().mean())
    assert metrics["eval_accuracy"] == pytest.approx(expected)


def test_peft_lora_sequence_classification_trains_adapters_and_head():
    tester = _tester()
    model = StanForVideoClassification(tester.get_config())
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or ".classifier." in name for name in trainable)
    labels = torch.tensor([0, 1, 2])
    video = tester.prepare_video()
    outputs = peft_model(pixel_values=video, labels=labels)
    outputs.loss.backward()
    assert all(parameter.grad is not None for name, parameter in peft_model.named_parameters() if name in trainable)
    as_tuple = peft_model.eval()(pixel_values=video, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[1].shape == (tester.batch_size, NUM_LABELS)
    with pytest.raises(TypeError, match="takes no input_ids"):
        peft_model(input_ids=torch.ones(3, 4, dtype=torch.long), pixel_values=video)


# ------------------------------------------------------------------------------------------------ saved checkpoints


CODE_FILES = {
    "configuration_stan.py",
    "modeling_stan.py",
    "mug_alignment.py",
    "pipeline_zero_shot_video_classification.py",
    "processing_stan.py",
    "video_processing_stan.py",
    "video_io.py",
}


@pytest.mark.parametrize(
    "model_class, own_auto_class",
    [
        (StanVisionModel, "AutoModel"),
        (StanModel, "AutoModel"),
        (StanForVideoTextRetrieval, "AutoModel"),
        (StanForVideoClassification, "AutoModelForVideoClassification"),
    ],
)
def test_model_and_processor_save_a_complete_hub_repository(model_class, own_auto_class, tiny_clip_dir, tmp_path):
    model_class(_tester().get_config()).save_pretrained(tmp_path)
    tiny_processor(tiny_clip_dir).save_pretrained(tmp_path)
    assert CODE_FILES <= {path.name for path in tmp_path.glob("*.py")}
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForVideoClassification"}
    assert config["auto_map"][own_auto_class] == f"modeling_stan.{model_class.__name__}"
    is_dual_encoder = hasattr(model_class, "get_text_features")
    assert ("zero-shot-video-classification" in config.get("custom_pipelines", {})) == is_dual_encoder
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_stan.StanProcessor"}
    video_processor_map = processor_config["video_processor"]["auto_map"]
    assert video_processor_map["AutoVideoProcessor"] == "video_processing_stan.StanVideoProcessor"
