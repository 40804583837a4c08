"""Helpers shared by the benchmark scripts: reference backbones, empty (meta) models, alternating timing, peak
memory (in-process, and of a fresh child process), random video-text features, the machine description and Markdown
tables.

Run the scripts from the repository root as modules, e.g. `python -m benchmarks.flops`.
"""

import ctypes
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch
from accelerate import init_empty_weights
from transformers import CLIPTextConfig, CLIPVisionConfig

from modeling_stan import StanConfig


GIB = 2**30


# ------------------------------------------------------------------------------------------------ model configurations


@dataclass(frozen=True)
class Backbone:
    """A CLIP vision tower's dimensions; every backbone gets the openai ViT-B text tower and a 512-d projection."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    patch_size: int
    num_hidden_layers: int = 12
    image_size: int = 224

    def vision_kwargs(self) -> dict:
        """The fields CLIP's and X-CLIP's vision configurations share."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "quick_gelu",
        }

    def stan_config(self, **stan_kwargs) -> StanConfig:
        return StanConfig(
            text_config=OPENAI_TEXT_CONFIG.to_dict(),
            vision_config=CLIPVisionConfig(**self.vision_kwargs()).to_dict(),
            projection_dim=PROJECTION_DIM,
            logit_scale_init_value=2.6592,
            **stan_kwargs,
        )


# The dimensions of openai/clip-vit-base-patch16 and -patch32, written out (no download).
OPENAI_TEXT_CONFIG = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
PROJECTION_DIM = 512
BACKBONES = {
    "b16": Backbone("CLIP ViT-B/16", hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=16),
    "b32": Backbone("CLIP ViT-B/32", hidden_size=768, intermediate_size=3072, num_attention_heads=12, patch_size=32),
    # The CPU stand-in: B/32's depth, patches and resolution at half its width.
    "b32-half": Backbone(
        "ViT-B/32 at half width (384)", hidden_size=384, intermediate_size=1536, num_attention_heads=6, patch_size=32
    ),
}


def empty_model(model_class, config):
    """`model_class(config)` with its parameters on the meta device: shapes only, built instantly, for counting."""
    with init_empty_weights(include_buffers=False):
        return model_class(config).eval()


def build_random_model(model_class, config, seed: int, **from_config_kwargs):
    """`model_class._from_config(config, **from_config_kwargs)` with weights drawn after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return model_class._from_config(config, **from_config_kwargs)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ random inputs


def random_video_text_features(num_texts, num_videos, num_tokens, num_frames, dim, seed=0):
    """Token embeddings (with random caption lengths), their mask and frame embeddings."""
    generator = torch.Generator().manual_seed(seed)
    text_token_embeds = torch.randn(num_texts, num_tokens, dim, generator=generator)
    lengths = torch.randint(3, num_tokens + 1, (num_texts,), generator=generator)
    text_mask = (torch.arange(num_tokens) < lengths[:, None]).long()
    frame_embeds = torch.randn(num_videos, num_frames, dim, generator=generator)
    return text_token_embeds, text_mask, frame_embeds


# ------------------------------------------------------------------------------------------------ time


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Medians over the timed calls, in seconds: wall time, and CPU time of this process (all its threads)."""

    wall: float
    cpu: float


def median_times(
    functions: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 1, repeats: int = 5
) -> dict[str, Timing]:
    """Median wall and process CPU time of each function, called in turn (a, b, c, a, b, c, ...) after `warmup` rounds.

    Alternating spreads slow drifts of the machine (thermal, other processes) evenly over all candidates. On a shared
    CPU, the CPU time of a single-threaded run is the steadier of the two: time spent waiting for a core is not in it.
    """
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            synchronize(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            function()
            synchronize(device)
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name])) for name in functions}


@contextmanager
def torch_threads(num_threads: int | None):
    """Runs the block with `num_threads` intra-op CPU threads (`None`: unchanged), then restores the previous count."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------ memory


def current_rss_bytes():
    return psutil.Process().memory_info().rss


def peak_rss_bytes():
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _child(queue, task, kwargs):
    try:
        result = task(**kwargs)
        result["peak_rss_bytes"] = peak_rss_bytes()
        queue.put(result)
    except BaseException as error:
        queue.put({"error": repr(error)})
        raise


def measure_in_child(task, **kwargs):
    """Run `task(**kwargs)` (a module-level function returning a dict) in a new process;
    return its dict plus `peak_rss_bytes` of that process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, task, kwargs))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{task.__name__}{kwargs} failed in the child process: {result['error']}")
    return result


def peak_memory_bytes(function: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory that `function()` adds above the level before the call, in bytes, in this process.

    CUDA: the allocator's peak. CPU: the peak resident set (Linux VmHWM, reset through /proc/self/clear_refs),
    which includes allocator caching and fragmentation; `None` where the peak cannot be reset. Unlike
    `measure_in_child`, this isolates one call from everything the process did before it (e.g. building a model).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _resident_peak() as peak:
        if peak is None:
            return None
        before = current_rss_bytes()
        function()
    return peak() - before


@contextmanager
def _resident_peak():
    """Yields a function reading the peak RSS since entry, or `None` when the OS cannot reset the peak."""
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0).
    except OSError:
        yield None
        return
    yield _read_vm_hwm


def _release_free_heap() -> None:
    """Hands memory that glibc keeps after earlier frees back to the OS, so that reusing it counts in the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak may then miss memory reused from earlier calls


def _read_vm_hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line.")


# ------------------------------------------------------------------------------------------------ reporting


def machine_summary(device: torch.device) -> str:
    """One line naming the hardware and software a benchmark ran on, and how busy the machine was."""
    memory_gib = psutil.virtual_memory().total / GIB
    parts = [
        f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        f"RAM {memory_gib:.0f} GiB",
    ]
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    parts.append(f"python {platform.python_version()}, torch {torch.__version__}")
    parts.append(f"load average (1 min) {os.getloadavg()[0]:.1f}")
    return "; ".join(parts)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; floats are printed as given by the caller (format them first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
