"""Video-embedding throughput and peak memory of the STAN video tower against CLIP mean pooling and X-CLIP.

The three video towers share the backbone (width, depth, patch size, resolution, frames) and are random-initialised:

- CLIP mean pooling: `StanModel` with `stan_depth=0` (no branch; the ViFi-CLIP baseline);
- STAN: `StanModel` with the branch (`--stan_depth`, `--temporal_module`);
- X-CLIP: transformers' `XCLIPModel.get_video_features` (cross-frame communication + multi-frame integration).

Each is timed on `get_video_features` in one run, the models alternating call by call after warm-up; the table
gives medians. Time ratios are printed next to FLOPs ratios from `benchmarks.flops.count_macs` (paper rule), so a
module that costs more time than its arithmetic shows up as a time ratio above the FLOPs ratio.

CPU (default there): float32, a half-width B/32 and the full B/32. CUDA: bfloat16 + SDPA, B/16 and B/32;
`--compile` adds torch.compile.

Usage (from the repository root): `python -m benchmarks.throughput [--backbones b32-half b32] [--batch_size 4]`
"""

import argparse
import os
from dataclasses import dataclass

import torch
from transformers import XCLIPConfig, XCLIPModel, XCLIPTextConfig, XCLIPVisionConfig

from modeling_stan import StanModel

from ._common import (
    BACKBONES,
    PROJECTION_DIM,
    Backbone,
    Timing,
    build_random_model,
    default_device,
    empty_model,
    machine_summary,
    markdown_table,
    median_times,
    peak_memory_bytes,
    torch_threads,
)
from .flops import count_macs


CLIP_NAME = "CLIP mean pooling (K=0)"
XCLIP_NAME = "X-CLIP"


def xclip_config(backbone: Backbone, num_frames: int) -> XCLIPConfig:
    """X-CLIP around the same vision backbone; its multi-frame integration transformer works in the projection space."""
    vision_config = XCLIPVisionConfig(
        **backbone.vision_kwargs(),
        num_frames=num_frames,
        mit_hidden_size=PROJECTION_DIM,
        mit_intermediate_size=4 * PROJECTION_DIM,
    )
    return XCLIPConfig(
        text_config=XCLIPTextConfig().to_dict(), vision_config=vision_config.to_dict(), projection_dim=PROJECTION_DIM
    )


@dataclass(frozen=True)
class Candidate:
    name: str
    model_class: type
    config: object


def candidates(backbone: Backbone, num_frames: int, stan_depth: int, temporal_module: str) -> list[Candidate]:
    stan_name = f"STAN-{'self' if temporal_module == 'attention' else 'conv'} (K={stan_depth})"
    return [
        Candidate(CLIP_NAME, StanModel, backbone.stan_config(stan_depth=0, num_frames=num_frames)),
        Candidate(
            stan_name,
            StanModel,
            backbone.stan_config(stan_depth=stan_depth, temporal_module=temporal_module, num_frames=num_frames),
        ),
        Candidate(XCLIP_NAME, XCLIPModel, xclip_config(backbone, num_frames)),
    ]


@dataclass(frozen=True)
class Measurement:
    name: str
    gmacs_per_video: float
    timing: Timing  # per batch
    peak_memory_bytes: int | None


def measure_backbone(backbone: Backbone, args, device: torch.device, dtype: torch.dtype) -> list[Measurement]:
    models = {}
    macs = {}
    for index, candidate in enumerate(candidates(backbone, args.num_frames, args.stan_depth, args.temporal_module)):
        model = build_random_model(
            candidate.model_class, candidate.config, seed=index, attn_implementation=args.attn_implementation
        )
        models[candidate.name] = model.to(device=device, dtype=dtype).eval()
        one_video = torch.empty(1, args.num_frames, 3, backbone.image_size, backbone.image_size, device="meta")
        macs[candidate.name] = count_macs(empty_model(candidate.model_class, candidate.config), one_video)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.num_frames, 3, backbone.image_size, backbone.image_size)
    pixel_values = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    functions = {}
    for name, model in models.items():
        forward = torch.compile(model.get_video_features) if args.compile else model.get_video_features
        functions[name] = lambda forward=forward: forward(pixel_values)
    with torch.inference_mode():
        times = median_times(functions, device, warmup=args.warmup, repeats=args.repeats)
        memory = {name: peak_memory_bytes(function, device) for name, function in functions.items()}
    return [Measurement(name, macs[name] / 1e9, times[name], memory[name]) for name in functions]


