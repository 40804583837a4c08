"""Tests of the training scripts (training/): optimiser recipe, config files, resumable data order, atomic
checkpoints, exact resumption (also after SIGKILL mid-checkpoint), corrupt videos, non-finite losses, and the
no-argument demos learning far above chance.

Runs happen in this process (`main(argv)`) except the one that must be killed; all of them use the tiny default model
on a small synthetic dataset generated once per module.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import REPO_ROOT, tiny_stan_config

from modeling_stan import StanForVideoTextRetrieval
from modeling_stan.demo.synthetic_videos import generate_synthetic_dataset


sys.path.insert(0, str(REPO_ROOT / "training"))
import run_classification  # noqa: E402
import run_pretraining  # noqa: E402
import run_retrieval  # noqa: E402
import stan_training  # noqa: E402
from stan_arguments import ScriptCommandLine  # noqa: E402
from stan_checkpointing import CheckpointManager, RerunError, choose_checkpoint  # noqa: E402


SIZES = {"train": 16, "validation": 8, "test": 8}
SMALL = [
    "--synthetic_num_train",
    SIZES["train"],
    "--synthetic_num_val",
    SIZES["validation"],
    "--synthetic_num_test",
    SIZES["test"],
    "--per_device_train_batch_size",
    8,
    "--per_device_eval_batch_size",
    8,
]
# Constant learning rate after a 4-step warm-up, so that stopping at --max_steps 3 does not change the schedule of
# the steps before it; drop path on (in the second STAN layer), so that the restored RNG state matters; validation
# and checkpoints in between.
RESUMABLE = [
    *SMALL,
    "--seed",
    3,
    "--lr_scheduler_type",
    "constant_with_warmup",
    "--warmup_steps",
    4,
    "--stan_depth",
    2,
    "--drop_path_rate",
    0.2,
    "--eval_strategy",
    "steps",
    "--eval_steps",
    2,
    "--save_strategy",
    "steps",
    "--save_steps",
    2,
]


def _reset_accelerate() -> None:
    # Each in-process run builds its own Accelerator, as a fresh process would.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(script, output_dir, *flags) -> dict:
    _reset_accelerate()
    started = time.monotonic()
    try:
        return script.main(["--output_dir", str(output_dir), *map(str, flags)])
    finally:
        _reset_accelerate()
        # Progress of a long module (`pytest -s` shows it).
        print(f"[{script.__name__} -> {output_dir.name}: {time.monotonic() - started:.0f} s]", flush=True)


def dump(folder, rank: int = 0) -> list[dict]:
    with open(folder / f"rank{rank}.jsonl", encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def loss_curve(records: list[dict]) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in records if "step" in record}


def final_hash(records: list[dict]) -> str:
    return [record for record in records if "weights_sha256" in record][-1]["weights_sha256"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_dataset(root, num_train=SIZES["train"], num_val=SIZES["validation"], num_test=SIZES["test"])
    return root


def corrupt_copy(data_dir, destination, videos):
    """A copy of the synthetic dataset whose `videos` (indices) are unreadable."""
    shutil.copytree(data_dir, destination, symlinks=True)
    for index in videos:
        (destination / "videos" / f"video{index}.mp4").write_bytes(b"\x00not a video" * 50)
    return destination


@pytest.fixture(scope="module")
def resumable_data_dir(tmp_path_factory, data_dir):
    """Two unreadable training videos (4 of the 32 training captions): the resumption tests also check that the
    corrupt-sample counts of a resumed run equal an uninterrupted run's."""
    return corrupt_copy(data_dir, tmp_path_factory.mktemp("resumable") / "data", videos=(0, 1))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, resumable_data_dir):
    """An uninterrupted 6-step run: its per-step losses, final weight hash (`dump`) and `all_results.json`."""
    folder = tmp_path_factory.mktemp("reference")
    run(
        run_retrieval,
        folder / "out",
        *RESUMABLE,
        "--data_dir",
        resumable_data_dir,
        "--max_steps",
        6,
        "--debug_dump_dir",
        folder / "dump",
    )
    return {"dump": dump(folder / "dump"), "results": results_file(folder / "out")}


def results_file(output_dir) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# Optimiser, arguments, sampler, checkpoint manager
# ----------------------------------------------------------------------------------------------------------------


