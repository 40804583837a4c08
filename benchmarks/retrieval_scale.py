"""Evaluation time and peak memory of N x N text-video retrieval at several N.

For each N and method, a fresh process builds random features (E=512; Mug: 32 tokens per
caption, 12 frames per video), computes the N x N score matrix, then both directions'
R@1/5/10, MdR, MnR, and reports the two times and its peak RSS:

- cosine: cosine similarity of pooled text and video embeddings;
- dsl:    the same matrix re-ranked by the dual softmax (per direction), then metrics;
- mug:    chunked Mug-simple on token and frame embeddings (acceptance: < 4 GiB at N=10,000).

Run from the repository root:  python -m benchmarks.retrieval_scale [--sizes 1000 5000]
"""

import argparse
import time

import torch

from benchmarks._common import GIB, machine_summary, measure_in_child, random_video_text_features
from modeling_stan.evaluation.metrics import dual_softmax, text_to_video_and_video_to_text
from modeling_stan.mug_alignment import mug_similarity


METHODS = ("cosine", "dsl", "mug")
NUM_TOKENS, NUM_FRAMES, DIM = 32, 12, 512
MUG_ACCEPTANCE_BYTES = 4 * GIB


def pooled_cosine_similarity(size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    texts = torch.nn.functional.normalize(torch.randn(size, DIM, generator=generator), dim=-1)
    videos = torch.nn.functional.normalize(torch.randn(size, DIM, generator=generator), dim=-1)
    return texts @ videos.T


def mug_score_matrix(size):
    return mug_similarity(*random_video_text_features(size, size, NUM_TOKENS, NUM_FRAMES, DIM))


def evaluate_retrieval(method, size):
    start = time.perf_counter()
    with torch.inference_mode():
        sim = mug_score_matrix(size) if method == "mug" else pooled_cosine_similarity(size)
    similarity_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if method == "dsl":
        metrics = text_to_video_and_video_to_text(dual_softmax(sim, axis=0), sim_v2t=dual_softmax(sim, axis=1))
    else:
        metrics = text_to_video_and_video_to_text(sim)
    return {
        "similarity_seconds": similarity_seconds,
        "metrics_seconds": time.perf_counter() - start,
        "t2v_R@1": metrics["t2v_R@1"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()

    print(f"N x N retrieval, E={DIM}, Mug: {NUM_TOKENS} tokens x {NUM_FRAMES} frames; one fresh process per row")
    print(machine_summary(torch.device("cpu")))
    header = f"{'N':>6}  {'method':<7} {'scores s':>9} {'rerank+metrics s':>17} {'peak RSS GiB':>13}"
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for method in args.methods:
            result = measure_in_child(evaluate_retrieval, method=method, size=size)
            peak = result["peak_rss_bytes"] / GIB
            verdict = ""
            if method == "mug":
                verdict = "  < 4 GiB: " + ("PASS" if result["peak_rss_bytes"] < MUG_ACCEPTANCE_BYTES else "FAIL")
            print(
                f"{size:>6}  {method:<7} {result['similarity_seconds']:>9.2f} {result['metrics_seconds']:>17.2f} "
                f"{peak:>13.2f}{verdict}",
                flush=True,
            )


if __name__ == "__main__":
    main()
