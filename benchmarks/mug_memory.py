"""Wall time and peak memory of chunked Mug scoring on CPU.

Scores `--num-texts` captions (32 tokens) against `--num-videos` videos (12 frames) at
E=512, in a fresh process, and prints the wall time and that process's peak RSS.
Acceptance: peak RSS under 4 GiB for 5,000 x 5,000.

Run from the repository root:  python -m benchmarks.mug_memory [--num-texts N --num-videos M]
"""

import argparse
import time

import torch

from benchmarks._common import GIB, current_rss_bytes, machine_summary, measure_in_child, random_video_text_features
from modeling_stan.mug_alignment import mug_similarity


ACCEPTANCE_BYTES = 4 * GIB


def score_with_mug(num_texts, num_videos, num_tokens, num_frames, dim, variant):
    features = random_video_text_features(num_texts, num_videos, num_tokens, num_frames, dim)
    rss_with_inputs = current_rss_bytes()
    start = time.perf_counter()
    with torch.inference_mode():
        scores = mug_similarity(*features, variant=variant)
    return {
        "seconds": time.perf_counter() - start,
        "rss_with_inputs_bytes": rss_with_inputs,
        "finite": bool(torch.isfinite(scores).all()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-texts", type=int, default=5000)
    parser.add_argument("--num-videos", type=int, default=5000)
    parser.add_argument("--num-tokens", type=int, default=32)
    parser.add_argument("--num-frames", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--variant", choices=("simple", "full"), default="simple")
    args = parser.parse_args()

    result = measure_in_child(score_with_mug, **vars(args))
    peak = result["peak_rss_bytes"]
    print(
        f"Mug-{args.variant}: {args.num_texts} texts x {args.num_tokens} tokens vs {args.num_videos} videos x "
        f"{args.num_frames} frames, E={args.dim}"
    )
    print(f"  {machine_summary(torch.device('cpu'))}")
    print(f"  wall time           {result['seconds']:.1f} s")
    print(f"  RSS with inputs     {result['rss_with_inputs_bytes'] / GIB:.2f} GiB")
    print(
        f"  peak RSS            {peak / GIB:.2f} GiB  (acceptance < {ACCEPTANCE_BYTES / GIB:.0f} GiB: "
        f"{'PASS' if peak < ACCEPTANCE_BYTES else 'FAIL'})"
    )
    print(f"  all scores finite   {result['finite']}")


if __name__ == "__main__":
    main()
