"""Evaluation metrics of STAN / Mug-STAN: video-text retrieval, re-ranking, recognition.

Plain functions. Every array argument may be a `numpy.ndarray` or a `torch.Tensor`;
score transforms return the same kind they were given (tensors on their own device).
Internally everything runs in torch (no copy for numpy input). Score transforms (DSL,
QB-Norm, view averaging) compute and return float64: their sharp softmaxes (lam = 100)
underflow to exact zeros in float32, which would turn distinct scores into ties.

Ties (STAN.md, section 4): with h candidates scoring strictly higher than the ground
truth and t others scoring exactly the same, the ground truth's position is taken as
uniformly random among h+1 ... h+t+1. A query then counts
clamp((k - h) / (t + 1), 0, 1) towards R@k (and top-k accuracy), and its rank for MdR/MnR
is the expected one, h + t/2 + 1. A collapsed model (all scores equal) thus scores chance,
R@k = k / N, instead of 100%. Everything is vectorised over queries. R@k are percentages.
"""

import numpy as np
import torch


RECALL_KS = (1, 5, 10)

# Citation of the metrics' model family, shared by the `evaluate` modules in metrics/.
STAN_BIBTEX = """
@inproceedings{liu2023stan,
  title={Revisiting Temporal Modeling for CLIP-based Image-to-Video Knowledge Transferring},
  author={Liu, Ruyang and Huang, Jingjia and Li, Ge and Feng, Jiashi and Wu, Xinglong and Li, Thomas H.},
  booktitle={CVPR},
  year={2023}
}
"""


def retrieval_metrics(sim, query_to_gallery=None):
    """R@1, R@5, R@10 (percent), MdR and MnR of query -> gallery retrieval.

    Args:
        sim: `(num_queries, num_gallery)` scores, higher is better.
        query_to_gallery: `(num_queries,)` integer index of each query's ground-truth
            gallery item. Several queries may share an item (e.g. several captions of one
            video). Default: the identity, which needs a square `sim`.

    Returns:
        `dict` with float values for keys `"R@1"`, `"R@5"`, `"R@10"`, `"MdR"`, `"MnR"`.
    """
    scores = _score_matrix(sim, "sim")
    targets = _ground_truth(query_to_gallery, scores)
    return _summarize_ranks(_tied_ranks(scores, _scores_at(scores, targets), axis=1))


def gallery_to_query_metrics(sim, query_to_gallery=None):
    """Retrieval in the reverse direction of `sim`: each gallery item retrieves queries.

    `sim` and `query_to_gallery` are the same as for `retrieval_metrics` (e.g. a
    `(num_texts, num_videos)` matrix and each caption's video). When a gallery item has
    several ground-truth queries, its rank is the best rank among them (the CLIP4Clip /
    MSVD multi-caption convention for video -> text): the rank of the first of its m
    best-scoring ground truths when the items tied at that score come in random order. With
    h queries strictly above and o other queries tied, that counts
    1 - C(o, k-h) / C(o+m, k-h) towards R@k and has expected rank h + 1 + o / (m + 1);
    for m = 1 this is the single-ground-truth rule of the module docstring. Every gallery
    item needs at least one ground-truth query.
    """
    scores = _score_matrix(sim, "sim")
    targets = _ground_truth(query_to_gallery, scores)
    captionless = (torch.bincount(targets, minlength=scores.shape[1]) == 0).nonzero().flatten().tolist()
    if captionless:
        raise ValueError(f"gallery_to_query_metrics: gallery items {captionless} have no ground-truth query.")
    target_scores = _scores_at(scores, targets)
    best_target_scores = scores.new_full((scores.shape[1],), float("-inf")).scatter_reduce(
        0, targets, target_scores, reduce="amax"
    )
    # How many of each gallery item's ground-truth queries reach its best ground-truth score.
    tied_targets = torch.bincount(
        targets, weights=(target_scores == best_target_scores[targets]).double(), minlength=scores.shape[1]
    )
    return _summarize_ranks(_tied_ranks(scores, best_target_scores, axis=0, tied_targets=tied_targets))


def text_to_video_and_video_to_text(sim_t2v, text_to_video=None, sim_v2t=None):
    """Both retrieval directions of a text-major score matrix, keys prefixed `t2v_` / `v2t_`.

    Args:
        sim_t2v: `(num_texts, num_videos)` scores used for text -> video.
        text_to_video: `(num_texts,)` video index of each caption (default: identity).
        sim_v2t: optional `(num_texts, num_videos)` scores used for video -> text, for
            re-ranking that differs by direction (DSL, QB-Norm); default `sim_t2v`.
            Video -> text uses the best-caption convention of `gallery_to_query_metrics`.
    """
    sim_v2t = sim_t2v if sim_v2t is None else sim_v2t
    if tuple(np.shape(sim_v2t)) != tuple(np.shape(sim_t2v)):
        raise ValueError(
            f"text_to_video_and_video_to_text: sim_v2t must have the shape of sim_t2v {tuple(np.shape(sim_t2v))}, "
            f"got {tuple(np.shape(sim_v2t))}."
        )
    directions = {
        "t2v_": retrieval_metrics(sim_t2v, text_to_video),
        "v2t_": gallery_to_query_metrics(sim_v2t, text_to_video),
    }
    return {prefix + name: value for prefix, metrics in directions.items() for name, value in metrics.items()}


