"""transformers' own video-processor and processor test suites, run against StanVideoProcessor and StanProcessor.

The testers are set up as transformers' in-tree tests set up theirs (tests/models/*/test_video_processing_*.py and
test_processing_*.py): a tester object describing random inputs and the processor options, and the processor's
`num_frames` equal to the tester's clip length, since STAN samples a fixed number of frames by default.
"""

import unittest

import pytest
import transformers_suite
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from modeling_stan.demo.tiny_clip import build_tiny_clip_tokenizer
from modeling_stan.processing_stan import StanProcessor
from modeling_stan.video_processing_stan import StanVideoProcessor


video_processing_common = transformers_suite.load("test_video_processing_common")
processing_common = transformers_suite.load("test_processing_common")


class StanVideoProcessingTester:
    """Random videos and processor options for `VideoProcessingTestMixin`, as transformers' video processor tests
    describe theirs."""

    def __init__(self, parent, batch_size=5, num_frames=8, num_channels=3, min_resolution=30, max_resolution=80):
        self.parent = parent
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.num_channels = num_channels
        self.min_resolution = min_resolution
        self.max_resolution = max_resolution
        self.size = {"shortest_edge": 20}
        self.crop_size = {"height": 18, "width": 18}

    def prepare_video_processor_dict(self):
        return {
            "do_resize": True,
            "size": self.size,
            "do_center_crop": True,
            "crop_size": self.crop_size,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
            "do_convert_rgb": True,
            "num_frames": self.num_frames,
        }

    def expected_output_video_shape(self, videos):
        return self.num_frames, self.num_channels, self.crop_size["height"], self.crop_size["width"]

    def prepare_video_inputs(self, equal_resolution=False, return_tensors="pil"):
        return video_processing_common.prepare_video_inputs(
            batch_size=self.batch_size,
            num_frames=self.num_frames,
            num_channels=self.num_channels,
            min_resolution=self.min_resolution,
            max_resolution=self.max_resolution,
            equal_resolution=equal_resolution,
            return_tensors=return_tensors,
        )


class StanVideoProcessingTest(video_processing_common.VideoProcessingTestMixin, unittest.TestCase):
    fast_video_processing_class = StanVideoProcessor
    input_name = "pixel_values"

    def setUp(self):
        super().setUp()
        self.video_processor_tester = StanVideoProcessingTester(self)

    @property
    def video_processor_dict(self):
        return self.video_processor_tester.prepare_video_processor_dict()

    @pytest.mark.skip(
        reason="tests BaseVideoProcessor.sample_frames (torchvision-based); StanVideoProcessor samples "
        "while decoding, with video_io.sample_frame_indices"
    )
    def test_call_sample_frames(self):
        pass

    @pytest.mark.skip(
        reason="the mixin imports the top-level AutoVideoProcessor, a placeholder without torchvision; "
        "tests/test_video_processing.py loads ours through AutoVideoProcessor's own module"
    )
    def test_video_processor_save_load_with_autovideoprocessor(self):
        pass


class StanProcessorTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = StanProcessor
    videos_input_name = "pixel_values"  # STAN's vision input, as for CLIP

    @classmethod
    def _setup_tokenizer(cls):
        return build_tiny_clip_tokenizer()

    @classmethod
    def _setup_video_processor(cls):
        # `prepare_videos_inputs` gives clips of 8 frames.
        return StanVideoProcessor(num_frames=8, size=20, crop_size=18)