def test_parameter_groups_follow_the_authors_recipe():
    model = StanForVideoTextRetrieval(tiny_stan_config(stan_depth=2))
    model.text_projection.requires_grad_(False)
    groups = stan_training.parameter_groups(model, learning_rate=1e-5, weight_decay=0.05, stan_lr_multiplier=10.0)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    group_of = {names[id(p)]: (group["lr"], group["weight_decay"]) for group in groups for p in group["params"]}

    assert group_of["vision_model.stan.layers.0.temporal.temporal_fc.weight"] == (1e-4, 0.05)
    assert group_of["vision_model.stan.layers.1.spatial.mlp.fc1.weight"] == (1e-4, 0.05)
    for stan_no_decay in (
        "vision_model.stan.layers.0.temporal.temporal_fc.bias",
        "vision_model.stan.layers.0.spatial.layer_norm1.weight",
        "vision_model.stan.time_embedding.weight",
    ):
        assert group_of[stan_no_decay] == (1e-4, 0.0), stan_no_decay
    assert group_of["vision_model.encoder.layers.0.self_attn.q_proj.weight"] == (1e-5, 0.05)
    assert group_of["visual_projection.weight"] == (1e-5, 0.05)
    for clip_no_decay in (
        "vision_model.encoder.layers.0.self_attn.q_proj.bias",
        "vision_model.post_layernorm.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        "logit_scale",
    ):
        assert group_of[clip_no_decay] == (1e-5, 0.0), clip_no_decay
    # Frozen parameters are not handed to the optimiser; every trainable one is, once.
    assert "text_projection.weight" not in group_of
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(group_of) == sorted(trainable) and sum(len(g["params"]) for g in groups) == len(trainable)


def retrieval_command_line(**recipe_defaults) -> ScriptCommandLine:
    return ScriptCommandLine(run_retrieval.COMMAND_LINE.argument_types, recipe_defaults, {}, ("msrvtt",))


def test_config_file_then_flags_override(tmp_path):
    config = tmp_path / "recipe.yaml"
    # YAML reads 2e-5 as a string: it must still become a float, as the same flag would.
    config.write_text(
        "learning_rate: 2e-5\nnum_frames: 12\nrandom_resized_crop_scale: [0.5, 1.0]\n"
        "gradient_checkpointing: true\nalignment: mug\n"
    )
    model, data, retrieval, training = retrieval_command_line(num_frames=4, learning_rate=1.0).parse(
        ["--config", str(config), "--num_frames", "16"]
    )
    assert training.learning_rate == 2e-5
    assert data.num_frames == 16  # the flag beats the file, which beats the script default
    assert data.random_resized_crop_scale == [0.5, 1.0]
    assert model.gradient_checkpointing is True and retrieval.alignment == "mug"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "{tmp}/unknown.yaml"], r"unknown\.yaml.*learning_rat"),
        (["--config", "{tmp}/wrong.json"], r"wrong\.json.*num_frames"),
        (["--config", "{tmp}/missing.yaml"], r"missing\.yaml: no such file"),
        (["--eval_strategy", "sometimes"], r"--eval_strategy.*invalid choice: 'sometimes'"),
        (["--eval_strategy", "steps"], r"--eval_strategy steps needs --eval_steps > 0"),
        (["--learning_rat", "1"], r"not used by the HfArgumentParser: \['--learning_rat', '1'\]"),  # no abbreviations
    ],
)
def test_bad_options_exit_with_a_message_naming_them(tmp_path, capsys, argv, message):
    (tmp_path / "unknown.yaml").write_text("learning_rat: 1.0\n")
    (tmp_path / "wrong.json").write_text('{"num_frames": "eight"}')
    with pytest.raises(SystemExit) as exit:
        retrieval_command_line().parse([arg.format(tmp=tmp_path) for arg in argv])
    assert exit.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_configs_parse(config):
    dataset = yaml.safe_load(config.read_text())["dataset"]
    script = next(
        script
        for script in (run_retrieval.RetrievalScript, run_classification.ClassificationScript)
        if dataset in script.command_line.dataset_formats
    )
    if "pretrain" in config.stem:
        script = run_pretraining.PretrainingScript
    model, _, _, training = script.command_line.parse(["--config", str(config)])
    assert model.model_name_or_path.startswith("openai/clip-vit-")
    assert training.metric_for_best_model in ("t2v_R@1", "top1")


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = stan_training.EpochSampler(10, seed=7, shuffle=True, multiple_of=4)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first  # re-creatable at any time: what resumption relies on
    assert len(first) == len(sampler) == 8  # cut to whole global batches
    assert [row for row, _ in first] != [row for row, _ in second]
    assert len({row for row, _ in first}) == 8
    # A sample's augmentation seed depends on (seed, epoch, row) only, not on its position in the order.
    other_layout = stan_training.EpochSampler(10, seed=7, shuffle=True, multiple_of=2)
    assert dict(first).items() <= dict(other_layout).items()
    assert dict(first) != dict(second)
    assert list(stan_training.EpochSampler(3, seed=7, shuffle=False)) == [(0, None), (1, None), (2, None)]


