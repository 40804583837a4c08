"""Converting the authors' checkpoints: parity with their code to 1e-5, and clear refusals."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, shared_path
from safetensors.torch import load_file, save_file
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_stan import StanForVideoTextRetrieval
from modeling_stan.conversion.convert_original_checkpoint import (
    CheckpointConversionError,
    convert_original_checkpoint,
    load_original_state_dict,
)
from modeling_stan.mug_alignment import mug_similarity


PARITY = ("parity", "stan_attention_k4_t8")
CONV_PARITY = ("parity", "stan_conv_k2_t8")


@pytest.fixture(scope="module")
def parity_dir():
    return shared_path(*PARITY)


def _convert_with_cli(parity_dir, output):
    """A parity checkpoint converted with the command-line tool, as a user would."""
    meta = json.loads((parity_dir / "meta.json").read_text())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_stan.conversion.convert_original_checkpoint",
            "--checkpoint",
            str(parity_dir / "official_state_dict.safetensors"),
            "--clip",
            str(parity_dir / "clip"),
            "--output",
            str(output),
            "--temperature",
            str(1.0 / meta["contrastive_logit_scale"]),
            "--num-frames",
            str(meta["num_frames"]),
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    return output


@pytest.fixture(scope="module")
def converted_dir(parity_dir, tmp_path_factory):
    return _convert_with_cli(parity_dir, tmp_path_factory.mktemp("converted"))


def _assert_reproduces_embeddings_and_loss(model, expected):
    """Video, frame, text and token embeddings and the summed loss to 1e-5; returns the video and text features."""
    with torch.no_grad():
        video = model.get_video_features(expected["pixel_values"])
        text = model.get_text_features(expected["input_ids"], expected["attention_mask"])
        out = model(
            input_ids=expected["input_ids"],
            attention_mask=expected["attention_mask"],
            pixel_values=expected["pixel_values"],
        )
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(video.pooler_output, expected["video_embeds"], **close)
    torch.testing.assert_close(video.frame_embeds, expected["frame_embeds"], **close)
    torch.testing.assert_close(text.pooler_output, expected["text_embeds"], **close)
    torch.testing.assert_close(text.token_embeds, expected["text_token_embeds"], **close)
    torch.testing.assert_close(out.loss.reshape(1), expected["contrastive_loss"], **close)
    return video, text


def test_converted_model_reproduces_the_authors_outputs(parity_dir, converted_dir):
    expected = load_file(str(parity_dir / "io.safetensors"))
    model = StanForVideoTextRetrieval.from_pretrained(converted_dir).eval()
    assert (model.config.stan_depth, model.config.temporal_module) == (4, "attention")  # inferred
    video, text = _assert_reproduces_embeddings_and_loss(model, expected)
    with torch.no_grad():
        for variant in ("simple", "full"):
            mug = mug_similarity(text.token_embeds, expected["attention_mask"], video.frame_embeds, variant=variant)
            torch.testing.assert_close(mug, expected[f"mug_logits_{variant}"], atol=1e-5, rtol=0)


def test_converted_stan_conv_reproduces_the_authors_outputs(tmp_path):
    parity_dir = shared_path(*CONV_PARITY)
    converted = _convert_with_cli(parity_dir, tmp_path / "converted")
    expected = load_file(str(parity_dir / "io.safetensors"))
    model = StanForVideoTextRetrieval.from_pretrained(converted).eval()
    assert (model.config.stan_depth, model.config.temporal_module) == (2, "conv")  # inferred from the keys
    _assert_reproduces_embeddings_and_loss(model, expected)


def test_timesfpn_era_conv_checkpoint_drops_its_two_unused_parameters_and_says_so(tmp_path):
    parity_dir = shared_path(*CONV_PARITY)
    official = _official(parity_dir)
    state = {k.replace("backbone.STAN_", "backbone.timesFPN_"): v for k, v in official.items()}
    hidden = official["backbone.STAN_time_embed.weight"].shape[1]
    state["backbone.timesFPN_pos_embed.weight"] = torch.randn(17, hidden)
    state["backbone.timesFPN_cls_token"] = torch.randn(1, 1, hidden)
    path = tmp_path / "timesfpn_conv.pth"
    torch.save({"state_dict": state}, path)
    logger = logging.get_logger("modeling_stan.conversion.convert_original_checkpoint")
    with CaptureLogger(logger) as captured:
        model = convert_original_checkpoint(path, parity_dir / "clip")
    assert "['backbone.timesFPN_cls_token', 'backbone.timesFPN_pos_embed.weight']" in captured.out
    assert model.config.temporal_module == "conv"
    conv = model.vision_model.stan.layers[1].temporal.conv
    assert torch.equal(conv.weight, official["backbone.STAN_T_layers.1.layers.weight"])

    state["backbone.timesFPN_pos_embed_extra"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(
        CheckpointConversionError, match=r"1 keys could not be mapped: \['backbone.timesFPN_pos_embed_extra'\]"
    ):
        convert_original_checkpoint(path, parity_dir / "clip")


def test_mug_alignment_head_matches_the_authors(parity_dir, converted_dir):
    expected = load_file(str(parity_dir / "io.safetensors"))
    for variant in ("simple", "full"):
        model = StanForVideoTextRetrieval.from_pretrained(converted_dir, alignment="mug", mug_variant=variant).eval()
        with torch.no_grad():
            out = model(
                input_ids=expected["input_ids"],
                attention_mask=expected["attention_mask"],
                pixel_values=expected["pixel_values"],
            )
        torch.testing.assert_close(out.logits_per_text / 100.0, expected[f"mug_logits_{variant}"], atol=1e-5, rtol=0)


def _official(parity_dir):
    return load_file(str(parity_dir / "official_state_dict.safetensors"))


def test_mmengine_pth_with_old_prefix_and_fp16(parity_dir, tmp_path):
    state = {k.replace("STAN_", "timesFPN_"): v.half() for k, v in _official(parity_dir).items()}
    state["text_backbone.text_model.embeddings.position_ids"] = torch.arange(32)[None]
    path = tmp_path / "epoch_5.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 5}}, path)
    model = convert_original_checkpoint(path, parity_dir / "clip", tmp_path / "out")
    assert model.vision_model.stan.time_embedding.weight.dtype == torch.float32
    reference = _official(parity_dir)["backbone.STAN_time_embed.weight"]
    torch.testing.assert_close(model.vision_model.stan.time_embedding.weight, reference.half().float())


def test_unmapped_key_is_refused_with_its_name(parity_dir, tmp_path):
    state = _official(parity_dir)
    state["adapter.text_weight_fc.weight"] = torch.zeros(1, 32)
    path = tmp_path / "with_adapter.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        CheckpointConversionError, match=r"1 keys could not be mapped: \['adapter.text_weight_fc.weight'\]"
    ):
        convert_original_checkpoint(path, parity_dir / "clip")


def test_shape_mismatch_against_the_clip_config_is_refused(parity_dir, tmp_path):
    state = _official(parity_dir)
    state["backbone.visual_projection.weight"] = torch.zeros(16, 64)
    path = tmp_path / "bad_shape.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        CheckpointConversionError,
        match=r"backbone.visual_projection.weight: checkpoint \(16, 64\) vs model \(32, 64\)",
    ):
        convert_original_checkpoint(path, parity_dir / "clip")


def test_a_file_that_is_not_a_checkpoint_is_refused(parity_dir, tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")
    with pytest.raises(CheckpointConversionError, match="notes.pth: not a PyTorch checkpoint"):
        load_original_state_dict(path)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointConversionError, match="fake.safetensors: not a readable safetensors file"):
        load_original_state_dict(fake)


class _Arbitrary:
    """An object that full unpickling would construct: weights_only loading must refuse it."""


def test_a_pickle_that_weights_only_refuses_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Arbitrary()}, path)
    with pytest.raises(CheckpointConversionError, match=r"unsafe.pth: refused by torch.load\(weights_only=True\)"):
        load_original_state_dict(path)


def test_cli_reports_errors_without_a_traceback(parity_dir, tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_stan.conversion.convert_original_checkpoint",
            "--checkpoint",
            str(path),
            "--clip",
            str(parity_dir / "clip"),
            "--output",
            str(tmp_path / "out"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "empty.pth: not a PyTorch checkpoint" in result.stderr and "Traceback" not in result.stderr


# Made by running the authors' 38de624 modules (`VITCLIPPretrained_STAN`, `BERTCLIPPretrained`): see its README.
PARITY_38DE624 = Path(__file__).parent / "fixtures" / "parity_38de624"


@pytest.mark.parametrize("temporal_module", ["attention", "conv"])
def test_checkpoint_of_the_authors_38de624_modules_converts_and_reproduces_their_embeddings(temporal_module):
    folder = PARITY_38DE624 / temporal_module
    logger = logging.get_logger("modeling_stan.conversion.convert_original_checkpoint")
    with CaptureLogger(logger) as captured:
        model = convert_original_checkpoint(folder / "epoch_5.pth", folder / "clip", temperature=0.01, num_frames=4)
    assert "['backbone.timesFPN_cls_token', 'backbone.timesFPN_pos_embed.weight']" in captured.out
    assert (model.config.stan_depth, model.config.temporal_module) == (2, temporal_module)
    expected = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        video = model.get_video_features(expected["pixel_values"])
        text = model.get_text_features(expected["input_ids"], expected["attention_mask"])
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(video.pooler_output, expected["video_embeds"], **close)
    torch.testing.assert_close(video.frame_embeds, expected["frame_embeds"], **close)
    torch.testing.assert_close(text.pooler_output, expected["text_embeds"], **close)


@pytest.mark.parametrize("stray", ["backbone.timesFPN_pos_embed", "backbone.timesFPN_cls_token.weight"])
def test_a_stray_key_beside_the_38de624_names_is_refused_by_name(tmp_path, stray):
    folder = PARITY_38DE624 / "conv"
    checkpoint = torch.load(folder / "epoch_5.pth", map_location="cpu", weights_only=True)
    checkpoint["state_dict"][stray] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "stray.pth")
    with pytest.raises(CheckpointConversionError, match=rf"1 keys could not be mapped: \['{re.escape(stray)}'\]"):
        convert_original_checkpoint(tmp_path / "stray.pth", folder / "clip", temperature=0.01)
