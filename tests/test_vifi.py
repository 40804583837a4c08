"""ViFi-CLIP in this package: the text-encoder head, vision/text prompts, tuning variants, prompt-only checkpoints."""

import json

import pytest
import torch
from conftest import random_video, tiny_stan_config
from transformers import AutoTokenizer, CLIPModel

from modeling_stan import StanConfig, StanForVideoClassification
from modeling_stan.demo.tiny_clip import build_tiny_clip_tokenizer
from modeling_stan.tuning.prompts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    load_with_prompts,
    prompt_parameters,
    save_prompts,
    set_trainable_parts,
)
from modeling_stan.vifi_prompts import encode_prompted_text


NAMES = ["red square", "blue circle", "green triangle"]
PROMPTS = dict(vision_prompt_depth=3, vision_prompt_length=2, text_prompt_depth=2, text_prompt_length=4)


def _text_head(tiny_clip_dir, **fields):
    fields.setdefault("stan_depth", 2)
    fields.setdefault("drop_path_rate", 0.0)
    return StanForVideoClassification.from_clip_pretrained(
        tiny_clip_dir, classifier_type="text_encoder", class_names=NAMES, **fields
    ).eval()


def test_text_encoder_head_is_clip_zero_shot(tiny_clip_dir):
    """Untrained, the text-encoder head scores videos as CLIP does: scale * cos(video, text(prompt))."""
    model = _text_head(tiny_clip_dir, hypothesis_template="a video of {}.")
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        text = clip.get_text_features(
            **tokenizer([f"a video of {n}." for n in NAMES], padding=True, return_tensors="pt")
        ).pooler_output
        out = model(pixel_values=random_video())
    cos = torch.nn.functional.normalize(out.video_embeds, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    torch.testing.assert_close(out.logits, clip.logit_scale.exp() * cos, atol=1e-5, rtol=1e-5)


def test_text_prompts_are_exactly_inserted_tokens(tiny_clip_dir):
    """Text prompts at depth 1 holding the embeddings of a phrase give the text tower's encoding of
    "<phrase> <name>." itself: positions, causal mask and end-of-text pooling are CLIP's."""
    model = _text_head(
        tiny_clip_dir,
        hypothesis_template="{}.",
        text_prompt_depth=1,
        text_prompt_length=4,
        text_prompt_init="a video of the",
    )  # 4 tokens of the tiny tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    full = tokenizer([f"a video of the {n}." for n in NAMES], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = model.text_model(**full).pooler_output
        prompted = encode_prompted_text(
            model.text_model, model.class_input_ids, model.class_attention_mask, model.text_prompts
        )
    torch.testing.assert_close(prompted, expected, atol=1e-5, rtol=1e-5)


def test_zero_depth_prompts_equal_the_model_without_prompts():
    labels = dict(enumerate(NAMES))
    plain = StanForVideoClassification(tiny_stan_config(classifier_type="text_encoder", id2label=labels)).eval()
    plain.set_class_names(NAMES, build_tiny_clip_tokenizer())  # copied into the other two with the weights
    zero = StanForVideoClassification(
        tiny_stan_config(
            classifier_type="text_encoder",
            id2label=labels,
            vision_prompt_depth=0,
            vision_prompt_length=5,
            text_prompt_depth=0,
            text_prompt_length=7,
        )
    ).eval()
    assert not prompt_parameters(zero)
    zero.load_state_dict(plain.state_dict())
    video = random_video()
    with torch.no_grad():
        torch.testing.assert_close(zero(pixel_values=video).logits, plain(pixel_values=video).logits, atol=0, rtol=0)
    prompted = StanForVideoClassification(
        tiny_stan_config(classifier_type="text_encoder", id2label=labels, **PROMPTS)
    ).eval()
    prompted.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(prompted(pixel_values=video).logits, plain(pixel_values=video).logits)


@pytest.mark.parametrize("stan_depth", [0, 2])
def test_only_prompts_get_gradients_and_change(tiny_clip_dir, stan_depth):
    model = _text_head(tiny_clip_dir, stan_depth=stan_depth, **PROMPTS).train()
    trainable = set_trainable_parts(model, "prompts")
    assert sorted(trainable) == ["text_prompts.tokens", "vision_model.prompts.tokens"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(pixel_values=random_video(), labels=torch.tensor([0, 2])).loss.backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in trainable), name
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(trainable)


def test_tuning_variants_follow_vifi(tiny_clip_dir):
    model = _text_head(tiny_clip_dir)
    text = set_trainable_parts(model, "text")
    assert text and all(n.startswith(("text_model.", "text_projection.")) for n in text)
    vision = set_trainable_parts(model, "vision")
    assert any(".stan." in n for n in vision) and all(
        n.startswith(("vision_model.", "visual_projection.")) for n in vision
    )
    with pytest.raises(ValueError, match="needs a model with prompts"):
        set_trainable_parts(model, "prompts")


def test_frozen_class_embeddings_are_the_authors_head(tiny_clip_dir):
    model = StanForVideoClassification.from_clip_pretrained(
        tiny_clip_dir, classifier_type="frozen_class_embeddings", class_names=NAMES, stan_depth=1
    )
    assert model.config.fixed_logit_scale == 100.0
    assert not model.classifier.weight.requires_grad and not model.logit_scale.requires_grad
    out = model(pixel_values=random_video())
    cos = (
        torch.nn.functional.normalize(out.video_embeds, dim=-1)
        @ torch.nn.functional.normalize(model.classifier.weight, dim=-1).t()
    )
    torch.testing.assert_close(out.logits, 100.0 * cos)


def test_prompt_only_checkpoint_on_its_base_reproduces_the_full_model(tiny_clip_dir, tmp_path):
    base = _text_head(tiny_clip_dir)
    base.save_pretrained(tmp_path / "base")
    prompted = StanForVideoClassification.from_pretrained(tmp_path / "base", **PROMPTS).eval()
    with torch.no_grad():  # as if trained: prompts away from their initialisation
        for parameter in prompt_parameters(prompted).values():
            parameter.normal_(0, 0.5)
    prompted.save_pretrained(tmp_path / "full")
    save_prompts(prompted, tmp_path / "prompts", base_model_name_or_path=str(tmp_path / "base"))

    saved = json.loads((tmp_path / "prompts" / ADAPTER_CONFIG_NAME).read_text())
    assert saved["vision_prompt_depth"] == 3 and saved["base_model_name_or_path"] == str(tmp_path / "base")
    assert (tmp_path / "prompts" / ADAPTER_WEIGHTS_NAME).stat().st_size < 5_000  # prompts only
    adapted = load_with_prompts(StanForVideoClassification, tmp_path / "base", tmp_path / "prompts").eval()
    full = StanForVideoClassification.from_pretrained(tmp_path / "full").eval()
    video = random_video()
    with torch.no_grad():
        expected = prompted(pixel_values=video).logits
        torch.testing.assert_close(adapted(pixel_values=video).logits, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(full(pixel_values=video).logits, expected, atol=1e-6, rtol=1e-6)


def test_prompt_checkpoint_of_another_shape_fails(tiny_clip_dir, tmp_path):
    base = _text_head(tiny_clip_dir)
    base.save_pretrained(tmp_path / "base")
    prompted = StanForVideoClassification.from_pretrained(tmp_path / "base", **PROMPTS)
    save_prompts(prompted, tmp_path / "prompts")
    config_path = tmp_path / "prompts" / ADAPTER_CONFIG_NAME
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "vision_prompt_length": 5}))
    with pytest.raises(ValueError, match="vision_model.prompts.tokens has shape"):
        load_with_prompts(StanForVideoClassification, tmp_path / "base", tmp_path / "prompts")


def test_set_class_names_for_zero_shot(tiny_clip_dir):
    model = _text_head(tiny_clip_dir, **PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    model.set_class_names(["up", "down"], tokenizer)
    assert model(pixel_values=random_video()).logits.shape == (2, 2)
    assert model.config.id2label == {0: "up", 1: "down"}
    model.set_class_names(["left_to_right"], tokenizer)  # identifiers read as words in the prompt
    expected = tokenizer(["a video of left to right."], padding="max_length", max_length=32)["input_ids"]
    assert model.class_input_ids.tolist() == expected
    with pytest.raises(ValueError, match="more than the 28 tokens"):
        model.set_class_names(["x" * 40], tokenizer)


def test_prompt_config_is_validated():
    with pytest.raises(ValueError, match="text_prompt_depth > 0 needs classifier_type='text_encoder'"):
        tiny_stan_config(text_prompt_depth=1)
    with pytest.raises(ValueError, match="vision_prompt_depth must be an integer in"):
        tiny_stan_config(vision_prompt_depth=7)
    assert StanConfig().classifier_type == "linear"
