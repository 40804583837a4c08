"""Models refuse NaN or infinite pixel_values with a typed error, and the check does not get in the way of
torch.export (it is skipped while tracing)."""

import pytest
import torch
from conftest import random_video, tiny_stan_config

from modeling_stan import NonFiniteInputError, StanForVideoClassification, StanModel, StanVisionModel


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_models_refuse_non_finite_pixel_values(value):
    config = tiny_stan_config(stan_depth=1, num_frames=4)
    video = random_video(2, 4, config)
    video[1, 2, 0, 3, 3] = value
    for model in (StanVisionModel(config), StanModel(config), StanForVideoClassification(config)):
        with pytest.raises(NonFiniteInputError, match="NaN or infinite"):
            model.eval()(pixel_values=video)


def test_the_check_is_skipped_under_export():
    config = tiny_stan_config(stan_depth=1, num_frames=4)
    model = StanVisionModel(config).eval()

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values).pooler_output

    video = random_video(1, 4, config)
    exported = torch.export.export(Pooled(), (video,))
    assert torch.allclose(exported.module()(video), Pooled()(video), atol=1e-5)
