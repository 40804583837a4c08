"""Mug (mutual-guided) alignment of Mug-STAN, computed in bounded memory.

Mug scores text a against video b from the token-frame similarities
<w[a, n], v[b, t]> of L2-normalised text token embeddings w and frame embeddings v: every token softly picks its best frames, every frame its best tokens, and
the two views are pooled again with softmax weights of inverse temperature `lam`.

The public implementation builds the whole texts x videos x tokens x frames grid (plus
several copies of it) at once; here the score matrix is filled block by block over texts
and videos, so memory is bounded by the block size whatever the number of texts and
videos. Each (text, video) score depends on that pair only, so blocking is exact.

Padded tokens, exactly as the public implementation treats them (it multiplies the grid
by the mask and then turns exact zeros into -inf before some softmaxes):

- every variant: padded tokens never take part in the token softmax that pools a
  frame's similarity over the text's tokens;
- `"simple"`: padded tokens are also left out of the final softmax over tokens (their
  pooled score is exactly 0 there, which the public code turns into -inf);
- `"full"`: a padded token attends to all frames uniformly (its masked similarities are
  all 0), so its pooled score is its mean similarity to the frames, which is not 0;
  it therefore *does* take part in the final token softmax and contributes its own
  embedding to the word-guided text vector.

The public code also drops a real token from a softmax when its similarity is exactly
0.0; this code uses the mask instead, which agrees everywhere except on that
measure-zero event (and cannot produce NaN for an all-zero frame embedding).
"""

import math

import torch

from .configuration_stan import MUG_VARIANTS


# The public implementation's floor on the norm when L2-normalising embeddings.
NORM_EPS = 1e-6

# Memory the per-block intermediates may take when chunk sizes are chosen automatically.
DEFAULT_CHUNK_MEMORY_BYTES = 256 * 2**20

# (tokens x frames) grids per (text, video) pair alive at the peak of a block: the
# grid, its masked copy, the exp weights and the weighted product. Peak RSS growth of one
# block measured ~4.7 grids on CPU in inference; 6 leaves headroom.
_LIVE_GRIDS_PER_PAIR = 6


def mug_similarity(
    text_token_embeds,
    text_mask,
    frame_embeds,
    *,
    variant="simple",
    lam=100.0,
    text_chunk_size=None,
    video_chunk_size=None,
):
    """Mug similarity of every text with every video.

    Args:
        text_token_embeds (`torch.Tensor` of shape `(B_text, N, E)`): projected text token
            embeddings (not necessarily normalised; they are L2-normalised here).
        text_mask (`torch.Tensor` of shape `(B_text, N)`): 1 (or `True`) for real tokens,
            BOS and EOS included, 0 for padding. Every text needs at least one real token.
        frame_embeds (`torch.Tensor` of shape `(B_video, T, E)`): projected frame embeddings
            (L2-normalised here).
        variant (`str`): `"simple"` (the public default: mean of the text-to-video and
            video-to-text pooled scores) or `"full"` (dot product of the word-guided text
            vector and the frame-guided video vector).
        lam (`float`): inverse temperature of every softmax (the public code's `tau`, 100).
        text_chunk_size, video_chunk_size (`int`, *optional*): texts and videos per block.
            When `None`, chosen so one block's intermediates stay within
            `DEFAULT_CHUNK_MEMORY_BYTES`.

    Returns:
        `torch.Tensor` of shape `(B_text, B_video)`, unscaled scores, text-major. Float32
        (float64 for float64 inputs): softmaxes always run in at least float32, and bf16 or
        fp16 scores would be too coarse to rank. Differentiable; note that under autograd
        every block's intermediates are kept for the backward pass, so blocking bounds
        memory for inference only.
    """
    _check_inputs(text_token_embeds, text_mask, frame_embeds, variant, lam)
    num_texts, num_tokens, _ = text_token_embeds.shape
    num_videos, num_frames, _ = frame_embeds.shape
    matmul_dtype = torch.promote_types(text_token_embeds.dtype, frame_embeds.dtype)
    accumulate_dtype = _accumulate_dtype(matmul_dtype)
    grid_bytes = num_tokens * num_frames * torch.finfo(accumulate_dtype).bits // 8
    text_chunk, video_chunk = _chunk_sizes(num_texts, num_videos, grid_bytes, text_chunk_size, video_chunk_size)
    videos = _l2_normalize(frame_embeds, matmul_dtype, accumulate_dtype)
    is_real_token = text_mask != 0
    score_block = _SCORE_BLOCK[variant]

    # Filled in place (autograd records the slice copies) rather than concatenated, which
    # would hold the score matrix twice at the end.
    scores = text_token_embeds.new_empty((num_texts, num_videos), dtype=accumulate_dtype)
    for text_start in range(0, num_texts, text_chunk):
        text_block = slice(text_start, text_start + text_chunk)
        # Texts are normalised block by block: a normalised copy of all token embeddings
        # would be the largest tensor of a big evaluation.
        texts = _l2_normalize(text_token_embeds[text_block], matmul_dtype, accumulate_dtype)
        for video_start in range(0, num_videos, video_chunk):
            video_block = slice(video_start, video_start + video_chunk)
            grid = _token_frame_grid(texts, videos[video_block], accumulate_dtype)
            scores[text_block, video_block] = score_block(grid, is_real_token[text_block], lam)
    return scores


