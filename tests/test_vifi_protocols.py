"""ViFi-CLIP's protocols: its split/label file layout, few-shot sampling, base-to-novel and zero-shot evaluation
through `run_classification.py`, and zero-shot recognition from a STAN dual-encoder checkpoint."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, random_video
from transformers import AutoTokenizer

from modeling_stan import StanForVideoClassification, StanModel
from modeling_stan.data.video_datasets import AnnotationError, load_vifi_split
from modeling_stan.demo.synthetic_videos import generate_synthetic_dataset


sys.path.insert(0, str(REPO_ROOT / "training"))
import run_classification  # noqa: E402
from test_training import SMALL, run  # noqa: E402
from vifi_protocols import few_shot_rows, harmonic_mean  # noqa: E402


FIXTURES = REPO_ROOT / "tests" / "fixtures" / "vifi_clip"


def _touch_videos(split_file: Path, video_dir: Path) -> None:
    for line in split_file.read_text().splitlines():
        path = video_dir / line.split()[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


@pytest.mark.parametrize(
    "split_file, labels_file, names, labels",
    [
        (
            "ucf_splits/val2.txt",
            "ucf_101_labels.csv",
            ["JugglingCubes", "PaintingFence", "RowingBoat"],
            [0, 0, 1, 1, 2, 2],
        ),
        (
            "base2novel_splits/hmdb_splits/novel_val.txt",
            "hmdb_51_novel_labels.csv",
            ["brush teeth", "wave flag"],
            [0, 0, 1, 1],
        ),
        (
            "k600_splits/ZS_split1_K600_eval.txt",
            "ZS_split1_K600.csv",
            ["acting in play", "arranging flowers, carefully"],
            [0, 1],
        ),
        (
            "ssv2_splits/validation.txt",
            "ssv2_labels.csv",
            ["Approaching something with your camera", "Attaching something to something"],
            [1, 0],
        ),
    ],
)
def test_vifi_split_and_label_files_parse(tmp_path, split_file, labels_file, names, labels):
    split_path = FIXTURES / "datasets_splits" / split_file
    _touch_videos(split_path, tmp_path)
    rows = load_vifi_split(split_path, FIXTURES / "labels" / labels_file, tmp_path)
    assert rows.features["label"].names == names  # CRLF label files and quoted names included
    assert rows["label"] == labels
    assert rows["video"][0] == str(tmp_path / split_path.read_text().split()[0])


def test_vifi_split_errors_name_file_and_line(tmp_path):
    labels = FIXTURES / "labels" / "ucf_101_labels.csv"
    bad = tmp_path / "val1.txt"
    bad.write_text("v_a.avi 0\nv_b.avi 7\n")
    with pytest.raises(AnnotationError, match=r"val1.txt.*line 2.*label id 7 is not a class"):
        load_vifi_split(bad, labels, tmp_path)
    bad.write_text("v_a.avi\n")
    with pytest.raises(AnnotationError, match=r"line 1.*'<video path> <label id>'"):
        load_vifi_split(bad, labels, tmp_path)


def test_few_shot_takes_exactly_k_per_class_deterministically():
    labels = [i % 5 for i in range(100)]  # 20 videos of each of 5 classes
    for shots in (2, 4, 8, 16):
        rows = few_shot_rows(labels, shots, seed=1)
        assert np.bincount([labels[r] for r in rows]).tolist() == [shots] * 5
        assert len(set(rows)) == len(rows)
        assert rows == few_shot_rows(labels, shots, seed=1)
    assert few_shot_rows(labels, 4, seed=1) != few_shot_rows(labels, 4, seed=2)
    with pytest.raises(ValueError, match=r"needs 3 videos of every class.*\{1: 2\}"):
        few_shot_rows([0, 0, 0, 1, 1], 3, seed=0)


def test_harmonic_mean():
    assert harmonic_mean(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)
    assert harmonic_mean(0.0, 0.0) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Runs on generated videos
# ----------------------------------------------------------------------------------------------------------------


DIRECTION_NAMES = {"bottom_to_top": "up", "left_to_right": "right", "right_to_left": "left", "top_to_bottom": "down"}


def _write_vifi_layout(data: Path, out: Path, base: list[str], novel: list[str]) -> None:
    """The synthetic videos as ViFi-CLIP split files: base classes train/val/test, novel classes test, and the test
    videos of all four classes as three "zero-shot splits" in the UCF101 layout (val1..3.txt, one labels file)."""
    out.mkdir()
    rows = [line.split(",") for line in (data / "metadata.csv").read_text().splitlines()[1:]]
    names = {"base": base, "novel": novel, "all": base + novel}
    for kind, classes in names.items():
        (out / f"{kind}_labels.csv").write_text("id,name\r\n" + "".join(f"{i},{n}\r\n" for i, n in enumerate(classes)))
    for kind, split in (("base", "train"), ("base", "validation"), ("base", "test"), ("novel", "test")):
        lines = [
            f"{video_id}.mp4 {names[kind].index(DIRECTION_NAMES[direction])}"
            for video_id, row_split, _, _, direction, *_ in rows
            if row_split == split and DIRECTION_NAMES[direction] in names[kind]
        ]
        (out / f"{kind}_{split}.txt").write_text("\n".join(lines) + "\n")
    test_rows = [(video_id, DIRECTION_NAMES[d]) for video_id, s, _, _, d, *_ in rows if s == "test"]
    for fold in (1, 2, 3):  # three different subsets, as three official splits would be
        kept = [
            f"{video_id}.mp4 {names['all'].index(name)}"
            for i, (video_id, name) in enumerate(test_rows)
            if i % 3 != fold - 1
        ]
        (out / f"val{fold}.txt").write_text("\n".join(kept) + "\n")
    # The same three splits in UCF101's official layout: ucfTrainTestlist/ and UCF-101/<class>/<video>.
    (out / "ucfTrainTestlist").mkdir()
    (out / "ucfTrainTestlist" / "classInd.txt").write_text(
        "".join(f"{i + 1} {n}\n" for i, n in enumerate(names["all"]))
    )
    for video_id, name in test_rows:
        (out / "UCF-101" / name).mkdir(parents=True, exist_ok=True)
        (out / "UCF-101" / name / f"{video_id}.mp4").symlink_to(data / "videos" / f"{video_id}.mp4")
    for fold in (1, 2, 3):
        kept = [f"{name}/{video_id}.mp4" for i, (video_id, name) in enumerate(test_rows) if i % 3 != fold - 1]
        (out / "ucfTrainTestlist" / f"testlist0{fold}.txt").write_text("\n".join(kept) + "\n")


@pytest.fixture(scope="module")
def vifi_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vifi")
    generate_synthetic_dataset(root / "data", num_train=16, num_val=8, num_test=12)
    _write_vifi_layout(root / "data", root / "splits", base=["up", "down"], novel=["left", "right"])
    return root


def test_base_to_novel_and_zero_shot_splits_with_prompts(tmp_path, vifi_data):
    splits, videos = vifi_data / "splits", vifi_data / "data" / "videos"
    results = run(
        run_classification,
        tmp_path / "out",
        *SMALL[:-4],
        "--per_device_train_batch_size",
        4,
        "--per_device_eval_batch_size",
        8,
        "--max_steps",
        2,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--dataset",
        "vifi",
        "--video_dir",
        videos,
        "--labels_file",
        splits / "base_labels.csv",
        "--train_file",
        splits / "base_train.txt",
        "--validation_file",
        splits / "base_validation.txt",
        "--test_file",
        splits / "base_test.txt",
        "--num_shots",
        2,
        "--classifier_type",
        "text_encoder",
        "--hypothesis_template",
        "{}.",
        "--trainable_parts",
        "prompts",
        "--vision_prompt_depth",
        2,
        "--vision_prompt_length",
        2,
        "--text_prompt_depth",
        2,
        "--text_prompt_length",
        4,
        "--novel_test_file",
        splits / "novel_test.txt",
        "--novel_labels_file",
        splits / "novel_labels.csv",
        "--zero_shot_test_files",
        *(splits / f"val{fold}.txt" for fold in (1, 2, 3)),
        "--zero_shot_labels_files",
        splits / "all_labels.csv",
        # ViFi-CLIP's augmentations, all on
        "--label_smoothing",
        0.1,
        "--mixup",
        0.8,
        "--cutmix",
        1.0,
        "--color_jitter",
        0.8,
        "--grayscale",
        0.2,
        "--multi_scale_crop",
        1,
        0.875,
        0.75,
        0.66,
        "--flip",
        0.5,
    )
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["train"]["steps"] == 2
    b2n = saved["base_to_novel"]
    assert b2n["base"] == saved["test"]["top1"] and b2n["novel"] == saved["novel"]["top1"]
    assert b2n["harmonic_mean"] == pytest.approx(harmonic_mean(b2n["base"], b2n["novel"]))
    per_split = [saved["zero_shot"][f"split{fold}"]["top1"] for fold in (1, 2, 3)]
    assert all(value in {100 * k / 8 for k in range(9)} for value in per_split)  # 8 of the 12 test videos each
    assert saved["zero_shot"]["top1_mean"] == pytest.approx(np.mean(per_split))
    assert saved["zero_shot"]["top1_std"] == pytest.approx(np.std(per_split))
    # The saved model keeps its own (base) classes and only its prompts were trained.
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "up", "1": "down"} and config["text_prompt_depth"] == 2
    assert results["zero_shot"] == saved["zero_shot"]


def test_zero_shot_head_from_a_stan_checkpoint(tiny_clip_dir, tmp_path):
    """A STAN dual encoder's folder loads as a text-encoder classifier whose logits are the dual encoder's
    video-to-prompt scores: zero-shot recognition from retrieval or post-pretraining checkpoints."""
    dual = StanModel.from_clip_pretrained(tiny_clip_dir, stan_depth=1, drop_path_rate=0.0)
    dual.save_pretrained(tmp_path / "stan")
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    names = ["up", "down", "left"]
    model = StanForVideoClassification.from_pretrained(tmp_path / "stan", classifier_type="text_encoder").eval()
    model.set_class_names(names, tokenizer)
    prompts = tokenizer([f"a video of {n}." for n in names], padding=True, return_tensors="pt")
    video = random_video()
    with torch.no_grad():
        expected = dual.eval()(pixel_values=video, **prompts).logits_per_video
        torch.testing.assert_close(model(pixel_values=video).logits, expected, atol=1e-5, rtol=1e-5)


def test_zero_shot_over_the_three_official_ucf101_splits(tmp_path, vifi_data):
    """Zero-shot recognition on the three test splits of a fixture in UCF101's official layout: per-split top-1,
    their mean and standard deviation, with the class names through the text tower."""
    splits, videos = vifi_data / "splits", vifi_data / "data" / "videos"
    run(
        run_classification,
        tmp_path / "out",
        "--per_device_train_batch_size",
        4,
        "--per_device_eval_batch_size",
        8,
        "--max_steps",
        1,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--dataset",
        "vifi",
        "--video_dir",
        videos,
        "--labels_file",
        splits / "base_labels.csv",
        "--train_file",
        splits / "base_train.txt",
        "--validation_file",
        splits / "base_validation.txt",
        "--test_file",
        splits / "base_test.txt",
        "--classifier_type",
        "text_encoder",
        "--zero_shot_dataset",
        "ucf101",
        "--zero_shot_split_dir",
        splits / "ucfTrainTestlist",
        "--zero_shot_video_dir",
        splits / "UCF-101",
    )
    zero_shot = json.loads((tmp_path / "out" / "all_results.json").read_text())["zero_shot"]
    per_split = [zero_shot[f"split{fold}"]["top1"] for fold in (1, 2, 3)]
    assert all(value in {100 * k / 8 for k in range(9)} for value in per_split)
    assert all(zero_shot[f"split{fold}"]["corrupt_videos"] == 0 for fold in (1, 2, 3))
    assert zero_shot["top1_mean"] == pytest.approx(np.mean(per_split))
    assert zero_shot["top1_std"] == pytest.approx(np.std(per_split))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--zero_shot_dataset", "kinetics"], "argument --zero_shot_dataset.*invalid choice"),
        (["--trainable_parts", "everything"], "argument --trainable_parts.*invalid choice"),
        (["--novel_test_file", "novel.txt", "--classifier_type", "text_encoder"], "needs both --novel_test_file"),
        (
            ["--zero_shot_test_files", "a.txt", "--zero_shot_labels_files", "x.csv", "y.csv"],
            "one file or one per split",
        ),
        (
            ["--zero_shot_test_files", "a.txt", "--zero_shot_labels_files", "x.csv"],
            "need --classifier_type text_encoder",
        ),
    ],
)
def test_protocol_options_fail_before_training(tmp_path, flags, message, capsys):
    """Bad protocol options end the command line with its usage error (status 2), before any data is read."""
    with pytest.raises(SystemExit) as exit_info:
        run(run_classification, tmp_path / "out", *flags)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_zero_shot_recognition_from_a_stan_checkpoint_without_training(tiny_clip_dir, tmp_path, vifi_data):
    """`--do_train false` from a dual-encoder STAN folder: the text-encoder head embeds the test split's class names
    and the three zero-shot splits' own, with nothing trained."""
    dual = StanModel.from_clip_pretrained(tiny_clip_dir, stan_depth=1, drop_path_rate=0.0)
    dual.save_pretrained(tmp_path / "stan")
    AutoTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path / "stan")
    splits = vifi_data / "splits"
    results = run(
        run_classification,
        tmp_path / "out",
        "--model_name_or_path",
        tmp_path / "stan",
        "--do_train",
        "false",
        "--classifier_type",
        "text_encoder",
        "--hypothesis_template",
        "a photo of a {}.",
        "--num_frames",
        4,
        "--vision_prompt_depth",
        1,
        "--vision_prompt_length",
        2,
        "--per_device_eval_batch_size",
        8,
        "--dataset",
        "ucf101",
        "--split_dir",
        splits / "ucfTrainTestlist",
        "--fold",
        1,
        "--video_dir",
        splits / "UCF-101",
        "--zero_shot_dataset",
        "ucf101",
        "--zero_shot_split_dir",
        splits / "ucfTrainTestlist",
        "--zero_shot_video_dir",
        splits / "UCF-101",
    )
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved == results and set(saved) == {"test", "zero_shot"}  # head and prompt fields set over the checkpoint
    # The test split is fold 1 of the same lists, scored by the same untrained model.
    assert saved["zero_shot"]["split1"]["top1"] == saved["test"]["top1"]
    per_split = [saved["zero_shot"][f"split{fold}"]["top1"] for fold in (1, 2, 3)]
    assert saved["zero_shot"]["top1_mean"] == pytest.approx(np.mean(per_split))
    assert saved["zero_shot"]["top1_std"] == pytest.approx(np.std(per_split))


