"""Every Python and bash snippet of README.md runs, in order, in a scratch folder that holds tiny local stand-ins for
the checkpoints and videos the README names. Snippets marked `<!-- snippet: not-run (why) -->` are the only ones
left out; the two commands at the top are CI's contract and run there."""

import contextlib
import importlib
import os
import shlex
import shutil
import subprocess

import pytest
import torch
from conftest import REPO_ROOT, shared_path
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPConfig

from modeling_stan import StanForVideoClassification, StanForVideoTextRetrieval
from modeling_stan.demo.synthetic_videos import render_clip, write_mp4
from modeling_stan.hub.model_card import extract_snippets
from modeling_stan.processing_stan import StanProcessor
from modeling_stan.video_processing_stan import StanVideoProcessor


README = REPO_ROOT / "README.md"
TOP_COMMANDS = (
    'pip install torch==2.13.0 -e ".[train]" && accelerate launch training/run_retrieval.py',
    'pip install torch==2.13.0 -e ".[test]" && python -m pytest',
)
NUM_FRAMES = 4


# ----------------------------------------------------------------------------------------------------------------
# Running snippets (also used by test_model_cards.py)
# ----------------------------------------------------------------------------------------------------------------


def run_python_snippet(snippet, where: str) -> None:
    """Executes a Python snippet as a script of its own (fresh globals) in the current directory."""
    exec(compile(snippet.code, f"{where}:{snippet.line}", "exec"), {"__name__": "__main__"})


def bash_commands(code: str) -> list[str]:
    """The commands of a bash snippet: continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line for line in (shlex.join(shlex.split(raw, comments=True)) for raw in joined.splitlines()) if line]


def run_bash_snippet(snippet, cwd) -> None:
    """`python -m modeling_stan.X ARGS` runs in this process as `modeling_stan.X.main(ARGS)` (what `-m` runs, without
    a second interpreter start); any other command runs in bash."""
    for command in bash_commands(snippet.code):
        argv = shlex.split(command)
        if argv[:2] == ["python", "-m"] and argv[2].startswith("modeling_stan."):
            try:
                importlib.import_module(argv[2]).main(argv[3:])
            except SystemExit as exit:
                assert exit.code in (None, 0), f"README line {snippet.line}: `{command}` exited with {exit.code}"
        else:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
            completed = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
            assert completed.returncode == 0, f"`{command}` failed:\n{completed.stderr[-3000:]}"


@contextlib.contextmanager
def one_thread():
    # Tiny models run many small ops: on a shared 2-core machine one thread is several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_thread():
    """Module-wide `one_thread()`; other test modules import it and use it with `pytest.mark.usefixtures`."""
    with one_thread():
        yield


def tiny_processor(clip_dir) -> StanProcessor:
    image_size = CLIPConfig.from_pretrained(clip_dir).vision_config.image_size
    return StanProcessor(
        video_processor=StanVideoProcessor.for_image_size(image_size, NUM_FRAMES),
        tokenizer=AutoTokenizer.from_pretrained(clip_dir),
    )


def write_video(path, colour="red", direction="left_to_right") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, render_clip("square", colour, direction, num_frames=8, size=32))


# ----------------------------------------------------------------------------------------------------------------
# The README
# ----------------------------------------------------------------------------------------------------------------

SNIPPETS = extract_snippets(README.read_text(encoding="utf-8"))
RUNNABLE = [s for s in SNIPPETS if not s.not_run_reason and s.code.strip() not in TOP_COMMANDS]
TRAINING = [s for s in RUNNABLE if s.code.startswith("accelerate launch")]
QUICK = [s for s in RUNNABLE if s not in TRAINING]


def test_the_two_commands_open_the_readme():
    first_two = [s.code.strip() for s in SNIPPETS[:2]]
    assert first_two == list(TOP_COMMANDS)
    assert all(s.language == "bash" for s in SNIPPETS[:2])


def test_every_snippet_runs_or_says_why_not():
    assert len(QUICK) >= 8 and TRAINING
    for snippet in SNIPPETS:
        assert snippet.not_run_reason is None or snippet.not_run_reason.strip(), f"README line {snippet.line}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_clip_dir):
    """What the README's snippets expect to find: checkpoints in outputs/ (saved as the training scripts save them:
    `model.save_pretrained`, then `processor.save_pretrained`), video.mp4, my_videos/, and (when the shared parity
    files exist) an authors' checkpoint with its CLIP for the converter."""
    root = tmp_path_factory.mktemp("readme")
    processor = tiny_processor(tiny_clip_dir)
    retrieval = StanForVideoTextRetrieval.from_clip_pretrained(
        tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES, drop_path_rate=0.0
    )
    classifier = StanForVideoClassification.from_clip_pretrained(
        tiny_clip_dir, stan_depth=1, num_frames=NUM_FRAMES, drop_path_rate=0.0, class_names=["left", "right", "up"]
    )
    for name, model in (("retrieval", retrieval), ("classification", classifier)):
        model.save_pretrained(root / "outputs" / name)
        processor.save_pretrained(root / "outputs" / name)
    write_video(root / "video.mp4")
    clips = [("red", "left_to_right"), ("blue", "top_to_bottom"), ("green", "right_to_left")]
    for index, (colour, direction) in enumerate(clips):
        write_video(root / "my_videos" / f"clip{index}.mp4", colour, direction)
    return root


@pytest.fixture(scope="module")
def authors_checkpoint(workdir):
    """The parity checkpoint in the authors' layout saved as the README names it, with its CLIP at the Hub id."""
    parity = shared_path("parity", "stan_attention_k4_t8")
    torch.save({"state_dict": load_file(parity / "official_state_dict.safetensors")}, workdir / "stan_msrvtt_b32.pth")
    shutil.copytree(parity / "clip", workdir / "openai" / "clip-vit-base-patch32", dirs_exist_ok=True)


@pytest.mark.parametrize("snippet", QUICK, ids=[f"line {s.line}" for s in QUICK])
def test_readme_snippet(snippet, workdir, monkeypatch, capsys, request):
    if "convert_original_checkpoint" in snippet.code:
        request.getfixturevalue("authors_checkpoint")
    monkeypatch.chdir(workdir)
    with one_thread():
        if snippet.language == "python":
            run_python_snippet(snippet, "README.md")
        else:
            run_bash_snippet(snippet, workdir)
    if "video_search index" in snippet.code:
        assert "3 videos indexed" in capsys.readouterr().out
    if "convert_original_checkpoint" in snippet.code:
        assert (workdir / "stan-msrvtt-b32" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("snippet", TRAINING, ids=[f"line {s.line}" for s in TRAINING])
def test_readme_training_snippet(snippet, tmp_path):
    (tmp_path / "training").symlink_to(REPO_ROOT / "training")
    run_bash_snippet(snippet, tmp_path)
    assert (tmp_path / "outputs" / "quick" / "README.md").is_file()


def test_bash_commands_join_continuations_and_drop_comments():
    code = "python -m a.b --x 1 \\\n    --y 'two words'  # comment\n\n# only a comment\nls\n"
    assert bash_commands(code) == ["python -m a.b --x 1 --y 'two words'", "ls"]


def test_a_failing_snippet_fails_the_test(tmp_path):
    broken = extract_snippets("```python\nraise RuntimeError('broken snippet')\n```\n")[0]
    with pytest.raises(RuntimeError, match="broken snippet"):
        run_python_snippet(broken, "inline")
    failing = extract_snippets("```bash\nfalse\n```\n")[0]
    with pytest.raises(AssertionError, match="`false` failed"):
        run_bash_snippet(failing, tmp_path)
