"""The recipes in training/configs/ run the authors' runs: the learning rate of every optimizer step, the parameter
groups (what trains, what decays) and the ViFi-CLIP crops.

The reference curves (tests/fixtures/lr_curves.json) were made by running the authors' code with timm 0.4.12 and
mmengine (tests/fixtures/make_lr_curves.py); the tests need neither.
"""

import json
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import REPO_ROOT, tiny_stan_config
from safetensors.torch import load_file


sys.path.insert(0, str(REPO_ROOT / "training"))
from optimization import AUTHORS_SCHEDULERS, build_scheduler, parameter_groups, total_training_steps  # noqa: E402
from run_classification import COMMAND_LINE as CLASSIFICATION  # noqa: E402
from run_pretraining import PretrainingScript  # noqa: E402
from run_retrieval import COMMAND_LINE as RETRIEVAL  # noqa: E402
from run_retrieval import main as run_retrieval_main  # noqa: E402

from modeling_stan import StanForVideoClassification, StanForVideoTextRetrieval  # noqa: E402
from modeling_stan.tuning.prompts import set_trainable_parts  # noqa: E402
from modeling_stan.video_processing_stan import StanVideoProcessor, _multi_scale_crop_box  # noqa: E402


CONFIGS = REPO_ROOT / "training" / "configs"
CURVES = json.loads((REPO_ROOT / "tests" / "fixtures" / "lr_curves.json").read_text())["cases"]


# Recipes without an authors' configuration (the public repository has no recognition configs): ours throughout.
NOT_THE_AUTHORS = {"stan_k400_b16.yaml", "stan_ssv2_b16.yaml"}


def recipe_arguments(recipe: str) -> tuple:
    if recipe.endswith("_pretrain.yaml"):
        command_line = PretrainingScript.command_line
    elif recipe.startswith("vifi_") or recipe in NOT_THE_AUTHORS:
        command_line = CLASSIFICATION
    else:
        command_line = RETRIEVAL
    return command_line.parse(["--config", str(CONFIGS / recipe)])


def test_every_training_recipe_of_the_authors_has_their_learning_rate_curve():
    curved = {case["recipe"] for case in CURVES}
    for path in sorted(CONFIGS.glob("*.yaml")):
        training_args = recipe_arguments(path.name)[-1]
        if path.name in NOT_THE_AUTHORS or not training_args.do_train:
            continue
        assert training_args.lr_scheduler_type in AUTHORS_SCHEDULERS, path.name
        assert path.name in curved, f"{path.name}: no reference learning-rate curve in tests/fixtures"


@pytest.mark.parametrize("case", CURVES, ids=lambda case: f"{case['recipe']}-{case['batches_per_epoch']}")
def test_learning_rate_of_every_step_is_the_authors(case):
    *_, training_args = recipe_arguments(case["recipe"])
    assert training_args.learning_rate == case["learning_rate"]
    assert training_args.gradient_accumulation_steps == case["accumulation"]
    assert training_args.num_train_epochs == case["epochs"]
    loader = range(case["batches_per_epoch"])  # only its length counts
    assert total_training_steps(loader, training_args) == len(case["lrs"])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=training_args.learning_rate)
    scheduler = build_scheduler(optimizer, training_args, loader)
    ours = []
    for _ in case["lrs"]:
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step, (value, reference) in enumerate(zip(ours, case["lrs"])):
        assert abs(value - reference) <= 1e-9 * abs(reference), f"step {step}: {value} != {reference}"


def test_scheduler_resumes_from_its_state():
    *_, training_args = recipe_arguments("vifi_hmdb51_base2novel_b16.yaml")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training_args.learning_rate)
    scheduler = build_scheduler(optimizer, training_args, range(13))
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training_args.learning_rate)
    resumed = build_scheduler(resumed_optimizer, training_args, range(13))
    resumed.load_state_dict(state)
    optimizer.step(), resumed_optimizer.step()
    scheduler.step(), resumed.step()
    assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_the_authors_schedulers_need_warmup_epochs_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        CLASSIFICATION.parse(["--lr_scheduler_type", "timm_cosine"])
    assert "set --warmup_epochs" in capsys.readouterr().err


def test_a_warm_up_over_the_whole_run_holds_the_full_rate_after_it():
    *_, training_args = recipe_arguments("stan_msrvtt_b32.yaml")
    training_args.lr_cosine_epochs = None  # no cosine phase: its period would be 0 epochs
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, training_args, range(3))
    for _ in range(total_training_steps(range(3), training_args) + 2):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [1.0]


def _groups(model, **kwargs) -> dict[str, float]:
    groups = parameter_groups(model, learning_rate=1.0, weight_decay=0.5, stan_lr_multiplier=10.0, **kwargs)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return {names[id(p)]: group["weight_decay"] for group in groups for p in group["params"]}