def test_frozen_class_embeddings_start_from_the_dual_encoders_text_tower(tiny_clip_dir, tmp_path, vifi_data):
    """Fine-tuning from a dual encoder, the authors' head takes its frozen class embeddings from the checkpoint's
    own text tower (not from a random initialisation), and keeps them through training."""
    dual = StanModel.from_clip_pretrained(tiny_clip_dir, stan_depth=1, drop_path_rate=0.0).eval()
    dual.save_pretrained(tmp_path / "stan")
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    tokenizer.save_pretrained(tmp_path / "stan")
    splits, videos = vifi_data / "splits", vifi_data / "data" / "videos"
    run(
        run_classification,
        tmp_path / "out",
        "--model_name_or_path",
        tmp_path / "stan",
        "--num_frames",
        4,
        "--classifier_type",
        "frozen_class_embeddings",
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        4,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--dataset",
        "vifi",
        "--video_dir",
        videos,
        "--labels_file",
        splits / "base_labels.csv",
        "--train_file",
        splits / "base_train.txt",
        "--validation_file",
        splits / "base_validation.txt",
        "--test_file",
        splits / "base_test.txt",
    )
    model = StanForVideoClassification.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        expected = dual.get_text_features(
            **tokenizer(["a video of up.", "a video of down."], padding=True, return_tensors="pt")
        ).pooler_output
    torch.testing.assert_close(model.classifier.weight, expected)
    assert model.config.fixed_logit_scale == 100.0
