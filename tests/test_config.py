import pytest

from configuration_crosslmm import CrossLMMConfig
from tiny import tiny_config


def test_defaults_are_crosslmm_2b():
    config = CrossLMMConfig()
    assert config.model_type == "crosslmm"
    assert config.vision_config.model_type == "siglip_vision_model"
    assert config.patch_grid_size == 27 and config.image_size == 384 and config.vision_layers_run == 26
    assert config.text_config.hidden_size == 1536 and config.text_config.num_hidden_layers == 28
    assert config.dcal_layer_indices == [3, 7, 11, 15, 19, 23, 27]
    assert config.tokens_per_frame == 9
    assert config.auto_map["AutoModelForImageTextToText"] == "modeling_crosslmm.CrossLMMForConditionalGeneration"


def test_explicit_layers_override_interval():
    config = tiny_config(cross_attention_interval=3, cross_attention_layers=[2, 0])
    assert config.dcal_layer_indices == [0, 2]
    assert tiny_config(cross_attention_interval=3).dcal_layer_indices == [2]
    assert tiny_config(cross_attention_layers=[]).dcal_layer_indices == []


def test_round_trip(tmp_path):
    config = tiny_config(pool_size=3, pooling_mode="average", v2v_scope="frame", use_t2v=False)
    config.save_pretrained(tmp_path)
    loaded = CrossLMMConfig.from_pretrained(tmp_path)
    for field in ("pool_size", "pooling_mode", "v2v_scope", "use_t2v", "video_token_id", "dcal_layer_indices"):
        assert getattr(loaded, field) == getattr(config, field)
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert loaded.vision_config.hidden_size == config.vision_config.hidden_size


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pool_size=0), "pool_size"),
        (dict(pool_size=8), "pool_size must be an integer in 1..7"),
        (dict(pooling_mode="max"), "pooling_mode"),
        (dict(v2v_scope="clip"), "v2v_scope"),
        (dict(cross_attention_interval=0), "cross_attention_interval"),
        (dict(cross_attention_layers=[1, 4]), r"indices \[4\] outside"),
        (dict(cross_attention_layers=[1, 1]), "repeated"),
        (dict(use_v2v=False, use_t2v=False), "both False"),
        (dict(vision_feature_layer=5), "vision_feature_layer"),
        (dict(vision_batch_size=0), "vision_batch_size"),
        (dict(video_token_id=150), "must differ"),
        (dict(text={"model_type": "llama"}), "text_config.model_type"),
        (dict(vision={"model_type": "clip_vision_model"}), "vision_config.model_type"),
    ],
)
def test_contradictions_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_no_dcal_without_branches_is_allowed():
    config = tiny_config(use_v2v=False, use_t2v=False, cross_attention_layers=[])
    assert config.dcal_layer_indices == []
