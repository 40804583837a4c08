"""Retrieval / recognition metrics, DSL, QB-Norm and the local `evaluate` modules.

Expected values are worked out by hand in the comments (or, for larger random cases,
by a naive formula written here).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_stan.evaluation.metrics import (
    aggregate_views,
    dual_softmax,
    gallery_to_query_metrics,
    querybank_normalize,
    retrieval_metrics,
    text_to_video_and_video_to_text,
    topk_accuracy,
)


REPO = Path(__file__).resolve().parents[1]

# 4 captions, 3 videos; captions 0 and 1 describe video 0.
MULTI_CAPTION_SIM = np.array(
    [
        [0.9, 0.5, 0.1],  # gt v0 = 0.9, nothing higher             -> rank 1
        [0.3, 0.6, 0.3],  # gt v0 = 0.3, 0.6 higher, tie with v2      -> rank 2 or 3: 2.5
        [0.2, 0.4, 0.7],  # gt v1 = 0.4, 0.7 higher                  -> rank 2
        [0.8, 0.1, 0.5],  # gt v2 = 0.5, 0.8 higher                  -> rank 2
    ],
    dtype=np.float32,
)
MULTI_CAPTION_TEXT_TO_VIDEO = np.array([0, 0, 1, 2])


def test_ranks_cut_offs_median_and_mean():
    wanted_ranks = [1, 1, 2, 5, 6, 10, 11, 12, 3, 4, 7, 8]
    sim = np.tile(-np.arange(12, dtype=np.float64), (12, 1))  # column c is the (c+1)-th best
    metrics = retrieval_metrics(sim, np.array(wanted_ranks) - 1)
    assert metrics["R@1"] == pytest.approx(100 * 2 / 12)
    assert metrics["R@5"] == pytest.approx(100 * 6 / 12)  # ranks 1, 1, 2, 5, 3, 4
    assert metrics["R@10"] == pytest.approx(100 * 10 / 12)  # all but 11 and 12
    assert metrics["MdR"] == pytest.approx(5.5)  # sorted: ..., 5, 6, ... -> (5 + 6) / 2
    assert metrics["MnR"] == pytest.approx(70 / 12)


def test_a_collapsed_model_scores_chance_in_both_directions():
    # All scores equal: the ground truth is equally likely at every one of the N places.
    n = 20
    metrics = text_to_video_and_video_to_text(np.ones((n, n), dtype=np.float32))
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_R@1"] == pytest.approx(100 * 1 / n)
        assert metrics[f"{direction}_R@5"] == pytest.approx(100 * 5 / n)
        assert metrics[f"{direction}_R@10"] == pytest.approx(100 * 10 / n)
        assert metrics[f"{direction}_MdR"] == pytest.approx((n + 1) / 2)
        assert metrics[f"{direction}_MnR"] == pytest.approx((n + 1) / 2)


def test_a_collapsed_model_scores_chance_after_re_ranking():
    sim = np.full((8, 8), 0.3)
    assert retrieval_metrics(dual_softmax(sim, axis=0))["R@1"] == pytest.approx(100 / 8)
    assert retrieval_metrics(querybank_normalize(sim, np.full((5, 8), 0.3)))["R@5"] == pytest.approx(100 * 5 / 8)


def test_square_matrix_defaults_to_the_diagonal_and_splits_ties():
    sim = torch.tensor([[0.9, 0.1, 0.9], [0.2, 0.5, 0.7], [0.3, 0.3, 0.1]])
    # row 0: tied with one other -> rank 1 or 2: counts 1/2 towards R@1, rank 1.5
    # row 1: 0.7 > 0.5 -> rank 2; row 2: 0.3, 0.3 > 0.1 -> rank 3
    metrics = retrieval_metrics(sim)
    assert metrics["R@1"] == pytest.approx(100 * 0.5 / 3)
    assert metrics["R@5"] == 100.0
    assert metrics["MdR"] == 2.0 and metrics["MnR"] == pytest.approx((1.5 + 2 + 3) / 3)


def test_ties_behind_higher_scores_split_the_cut_off():
    # gt 0.5 with h=2 strictly higher and t=3 others tied: rank uniform in 3..6
    sim = np.array([[0.5, 0.9, 0.8, 0.5, 0.5, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]])
    metrics = retrieval_metrics(sim, np.array([0]))
    assert metrics["R@1"] == 0.0  # k - h < 0
    assert metrics["R@5"] == pytest.approx(100 * 3 / 4)  # ranks 3, 4, 5 of 3..6
    assert metrics["R@10"] == 100.0
    assert metrics["MdR"] == pytest.approx(4.5) and metrics["MnR"] == pytest.approx(4.5)  # 2 + 3/2 + 1


def test_video_to_text_with_several_tied_ground_truth_captions():
    # texts 0, 1 -> video 0; texts 2, 3 -> video 1
    sim = np.array([[0.5, 0.9], [0.5, 0.2], [0.5, 0.3], [0.1, 0.3]])
    # v0: captions t0, t1 and the other text t2 all at 0.5: the first of the three (random order) is a caption
    #     with probability 2/3; expected position 1 * 2/3 + 2 * 1/3 = 4/3.
    # v1: t0 (0.9) above, captions t2, t3 tied at 0.3 -> rank 2 exactly.
    metrics = gallery_to_query_metrics(sim, np.array([0, 0, 1, 1]))
    assert metrics["R@1"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert metrics["R@5"] == 100.0
    assert metrics["MnR"] == pytest.approx((4 / 3 + 2) / 2) and metrics["MdR"] == pytest.approx((4 / 3 + 2) / 2)


def naive_tie_rule(scores, targets, k):
    """The rule of STAN.md section 4, one query at a time."""
    hits, ranks = [], []
    for row, target in zip(scores, targets):
        higher = int((row > row[target]).sum())
        tied = int((row == row[target]).sum()) - 1
        hits.append(min(max((k - higher) / (tied + 1), 0.0), 1.0))
        ranks.append(higher + tied / 2 + 1)
    return 100 * np.mean(hits), np.median(ranks), np.mean(ranks)


def test_vectorised_tie_rule_matches_the_rule_query_by_query():
    generator = np.random.default_rng(3)
    scores = generator.integers(0, 4, (200, 30)).astype(np.float64)  # few distinct values: ties everywhere
    targets = generator.integers(0, 30, 200)
    metrics = retrieval_metrics(scores, targets)
    for k in (1, 5, 10):
        hit_rate, median, mean = naive_tie_rule(scores, targets, k)
        assert metrics[f"R@{k}"] == pytest.approx(hit_rate)
    assert metrics["MdR"] == pytest.approx(median) and metrics["MnR"] == pytest.approx(mean)
    assert topk_accuracy(scores, targets, ks=(5,))["top5"] == pytest.approx(naive_tie_rule(scores, targets, 5)[0])


def test_multi_caption_text_to_video_and_best_caption_video_to_text():
    metrics = text_to_video_and_video_to_text(MULTI_CAPTION_SIM, MULTI_CAPTION_TEXT_TO_VIDEO)
    # t2v ranks [1, 2.5, 2, 2]
    assert metrics["t2v_R@1"] == pytest.approx(25.0)
    assert metrics["t2v_R@5"] == 100.0
    assert metrics["t2v_MdR"] == 2.0 and metrics["t2v_MnR"] == pytest.approx(7.5 / 4)
    # v2t, column by column, a video's best caption:
    # v0 [0.9, 0.3, 0.2, 0.8], captions t0 (0.9), t1 -> best 0.9 -> rank 1
    # v1 [0.5, 0.6, 0.4, 0.1], caption t2 (0.4)        -> rank 3
    # v2 [0.1, 0.3, 0.7, 0.5], caption t3 (0.5)        -> rank 2
    assert metrics["v2t_R@1"] == pytest.approx(100 / 3)
    assert metrics["v2t_MdR"] == 2.0 and metrics["v2t_MnR"] == 2.0
    assert set(metrics) == {f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")}


def test_direction_specific_matrices_must_match_in_shape():
    with pytest.raises(ValueError, match="sim_v2t must have the shape"):
        text_to_video_and_video_to_text(MULTI_CAPTION_SIM, MULTI_CAPTION_TEXT_TO_VIDEO, sim_v2t=MULTI_CAPTION_SIM[:3])


def test_gallery_to_query_needs_a_caption_for_every_video():
    with pytest.raises(ValueError, match=r"gallery items \[1\]"):
        gallery_to_query_metrics(MULTI_CAPTION_SIM, np.array([0, 0, 2, 2]))


@pytest.mark.parametrize(
    "sim, mapping, error, message",
    [
        (np.zeros((2, 3)), None, ValueError, "pass query_to_gallery"),
        (np.zeros(3), None, ValueError, "2-D"),
        (np.zeros((2, 2)), np.array([0, 2]), ValueError, r"\[0, 2\)"),
        (np.zeros((2, 2)), np.array([0]), ValueError, r"shape \(2,\)"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), TypeError, "integer"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), None, ValueError, "NaN"),
        (np.zeros((2, 2), dtype=np.int64), None, TypeError, "floating"),
        ("scores", None, TypeError, "numpy array or torch tensor"),
    ],
)
def test_retrieval_bad_inputs_raise(sim, mapping, error, message):
    with pytest.raises(error, match=message):
        retrieval_metrics(sim, mapping)


def test_dual_softmax_hand_computed_and_axis():
    sim = np.array([[1.0, 1.0], [0.0, 0.0]])
    lam = math.log(3.0)  # exp(lam * 1) = 3, exp(lam * 0) = 1
    # axis 0, each column over the texts: softmax [3/4, 1/4]
    np.testing.assert_allclose(dual_softmax(sim, lam=lam, axis=0), [[0.75, 0.75], [0.0, 0.0]], atol=1e-12)
    # axis 1, each row over the videos: [1/2, 1/2]
    np.testing.assert_allclose(dual_softmax(sim, lam=lam, axis=1), [[0.5, 0.5], [0.0, 0.0]], atol=1e-12)


def test_dual_softmax_matches_naive_formula_and_keeps_tensor_type():
    sim = torch.rand(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.exp(100 * sim) / torch.exp(100 * sim).sum(dim=0, keepdim=True)
    result = dual_softmax(sim)
    assert isinstance(result, torch.Tensor)
    torch.testing.assert_close(result, sim * weights)


def test_dual_softmax_damps_a_hub_video():
    # Video 0 scores high for both texts; raw text 1 retrieves it first (rank 2).
    sim = np.array([[0.50, 0.45], [0.52, 0.50]])
    assert retrieval_metrics(sim)["R@1"] == 50.0
    # Column v0 over texts: softmax(100 * [0.50, 0.52]) = [0.119, 0.881] -> t1: 0.458
    # Column v1 over texts: softmax(100 * [0.45, 0.50]) = [0.007, 0.993] -> t1: 0.497
    assert retrieval_metrics(dual_softmax(sim, lam=100.0, axis=0))["R@1"] == 100.0


@pytest.mark.parametrize("transform", [dual_softmax, lambda sim: querybank_normalize(sim, sim)])
@pytest.mark.parametrize("kind", [np.array, torch.tensor])
def test_score_transforms_leave_float64_input_untouched(transform, kind):
    sim = kind([[0.3, 0.1], [0.2, 0.4]])
    original = sim.copy() if isinstance(sim, np.ndarray) else sim.clone()
    transform(sim)
    assert (sim == original).all()


def test_dual_softmax_keeps_tiny_weights_apart():
    # exp(100 * -2) underflows to an exact 0 in float32; the two off-diagonal entries
    # must still differ so that the ground truth is not helped by a tie.
    sim = np.array([[1.0, -1.0, -0.9], [-1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=np.float32)
    result = dual_softmax(sim, lam=100.0, axis=0)
    assert result[0, 1] != result[0, 2]


def test_dual_softmax_bad_axis_raises():
    with pytest.raises(ValueError, match="axis"):
        dual_softmax(np.zeros((2, 2)), axis=2)


BANK = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1]])  # top-1 of both rows: item 0
QB_SIM = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.2]])  # top-1s: item 0, item 1


def inverted_softmax_row(row, beta):
    e = math.exp
    return [e(beta * row[g]) / (e(beta * BANK[0, g]) + e(beta * BANK[1, g])) for g in range(3)]


def test_querybank_normalize_only_rows_whose_top1_is_activated():
    result = querybank_normalize(QB_SIM, BANK, beta=1.0, k=1)
    # activation set {0}: row 0 (top-1 item 0) is normalised, row 1 (top-1 item 1) stays raw
    np.testing.assert_allclose(result[0], inverted_softmax_row(QB_SIM[0], 1.0), rtol=1e-12)
    np.testing.assert_array_equal(result[1], QB_SIM[1])


def test_querybank_normalize_larger_k_activates_more_items():
    # top-2: bank row 0 -> {0, 2}, row 1 -> {0, 1}; activation {0, 1, 2}: both rows normalised
    result = querybank_normalize(QB_SIM, BANK, beta=2.0, k=2)
    for row in range(2):
        np.testing.assert_allclose(result[row], inverted_softmax_row(QB_SIM[row], 2.0), rtol=1e-12)


@pytest.mark.parametrize(
    "bank, k, message",
    [(BANK[:, :2], 1, "bank_sim must be"), (BANK, 0, "k must be"), (BANK, 4, "k must be")],
)
def test_querybank_normalize_bad_inputs_raise(bank, k, message):
    with pytest.raises(ValueError, match=message):
        querybank_normalize(QB_SIM, bank, k=k)


def test_topk_accuracy_with_ties():
    logits = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.2], [0.9, 0.05, 0.05]])
    # label 2: 0.5 higher -> rank 2 (top1 0, top2 1)
    # label 1: tied with one other -> rank 1 or 2 (top1 1/2, top2 1)
    # label 1: 0.9 higher, tied with one other -> rank 2 or 3 (top1 0, top2 1/2)
    assert topk_accuracy(logits, np.array([2, 1, 1]), ks=(1, 2)) == {
        "top1": pytest.approx(100 * 0.5 / 3),
        "top2": pytest.approx(100 * 2.5 / 3),
    }


def test_constant_logits_score_chance_top_k():
    assert topk_accuracy(np.zeros((4, 10)), np.array([0, 3, 7, 9]), ks=(1, 5)) == {
        "top1": pytest.approx(10.0),
        "top5": pytest.approx(50.0),
    }


@pytest.mark.parametrize(
    "labels, ks, message",
    [(np.array([0, 3]), (1,), r"\[0, 3\)"), (np.array([0, 1]), (), "ks"), (np.array([0, 1]), (0,), "ks")],
)
def test_topk_accuracy_bad_inputs_raise(labels, ks, message):
    with pytest.raises(ValueError, match=message):
        topk_accuracy(np.zeros((2, 3)), labels, ks=ks)


def softmax_row(row):
    exps = [math.exp(x) for x in row]
    return [x / sum(exps) for x in exps]


def test_aggregate_views_averages_probabilities_not_logits():
    views = [[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]]
    expected = np.mean([softmax_row(v) for v in views], axis=0)  # about [0.413, 0.587]
    result = aggregate_views(np.array(views), num_views=3)
    np.testing.assert_allclose(result, [expected], rtol=1e-12)
    # mean logits would be [3.33, 1.33] and pick class 0; probabilities pick class 1
    assert topk_accuracy(result, np.array([1]), ks=(1,)) == {"top1": 100.0}


def test_aggregate_views_groups_rows_video_major():
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    result = aggregate_views(logits, num_views=2)
    assert isinstance(result, torch.Tensor) and result.shape == (2, 2)
    expected = [
        np.mean([softmax_row([1, 0]), softmax_row([2, 0])], 0),
        np.mean([softmax_row([0, 3]), softmax_row([0, 1])], 0),
    ]
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("num_views, message", [(3, "multiple of num_views"), (0, "positive int")])
def test_aggregate_views_bad_inputs_raise(num_views, message):
    with pytest.raises(ValueError, match=message):
        aggregate_views(np.zeros((4, 2)), num_views)


@pytest.fixture
def offline_evaluate(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("evaluate")


def random_retrieval_case():
    generator = np.random.default_rng(0)
    text_to_video = np.concatenate([np.arange(10), generator.integers(0, 10, 14)])  # 24 captions, 10 videos
    sim = generator.uniform(-1, 1, (24, 10)).astype(np.float32)
    sim[np.arange(24), text_to_video] += 0.4  # better than chance, imperfect
    bank_t2v = generator.uniform(-1, 1, (30, 10)).astype(np.float32)
    bank_v2t = generator.uniform(-1, 1, (8, 24)).astype(np.float32)
    return sim, text_to_video, bank_t2v, bank_v2t


def test_evaluate_retrieval_module_matches_plain_functions(offline_evaluate):
    sim, text_to_video, bank_t2v, bank_v2t = random_retrieval_case()
    module = offline_evaluate.load(str(REPO / "metrics" / "video_text_retrieval"), keep_in_memory=True)
    settings = {
        "raw": ({}, sim, sim),
        "dsl": ({"dsl": True}, dual_softmax(sim, axis=0), dual_softmax(sim, axis=1)),
        "qb": (
            {"qb_bank_t2v": bank_t2v, "qb_bank_v2t": bank_v2t},
            querybank_normalize(sim, bank_t2v),
            querybank_normalize(sim.T, bank_v2t).T,
        ),
    }
    for name, (options, sim_t2v, sim_v2t) in settings.items():
        expected = text_to_video_and_video_to_text(sim_t2v, text_to_video, sim_v2t=sim_v2t)
        assert module.compute(predictions=sim, references=text_to_video, **options) == pytest.approx(expected), name
    with pytest.raises(ValueError, match="not both"):
        module.compute(predictions=sim, references=text_to_video, dsl=True, qb_bank_t2v=bank_t2v)


def test_evaluate_classification_module_matches_plain_functions(offline_evaluate):
    generator = np.random.default_rng(1)
    logits = generator.normal(size=(6 * 3, 10)).astype(np.float32)
    labels = generator.integers(0, 10, 6)
    module = offline_evaluate.load(str(REPO / "metrics" / "video_classification"), keep_in_memory=True)
    result = module.compute(predictions=logits, references=np.repeat(labels, 3), num_views=3)
    assert result == pytest.approx(topk_accuracy(aggregate_views(logits, 3), labels, ks=(1, 5)))
    with pytest.raises(ValueError, match="share one label"):
        module.compute(predictions=logits, references=np.arange(18) % 10, num_views=3)
