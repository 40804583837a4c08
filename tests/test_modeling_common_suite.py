"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester` of the installed version) run against
the STAN classes, set up as transformers' in-tree model tests are (see tests/models/clip and tests/models/videomae
there). A test is skipped only where CLIP's own tests skip the same test, with CLIP's reason."""

import unittest

import pytest
import torch
from test_readme import single_thread  # noqa: F401  (a fixture)
from transformers import CLIPTextConfig, CLIPVisionConfig
from transformers_suite import load

from modeling_stan import StanConfig, StanForVideoClassification, StanModel, StanVisionModel


common = load("test_modeling_common")
ConfigTester = load("test_configuration_common").ConfigTester
ModelTesterMixin = common.ModelTesterMixin
floats_tensor = common.floats_tensor
ids_tensor = common.ids_tensor
random_attention_mask = common.random_attention_mask

pytestmark = pytest.mark.usefixtures("single_thread")


class StanModelTester:
    """Tiny STAN configurations and inputs: CLIP towers of two layers, a STAN branch beside the last one."""

    def __init__(
        self,
        parent,
        batch_size=3,
        num_frames=3,
        image_size=8,
        patch_size=4,
        seq_length=7,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        projection_dim=16,
        stan_depth=1,
        temporal_module="attention",
        num_labels=3,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.image_size = image_size
        self.patch_size = patch_size
        self.text_seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.projection_dim = projection_dim
        self.stan_depth = stan_depth
        self.temporal_module = temporal_module
        self.num_labels = num_labels
        self.is_training = is_training
        # The vision layers (whose hidden states and attentions the models return) see one frame at a time: its
        # patches plus [CLS].
        self.seq_length = (image_size // patch_size) ** 2 + 1

    def get_config(self) -> StanConfig:
        tower = dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            dropout=0.1,
            attention_dropout=0.1,
        )
        return StanConfig(
            text_config=CLIPTextConfig(vocab_size=self.vocab_size, max_position_embeddings=32, **tower).to_dict(),
            vision_config=CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size, **tower).to_dict(),
            projection_dim=self.projection_dim,
            stan_depth=self.stan_depth,
            temporal_module=self.temporal_module,
            num_frames=self.num_frames,
            max_frames=8,
            num_labels=self.num_labels,
        )

    def prepare_video(self):
        return floats_tensor([self.batch_size, self.num_frames, 3, self.image_size, self.image_size])

    def prepare_text(self):
        input_ids = ids_tensor([self.batch_size, self.text_seq_length], self.vocab_size)
        return input_ids, random_attention_mask([self.batch_size, self.text_seq_length])


class StanVisionModelTester(StanModelTester):
    """Inputs of the video tower and of the video classifier."""

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), {"pixel_values": self.prepare_video()}


class StanDualEncoderTester(StanModelTester):
    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        # As CLIP's model tester: the common `get_video_features` tests take their inputs from the tower's tester.
        self.video_model_tester = StanVisionModelTester(parent, **kwargs)

    def prepare_config_and_inputs_for_common(self):
        input_ids, attention_mask = self.prepare_text()
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.prepare_video(),
            "return_loss": True,
        }
        return self.get_config(), inputs


class StanVisionModelTest(ModelTesterMixin, unittest.TestCase):
    """The video tower with the STAN-self branch (attention temporal module)."""

    all_model_classes = (StanVisionModel,)
    temporal_module = "attention"
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = StanVisionModelTester(self, temporal_module=self.temporal_module)
        self.config_tester = ConfigTester(
            self, config_class=StanConfig, has_text_modality=False, common_properties=["projection_dim"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="CLIP does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        # As CLIP's vision test: the input embedding is the patch embedding, a convolution.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = StanVisionModel(config)
        self.assertIs(model.get_input_embeddings(), model.embeddings.patch_embedding)
        self.assertIsNone(model.get_output_embeddings())

    @unittest.skip
    def test_training(self):
        pass

    @unittest.skip
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(
        reason="This architecture seem to not compute gradients properly when using GC, check: https://github.com/huggingface/transformers/pull/27124"
    )
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip(
        reason="This architecture seem to not compute gradients properly when using GC, check: https://github.com/huggingface/transformers/pull/27124"
    )
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    def test_video_outputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = StanVisionModel(config).eval()
        with torch.no_grad():
            outputs = model(**inputs, output_attentions=True, output_branch_attentions=True)
        tester = self.model_tester
        frames = (tester.batch_size, tester.num_frames)
        self.assertEqual(outputs.last_hidden_state.shape, (*frames, tester.seq_length, tester.hidden_size))
        self.assertEqual(outputs.pooler_output.shape, (*frames, tester.hidden_size))
        branch_tokens = 1 + (tester.seq_length - 1) * tester.num_frames
        self.assertEqual(
            outputs.branch_last_hidden_state.shape, (tester.batch_size, branch_tokens, tester.hidden_size)
        )
        # `attentions` keeps to the CLIP layers, as `hidden_states` does; the branch's maps come apart.
        frame_map = (
            tester.batch_size * tester.num_frames,
            tester.num_attention_heads,
            tester.seq_length,
            tester.seq_length,
        )
        self.assertEqual([tuple(a.shape) for a in outputs.attentions], [frame_map] * tester.num_hidden_layers)
        # Every STAN layer's spatial module attends within each frame (the video [CLS] shared by all frames).
        spatial_maps = [a for a in outputs.branch_attentions if tuple(a.shape) == frame_map]
        self.assertEqual(len(spatial_maps), tester.stan_depth)
        if self.temporal_module == "attention":
            temporal_map = (
                tester.batch_size * (tester.seq_length - 1),
                tester.num_attention_heads,
                tester.num_frames,
                tester.num_frames,
            )
            self.assertEqual(
                [tuple(a.shape) for a in outputs.branch_attentions[::2]], [temporal_map] * tester.stan_depth
            )


class StanVisionModelConvTest(StanVisionModelTest):
    """The video tower with the STAN-conv branch (convolution temporal module)."""

    temporal_module = "conv"


class StanModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (StanModel,)
    additional_model_inputs = ["pixel_values"]
    test_resize_embeddings = False
    test_attention_outputs = False
    _is_composite = True

    def setUp(self):
        self.model_tester = StanDualEncoderTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=StanConfig,
            has_text_modality=False,
            common_properties=["projection_dim", "logit_scale_init_value"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="Inputs_embeds is tested in individual model tests")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="CLIPModel does not have input/output embeddings")
    def test_model_get_set_embeddings(self):
        pass

    def test_logits_shapes(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = StanModel(config).eval()
        with torch.no_grad():
            outputs = model(**inputs)
        batch_size = self.model_tester.batch_size
        self.assertEqual(outputs.logits_per_video.shape, (batch_size, batch_size))
        self.assertEqual(outputs.logits_per_text.shape, (batch_size, batch_size))
        self.assertTrue(torch.isfinite(outputs.loss))


class StanForVideoClassificationTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (StanForVideoClassification,)
    test_resize_embeddings = False
    test_attention_outputs = False
    _is_composite = True

    def setUp(self):
        self.model_tester = StanVisionModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # As VideoMAE's test: transformers adds labels only for its own video classifiers.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict

    @unittest.skip(reason="CLIPForImageClassification does not support inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="CLIPForImageClassification does not support inputs_embeds")  # CLIP's own wording
    def test_model_get_set_embeddings(self):
        pass

    def test_logits_shape(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = StanForVideoClassification(config).eval()
        labels = torch.arange(self.model_tester.batch_size) % self.model_tester.num_labels
        with torch.no_grad():
            outputs = model(**inputs, labels=labels)
        self.assertEqual(outputs.logits.shape, (self.model_tester.batch_size, self.model_tester.num_labels))
        self.assertTrue(torch.isfinite(outputs.loss))
