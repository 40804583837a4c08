"""The training scripts' command line: `--help` shows the defaults a run uses, documents every flag, lists choices,
hides the test-only flags and answers before torch is imported; the shipped Accelerate configs parse."""

import logging
import os
import re
import subprocess
import sys

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import prepare_multi_gpu_env
from conftest import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "training"))
import run_classification  # noqa: E402
import run_retrieval  # noqa: E402
from stan_arguments import arguments_dict  # noqa: E402


SCRIPTS = {"retrieval": run_retrieval.COMMAND_LINE, "classification": run_classification.COMMAND_LINE}
ACCELERATE_CONFIGS = REPO_ROOT / "training" / "accelerate_configs"


def help_text(command_line, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        command_line.parse([*argv, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def shown_options(text: str) -> dict[str, str]:
    """`--flag` -> its help paragraph (joined onto one line)."""
    options = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    paragraphs = re.split(r"\n  (?=-)", "\n" + options)
    return {match.group(1): " ".join(p.split()) for p in paragraphs if (match := re.match(r"\s*--(\w+)", p))}


def shown_value(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "argv", [[], ["--model_name_or_path", "openai/clip-vit-base-patch32"]], ids=["demo", "recipe"]
)
def test_help_shows_the_defaults_the_run_uses(script, argv, capsys):
    command_line = SCRIPTS[script]
    options = shown_options(help_text(command_line, argv, capsys))
    used = arguments_dict(*command_line.parse(argv))  # what the run with these flags parses, and logs
    assert set(used) <= set(options) | {name for name in used if name.startswith("debug_")}
    for name, value in used.items():
        if name.startswith("debug_"):
            assert name not in options, f"--{name} is shown"
            continue
        if f"--{name}" in argv:
            continue  # given, not a default
        help_paragraph = options[name]
        assert len(help_paragraph.split(" ", 1)[1]) > 10, f"--{name} has no help"
        default = re.search(r"\(default: (.*?)(?:;|\)$)", help_paragraph)
        shown = default.group(1) if default else "unset"
        assert shown == shown_value(value), f"--{name}: --help shows {shown}, the run uses {value!r}"


def test_help_names_the_other_set_of_defaults_and_lists_choices(capsys):
    options = shown_options(help_text(run_retrieval.COMMAND_LINE, [], capsys))
    assert "default: 8; 12 with --model_name_or_path" in options["num_frames"]
    assert "default: 0.001; 2e-06 with --model_name_or_path" in options["learning_rate"]
    assert options["dataset"].startswith("--dataset {synthetic,msrvtt,didemo,lsmdc,msvd,activitynet,webvid}")
    assert "{epoch,steps,no}" in options["eval_strategy"]


def test_help_answers_before_torch_is_imported():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['run_retrieval.py', '--help']\n"
        "try:\n    runpy.run_path('training/run_retrieval.py', run_name='__main__')\n"
        "except SystemExit as exit:\n    assert exit.code == 0\n"
        "print(sorted(m for m in ('torch', 'datasets', 'modeling_stan', 'accelerate') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "training"), str(REPO_ROOT)])}
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.filterwarnings("ignore:Port .* is already in use")  # another run on this machine holds 29500
@pytest.mark.parametrize(
    "config, expected",
    [
        ("single_process", {"num_processes": 1, "num_machines": 1, "multi_gpu": False, "use_fsdp": False}),
        ("multi_node_ddp", {"num_processes": 16, "num_machines": 2, "multi_gpu": True, "main_process_port": 29500}),
        ("fsdp", {"num_processes": 8, "num_machines": 1, "use_fsdp": True, "mixed_precision": "bf16"}),
    ],
)
def test_accelerate_configs_parse_as_accelerate_launch_reads_them(config, expected, caplog):
    """What `accelerate launch --config_file CONFIG training/run_retrieval.py` makes of the file, up to starting the
    processes (which needs the GPUs and machines)."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml"), "training/run_retrieval.py"]
    )
    with caplog.at_level(logging.WARNING):
        args, _, _ = _validate_launch_command(args)
    assert "were not passed" not in caplog.text  # every value accelerate would warn about is in the file
    assert {name: getattr(args, name) for name in expected} == expected
    if config == "fsdp":
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "CLIPEncoderLayer"
