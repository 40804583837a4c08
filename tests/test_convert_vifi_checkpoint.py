"""Converting the ViFi-CLIP authors' checkpoints: their logits to 1e-5 (fine-tuned and prompted runs), their
normalisation, the video-classification pipeline, and clear refusals."""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from modeling_stan import StanForVideoClassification
from modeling_stan.conversion.convert_original_checkpoint import CheckpointConversionError, main
from modeling_stan.conversion.convert_vifi_checkpoint import convert_vifi_checkpoint, read_labels
from modeling_stan.demo.synthetic_videos import write_mp4
from modeling_stan.processing_stan import StanProcessor


# Made by running the authors' ViFi-CLIP code (e2d1948) on tiny random weights: see the folder's README.
VIFI = Path(__file__).parent / "fixtures" / "parity_vifi_e2d1948"
VARIANTS = ("finetuned", "prompted")


def _checkpoint(variant: str) -> Path:
    return VIFI / variant / "ckpt_epoch_9.pth"


def _load_their_file(path: Path) -> dict:
    with torch.serialization.safe_globals([(OrderedDict, "yacs.config.CfgNode")]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Both checkpoints converted with the command-line entry point, as a user would."""
    folders = {}
    for variant in VARIANTS:
        folders[variant] = tmp_path_factory.mktemp(variant)
        main(
            ["--checkpoint", str(_checkpoint(variant)), "--clip", str(VIFI / "clip")]
            + ["--labels", str(VIFI / "labels.csv"), "--output", str(folders[variant])]
        )
    return folders


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_checkpoint_reproduces_the_authors_logits(converted, variant):
    expected = load_file(str(VIFI / "io.safetensors"))
    model = StanForVideoClassification.from_pretrained(converted[variant]).eval()
    with torch.no_grad():
        logits = model(pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected[f"logits_{variant}"], atol=1e-5, rtol=0)
    config = model.config
    prompted = variant == "prompted"
    assert (config.stan_depth, config.classifier_type, config.num_frames) == (0, "text_encoder", 3)
    assert (config.vision_prompt_depth, config.text_prompt_depth) == ((2, 2) if prompted else (0, 0))
    assert config.hypothesis_template == ("{}." if prompted else "a photo of a {}.")
    assert [config.id2label[i] for i in range(3)] == read_labels(VIFI / "labels.csv")


def test_a_bare_state_dict_converts_with_their_default_class_prompt():
    """Without the run's configuration (a state dict alone, `module.` prefix removed), their defaults apply."""
    state_dict = {k.removeprefix("module."): v for k, v in _load_their_file(_checkpoint("finetuned"))["model"].items()}
    model = convert_vifi_checkpoint(state_dict, VIFI / "clip", read_labels(VIFI / "labels.csv"))
    expected = load_file(str(VIFI / "io.safetensors"))
    with torch.no_grad():
        logits = model(pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["logits_finetuned"], atol=1e-5, rtol=0)
    assert (model.config.hypothesis_template, model.config.num_frames) == ("a photo of a {}.", 8)


def test_saved_processor_normalises_and_crops_as_their_test_pipeline(converted):
    """Short side int(256 / 224 * 16) = 18, centre crop 16, ImageNet mean and std on the 0-255 scale."""
    processor = StanProcessor.from_pretrained(converted["finetuned"])
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 18, 18, 3), dtype=np.uint8)
    # Frame sampling left out: the processor samples as the STAN authors do (see the converter's docstring).
    pixel_values = processor(videos=[frames], do_sample_frames=False, return_tensors="pt")["pixel_values"][0]
    crop = torch.from_numpy(frames[:, 1:17, 1:17]).permute(0, 3, 1, 2).float()
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    torch.testing.assert_close(pixel_values, (crop - mean) / std, atol=1e-5, rtol=1e-5)


def test_video_classification_pipeline_of_the_converted_folder(converted, tmp_path):
    video = tmp_path / "clip.mp4"
    write_mp4(video, np.random.default_rng(1).integers(0, 256, size=(6, 24, 32, 3), dtype=np.uint8))
    folder = converted["prompted"]
    classifier = pipeline("video-classification", model=str(folder), trust_remote_code=True)
    model = StanForVideoClassification.from_pretrained(folder).eval()
    processor = StanProcessor.from_pretrained(folder)
    with torch.no_grad():
        scores = model(**processor(videos=[str(video)], return_tensors="pt")).logits[0].softmax(dim=-1)
    expected = {model.config.id2label[i]: score for i, score in enumerate(scores.tolist())}
    predictions = classifier(str(video), top_k=3)
    assert {p["label"]: p["score"] for p in predictions} == pytest.approx(expected, abs=1e-6)


def test_other_classes_than_the_trained_ones_are_allowed(tmp_path):
    """Their loader drops the stored class prompts: any class list works (zero-shot, novel classes)."""
    model = convert_vifi_checkpoint(_checkpoint("prompted"), VIFI / "clip", ["jump", "run"])
    assert model.class_embeddings().shape == (2, model.config.projection_dim)


@pytest.mark.parametrize(
    "stray", ["module.image_encoder.transformer.resblocks.0.VPT_deep", "module.text_encoder.token_embedding.weight"]
)
def test_a_stray_key_is_refused_by_name(tmp_path, stray):
    checkpoint = _load_their_file(_checkpoint("prompted"))
    checkpoint["model"][stray] = torch.zeros(1)
    with pytest.raises(CheckpointConversionError, match=rf"1 keys could not be mapped: \['{stray}'\]"):
        convert_vifi_checkpoint(checkpoint, VIFI / "clip", ["jump"], source="stray.pth")


def test_prompt_layers_must_start_at_the_first(tmp_path):
    checkpoint = _load_their_file(_checkpoint("prompted"))
    del checkpoint["model"]["module.image_encoder.VPT"]
    with pytest.raises(CheckpointConversionError, match=r"vision prompt tokens for layers \[1\]"):
        convert_vifi_checkpoint(checkpoint, VIFI / "clip", ["jump"])


def test_a_clip_other_than_the_one_the_run_started_from_is_refused(tiny_clip_dir):
    with pytest.raises(CheckpointConversionError, match="were not embedded with --clip"):
        convert_vifi_checkpoint(_load_their_file(_checkpoint("finetuned")), tiny_clip_dir, ["jump"])


def test_labels_file_in_another_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("jump\nrun\n")
    with pytest.raises(CheckpointConversionError, match="expected a header 'id,name'"):
        read_labels(path)
    path.write_text("id,name\n0,jump\n2,run\n")
    with pytest.raises(CheckpointConversionError, match="line 3: expected '1,<class name>'"):
        read_labels(path)


def test_cli_needs_labels_for_vifi_and_refuses_stan_options(tmp_path, capsys):
    base = ["--checkpoint", str(_checkpoint("finetuned")), "--clip", str(VIFI / "clip"), "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(base)
    assert exit_info.value.code == 2 and "needs --labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--labels", str(VIFI / "labels.csv"), "--temperature", "0.01"])
    assert "--temperature do not apply to a vifi checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--format", "stan"])
    assert "--format stan, but its keys are vifi's" in capsys.readouterr().err


def test_unknown_key_layout_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(1)}}, path)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(path), "--clip", str(VIFI / "clip"), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert "not a layout stan-convert knows" in error and "['encoder.weight']" in error