def format_measurements(measurements: list[Measurement], batch_size: int, stan_name: str) -> str:
    stan = next(m for m in measurements if m.name == stan_name)
    headers = [
        "video tower",
        "GFLOPs / video",
        "videos / s",
        "ms / batch",
        "CPU ms / batch",
        "peak memory (MiB)",
        "STAN / this: time",
        "CPU time",
        "FLOPs",
    ]
    rows = []
    for m in measurements:
        memory = "n/a" if m.peak_memory_bytes is None else f"{m.peak_memory_bytes / 2**20:.0f}"
        rows.append(
            [
                m.name,
                f"{m.gmacs_per_video:.2f}",
                f"{batch_size / m.timing.wall:.2f}",
                f"{m.timing.wall * 1e3:.0f}",
                f"{m.timing.cpu * 1e3:.0f}",
                memory,
                f"{stan.timing.wall / m.timing.wall:.3f}",
                f"{stan.timing.cpu / m.timing.cpu:.3f}",
                f"{stan.gmacs_per_video / m.gmacs_per_video:.3f}",
            ]
        )
    return markdown_table(headers, rows)


def overhead_verdict(measurements: list[Measurement], stan_name: str) -> str:
    """How far the STAN / CLIP time ratios are from the FLOPs ratio (the acceptance bound is 10%)."""
    by_name = {m.name: m for m in measurements}
    stan, clip = by_name[stan_name], by_name[CLIP_NAME]
    flops_ratio = stan.gmacs_per_video / clip.gmacs_per_video
    parts = []
    time_ratios = {"wall time": stan.timing.wall / clip.timing.wall, "CPU time": stan.timing.cpu / clip.timing.cpu}
    for label, ratio in time_ratios.items():
        deviation = ratio / flops_ratio - 1
        verdict = "within" if abs(deviation) <= 0.10 else "OUTSIDE"
        parts.append(f"{label} ratio {ratio:.3f} ({deviation:+.1%}, {verdict} 10%)")
    return f"STAN / CLIP vs FLOPs ratio {flops_ratio:.3f}: " + "; ".join(parts)


def parse_args(argv, device: torch.device):
    on_cuda = device.type == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbones", nargs="+", choices=sorted(BACKBONES), default=["b16", "b32"] if on_cuda else ["b32-half", "b32"]
    )
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32 if on_cuda else 4)
    parser.add_argument("--stan_depth", type=int, default=4)
    parser.add_argument("--temporal_module", choices=["attention", "conv"], default="attention")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16" if on_cuda else "float32")
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd get_video_features")
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7 if on_cuda else 5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[Measurement]]:
    device = default_device()
    args = parse_args(argv, device)
    with torch_threads(args.threads):
        return run(args, device)


def run(args, device: torch.device) -> dict[str, list[Measurement]]:
    dtype = getattr(torch, args.dtype)
    print(machine_summary(device))
    print(
        f"{args.dtype}, attention {args.attn_implementation}, compile={args.compile}, batch {args.batch_size} x "
        f"{args.num_frames} frames, median of {args.repeats} alternating calls after {args.warmup} warm-up rounds; "
        "GFLOPs = G multiply-accumulates of Linear/Conv layers (paper rule); peak memory = added during one call "
        f"({'allocator peak' if device.type == 'cuda' else 'peak resident set'})."
    )
    results = {}
    for key in args.backbones:
        backbone = BACKBONES[key]
        measurements = measure_backbone(backbone, args, device, dtype)
        stan_name = measurements[1].name
        print(f"\n### {backbone.name} at {backbone.image_size} px\n")
        print(format_measurements(measurements, args.batch_size, stan_name))
        print("\n" + overhead_verdict(measurements, stan_name))
        results[key] = measurements
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    return results


if __name__ == "__main__":
    main()