def dual_softmax(sim, lam=100.0, axis=0):
    """Dual softmax re-ranking (DSL): `sim * softmax(lam * sim, axis)`.

    The softmax runs along the *query* axis, i.e. the axis the ranking does not run
    along: a gallery item that scores high for many queries is damped for all of them.
    For text -> video on a `(num_texts, num_videos)` matrix this is `axis=0` (each video's
    column normalised over the texts); for video -> text on the same matrix, `axis=1`.
    """
    scores = _score_matrix(sim, "sim")
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"dual_softmax: axis must be 0 or 1 for a 2-D score matrix, got {axis!r}.")
    _check_positive("dual_softmax", "lam", lam)
    # In place on one float64 copy: a 10k x 10k matrix would otherwise need several.
    result = _float64_copy(scores).mul_(lam)
    result.sub_(result.amax(dim=axis, keepdim=True)).exp_()
    result.div_(result.sum(dim=axis, keepdim=True)).mul_(scores)
    return _like_input(result, sim)


def querybank_normalize(sim, bank_sim, beta=20.0, k=1):
    """QB-Norm with the dynamic inverted softmax (Bogolin et al., CVPR 2022).

    The activation set is every gallery item that appears in the top-`k` of at least one
    querybank query. A query whose top-1 gallery item (under the raw scores) is in the
    activation set has its whole row replaced by the inverted softmax
    `exp(beta * s(q, g)) / sum_b exp(beta * s(b, g))`, the sum running over all querybank
    queries b; other queries keep their raw scores. Rows are only compared within
    themselves, so mixing normalised and raw rows does not affect rankings.

    Args:
        sim: `(num_queries, num_gallery)` test scores (cosine-like; `beta` assumes
            scores in [-1, 1]).
        bank_sim: `(num_bank_queries, num_gallery)` scores of the querybank (e.g.
            training captions) against the same gallery.
        beta: inverse temperature of the inverted softmax.
        k: top-k of each bank query that enters the activation set.
    """
    scores = _score_matrix(sim, "sim")
    bank = _score_matrix(bank_sim, "bank_sim").to(scores.device)
    if bank.shape[1] != scores.shape[1]:
        raise ValueError(
            f"querybank_normalize: bank_sim must be (num_bank_queries, {scores.shape[1]}) to match sim's gallery, "
            f"got {tuple(bank.shape)}."
        )
    _check_positive("querybank_normalize", "beta", beta)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"querybank_normalize: k must be an int in [1, {scores.shape[1]}], got {k!r}.")
    activated = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    activated[bank.topk(k, dim=1).indices.flatten()] = True
    normalize_row = activated[scores.argmax(dim=1)]
    # exp(beta*s - logsumexp_b(beta*s_b)) equals the ratio of exponentials without
    # overflowing; computed in place on one float64 copy.
    result = _float64_copy(scores).mul_(beta)
    result.sub_(torch.logsumexp(beta * bank.double(), dim=0)).exp_()
    result[~normalize_row] = scores[~normalize_row].double()
    return _like_input(result, sim)


def topk_accuracy(logits, labels, ks=(1, 5)):
    """Top-k accuracy in percent, `{"top1": ..., "top5": ...}` for `ks=(1, 5)`.

    Args:
        logits: `(num_samples, num_classes)` scores (logits or probabilities).
        labels: `(num_samples,)` integer class of each sample.
        ks: the k values. A sample counts clamp((k - h) / (t + 1), 0, 1) towards top-k
            accuracy, with h classes scoring strictly higher than its label and t others
            tied with it (so constant logits score chance, k / num_classes).
    """
    scores = _score_matrix(logits, "logits")
    targets = _index_array(labels, "labels", len(scores), scores.shape[1]).to(scores.device)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"topk_accuracy: ks must be a non-empty sequence of positive ints, got {ks!r}.")
    ranks = _tied_ranks(scores, _scores_at(scores, targets), axis=1)
    return {f"top{k}": _percent(ranks.hit_rate(k)) for k in ks}