def test_checkpoint_manager_keeps_the_last_ones_and_the_best(tmp_path):
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints", total_limit=2)
    assert choose_checkpoint(manager, "latest").checkpoint is None
    (tmp_path / "checkpoints" / ".tmp-checkpoint-9").mkdir(parents=True)  # left by a crash
    for step in (1, 2, 3, 4):
        manager.save(step, protected_step=1)
    assert manager.steps() == [1, 3, 4]
    assert choose_checkpoint(manager, "latest").checkpoint == tmp_path / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-1",
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert (manager.path(4) / "model.safetensors").is_file()
    with pytest.raises(RerunError, match="nowhere"):
        choose_checkpoint(manager, str(tmp_path / "nowhere"))
    _reset_accelerate()


def test_all_gather_with_grad_is_the_identity_on_one_process():
    tensor = torch.randn(3, 2, requires_grad=True)
    assert stan_training.all_gather_with_grad(tensor) is tensor


# ----------------------------------------------------------------------------------------------------------------
# Resumption
# ----------------------------------------------------------------------------------------------------------------


def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, resumable_data_dir, reference_run):
    output, dump_dir = tmp_path / "out", tmp_path / "dump"
    common = [*RESUMABLE, "--data_dir", resumable_data_dir, "--debug_dump_dir", dump_dir]
    run(run_retrieval, output, *common, "--max_steps", 3)
    assert (output / "checkpoints" / "checkpoint-3").is_dir()
    run(run_retrieval, output, *common, "--max_steps", 6, "--resume_from_checkpoint", "latest")

    records = dump(dump_dir)
    # Steps 1-3 come from the first run, 4-6 from the resumed one (which restarts mid-epoch: 4 steps an epoch).
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4, 5, 6]
    assert loss_curve(records) == loss_curve(reference_run["dump"])
    assert final_hash(records) == final_hash(reference_run["dump"])
    # Counted once each, although the loader had prefetched past step 3 when the first run stopped: the whole of
    # epoch 0 (all 4 corrupt captions), and the same part of epoch 1 as the uninterrupted run.
    resumed, reference = results_file(output)["train"], reference_run["results"]["train"]
    assert resumed["corrupt_samples_per_epoch"] == reference["corrupt_samples_per_epoch"]
    assert resumed["corrupt_samples_per_epoch"]["0"] == 4
    assert resumed["samples"] == reference["samples"] == 48  # 6 steps x 8


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(
    tmp_path, resumable_data_dir, reference_run, caplog
):
    output, dump_dir = tmp_path / "out", tmp_path / "dump"
    common = [*RESUMABLE, "--data_dir", resumable_data_dir, "--debug_dump_dir", dump_dir, "--max_steps", 6]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "run_retrieval.py"),
        "--output_dir",
        str(output),
        *map(str, common),
        "--debug_checkpoint_write_delay",
        "0.3",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    in_flight = output / "checkpoints" / ".tmp-checkpoint-4"
    try:
        deadline = time.monotonic() + 240
        while not in_flight.is_dir():
            assert process.poll() is None, "the run ended before writing checkpoint-4"
            assert time.monotonic() < deadline, "checkpoint-4 was never started"
            time.sleep(0.05)
        time.sleep(0.2)  # inside the writer's pauses between files
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == [".tmp-checkpoint-4", "checkpoint-2"]

    # The same command again (without --debug_checkpoint_write_delay, which does not change the run): the default
    # --resume_from_checkpoint auto continues the unfinished run.
    with caplog.at_level("INFO"):
        run(run_retrieval, output, *common)
    assert "Resuming the unfinished run" in caplog.text and "checkpoint-2 (step 2 of 6)" in caplog.text
    resumed = [r for r in dump(dump_dir) if "step" in r]
    # The killed run logged steps 1-4; the resumed one starts again after step 2.
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 3, 4, 5, 6]
    reference = loss_curve(reference_run["dump"])
    assert {r["step"]: r["loss"] for r in resumed[4:]} == {s: l for s, l in reference.items() if s > 2}
    assert final_hash(dump(dump_dir)) == final_hash(reference_run["dump"])
    assert not in_flight.exists()  # the leftover is cleaned up by the next save