def _accumulate_dtype(dtype):
    """Float64 stays float64; everything else (fp32, bf16, fp16) is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _l2_normalize(embeds, matmul_dtype, accumulate_dtype):
    """x / max(|x|, NORM_EPS) as the public code does, computed in `accumulate_dtype` and
    returned in `matmul_dtype` so the big matmul keeps the caller's precision (bf16 on GPU)."""
    wide = embeds.to(accumulate_dtype)
    norms = wide.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return (wide / norms).to(matmul_dtype)


def _token_frame_grid(texts, videos, accumulate_dtype):
    """g[a, n, b, t] = <texts[a, n], videos[b, t]> from one (a*N, E) x (E, b*T) matmul.

    The (texts, tokens, videos, frames) layout is the matmul's own, so no transposed copy
    of the largest tensor is made; token axis 1, frame axis 3.
    """
    num_texts, num_tokens, width = texts.shape
    num_videos, num_frames, _ = videos.shape
    flat = texts.reshape(-1, width) @ videos.reshape(-1, width).T
    return flat.view(num_texts, num_tokens, num_videos, num_frames).to(accumulate_dtype)


def _unnormalized_softmax(scores, lam, dim, keep=None):
    """exp(lam * (scores - max)) along `dim`, zero where `keep` is False.

    Normalising is left to the caller: a soft maximum only needs sum(e * x) / sum(e).
    Written out rather than with torch.softmax, which is several times slower on CPU over
    a short axis (12 frames) and has a large fixed cost on small tensors.
    """
    logits = scores if keep is None else scores.masked_fill(~keep, float("-inf"))
    # Any shift gives the same result; detaching the max keeps it out of the gradient.
    weights = logits - logits.detach().amax(dim, keepdim=True)
    return weights.mul_(lam).exp_()


def _softmax_weights(scores, lam, dim):
    weights = _unnormalized_softmax(scores, lam, dim)
    return weights / weights.sum(dim, keepdim=True)


def _softmax_pool(scores, lam, dim, keep=None):
    """sum_i softmax_i(lam * scores) * scores along `dim` (a soft maximum); entries where
    `keep` is False get zero weight."""
    weights = _unnormalized_softmax(scores, lam, dim, keep)
    return (weights * scores).sum(dim) / weights.sum(dim)


def _frame_scores(grid, token_keep, lam):
    """Per (text, video, frame): soft maximum over the text's real tokens. (a, b, T)."""
    return _softmax_pool(grid, lam, dim=1, keep=token_keep[..., None])


def _token_scores(grid, lam):
    """Per (text, token, video): soft maximum over the video's frames. (a, N, b)."""
    return _softmax_pool(grid, lam, dim=3)


def _score_block_simple(grid, is_real_token, lam):
    token_keep = is_real_token[:, :, None]  # (a, N, 1), broadcasts over videos
    # Padded tokens' scores are computed but excluded here, as the public code's 0 -> -inf.
    text_to_video = _softmax_pool(_token_scores(grid, lam), lam, dim=1, keep=token_keep)
    video_to_text = _softmax_pool(_frame_scores(grid, token_keep, lam), lam, dim=-1)
    return (text_to_video + video_to_text) / 2


