"""Exports of the video tower with a dynamic batch size and frame count: `torch.export`, then ONNX (the dynamo
exporter) run with onnxruntime, both checked against the eager model on shapes other than the traced one."""

import numpy as np
import onnxruntime
import pytest
import torch
from test_modeling_common_suite import StanModelTester
from test_readme import single_thread  # noqa: F401  (a fixture)

from modeling_stan import StanVisionModel


pytestmark = pytest.mark.usefixtures("single_thread")

OUTPUT_NAMES = ["last_hidden_state", "pooler_output", "branch_last_hidden_state"]
# (batch, frames): the traced shape first, then others the exports must take.
TRACED = (2, 4)
OTHER_SHAPES = [(3, 6), (1, 1), (2, 8)]


def _video(batch_size, num_frames, image_size, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, num_frames, 3, image_size, image_size, generator=generator)


def _export_checked(temporal_module, tmp_path):
    torch.manual_seed(0)
    tester = StanModelTester(None, temporal_module=temporal_module)
    model = StanVisionModel(tester.get_config()).eval()
    dynamic_shapes = {
        "pixel_values": {
            0: torch.export.Dim("batch", min=1, max=64),
            1: torch.export.Dim("frames", min=1, max=model.config.max_frames),
        }
    }
    program = torch.export.export(
        model, (), {"pixel_values": _video(*TRACED, tester.image_size, seed=0)}, dynamic_shapes=dynamic_shapes
    )
    path = tmp_path / "video_tower.onnx"
    torch.onnx.export(program, f=path, dynamo=True, input_names=["pixel_values"], output_names=OUTPUT_NAMES)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == OUTPUT_NAMES
    for seed, (batch_size, num_frames) in enumerate(OTHER_SHAPES, start=1):
        video = _video(batch_size, num_frames, tester.image_size, seed)
        with torch.no_grad():
            expected = model(pixel_values=video)
            exported = program.module()(pixel_values=video)
        onnx_outputs = session.run(None, {"pixel_values": video.numpy()})
        for name, onnx_output in zip(OUTPUT_NAMES, onnx_outputs):
            torch.testing.assert_close(exported[name], expected[name], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(onnx_output, expected[name].numpy(), rtol=1e-4, atol=1e-5)
        assert onnx_outputs[1].shape == (batch_size, num_frames, tester.hidden_size)


def test_stan_self_video_tower_exports_with_dynamic_batch_and_frames(tmp_path):
    _export_checked("attention", tmp_path)


@pytest.mark.slow
def test_stan_conv_video_tower_exports_with_dynamic_batch_and_frames(tmp_path):
    _export_checked("conv", tmp_path)
