"""Mug similarity: parity with the authors' code, blocking, padding, gradients, errors."""

from pathlib import Path

import pytest
import torch

from modeling_stan import mug_alignment
from modeling_stan.mug_alignment import mug_similarity


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY_IO = SHARED / "parity" / "stan_attention_k4_t8" / "io.safetensors"


def naive_mug(text_token_embeds, text_mask, frame_embeds, variant, lam):
    """Reference written from the published algorithm: materialise the whole
    texts x videos x tokens x frames grid, multiply it by the mask, and exclude entries
    that are exactly zero from the softmaxes where the public code does (0 -> -inf)."""
    words = text_token_embeds / text_token_embeds.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    frames = frame_embeds / frame_embeds.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    grid = torch.einsum("and,btd->abnt", words, frames) * text_mask[:, None, :, None]

    def zero_to_minus_inf(x):
        return torch.where(x == 0, torch.full_like(x, float("-inf")), x)

    per_token_frame_weights = torch.softmax(lam * grid, dim=3)
    per_frame_token_weights = torch.softmax(lam * zero_to_minus_inf(grid), dim=2)
    if variant == "simple":
        token_scores = (per_token_frame_weights * grid).sum(3)
        frame_scores = (per_frame_token_weights * grid).sum(2)
        t2v = (torch.softmax(lam * zero_to_minus_inf(token_scores), dim=2) * token_scores).sum(2)
        v2t = (torch.softmax(lam * frame_scores, dim=2) * frame_scores).sum(2)
        return (t2v + v2t) / 2
    # full: aggregate vectors, then dot them.
    frame_guided_words = torch.einsum("abnt,btd->abnd", per_token_frame_weights, frames)
    token_scores = torch.einsum("abnd,and->abn", frame_guided_words, words)
    word_guided_frames = torch.einsum("abnt,and->abtd", per_frame_token_weights, words)
    frame_scores = torch.einsum("abtd,btd->abt", word_guided_frames, frames)
    text_vector = torch.einsum("abn,and->abd", torch.softmax(lam * zero_to_minus_inf(token_scores), dim=2), words)
    video_vector = torch.einsum("abt,btd->abd", torch.softmax(lam * frame_scores, dim=2), frames)
    return (text_vector * video_vector).sum(-1)


def random_inputs(num_texts=5, num_videos=4, num_tokens=6, num_frames=3, width=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    texts = torch.randn(num_texts, num_tokens, width, generator=generator, dtype=dtype)
    frames = torch.randn(num_videos, num_frames, width, generator=generator, dtype=dtype)
    lengths = torch.randint(1, num_tokens + 1, (num_texts,), generator=generator)
    lengths[0] = num_tokens  # one unpadded text
    lengths[1] = 1  # one text with a single real token
    mask = (torch.arange(num_tokens) < lengths[:, None]).long()
    return texts, mask, frames


@pytest.fixture(scope="module")
def parity():
    if not PARITY_IO.is_file():
        pytest.skip(f"parity tensors not found at {PARITY_IO} (shared/ is not checked out here)")
    from safetensors.torch import load_file

    return load_file(str(PARITY_IO))


@pytest.mark.parametrize("variant", ["simple", "full"])
@pytest.mark.parametrize("chunks", [(None, None), (1, 1), (2, 3)])
def test_matches_authors_parity_tensors(parity, variant, chunks):
    scores = mug_similarity(
        parity["text_token_embeds"],
        parity["attention_mask"],
        parity["frame_embeds"],
        variant=variant,
        lam=100.0,
        text_chunk_size=chunks[0],
        video_chunk_size=chunks[1],
    )
    torch.testing.assert_close(scores, parity[f"mug_logits_{variant}"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["simple", "full"])
@pytest.mark.parametrize("lam", [100.0, 3.0])
def test_matches_naive_reference_with_padding(variant, lam):
    # A low lam makes padded tokens weigh enough to expose how each variant treats them
    # (the parity tensors alone cannot tell them apart at 1e-5).
    texts, mask, frames = random_inputs(dtype=torch.float64)
    expected = naive_mug(texts, mask.double(), frames, variant, lam)
    scores = mug_similarity(texts, mask, frames, variant=variant, lam=lam, text_chunk_size=2, video_chunk_size=3)
    torch.testing.assert_close(scores, expected, atol=1e-12, rtol=0)


def test_padded_token_embeddings_matter_in_full_only():
    texts, mask, frames = random_inputs(dtype=torch.float64)
    changed = texts.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), texts.shape[-1], dtype=torch.float64)
    for variant, should_change in (("simple", False), ("full", True)):
        before = mug_similarity(texts, mask, frames, variant=variant, lam=3.0)
        after = mug_similarity(changed, mask, frames, variant=variant, lam=3.0)
        assert (not torch.equal(before, after)) == should_change, variant