# ----------------------------------------------------------------------------------------------------------------
# Operations: corrupt videos, non-finite losses
# ----------------------------------------------------------------------------------------------------------------


def test_corrupt_videos_are_skipped_and_counted(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, symlinks=True)
    (data / "videos" / "video0.mp4").write_bytes(b"")  # a training video (two captions)
    (data / "videos" / f"video{SIZES['train']}.mp4").write_bytes(b"\x00not a video" * 50)  # a validation video
    results = run(run_retrieval, tmp_path / "out", *SMALL, "--data_dir", data, "--num_train_epochs", 1)

    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["train"]["corrupt_samples"] == 2
    assert saved["train"]["corrupt_samples_per_epoch"] == {"0": 2}
    assert saved["validation"]["corrupt_videos"] == 1.0
    assert saved["test"]["corrupt_videos"] == 0.0
    assert results["train"]["steps"] == 4
    # Raw and dual-softmax metrics on both splits; QB-Norm (a pass over the training captions) on test only.
    assert {"t2v_R@1", "v2t_MdR", "dsl_t2v_R@1", "dsl_v2t_MnR"} <= saved["validation"].keys()
    assert {"t2v_R@1", "dsl_v2t_R@1", "qbnorm_t2v_R@1"} <= saved["test"].keys()
    assert not any(name.startswith("qbnorm") for name in saved["validation"])


@pytest.mark.parametrize(
    "unreadable, message",
    [
        (range(SIZES["train"]), r"Epoch 0: none of the 32 training samples could be decoded"),
        (
            range(6),
            r"Epoch 0: only 20 of 32 training samples \(62%\) could be decoded, below "
            r"--min_usable_sample_fraction 0.8",
        ),
    ],
    ids=["all", "most"],
)
def test_a_run_without_enough_usable_training_videos_fails(
    tmp_path, data_dir, monkeypatch, caplog, unreadable, message
):
    data = corrupt_copy(data_dir, tmp_path / "data", unreadable)
    output = tmp_path / "out"
    # As `python training/run_retrieval.py ...` runs it: a non-zero exit and the reason, no traceback.
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "run_retrieval.py",
            "--output_dir",
            str(output),
            *map(str, SMALL),
            "--data_dir",
            str(data),
            "--num_train_epochs",
            "1",
        ],
    )
    _reset_accelerate()
    with pytest.raises(SystemExit) as exit:
        run_retrieval.RetrievalScript().run_from_command_line()
    _reset_accelerate()
    assert exit.value.code == 1
    assert re.search(r"UnusableTrainingDataError: " + message, caplog.text)
    assert not (output / "model.safetensors").exists() and not (output / "all_results.json").exists()