@pytest.mark.parametrize("parts", ["all", "text", "vision"])
def test_vifi_recipes_train_what_their_model_holds_and_decay_all_of_it(parts):
    model = StanForVideoClassification(tiny_stan_config(stan_depth=0, classifier_type="text_encoder"))
    set_trainable_parts(model, parts, train_token_embedding=False)
    names = [name for name, _ in model.named_parameters()]
    # trainers/vificlip.py: "both" trains the whole ViFiCLIP module (image encoder, TextEncoder, logit scale),
    # "image" / "text" the image_encoder / text_encoder; TextEncoder holds no token-embedding table.
    tower = {
        "all": ("",),
        "text": ("text_model.", "text_projection."),
        "vision": ("vision_model.", "visual_projection."),
    }
    expected = {n for n in names if n.startswith(tower[parts]) and "token_embedding" not in n}
    decayed = _groups(model, no_decay="none")
    assert set(decayed) == expected
    assert set(decayed.values()) == {0.5}  # utils/optimizer.py: one weight decay for every parameter
    if parts == "all":
        assert "logit_scale" in decayed and "text_model.embeddings.position_embedding.weight" in decayed


def test_pretraining_recipes_exempt_norms_and_biases_outside_the_stan_branch():
    model = StanForVideoTextRetrieval(tiny_stan_config(stan_depth=2))
    decay = _groups(model, no_decay="norms_and_biases")
    for name, rate in decay.items():
        # mmengine paramwise_cfg: norm layers and biases at decay 0, except under the custom key "STAN" (full decay).
        module = name.split(".")[-2] if "." in name else ""
        exempt = ".stan." not in f".{name}" and (name.endswith(".bias") or "norm" in module)
        assert rate == (0.0 if exempt else 0.5), name
    assert decay["vision_model.embeddings.class_embedding"] == 0.5  # a vector, but neither a norm nor a bias
    assert decay["vision_model.stan.layers.0.spatial.layer_norm1.weight"] == 0.5
    assert decay["vision_model.pre_layrnorm.bias"] == 0.0


@pytest.mark.parametrize("size", [(240, 320), (720, 1280)])
def test_vifi_test_crop_is_short_side_256_then_centre_224(size):
    *_, data_args, _, _ = recipe_arguments("vifi_ucf101_base2novel_b16.yaml")
    processor = StanVideoProcessor.for_image_size(224, num_frames=2, **data_args.processor_options())
    height, width = size
    frames = (torch.rand(1, 3, height, width) * 255).repeat(2, 1, 1, 1)  # whichever frames are sampled
    out = processor(frames, return_tensors="pt")["pixel_values"][0]
    # mmcv rescale_size: int(side * 256 / short + 0.5); CenterCrop: (size - 224) // 2
    new_width = int(width * 256 / height + 0.5)
    resized = torch.nn.functional.interpolate(frames, size=(256, new_width), mode="bilinear", antialias=True)
    top, left = (256 - 224) // 2, (new_width - 224) // 2
    expected = resized[..., top : top + 224, left : left + 224] / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(out, (expected - mean) / std, atol=1e-4, rtol=1e-4)


def test_vifi_training_crops_are_their_fixed_boxes():
    # 320x240 resized to short side 256: 341x256. mmaction MultiScaleCrop(scales=(1, .875, .75, .66),
    # max_wh_scale_gap=1, random_crop=False): sides int(256 * s), pairs at most one scale apart, 5 fixed offsets.
    height, width = 256, 341
    sides = [256, 224, 192, 168]
    expected = set()
    for i, box_h in enumerate(sides):
        for j, box_w in enumerate(sides):
            if abs(i - j) <= 1:
                step_y, step_x = (height - box_h) // 4, (width - box_w) // 4
                for y, x in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2)):
                    expected.add((y * step_y, x * step_x, box_h, box_w))
    generator = torch.Generator().manual_seed(0)
    boxes = {
        _multi_scale_crop_box((height, width), (1, 0.875, 0.75, 0.66), (224, 224), generator) for _ in range(3000)
    }
    assert boxes == expected


@pytest.mark.parametrize("size", [(240, 320), (720, 1280)])
def test_vifi_train_and_test_frames_share_one_aspect_handling(size):
    # Test: a square crop of the short-side-256 frame. Training: boxes of that same frame, square within one scale
    # step (at most 224/192), resized to 224x224 - not the whole 4:3 or 16:9 frame squeezed into a square.
    height, width = size
    resized = (256, int(width * 256 / height + 0.5))
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        _, _, box_h, box_w = _multi_scale_crop_box(resized, (1, 0.875, 0.75, 0.66), (224, 224), generator)
        assert 192 / 224 <= box_w / box_h <= 224 / 192  # the widest pair one scale apart


def test_final_checkpoint_last_exports_and_tests_the_last_step(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # Validation and a checkpoint at every step; the selection metric (corrupt validation videos, 0 at every step,
    # a tie never improves) makes step 1 the best, not the last.
    flags = "--synthetic_num_train 8 --synthetic_num_val 4 --synthetic_num_test 4 --seed 1 --max_steps 2"
    flags += " --eval_strategy steps --eval_steps 1 --save_strategy steps --save_steps 1 --save_total_limit 3"
    flags += " --metric_for_best_model corrupt_videos --per_device_train_batch_size 4 --final_checkpoint last"
    run_retrieval_main([*flags.split(), "--output_dir", str(tmp_path)])
    exported = load_file(tmp_path / "model.safetensors")
    last = load_file(tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors")
    best = load_file(tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors")
    assert all(torch.equal(exported[name], last[name]) for name in last)
    assert not all(torch.equal(exported[name], best[name]) for name in best)