@pytest.mark.parametrize("variant", ["simple", "full"])
@pytest.mark.parametrize("chunks", [(1, 1), (2, 3), (3, None), (None, 2), (7, 11)])
def test_chunked_equals_unchunked(variant, chunks):
    texts, mask, frames = random_inputs(num_texts=7, num_videos=11, num_tokens=9, num_frames=4, width=16, seed=1)
    whole = mug_similarity(texts, mask, frames, variant=variant, text_chunk_size=7, video_chunk_size=11)
    chunked = mug_similarity(
        texts, mask, frames, variant=variant, text_chunk_size=chunks[0], video_chunk_size=chunks[1]
    )
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_automatic_chunks_follow_the_memory_budget(monkeypatch):
    texts, mask, frames = random_inputs(num_texts=7, num_videos=11, num_tokens=9, num_frames=4, width=16, seed=2)
    whole = mug_similarity(texts, mask, frames, text_chunk_size=7, video_chunk_size=11)
    blocks = []
    real_grid = mug_alignment._token_frame_grid

    def recording_grid(block_texts, block_videos, accumulate_dtype):
        blocks.append((len(block_texts), len(block_videos)))
        return real_grid(block_texts, block_videos, accumulate_dtype)

    # Room for 6 (text, video) pairs per block: 9 tokens * 4 frames * 6 grids * 4 bytes each.
    monkeypatch.setattr(mug_alignment, "DEFAULT_CHUNK_MEMORY_BYTES", 6 * 9 * 4 * 6 * 4)
    monkeypatch.setattr(mug_alignment, "_token_frame_grid", recording_grid)
    chunked = mug_similarity(texts, mask, frames)
    assert max(a * b for a, b in blocks) <= 6 and len(blocks) > 1
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["simple", "full"])
def test_gradients_are_exact(variant):
    texts, mask, frames = random_inputs(
        num_texts=3, num_videos=2, num_tokens=4, num_frames=3, width=5, dtype=torch.float64
    )
    texts.requires_grad_(True)
    frames.requires_grad_(True)

    def blocked(t, f):
        return mug_similarity(t, mask, f, variant=variant, lam=5.0, text_chunk_size=2, video_chunk_size=1)

    assert torch.autograd.gradcheck(blocked, (texts, frames))


def test_gradients_flow_into_a_loss():
    texts, mask, frames = random_inputs()
    texts.requires_grad_(True)
    frames.requires_grad_(True)
    scores = mug_similarity(texts, mask, frames, text_chunk_size=2, video_chunk_size=2)
    torch.nn.functional.cross_entropy(100 * scores[:4], torch.arange(4)).backward()
    assert torch.isfinite(texts.grad).all() and texts.grad[mask == 1].abs().sum() > 0
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    # "simple" ignores padded tokens entirely.
    assert texts.grad[mask == 0].abs().sum() == 0


def test_bfloat16_inputs_give_float32_scores_close_to_float32():
    texts, mask, frames = random_inputs(width=64)
    reference = mug_similarity(texts, mask, frames)
    low = mug_similarity(texts.bfloat16(), mask, frames.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, atol=2e-2, rtol=0)


def test_bool_mask_equals_int_mask():
    texts, mask, frames = random_inputs()
    torch.testing.assert_close(mug_similarity(texts, mask.bool(), frames), mug_similarity(texts, mask, frames))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda t, m, f: (t[0], m, f), ValueError, "text_token_embeds"),
        (lambda t, m, f: (t, m, f[..., :-1]), ValueError, "embedding size"),
        (lambda t, m, f: (t, m[:, :-1], f), ValueError, "text_mask must have shape"),
        (lambda t, m, f: (t, m * 2, f), ValueError, "0/1"),
        (lambda t, m, f: (t, torch.cat([m[:1], 0 * m[1:]]), f), ValueError, "no real token"),
        (lambda t, m, f: (t, m, f[:0]), ValueError, "frame_embeds"),
        (lambda t, m, f: (t.long(), m, f), TypeError, "floating point"),
        (lambda t, m, f: (t.numpy(), m, f), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(change, error, message):
    texts, mask, frames = random_inputs()
    with pytest.raises(error, match=message):
        mug_similarity(*change(texts, mask, frames))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"variant": "mean"}, "variant"),
        ({"lam": 0.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"text_chunk_size": 0}, "text_chunk_size"),
        ({"video_chunk_size": 1.5}, "video_chunk_size"),
    ],
)
def test_bad_options_raise(options, message):
    texts, mask, frames = random_inputs()
    with pytest.raises(ValueError, match=message):
        mug_similarity(texts, mask, frames, **options)
