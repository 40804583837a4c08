"""The `zero-shot-video-classification` pipeline and transformers' `video-classification` pipeline on tiny local STAN
checkpoints: every input form, batching, errors, the registered task, and remote code in a fresh process."""

import copy
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from conftest import shared_path
from test_readme import (
    NUM_FRAMES,
    single_thread,  # noqa: F401  (a fixture)
    tiny_processor,
    write_video,
)
from transformers import pipeline

from modeling_stan import StanForVideoClassification, StanForVideoTextRetrieval
from modeling_stan.pipeline_zero_shot_video_classification import (
    TASK,
    ZeroShotVideoClassificationPipeline,
    register_pipelines,
)
from modeling_stan.video_io import VideoDecodeError


LABELS = ["a red square", "a blue circle", "a green triangle"]
CLASSES = ["left_to_right", "right_to_left", "top_to_bottom"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def retrieval(tiny_clip_dir):
    torch.manual_seed(0)
    model = StanForVideoTextRetrieval.from_clip_pretrained(
        tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES, drop_path_rate=0.0
    )
    # A random temporal module, so that frame order changes the scores.
    with torch.no_grad():
        model.vision_model.stan.layers[0].temporal.temporal_fc.weight.normal_(std=0.5)
    return model.eval(), tiny_processor(tiny_clip_dir)


@pytest.fixture(scope="module")
def classification(tiny_clip_dir):
    model = StanForVideoClassification.from_clip_pretrained(
        tiny_clip_dir,
        stan_depth=1,
        num_frames=NUM_FRAMES,
        drop_path_rate=0.0,
        classifier_type="class_embeddings",
        class_names=CLASSES,
    )
    return model.eval(), tiny_processor(tiny_clip_dir)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "square.mp4"
    write_video(path)
    return path


@pytest.fixture(scope="module")
def zero_shot(retrieval):
    model, processor = retrieval
    return ZeroShotVideoClassificationPipeline(model=model, processor=processor, task=TASK)


def _expected_scores(model, processor, video, labels=LABELS, template="a video of {}."):
    """Label probabilities computed with the model and processor directly."""
    inputs = processor(
        text=[template.format(label) for label in labels], videos=[video], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs, return_loss=False).logits_per_video[0]
    return dict(zip(labels, logits.softmax(dim=-1).tolist()))


def _as_dict(predictions):
    return {prediction["label"]: prediction["score"] for prediction in predictions}


def _all_frames(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_zero_shot_scores_are_the_models_label_probabilities(zero_shot, retrieval, video_path):
    predictions = zero_shot(str(video_path), candidate_labels=LABELS)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    expected = _expected_scores(*retrieval, str(video_path))
    assert _as_dict(predictions) == pytest.approx(expected, abs=1e-5)


def test_hypothesis_template_and_top_k(zero_shot, retrieval, video_path):
    predictions = zero_shot(str(video_path), candidate_labels=LABELS, hypothesis_template="{} moves.", top_k=2)
    expected = _expected_scores(*retrieval, str(video_path), template="{} moves.")
    assert len(predictions) == 2
    assert predictions[0]["label"] == max(expected, key=expected.get)
    assert predictions[0]["score"] == pytest.approx(expected[predictions[0]["label"]], abs=1e-5)


def test_every_input_form_gives_the_same_scores(zero_shot, video_path):
    frames = _all_frames(video_path)
    forms = {
        "path": str(video_path),
        "pathlib": video_path,
        "file url": video_path.as_uri(),
        "bytes": video_path.read_bytes(),
        "numpy (T, H, W, C)": frames,
        "torch (T, C, H, W)": torch.from_numpy(frames).permute(0, 3, 1, 2),
        "list of frames": list(frames),
    }
    reference = _as_dict(zero_shot(forms["path"], candidate_labels=LABELS))
    for name, video in forms.items():
        assert _as_dict(zero_shot(video, candidate_labels=LABELS)) == pytest.approx(reference, abs=1e-5), name


def test_frame_order_matters(zero_shot, video_path):
    frames = _all_frames(video_path)
    forward = _as_dict(zero_shot(frames, candidate_labels=LABELS))
    backward = _as_dict(zero_shot(frames[::-1], candidate_labels=LABELS))
    assert forward != pytest.approx(backward, abs=1e-6)


def test_batches_equal_single_calls(zero_shot, video_path):
    frames = _all_frames(video_path)
    videos = [str(video_path), frames[::-1], frames[:5]]
    singles = [_as_dict(zero_shot(video, candidate_labels=LABELS)) for video in videos]
    for batch_size in (1, 2):
        batched = zero_shot(videos, candidate_labels=LABELS, batch_size=batch_size)
        assert len(batched) == len(videos)
        for predictions, single in zip(batched, singles):
            assert _as_dict(predictions) == pytest.approx(single, abs=1e-5)


def test_mug_checkpoints_score_with_mug(tiny_clip_dir, video_path):
    model = StanForVideoTextRetrieval.from_clip_pretrained(
        tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES, drop_path_rate=0.0, alignment="mug"
    ).eval()
    processor = tiny_processor(tiny_clip_dir)
    classifier = ZeroShotVideoClassificationPipeline(model=model, processor=processor, task=TASK)
    mug = _as_dict(classifier(str(video_path), candidate_labels=LABELS))
    assert mug == pytest.approx(_expected_scores(model, processor, str(video_path)), abs=1e-5)
    model.config.alignment = "mean"
    assert mug != pytest.approx(_expected_scores(model, processor, str(video_path)), abs=1e-4)


def test_real_videos(zero_shot, retrieval):
    videos = [str(shared_path("videos", "test.mp4")), str(shared_path("videos", "test.avi"))]
    batched = zero_shot(videos, candidate_labels=LABELS, batch_size=2)
    for video, predictions in zip(videos, batched):
        assert _as_dict(predictions) == pytest.approx(_expected_scores(*retrieval, video), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "needs candidate_labels"),
        ({"candidate_labels": []}, ValueError, "non-empty list"),
        ({"candidate_labels": "cooking"}, TypeError, "must be a list of strings"),
        ({"candidate_labels": ["ok", ""]}, ValueError, "non-empty list"),
        ({"candidate_labels": LABELS, "hypothesis_template": "no placeholder"}, ValueError, "containing '{}'"),
        ({"candidate_labels": LABELS, "top_k": 0}, ValueError, "top_k must be an integer >= 1"),
        ({"candidate_labels": LABELS, "hypothesis_template": "{} and {}"}, ValueError, "exactly once"),
        ({"candidate_labels": LABELS, "hypothesis_template": "{label}"}, ValueError, "exactly once"),
        ({"candidate_labels": LABELS, "num_frames": 0}, ValueError, "num_frames must be an integer >= 1"),
        ({"candidate_labels": LABELS, "on_error": "ignore"}, ValueError, "on_error must be one of"),
    ],
)
def test_bad_arguments_are_refused(zero_shot, video_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        zero_shot(str(video_path), **kwargs)


def test_bad_videos_are_refused_with_their_cause(zero_shot, tmp_path):
    with pytest.raises(ValueError, match="does not download"):
        zero_shot("https://example.com/video.mp4", candidate_labels=LABELS)
    with pytest.raises(VideoDecodeError):
        zero_shot(b"not a video at all", candidate_labels=LABELS)
    with pytest.raises(FileNotFoundError):
        zero_shot(str(tmp_path / "missing.mp4"), candidate_labels=LABELS)


def test_a_bad_video_in_a_batch_is_reported_and_the_others_are_scored(zero_shot, video_path, tmp_path):
    frames = _all_frames(video_path)
    videos = [str(video_path), b"not a video at all", frames[::-1], str(tmp_path / "missing.mp4")]
    singles = {i: _as_dict(zero_shot(videos[i], candidate_labels=LABELS)) for i in (0, 2)}
    for batch_size in (1, 3):
        results = zero_shot(videos, candidate_labels=LABELS, batch_size=batch_size)
        assert len(results) == 4
        for i, single in singles.items():
            assert _as_dict(results[i]) == pytest.approx(single, abs=1e-5)
        assert results[1]["error"].startswith("VideoDecodeError: Cannot decode video")
        assert results[3]["error"].startswith("FileNotFoundError") and "missing.mp4" in results[3]["error"]
    with pytest.raises(VideoDecodeError):
        zero_shot(videos, candidate_labels=LABELS, on_error="raise")


def test_an_empty_batch_gives_an_empty_list(zero_shot):
    assert zero_shot([], candidate_labels=LABELS) == []
    assert zero_shot([], candidate_labels=LABELS, batch_size=4) == []
    with pytest.raises(ValueError, match="non-empty list"):
        zero_shot([], candidate_labels=[])


def test_nan_frames_never_give_nan_scores(zero_shot, video_path):
    frames = _all_frames(video_path).astype(np.float32)
    frames[2, 5, 5, 1] = np.nan
    infinite = _all_frames(video_path).astype(np.float32)
    infinite[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN|finite"):
        zero_shot(frames, candidate_labels=LABELS)
    results = zero_shot([str(video_path), frames, infinite], candidate_labels=LABELS, batch_size=3)
    assert [isinstance(result, dict) and list(result) == ["error"] for result in results] == [False, True, True]
    scores = [prediction["score"] for prediction in results[0]]
    assert all(np.isfinite(scores)) and sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_finite_frames_that_overflow_once_processed_are_reported_alone(retrieval, tiny_clip_dir):
    # The processor takes finite frames, but in a float16 model's dtype these overflow; the model's own check
    # would fail the whole batch.
    model, _ = retrieval
    processor = tiny_processor(tiny_clip_dir)
    processor.video_processor.do_rescale = False  # frames already scaled: values are taken as given
    classifier = ZeroShotVideoClassificationPipeline(model=copy.deepcopy(model).half(), processor=processor, task=TASK)
    frames = np.random.default_rng(0).random((NUM_FRAMES, 32, 32, 3), dtype=np.float32)
    too_large = frames.copy()
    too_large[0, 0, 0, 0] = 1e5  # float16 ends at 65504
    message = r"pixel values, once processed and cast to the model's torch.float16, are NaN or infinite"
    with pytest.raises(ValueError, match=message):
        classifier(too_large, candidate_labels=LABELS)
    results = classifier([frames, too_large, frames], candidate_labels=LABELS, batch_size=3)
    assert list(results[1]) == ["error"] and results[1]["error"].startswith("ValueError: the video's pixel values")
    for scored in (results[0], results[2]):
        scores = [prediction["score"] for prediction in scored]
        assert all(np.isfinite(scores)) and sum(scores) == pytest.approx(1.0, abs=1e-3)


def test_a_model_with_non_finite_outputs_reports_instead_of_scoring_nan(retrieval, video_path):
    model, processor = retrieval
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.visual_projection.weight[0, 0] = float("nan")
    classifier = ZeroShotVideoClassificationPipeline(model=broken, processor=processor, task=TASK)
    with pytest.raises(ValueError, match="non-finite scores"):
        classifier(str(video_path), candidate_labels=LABELS)
    results = classifier([str(video_path)] * 2, candidate_labels=LABELS, batch_size=2)
    assert results == [{"error": "ValueError: the model produced non-finite scores for this video."}] * 2


def test_a_classifier_without_text_tower_is_refused(classification):
    model, processor = classification
    with pytest.raises(TypeError, match="needs a video-text model"):
        ZeroShotVideoClassificationPipeline(model=model, processor=processor, task=TASK)


def test_registered_task_runs_a_model_in_memory(retrieval, video_path):
    register_pipelines()
    register_pipelines()  # idempotent
    model, processor = retrieval
    classifier = pipeline(TASK, model=model, processor=processor)
    assert type(classifier) is ZeroShotVideoClassificationPipeline
    expected = _expected_scores(model, processor, str(video_path))
    assert _as_dict(classifier(str(video_path), candidate_labels=LABELS)) == pytest.approx(expected, abs=1e-5)


def test_a_saved_checkpoint_names_its_pipeline_and_needs_trust_remote_code(retrieval, tmp_path):
    model, processor = retrieval
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["custom_pipelines"][TASK]["impl"] == (
        "pipeline_zero_shot_video_classification.ZeroShotVideoClassificationPipeline"
    )
    # transformers' rule for a task listed in `custom_pipelines`, even where this package is imported.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline(TASK, model=str(tmp_path))


def test_video_classification_pipeline(classification, video_path, tmp_path):
    model, processor = classification
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    classifier = pipeline("video-classification", model=str(tmp_path))
    with torch.no_grad():
        logits = model(**processor(videos=[str(video_path)], return_tensors="pt")).logits[0]
    expected = dict(zip(CLASSES, logits.softmax(dim=-1).tolist()))
    predictions = classifier(str(video_path), top_k=3)
    assert {p["label"]: p["score"] for p in predictions} == pytest.approx(expected, abs=1e-5)
    real = classifier([str(shared_path("videos", "test.mp4")), str(shared_path("videos", "test.avi"))], top_k=1)
    assert [len(p) for p in real] == [1, 1] and all(p[0]["label"] in CLASSES for p in real)


# A process that cannot import modeling_stan (a meta-path finder refuses it) loads both pipelines from directories
# saved with plain `save_pretrained` of the model and the processor, as a user without this package would.
_FRESH_PROCESS = r"""
import json, sys

class RefuseModelingStan:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_stan":
            raise ImportError(f"{name} must not be importable here")

sys.meta_path.insert(0, RefuseModelingStan())
from transformers import pipeline

zero_shot_dir, classification_dir, labels, videos = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
inferred = pipeline(model=zero_shot_dir, trust_remote_code=True)
named = pipeline("zero-shot-video-classification", model=zero_shot_dir, trust_remote_code=True)
classifier = pipeline("video-classification", model=classification_dir, trust_remote_code=True)
print(json.dumps({
    "pipeline_module": type(inferred).__module__,
    "model_module": type(inferred.model).__module__,
    "inferred": [inferred(video, candidate_labels=labels) for video in videos],
    "named": named(videos, candidate_labels=labels, batch_size=2),
    "classified": [classifier(video, top_k=3) for video in videos],
}))
"""


def test_checkpoints_work_as_remote_code_in_a_fresh_process(retrieval, classification, video_path, tmp_path):
    zero_shot_dir, classification_dir = tmp_path / "zero_shot", tmp_path / "classification"
    for directory, parts in ((zero_shot_dir, retrieval), (classification_dir, classification)):
        for part in parts:
            part.save_pretrained(directory)
    videos = [str(video_path), str(shared_path("videos", "test.avi"))]
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH_PROCESS)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-I", str(script), str(zero_shot_dir), str(classification_dir), json.dumps(LABELS), *videos],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["pipeline_module"].startswith("transformers_modules.")
    assert result["model_module"].startswith("transformers_modules.")
    model, processor = retrieval
    for video, inferred, named in zip(videos, result["inferred"], result["named"]):
        expected = _expected_scores(model, processor, video)
        assert _as_dict(inferred) == pytest.approx(expected, abs=1e-5)
        assert _as_dict(named) == pytest.approx(expected, abs=1e-5)
    classifier_model, classifier_processor = classification
    for video, predictions in zip(videos, result["classified"]):
        with torch.no_grad():
            logits = classifier_model(**classifier_processor(videos=[video], return_tensors="pt")).logits[0]
        assert {p["label"]: p["score"] for p in predictions} == pytest.approx(
            dict(zip(CLASSES, logits.softmax(dim=-1).tolist())), abs=1e-5
        )