def test_running_the_same_command_again_re_exports_a_finished_run(tmp_path, data_dir, caplog):
    """The second run of an unchanged command (as when the README's first command is run twice): no training, the
    best checkpoint evaluated and exported again, with one line saying so; a changed command is refused."""
    output = tmp_path / "out"
    # Step 2 is checkpointed (--save_steps 2), then validated (the end of training): the checkpoint is rewritten
    # with the validation, which the second run must find.
    command = [*SMALL, "--data_dir", data_dir, "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 2]
    with caplog.at_level("INFO"):
        first = run(run_retrieval, output, *command)
    # The demo's values, as --help shows them (tests/test_training_cli.py), flags applied.
    settings = re.search(r"Demo settings \(no --model_name_or_path\): (.*)", caplog.text).group(1).split()
    assert {
        "stan_depth=1",
        "num_frames=8",
        "fixed_logit_scale=unset",
        "learning_rate=0.001",
        "per_device_train_batch_size=8",
    } <= set(settings)
    caplog.clear()
    with caplog.at_level("INFO"):
        second = run(run_retrieval, output, *command)
    assert "already finished training (step 2 of 2) with these arguments" in caplog.text
    assert second["test"] == first["test"] and second["train"]["steps"] == 2
    assert second["validation"] == first["validation"] and "t2v_R@1" in first["validation"]
    assert (output / "model.safetensors").is_file()
    with pytest.raises(
        RerunError,
        match=r"other arguments \(learning_rate: 0\.001 there, 0\.002 here\).*"
        r"--overwrite_output_dir",
    ):
        run(run_retrieval, output, *command, "--learning_rate", 0.002)
    assert (
        run(run_retrieval, output, *command, "--learning_rate", 0.002, "--overwrite_output_dir")["train"]["steps"] == 2
    )


def test_classification_with_multi_view_testing(tmp_path, data_dir):
    results = run(
        run_classification,
        tmp_path / "out",
        *SMALL,
        "--data_dir",
        data_dir,
        "--max_steps",
        2,
        "--num_test_clips",
        2,
        "--num_test_crops",
        3,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    )
    # 8 test videos x 6 views each, averaged back to one prediction per video.
    assert results["test"]["corrupt_videos"] == 0.0
    assert results["test"]["top1"] in {100 * k / 8 for k in range(9)}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {
        "0": "bottom_to_top",
        "1": "left_to_right",
        "2": "right_to_left",
        "3": "top_to_bottom",
    }


def test_nonfinite_loss_skips_the_step_then_stops_the_run(tmp_path, data_dir):
    dump_dir = tmp_path / "dump"
    common = [*SMALL, "--data_dir", data_dir, "--eval_strategy", "no", "--save_strategy", "no"]
    results = run(
        run_retrieval,
        tmp_path / "once",
        *common,
        "--max_steps",
        3,
        "--debug_nonfinite_steps",
        2,
        "--debug_dump_dir",
        dump_dir,
    )
    attempts = [r for r in dump(dump_dir) if "attempt" in r]
    # The second attempt is refused; it is not a step, so a fourth attempt makes the third step.
    assert [(r["attempt"], r["step"], r["applied"]) for r in attempts] == [
        (1, 1, True),
        (2, 1, False),
        (3, 2, True),
        (4, 3, True),
    ]
    assert results["train"]["steps"] == 3 and results["train"]["nonfinite_steps"] == 1

    with pytest.raises(stan_training.NonFiniteLossError, match=r"Step 2: non-finite loss.*Stopping"):
        run(
            run_retrieval,
            tmp_path / "twice",
            *common,
            "--max_steps",
            4,
            "--debug_nonfinite_steps",
            2,
            3,
            "--max_nonfinite_steps",
            2,
        )


# ----------------------------------------------------------------------------------------------------------------
# The no-argument demos, shortened
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
    """The default job's synthetic dataset (160/40/40 videos, the default seed), generated once for both demos."""
    root = tmp_path_factory.mktemp("demo") / "data"
    generate_synthetic_dataset(root, num_train=160, num_val=40, num_test=40, seed=42)
    return root


def assert_next_command_runs(script_class, output_dir, data_dir, expected_text):
    """The command the end-of-run summary suggests works as printed, on a video named video.mp4 in the working folder."""
    workdir = output_dir.parent / "next_command"
    workdir.mkdir()
    shutil.copy(next(data_dir.rglob("*.mp4")), workdir / "video.mp4")
    command = script_class.next_command.format(output_dir=output_dir)
    completed = subprocess.run(shlex.split(command), cwd=workdir, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert expected_text in completed.stdout


def test_retrieval_demo_learns_far_above_chance(tmp_path, demo_data_dir):
    """The default job (tiny random CLIP, 160/40/40 synthetic videos), 3 of its 12 epochs, no validation."""
    results = run(
        run_retrieval,
        tmp_path / "out",
        "--data_dir",
        demo_data_dir,
        "--num_train_epochs",
        3,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    )
    chance = 100 / 40  # R@1 of a random ranking of the 40 test videos, in percent
    assert results["test"]["t2v_R@1"] >= 3 * chance
    assert results["test"]["v2t_R@1"] >= 3 * chance
    for name in ("config.json", "model.safetensors", "processor_config.json", "all_results.json", "README.md"):
        assert (tmp_path / "out" / name).is_file(), name
    # A trained dual encoder carries the zero-shot pipeline as remote code.
    assert (
        "zero-shot-video-classification"
        in json.loads((tmp_path / "out" / "config.json").read_text())["custom_pipelines"]
    )
    assert_next_command_runs(run_retrieval.RetrievalScript, tmp_path / "out", demo_data_dir, "label")


def test_classification_demo_learns_far_above_chance(tmp_path, demo_data_dir):
    """The default job, 40 of its 60 epochs (about a minute on 2 idle cores; it runs in CI, which has the machine to
    itself): a random CLIP needs about 300 steps to leave its initial plateau on this task, so no shorter run shows
    it learning."""
    results = run(
        run_classification,
        tmp_path / "out",
        "--data_dir",
        demo_data_dir,
        "--num_train_epochs",
        40,
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
    )
    chance = 100 / 4  # four motion directions
    assert results["test"]["top1"] >= 2 * chance
    assert_next_command_runs(run_classification.ClassificationScript, tmp_path / "out", demo_data_dir, "label")
