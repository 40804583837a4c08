"""Training-step throughput of STAN video-text retrieval, with and without gradient checkpointing.

One step = `StanForVideoTextRetrieval` forward (video and text towers, summed symmetric InfoNCE), backward and an
AdamW update, on random videos and captions (32 tokens), random-initialised weights. The two variants (identical
seeds and inputs) alternate step by step after warm-up; the table gives medians, samples/s (video-caption pairs) and
peak memory added by one step.

Model FLOPs per sample = 3 (forward + backward) x 2 x the Linear/Conv MACs of both towers, counted by
`benchmarks.flops.count_macs` (attention score/value matmuls are not included, as in the paper's rule, so the
utilisation is slightly understated). MFU = model FLOPs / step time / the device's peak; recomputation by gradient
checkpointing is not counted as useful work.

CUDA (default there): CLIP-B/16, 8 frames, bf16 autocast, SDPA, batch 32. CPU: a reduced configuration -- ViT-B/32
at half width (384, 12 layers, 224 px), 8 frames, float32, batch 4 -- and no MFU (no peak to compare against).

Usage (from the repository root):
`python -m benchmarks.train_step [--backbone b16] [--batch_size 32] [--peak_tflops 989]`
"""

import argparse
import os
from dataclasses import dataclass

import torch

from modeling_stan import StanForVideoTextRetrieval

from ._common import (
    BACKBONES,
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


TEXT_LENGTH = 32
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s), keyed by the exact CUDA device name (variants of
# one GPU differ: H100 SXM, NVL and PCIe have three peaks); any other device needs --peak_tflops.
BF16_PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
}


def random_batch(config, batch_size: int, num_frames: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Videos and captions whose last token is EOS (CLIP pools the text at the EOS position)."""
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    eos = config.text_config.eos_token_id
    input_ids = torch.randint(0, eos, (batch_size, TEXT_LENGTH), generator=generator)
    input_ids[:, -1] = eos
    return {
        "pixel_values": torch.randn(batch_size, num_frames, 3, size, size, generator=generator).to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones(batch_size, TEXT_LENGTH, dtype=torch.long, device=device),
    }


def model_flops_per_sample(config, num_frames: int) -> float:
    """Forward + backward FLOPs of one video-caption pair (3 x forward, 2 FLOPs per MAC)."""
    model = empty_model(StanForVideoTextRetrieval, config)
    size = config.vision_config.image_size
    macs = count_macs(
        model,
        pixel_values=torch.empty(1, num_frames, 3, size, size, device="meta"),
        input_ids=torch.zeros(1, TEXT_LENGTH, dtype=torch.long),
    )
    return 3 * 2 * macs


def make_step(model, batch: dict, autocast_dtype: torch.dtype | None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    device_type = batch["pixel_values"].device.type

    def step():
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass(frozen=True)
class StepResult:
    name: str
    timing: Timing  # per step
    peak_memory_bytes: int | None


def peak_tflops_for(device: torch.device, requested: float | None) -> float | None:
    if requested is not None or device.type != "cuda":
        return requested
    return BF16_PEAK_TFLOPS.get(torch.cuda.get_device_name(device))


def parse_args(argv, device: torch.device):
    on_cuda = device.type == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="b16" if on_cuda else "b32-half")
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32 if on_cuda else 4)
    parser.add_argument("--stan_depth", type=int, default=4)
    parser.add_argument(
        "--autocast",
        choices=["bfloat16", "none"],
        default="bfloat16" if on_cuda else "none",
        help="mixed precision (weights and optimizer stay float32)",
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10 if on_cuda else 5)
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: BF16_PEAK_TFLOPS by device name)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[StepResult]:
    device = default_device()
    args = parse_args(argv, device)
    with torch_threads(args.threads):
        return run(args, device)


def run(args, device: torch.device) -> list[StepResult]:
    autocast_dtype = None if args.autocast == "none" else getattr(torch, args.autocast)
    backbone = BACKBONES[args.backbone]
    config = backbone.stan_config(stan_depth=args.stan_depth, num_frames=args.num_frames)
    batch = random_batch(config, args.batch_size, args.num_frames, device)

    steps = {}
    for checkpointing in (False, True):
        model = build_random_model(StanForVideoTextRetrieval, config, seed=0, attn_implementation="sdpa")
        model.to(device).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        steps[f"gradient checkpointing {'on' if checkpointing else 'off'}"] = make_step(model, batch, autocast_dtype)
    times = median_times(steps, device, warmup=args.warmup, repeats=args.repeats)
    results = [StepResult(name, times[name], peak_memory_bytes(step, device)) for name, step in steps.items()]

    flops_per_sample = model_flops_per_sample(config, args.num_frames)
    peak_tflops = peak_tflops_for(device, args.peak_tflops)
    print(machine_summary(device))
    print(
        f"{backbone.name} at {backbone.image_size} px, STAN K={args.stan_depth}, {args.num_frames} frames, "
        f"{TEXT_LENGTH}-token captions, batch {args.batch_size}, autocast {args.autocast}, SDPA, AdamW; median of "
        f"{args.repeats} alternating steps after {args.warmup} warm-up rounds; model FLOPs "
        f"{flops_per_sample / 1e9:.1f} GFLOP per sample; peak = "
        f"{'GPU allocator peak' if device.type == 'cuda' else 'peak resident set'} added by one step."
    )
    headers = ["variant", "s / step", "CPU s / step", "samples / s", "achieved TFLOP/s", "MFU", "peak memory (MiB)"]
    rows = []
    for result in results:
        tflops = flops_per_sample * args.batch_size / result.timing.wall / 1e12
        rows.append(
            [
                result.name,
                f"{result.timing.wall:.3f}",
                f"{result.timing.cpu:.3f}",
                f"{args.batch_size / result.timing.wall:.2f}",
                f"{tflops:.3f}",
                "n/a" if peak_tflops is None else f"{tflops / peak_tflops:.1%}",
                "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**20:.0f}",
            ]
        )
    print()
    print(markdown_table(headers, rows))
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    return results


if __name__ == "__main__":
    main()
