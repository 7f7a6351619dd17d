"""VideoReferConfig: sub-configs, round trips, Auto registration, visual token counts, validation."""

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.models.qwen2 import Qwen2Config
from transformers.models.siglip import SiglipVisionConfig

from transformers_videorefer import VideoReferConfig, VideoReferForCausalLM, VideoReferModel, VideoReferProcessor


def test_defaults_describe_the_released_model():
    config = VideoReferConfig()
    assert isinstance(config.vision_config, SiglipVisionConfig) and isinstance(config.text_config, Qwen2Config)
    assert (config.vision_config.hidden_size, config.vision_config.image_size, config.vision_config.patch_size) == (1152, 384, 14)
    assert (config.text_config.hidden_size, config.text_config.vocab_size) == (3584, 152064)
    # 16 frames of 27x27 patches; Conv3d kernel = stride = 2, no padding: 8 x 13 x 13.
    assert config.patches_per_side == 27 and config.num_visual_tokens == 8 * 13 * 13
    assert VideoReferConfig(connector_type="stc_connector").num_visual_tokens == 9 * 14 * 14


def test_sub_configs_as_dicts_or_objects_and_round_trip(tmp_path):
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    text = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    config = VideoReferConfig(vision_config=vision, text_config=text, num_frames=8, num_region_tokens=3, region_token_id=99)
    assert config.text_config.hidden_size == 48 and config.vision_config.image_size == 28
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VideoReferConfig)
    without_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(loaded) == without_path(config)
    assert (loaded.num_frames, loaded.num_region_tokens, loaded.region_token_id) == (8, 3, 99)


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("videorefer")
    assert isinstance(config, VideoReferConfig)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        MODEL_MAPPING,
    )
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    assert MODEL_MAPPING[VideoReferConfig] is VideoReferModel
    assert MODEL_FOR_CAUSAL_LM_MAPPING[VideoReferConfig] is VideoReferForCausalLM
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[VideoReferConfig] is VideoReferForCausalLM
    assert PROCESSOR_MAPPING[VideoReferConfig] is VideoReferProcessor
    assert AutoModel and AutoModelForCausalLM and AutoModelForImageTextToText and AutoProcessor


def test_auto_model_loads_base_and_causal_lm(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is VideoReferModel
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is VideoReferForCausalLM
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is VideoReferForCausalLM


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"connector_type": "mlp2x_gelu"}, "connector_type"),
        ({"connector_downsample": [2, 2, 3]}, "connector_downsample"),
        ({"kernel_backend": "cuda"}, "kernel_backend"),
        ({"num_region_tokens": 0}, "num_region_tokens"),
    ],
)
def test_invalid_values_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        VideoReferConfig(**fields)
