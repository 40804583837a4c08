"""Model cards: the published cards are fresh, validate with huggingface_hub, label the paper's numbers as reported,
and `write_training_model_card` writes a valid card of a training run."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_eval_result
from test_readme import NUM_FRAMES, one_thread, run_python_snippet, tiny_processor, write_video

from modeling_stan import StanForVideoClassification, StanForVideoTextRetrieval
from modeling_stan.hub.model_card import (
    CHECKPOINTS_PATH,
    ModelCardError,
    extract_snippets,
    load_checkpoint_specs,
    stale_published_cards,
    validate_card,
    write_training_model_card,
)


HUB_CARDS_DIR = Path(__file__).resolve().parents[1] / "hub_cards"
PUBLISHED = sorted(HUB_CARDS_DIR.glob("*/README.md"))
STAN_PAPER = "https://arxiv.org/abs/2301.11116"


def _card_id(path):
    return path.parent.name


def test_every_checkpoint_has_a_fresh_rendered_card():
    names = {spec.name for spec in load_checkpoint_specs()}
    assert {path.parent.name for path in PUBLISHED} == names
    assert {"stan-self-b32-msrvtt", "stan-self-b16-msrvtt", "stan-conv-b32-didemo"} <= names
    assert {"stan-self-b16-k400", "stan-self-b16-ssv2", "stan-conv-b16-ssv2", "mug-stan-l14"} <= names
    assert stale_published_cards(HUB_CARDS_DIR) == [], "run `stan-cards render`"


@pytest.mark.parametrize("path", PUBLISHED, ids=_card_id)
def test_published_card_validates_with_huggingface_hub(path):
    card = ModelCard.load(path)  # huggingface_hub's parser: strict YAML and model-index
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "video-classification"
    assert data.license
    assert data.base_model.startswith("openai/clip-vit-")
    assert "stan" in data.tags
    validate_card(path)


@pytest.mark.parametrize("path", [p for p in PUBLISHED if ModelCard.load(p).data.eval_results], ids=_card_id)
def test_paper_numbers_are_labelled_as_reported(path):
    card = ModelCard.load(path)
    for result in card.data.eval_results:
        assert result.source_url == STAN_PAPER
        assert "reported (not measured by us)" in card.text
    first = card.data.eval_results[0]
    # The model-index is the structure huggingface_hub's own helper builds for the same result.
    expected = metadata_eval_result(
        model_pretty_name=card.data.model_name,
        task_pretty_name=first.task_name,
        task_id=first.task_type,
        metrics_pretty_name=first.metric_name,
        metrics_id=first.metric_type,
        metrics_value=first.metric_value,
        dataset_pretty_name=first.dataset_name,
        dataset_id=first.dataset_type,
        dataset_split=first.dataset_split,
    )["model-index"][0]["results"][0]
    actual = card.data.to_dict()["model-index"][0]["results"][0]
    assert actual["task"] == expected["task"]
    assert actual["dataset"] == expected["dataset"]
    assert actual["metrics"][0] == {k: v for k, v in expected["metrics"][0].items() if k != "verified"}


@pytest.mark.parametrize(
    "name, metric, value",
    [
        # Values typed in from the STAN paper's MSR-VTT, DiDeMo, Kinetics-400 and Something-Something v2 tables.
        ("stan-self-b32-msrvtt", "R@1", 46.9),
        ("stan-self-b16-msrvtt", "R@10", 84.1),
        ("stan-conv-b32-didemo", "R@5", 71.5),
        ("stan-self-b16-k400", "Top-1", 84.2),
        ("stan-self-b16-ssv2", "Top-5", 91.4),
        ("stan-conv-b16-ssv2", "Top-1", 65.2),
    ],
)
def test_reported_values_match_the_paper(name, metric, value):
    results = ModelCard.load(HUB_CARDS_DIR / name / "README.md").data.eval_results
    assert {r.metric_name: r.metric_value for r in results}[metric] == value


def test_card_without_numbers_says_why():
    card = ModelCard.load(HUB_CARDS_DIR / "mug-stan-l14" / "README.md")
    assert not card.data.eval_results
    assert card.data.license == "other" and card.data.license_link
    assert "No numbers are listed" in card.text


def test_every_card_snippet_is_python_or_marked_not_run():
    for path in PUBLISHED:
        for snippet in extract_snippets(path.read_text()):
            assert snippet.language == "python" or snippet.not_run_reason, f"{path}:{snippet.line}"


_VALID = """---
license: apache-2.0
library_name: transformers
pipeline_tag: video-classification
base_model: openai/clip-vit-base-patch32
tags: [stan]
datasets: [msr-vtt]
model-index:
- name: m
  results:
  - task: {type: text-to-video-retrieval}
    dataset: {type: msr-vtt, name: MSR-VTT}
    metrics:
    - {type: recall_at_1, value: 46.9, name: R@1}