def aggregate_views(logits_per_view, num_views):
    """Multi-view testing: average the softmax scores of each video's views.

    Args:
        logits_per_view: `(num_videos * num_views, num_classes)` logits, video-major: rows
            `[i * num_views, (i + 1) * num_views)` are the views (clips x crops) of video i.
        num_views: views per video.

    Returns:
        `(num_videos, num_classes)` float64 mean class probabilities, same kind as the input.
    """
    scores = _score_matrix(logits_per_view, "logits_per_view")
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"aggregate_views: num_views must be a positive int, got {num_views!r}.")
    if len(scores) % num_views:
        raise ValueError(
            f"aggregate_views: logits_per_view has {len(scores)} rows, not a multiple of num_views={num_views}."
        )
    probabilities = torch.softmax(scores.double(), dim=1)
    return _like_input(probabilities.view(-1, num_views, scores.shape[1]).mean(dim=1), logits_per_view)


def _scores_at(scores, targets):
    """scores[i, targets[i]] for every row i."""
    return scores.gather(1, targets[:, None]).squeeze(1)


class _TiedRanks:
    """Per line (query): h entries strictly above its ground truth, o others tied with it, and m tied
    ground truths (1 unless several ground truths share the best score)."""

    def __init__(self, higher, tied_others, tied_targets):
        self.higher, self.tied_others, self.tied_targets = higher, tied_others, tied_targets

    def hit_rate(self, k):
        """Per line, the probability that a ground truth lands in the top k when the tied entries come in random
        order: 1 - C(o, j) / C(o + m, j) for j = k - h free places (1 if j > o, 0 if j <= 0)."""
        free = k - self.higher
        o, m = self.tied_others, self.tied_targets
        j = free.clamp(min=0).minimum(o)
        # C(o, j) / C(o + m, j) through log-gamma: exact for small counts, no overflow for large ones.
        all_missed = torch.exp(
            torch.lgamma(o + 1) - torch.lgamma(o - j + 1) - torch.lgamma(o + m + 1) + torch.lgamma(o + m - j + 1)
        )
        hit = 1 - all_missed
        return torch.where(free <= 0, 0.0, torch.where(free > o, 1.0, hit))

    def expected(self):
        """The expected rank of the first ground truth: h + 1 + o / (m + 1)."""
        return self.higher + 1 + self.tied_others / (self.tied_targets + 1)


def _tied_ranks(scores, target_scores, axis, tied_targets=None):
    """Counts, along `axis`, the entries strictly above and tied with the target score of their line."""
    target = target_scores.unsqueeze(axis)
    higher = (scores > target).sum(dim=axis).double()
    tied_targets = torch.ones_like(higher) if tied_targets is None else tied_targets.double()
    tied_others = (scores == target).sum(dim=axis).double() - tied_targets
    return _TiedRanks(higher, tied_others, tied_targets)


def _summarize_ranks(ranks):
    metrics = {f"R@{k}": _percent(ranks.hit_rate(k)) for k in RECALL_KS}
    expected = ranks.expected()
    metrics["MdR"] = float(np.median(expected.cpu().numpy()))
    metrics["MnR"] = float(expected.mean())
    return metrics


def _percent(hits):
    return float(hits.double().mean() * 100)


def _ground_truth(query_to_gallery, scores):
    num_queries, num_gallery = scores.shape
    if query_to_gallery is not None:
        return _index_array(query_to_gallery, "query_to_gallery", num_queries, num_gallery).to(scores.device)
    if num_queries != num_gallery:
        raise ValueError(
            f"sim is {num_queries} x {num_gallery}; pass query_to_gallery when the ground truth is not the diagonal."
        )
    return torch.arange(num_queries, device=scores.device)


def _as_tensor(array, name):
    if isinstance(array, torch.Tensor):
        return array.detach()
    try:
        return torch.from_numpy(np.asarray(array))
    except TypeError as error:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(array).__name__}.") from error


def _score_matrix(array, name):
    """2-D, non-empty, NaN-free floating scores in float32 or float64 (ranked as given)."""
    scores = _as_tensor(array, name)
    if scores.dim() != 2 or 0 in scores.shape:
        raise ValueError(f"{name} must be a non-empty 2-D score matrix, got shape {tuple(scores.shape)}.")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must hold floating-point scores, got {scores.dtype}.")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN; ranks would be meaningless.")
    return scores if scores.dtype == torch.float64 else scores.float()


def _float64_copy(scores):
    """A fresh float64 tensor (`.double()` would alias a float64 input, which in-place
    arithmetic must not modify)."""
    return scores.to(torch.float64, copy=True)


def _index_array(array, name, length, upper):
    indices = _as_tensor(array, name)
    if indices.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(indices.shape)}.")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got {indices.dtype}.")
    indices = indices.long()
    if length and (indices.min() < 0 or indices.max() >= upper):
        raise ValueError(f"{name} values must lie in [0, {upper}), got range [{indices.min()}, {indices.max()}].")
    return indices


def _check_positive(function, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{function}: {name} must be a number > 0, got {value!r}.")


def _like_input(result, original):
    return result if isinstance(original, torch.Tensor) else result.cpu().numpy()
