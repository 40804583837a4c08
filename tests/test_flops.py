"""The paper-rule FLOPs counter of benchmarks/flops.py: the layer rule, hand counts of a tiny STAN, the paper."""

import sys

import pytest
import torch
from conftest import REPO_ROOT
from torch import nn
from transformers import CLIPTextConfig, CLIPVisionConfig

from modeling_stan import StanConfig, StanModel


sys.path.insert(0, str(REPO_ROOT))  # `benchmarks` is a folder of scripts at the repository root, not installed.
from benchmarks._common import BACKBONES, empty_model  # noqa: E402
from benchmarks.flops import count_macs, recording_macs  # noqa: E402


def test_layer_rule_counts_linear_and_conv_macs_only():
    model = nn.Sequential(
        nn.Linear(6, 5),  # (2, 7, 6) -> (2, 7, 5): 70 outputs x 6 inputs = 420
        nn.Unflatten(2, (5, 1)),
        nn.Conv2d(7, 4, kernel_size=(2, 1)),  # (2, 7, 5, 1) -> (2, 4, 4, 1): 32 outputs x 7*2 inputs = 448
        nn.LayerNorm(1),  # not counted
        nn.Conv2d(4, 6, kernel_size=(3, 1), groups=2),  # -> (2, 6, 2, 1): 24 outputs x (4/2)*3 inputs = 144
    )
    with recording_macs(model) as counts:
        model(torch.randn(2, 7, 6))
    assert dict(counts) == {"0": 420, "2": 448, "4": 144}


# Tiny STAN: width D=32, MLP M=64, L=2 CLIP layers, 32 px frames of 16 px patches (P=4, N=1+P=5 tokens per frame),
# projection E=16, K=1 STAN layer; B=2 videos of T=3 frames.
D, M, L, P, E, T, B = 32, 64, 2, 4, 16, 3, 2
N = 1 + P
CLIP_PER_FRAME = P * D * (3 * 16 * 16) + L * N * (4 * D * D + 2 * D * M) + D * E  # patch conv, layers, projection
SPATIAL_PER_VIDEO = T * N * 4 * D * D + (1 + P * T) * 2 * D * M  # per-frame q/k/v/o, MLP over the branch sequence
TEMPORAL_PER_VIDEO = {
    "attention": P * T * 5 * D * D,  # q/k/v/o and temporal_fc on every patch token
    # full-width Conv3d 3x3x3 (every output reads D x 27 inputs, padded borders included) and temporal_fc
    "conv": P * T * (D * D * 27 + D * D),
}


def tiny_config(stan_depth: int, temporal_module: str = "attention") -> StanConfig:
    vision = CLIPVisionConfig(
        hidden_size=D, intermediate_size=M, num_hidden_layers=L, num_attention_heads=2, image_size=32, patch_size=16
    )
    text = CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    return StanConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        projection_dim=E,
        stan_depth=stan_depth,
        temporal_module=temporal_module,
        drop_path_rate=0.0,
    )


@pytest.mark.parametrize(
    "stan_depth, temporal_module, expected",
    [
        (0, "attention", B * T * CLIP_PER_FRAME),
        (1, "attention", B * (T * CLIP_PER_FRAME + TEMPORAL_PER_VIDEO["attention"] + SPATIAL_PER_VIDEO)),
        (1, "conv", B * (T * CLIP_PER_FRAME + TEMPORAL_PER_VIDEO["conv"] + SPATIAL_PER_VIDEO)),
    ],
)
def test_count_macs_matches_a_hand_count_of_a_tiny_stan(stan_depth, temporal_module, expected):
    model = StanModel(tiny_config(stan_depth, temporal_module)).eval()
    pixel_values = torch.randn(B, T, 3, 32, 32)
    assert count_macs(model, pixel_values) == expected


def test_meta_weights_count_the_same_as_real_weights():
    config = tiny_config(1)
    pixel_values = torch.randn(B, T, 3, 32, 32)
    real = count_macs(StanModel(config).eval(), pixel_values)
    assert count_macs(empty_model(StanModel, config), pixel_values.to("meta")) == real


@pytest.mark.parametrize(
    "stan_depth, num_frames, paper_gflops_3_views",
    [(4, 8, 593), (4, 16, 1187), (6, 8, 688), (6, 16, 1376)],  # STAN paper, STAN-self on K400 (K=4) and SSv2 (K=6)
)
def test_clip_b16_stan_self_matches_the_paper_within_one_percent(stan_depth, num_frames, paper_gflops_3_views):
    config = BACKBONES["b16"].stan_config(stan_depth=stan_depth, temporal_module="attention")
    model = empty_model(StanModel, config)
    gflops_per_view = count_macs(model, torch.empty(1, num_frames, 3, 224, 224, device="meta")) / 1e9
    assert gflops_per_view * 3 == pytest.approx(paper_gflops_3_views, rel=0.01)


@pytest.mark.parametrize(
    "stan_depth, num_frames, paper_gflops_3_views",
    [(4, 8, 845)],  # STAN paper, SSv2 table, STAN-conv B/16 8 frames; the paper does not give K for it
)
def test_clip_b16_stan_conv_matches_the_paper_within_one_percent(stan_depth, num_frames, paper_gflops_3_views):
    config = BACKBONES["b16"].stan_config(stan_depth=stan_depth, temporal_module="conv")
    model = empty_model(StanModel, config)
    gflops_per_view = count_macs(model, torch.empty(1, num_frames, 3, 224, 224, device="meta")) / 1e9
    assert gflops_per_view * 3 == pytest.approx(paper_gflops_3_views, rel=0.01)


def test_count_macs_of_the_text_tower_counts_every_token_and_both_projections():
    # Text tower of tiny_config: width 16, MLP 32, 1 layer; projection E=16. get_text_features projects the EOS state
    # (pooled) and every token state (token_embeds, for Mug): 1 + N projected rows per caption.
    num_tokens, width, mlp = 5, 16, 32
    per_caption = num_tokens * (4 * width * width + 2 * width * mlp) + (1 + num_tokens) * width * E
    model = StanModel(tiny_config(1)).eval()
    input_ids = torch.randint(0, 60, (B, num_tokens))
    assert count_macs(model, input_ids=input_ids) == B * per_caption


def test_count_macs_needs_an_input():
    with pytest.raises(ValueError, match="count_macs needs pixel_values, input_ids or both"):
        count_macs(StanModel(tiny_config(0)))