def _score_block_full(grid, is_real_token, lam):
    token_keep = is_real_token[:, :, None]
    # The public code zeroes a padded token's similarities before its softmax over frames
    # (uniform weights) but dots the pooled frames with the unmasked token embedding: its
    # score is its mean similarity to the frames, and it stays in the token softmax.
    token_scores = torch.where(token_keep, _token_scores(grid, lam), grid.mean(dim=3))
    token_weights = _softmax_weights(token_scores, lam, dim=1)  # (a, N, b)
    frame_weights = _softmax_weights(_frame_scores(grid, token_keep, lam), lam, dim=-1)  # (a, b, T)
    # <sum_n q_n w_n, sum_t r_t v_t> = sum_{n,t} q_n g_nt r_t: no E-sized vectors needed.
    return torch.einsum("anb,anbt,abt->ab", token_weights, grid, frame_weights)


_SCORE_BLOCK = {"simple": _score_block_simple, "full": _score_block_full}


def _chunk_sizes(num_texts, num_videos, grid_bytes, text_chunk_size, video_chunk_size):
    """Block shape (texts, videos). Unset sizes are derived from the memory budget and the
    bytes of one pair's (tokens x frames) grid, as square as the batch allows (large blocks
    keep the matmul efficient)."""
    for name, size in (("text_chunk_size", text_chunk_size), ("video_chunk_size", video_chunk_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"mug_similarity: {name} must be a positive int or None, got {size!r}.")
    pairs = max(1, DEFAULT_CHUNK_MEMORY_BYTES // (grid_bytes * _LIVE_GRIDS_PER_PAIR))
    text_chunk = text_chunk_size or min(num_texts, max(1, math.isqrt(pairs)))
    video_chunk = video_chunk_size or min(num_videos, max(1, pairs // text_chunk))
    if text_chunk_size is None:
        # Spend the budget a small video batch leaves unused on more texts.
        text_chunk = min(num_texts, max(text_chunk, pairs // video_chunk))
    return text_chunk, video_chunk


def _check_inputs(text_token_embeds, text_mask, frame_embeds, variant, lam):
    for name, value in (
        ("text_token_embeds", text_token_embeds),
        ("text_mask", text_mask),
        ("frame_embeds", frame_embeds),
    ):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"mug_similarity: {name} must be a torch.Tensor, got {type(value).__name__}.")
    _check_embeds("text_token_embeds", text_token_embeds, "(B_text, N, E)")
    _check_embeds("frame_embeds", frame_embeds, "(B_video, T, E)")
    if text_token_embeds.shape[-1] != frame_embeds.shape[-1]:
        raise ValueError(
            "mug_similarity: text_token_embeds and frame_embeds must share the embedding size E, got "
            f"{text_token_embeds.shape[-1]} and {frame_embeds.shape[-1]}."
        )
    devices = {value.device for value in (text_token_embeds, text_mask, frame_embeds)}
    if len(devices) > 1:
        raise ValueError(f"mug_similarity: all inputs must be on one device, got {sorted(map(str, devices))}.")
    if text_mask.shape != text_token_embeds.shape[:2]:
        raise ValueError(
            f"mug_similarity: text_mask must have shape (B_text, N) = {tuple(text_token_embeds.shape[:2])}, "
            f"got {tuple(text_mask.shape)}."
        )
    if not ((text_mask == 0) | (text_mask == 1)).all():
        raise ValueError("mug_similarity: text_mask must contain only 0/1 (or False/True).")
    empty_texts = (text_mask == 0).all(dim=1).nonzero().flatten().tolist()
    if empty_texts:
        raise ValueError(f"mug_similarity: texts {empty_texts} have no real token in text_mask.")
    if variant not in MUG_VARIANTS:
        raise ValueError(f"mug_similarity: variant must be one of {MUG_VARIANTS}, got {variant!r}.")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"mug_similarity: lam must be a finite number > 0, got {lam!r}.")


def _check_embeds(name, embeds, expected_shape):
    if embeds.dim() != 3 or 0 in embeds.shape:
        raise ValueError(
            f"mug_similarity: {name} must be a non-empty 3-D tensor {expected_shape}, got shape {tuple(embeds.shape)}."
        )
    if not embeds.is_floating_point():
        raise TypeError(f"mug_similarity: {name} must be floating point, got {embeds.dtype}.")