---
| metric | value | split | source |
|---|---|---|---|
| R@1 | 46.9 | test | the paper |
"""


def test_validate_card_accepts_a_minimal_card():
    assert validate_card(_VALID).data.eval_results[0].metric_value == 46.9


@pytest.mark.parametrize(
    "broken, message",
    [
        (_VALID.replace("| the paper |", "| |"), "has no row with a source"),
        (_VALID.replace("value: 46.9", "value: 47.0"), "R@1=47.0"),
        (_VALID.replace("license: apache-2.0\n", ""), "'license' is missing"),
        (_VALID.replace("datasets: [msr-vtt]\n", ""), "names no datasets"),
        (_VALID.replace("    metrics:\n    - {type: recall_at_1, value: 46.9, name: R@1}\n", ""), "invalid card"),
    ],
)
def test_validate_card_rejects(broken, message):
    with pytest.raises(ModelCardError, match=message):
        validate_card(broken)


@pytest.mark.parametrize("path", PUBLISHED, ids=_card_id)
def test_re_ranking_is_only_mentioned_on_retrieval_cards(path):
    card = ModelCard.load(path)
    mentions_dsl = "DSL" in card.text
    assert mentions_dsl == ("video-text-retrieval" in card.data.tags and bool(card.data.eval_results))


def test_a_recipe_value_must_name_its_source(tmp_path):
    path = tmp_path / "checkpoints.yaml"
    original = """"AdamW, betas (0.9, 0.98), weight decay 0.05, 30 epochs, 10% warm-up (the authors' retrieval recipe carried over; the paper states Adam with weight decay 0.02 and no epoch count)", "ours"]"""
    guessed = original.replace('"ours"]', '"paper-ish guess"]')
    text = CHECKPOINTS_PATH.read_text()
    assert original in text
    path.write_text(text.replace(original, guessed, 1))
    with pytest.raises(ModelCardError, match=r"stan-self-b16-k400\).*source of 'optimizer and schedule' must start"):
        load_checkpoint_specs(path)


def test_checkpoint_list_errors_name_the_field(tmp_path):
    path = tmp_path / "checkpoints.yaml"
    path.write_text(CHECKPOINTS_PATH.read_text().replace("    task: video-classification\n", "    task: dance\n", 1))
    with pytest.raises(ModelCardError, match=r"stan-self-b16-k400.*task must be one of"):
        load_checkpoint_specs(path)


def _saved_run(tmp_path, **config):
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model_type": "stan", "stan_depth": 2, **config}))
    return run


def test_write_training_model_card(tmp_path):
    run = _saved_run(tmp_path, temporal_module="conv", num_frames=4)
    path = write_training_model_card(
        run,
        metrics={"t2v": {"R@1": 61.25, "R@5": 90}, "eval_loss": 0.5},
        task="video-text-retrieval",
        base_model="openai/clip-vit-base-patch32",
        dataset_name="synthetic shapes",
        training_args={"learning_rate": 1e-4, "max_steps": 40},
    )
    assert path == run / "README.md"
    card = validate_card(path)
    measured = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert measured == {"t2v/R@1": 61.25, "t2v/R@5": 90.0, "eval_loss": 0.5}
    assert all(r.source_url is None for r in card.data.eval_results)
    assert "| t2v/R@1 | 61.25 | evaluation | measured by this training run |" in card.text
    assert "| `max_steps` | `40` |" in card.text
    assert "| `temporal_module` | `conv` |" in card.text
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert 'pipeline("zero-shot-video-classification", model="my-run", trust_remote_code=True)' in card.text


def test_write_training_model_card_for_classification(tmp_path):
    run = _saved_run(tmp_path, id2label={"0": "a", "1": "b", "2": "c"}, classifier_type="linear")
    card = validate_card(
        write_training_model_card(
            run,
            metrics={"top1": 75.0},
            task="video-classification",
            base_model="clip-dir",
            dataset_name="shapes",
            training_args={},
            eval_split="test",
        )
    )
    assert card.data.eval_results[0].dataset_split == "test"
    assert "| `num_labels` | `3` |" in card.text
    assert 'pipeline("video-classification", model="my-run", trust_remote_code=True)' in card.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "dance"}, "task must be one of"),
        ({"metrics": {"R@1": "high"}}, "metric 'R@1' must be a number"),
        ({"metrics": [1, 2]}, "must be a mapping of metric name"),
        ({"training_args": ["--lr", "1"]}, "training_args must be a mapping"),
    ],
)
def test_write_training_model_card_rejects_bad_input(tmp_path, overrides, message):
    arguments = dict(metrics={}, task="video-text-retrieval", base_model="b", dataset_name="d", training_args={})
    arguments.update(overrides)
    run = _saved_run(tmp_path)
    with pytest.raises(ModelCardError, match=message):
        write_training_model_card(run, **arguments)


def test_write_training_model_card_needs_the_saved_model(tmp_path):
    with pytest.raises(ModelCardError, match="config.json not found"):
        write_training_model_card(
            tmp_path, metrics={}, task="video-text-retrieval", base_model="b", dataset_name="d", training_args={}
        )


# ----------------------------------------------------------------------------------------------------------------
# The cards' snippets run against tiny stand-ins saved at the repo ids they name
# ----------------------------------------------------------------------------------------------------------------

# The tiny CLIP has 6 vision layers; the cards' own frame counts (up to 64) only slow the test down.
_TINY_FIELDS = ("stan_depth", "temporal_module", "alignment", "mug_variant", "fixed_logit_scale", "classifier_type")


def _save_stand_in(spec, clip_dir, directory):
    """A tiny random checkpoint with the card's STAN configuration, saved as the card's users will find it."""
    fields = {key: value for key, value in spec.config.items() if key in _TINY_FIELDS}
    fields.setdefault("stan_depth", 2)
    processor = tiny_processor(clip_dir)
    common = dict(num_frames=NUM_FRAMES, drop_path_rate=0.0, **fields)
    if spec.task == "video-text-retrieval":
        model = StanForVideoTextRetrieval.from_clip_pretrained(clip_dir, **common)
    else:
        model = StanForVideoClassification.from_clip_pretrained(clip_dir, class_names=["up", "down", "left"], **common)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.mark.parametrize("spec", load_checkpoint_specs(), ids=lambda spec: spec.name)
def test_card_snippets_run(spec, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    _save_stand_in(spec, tiny_clip_dir, tmp_path / spec.repo_id)
    write_video(tmp_path / "video.mp4")
    monkeypatch.chdir(tmp_path)
    path = HUB_CARDS_DIR / spec.name / "README.md"
    snippets = [s for s in extract_snippets(path.read_text()) if not s.not_run_reason]
    assert snippets
    with one_thread():
        for snippet in snippets:
            run_python_snippet(snippet, str(path))
    assert capsys.readouterr().out.strip()


def test_training_card_snippets_run(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    # Saved as the training scripts save (no pipeline code): the card's snippets name their task.
    run = tmp_path / "my-run"
    model = StanForVideoTextRetrieval.from_clip_pretrained(tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES)
    model.save_pretrained(run)
    tiny_processor(tiny_clip_dir).save_pretrained(run)
    path = write_training_model_card(
        run,
        metrics={"t2v_R@1": 50.0},
        task="video-text-retrieval",
        base_model="tiny-clip",
        dataset_name="shapes",
        training_args={"max_steps": 1},
    )
    write_video(tmp_path / "video.mp4")
    monkeypatch.chdir(tmp_path)
    with one_thread():
        for snippet in extract_snippets(path.read_text()):
            run_python_snippet(snippet, str(path))
    assert capsys.readouterr().out.strip()
