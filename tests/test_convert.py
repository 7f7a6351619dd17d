"""Conversion of upstream-format VideoRefer checkpoints (built here synthetically, with upstream parameter names and
config fields) into this package's format: the mapping, the config translation, errors, and the numbers against
references that follow the upstream computation (timm's RegStage connector, bilinear mask pooling, token merge)."""

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
from transformers.testing_utils import CaptureLogger

from conftest import box_mask, make_frames
from transformers_videorefer import convert
from transformers_videorefer.convert import (
    add_convert_parser,
    convert_checkpoint,
    convert_upstream_config,
    tower_to_native_key,
    upstream_to_native_key,
)
from transformers_videorefer.processing_videorefer import CHAT_TEMPLATE
from transformers_videorefer.tiny import build_tiny_tokenizer


timm_regnet = pytest.importorskip("timm.models.regnet", reason="timm is the reference for the STC connector")
LayerNorm2d = pytest.importorskip("timm.layers").LayerNorm2d


VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
IMAGE_SIZE, PATCH_SIZE, NUM_FRAMES = 56, 14, 4
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------- upstream-format builder


def upstream_tokenizer(with_region: bool = True) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer as the upstream training leaves it: Qwen2's special tokens plus `<region>` (no <image>/<video>)."""
    tiny = build_tiny_tokenizer()
    model = json.loads(tiny.backend_tokenizer.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(pair) for pair in model["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if with_region:
        tokenizer.add_tokens("<region>", special_tokens=True)
    tokenizer.chat_template = QWEN2_TEMPLATE
    return tokenizer


class UpstreamConnector(nn.Module):
    """The upstream STC connector's structure and forward, built from timm's RegStage (the released parameter names)."""

    def __init__(self, vision_size: int, text_size: int, padding: int):
        super().__init__()
        stage = {"stride": 1, "dilation": 1, "act_layer": nn.SiLU, "norm_layer": LayerNorm2d}
        self.s1 = timm_regnet.RegStage(depth=4, in_chs=vision_size, out_chs=text_size, **stage)
        self.sampler = nn.Sequential(nn.Conv3d(text_size, text_size, 2, stride=2, padding=padding), nn.SiLU())
        self.s2 = timm_regnet.RegStage(depth=4, in_chs=text_size, out_chs=text_size, **stage)
        self.readout = nn.Sequential(nn.Linear(text_size, text_size), nn.GELU(), nn.Linear(text_size, text_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [b, t, h*w, d] -> [b, tokens, text]
        batch, frames, patches, _ = features.shape
        side = int(patches**0.5)
        x = features.unflatten(2, (side, side)).flatten(0, 1).permute(0, 3, 1, 2)  # (b t) d h w
        x = self.s1(x)
        x = x.unflatten(0, (batch, frames)).transpose(1, 2)  # b d t h w
        x = self.sampler(x)
        new_frames = x.shape[2]
        x = self.s2(x.transpose(1, 2).flatten(0, 1))  # (b t) d h w
        x = x.unflatten(0, (batch, new_frames)).permute(0, 1, 3, 4, 2).flatten(1, 3)  # b (t h w) d
        return self.readout(x)


def reference_region_tokens(frame_features, masks, encoder_mlp, num_tokens=4):
    """Upstream object encoding, object by object: bilinear mask resize > 0, mean pooling, adjacent-similarity token
    merge of k > num_tokens frames (ties merge too), MLP. `masks` holds per object a list of (frame, mask)."""
    side = int(frame_features.shape[1] ** 0.5)
    tokens = []
    for object_masks in masks:
        pooled = []
        for frame, mask in object_masks:
            grid = F.interpolate(torch.as_tensor(mask, dtype=torch.float32)[None, None], (side, side), mode="bilinear")
            inside = (grid[0, 0] > 0).flatten().float()
            pooled.append((frame_features[frame] * inside[:, None]).sum(0) / (inside.sum() + 1e-8))
        pooled = torch.stack(pooled)
        if len(pooled) > num_tokens:
            unit = F.normalize(pooled, dim=-1)
            similarity = (unit[:-1] * unit[1:]).sum(-1)
            threshold = similarity.sort(descending=True).values[len(pooled) - num_tokens - 1]
            groups, current = [], [pooled[0]]
            for index in range(1, len(pooled)):
                if similarity[index - 1] < threshold:
                    groups.append(torch.stack(current).mean(0))
                    current = []
                current.append(pooled[index])
            pooled = torch.stack([*groups, torch.stack(current).mean(0)])
        tokens.append(pooled)
    return encoder_mlp(torch.cat(tokens))


def randomize(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_norm_weight = name.endswith("weight") and parameter.dim() == 1
            parameter.copy_(1 + 0.1 * noise if is_norm_weight else 0.1 * noise)


def build_upstream(
    root: Path,
    *,
    projector: str = "stc_connector_v35",
    extra_vocab_rows: int = 0,
    num_shards: int = 3,
    seed: int = 0,
) -> dict:
    """Writes a tiny upstream-format VideoRefer checkpoint (and its SigLIP folder) and returns the reference modules."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = upstream_tokenizer()
    vision_config = SiglipVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    tower = SiglipVisionModel(vision_config).eval()
    connector = UpstreamConnector(VISION["hidden_size"], TEXT["hidden_size"], {"stc_connector": 1}.get(projector, 0))
    if projector == "stp_connector":
        connector.sampler[0] = nn.AvgPool3d(2)
    region_mlp = nn.Sequential(
        nn.Linear(VISION["hidden_size"], TEXT["hidden_size"]),
        nn.GELU(),
        nn.Linear(TEXT["hidden_size"], TEXT["hidden_size"]),
    )
    vocab_size = len(tokenizer) + extra_vocab_rows
    text_fields = dict(
        TEXT, vocab_size=vocab_size, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )  # fmt: skip
    language_model = Qwen2ForCausalLM(Qwen2Config(**text_fields)).eval()
    for module in (tower, connector, region_mlp, language_model):
        randomize(module, generator)

    tower_dir = root / "siglip-tiny"
    tower_dir.mkdir(parents=True)
    vision_config.save_pretrained(tower_dir)
    save_file(
        {f"vision_model.{key}": value for key, value in tower.state_dict().items()}, tower_dir / "model.safetensors"
    )
    (tower_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                    "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255})
    )  # fmt: skip

    tensors = {f"model.mm_projector.{key}": value for key, value in connector.state_dict().items()}
    tensors |= {f"model.region_encoder.feat_linear.{key}": value for key, value in region_mlp.state_dict().items()}
    tensors |= dict(language_model.state_dict())  # model.embed_tokens..., model.layers..., lm_head.weight
    tensors |= {
        f"model.vision_tower.vision_tower.vision_model.{key}": value for key, value in tower.state_dict().items()
    }
    tensors = {key: value.contiguous() for key, value in tensors.items()}

    checkpoint = root / "videorefer"
    checkpoint.mkdir()
    write_shards(checkpoint, tensors, num_shards)
    config = {
        **text_fields,
        "model_type": "videorefer_qwen2", "architectures": ["VideoReferQwen2ForCausalLM"], "hidden_act": "silu",
        "rope_scaling": None, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
        "mm_vision_tower": str(tower_dir), "mm_projector_type": projector,
        "mm_hidden_size": VISION["hidden_size"], "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_region_encoder_type": "pooling", "image_aspect_ratio": "square", "num_frames": NUM_FRAMES,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False, "tune_region_encoder": False, "freeze_mm_mlp_adapter": False,
        "mm_projector_lr": None, "tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048,
        "transformers_version": "4.46.3",
    }  # fmt: skip
    (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    (checkpoint / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.05, "eos_token_id": 0}))
    tokenizer.save_pretrained(checkpoint)
    return {
        "checkpoint": checkpoint, "tower_dir": tower_dir, "tensors": tensors, "tokenizer": tokenizer, "tower": tower,
        "connector": connector, "region_mlp": region_mlp, "language_model": language_model, "vocab_size": vocab_size,
    }  # fmt: skip


def write_shards(folder: Path, tensors: dict, num_shards: int) -> None:
    keys = sorted(tensors)
    shards = [keys[index::num_shards] for index in range(num_shards)]
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
        save_file({key: tensors[key] for key in shard}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    return build_upstream(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def converted(upstream, tmp_path_factory):
    output = convert_checkpoint(upstream["checkpoint"], tmp_path_factory.mktemp("converted") / "out")
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    return output, model, AutoProcessor.from_pretrained(output)


# ----------------------------------------------------------------------------------------------------------- mapping


def test_upstream_names_map_to_native_names():
    assert upstream_to_native_key("model.mm_projector.s1.b2.se.fc1.weight") == "model.connector.s1.b2.se.fc1.weight"
    assert upstream_to_native_key("model.mm_projector.sampler.0.bias") == "model.connector.sampler.0.bias"
    assert upstream_to_native_key("model.region_encoder.feat_linear.2.weight") == "model.object_encoder.mlp.2.weight"
    assert (
        upstream_to_native_key("model.layers.3.mlp.up_proj.weight")
        == "model.language_model.layers.3.mlp.up_proj.weight"
    )
    assert upstream_to_native_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert upstream_to_native_key("lm_head.weight") == "lm_head.weight"
    tower_key = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert upstream_to_native_key(tower_key) == "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert tower_to_native_key("vision_model.post_layernorm.bias") == "model.vision_tower.post_layernorm.bias"
    assert (
        tower_to_native_key("embeddings.patch_embedding.weight")
        == "model.vision_tower.embeddings.patch_embedding.weight"
    )
    assert tower_to_native_key("text_model.embeddings.token_embedding.weight") is None
    assert tower_to_native_key("logit_scale") is None


def _assert_same_state(native: nn.Module, reference: nn.Module) -> None:
    """Same parameter names, shapes and values."""
    native_state, reference_state = native.state_dict(), reference.state_dict()
    assert sorted(native_state) == sorted(reference_state)
    for key, value in reference_state.items():
        torch.testing.assert_close(native_state[key], value, rtol=0, atol=0, msg=key)


def test_every_upstream_tensor_lands_in_its_native_parameter(upstream, converted):
    _, model, _ = converted
    # Relative names inside each part are the reference modules' own (timm RegStage, SigLIP, Qwen2, Sequential MLP).
    _assert_same_state(model.model.connector, upstream["connector"])
    _assert_same_state(model.model.object_encoder.mlp, upstream["region_mlp"])
    _assert_same_state(model.model.vision_tower, upstream["tower"])
    _assert_same_state(model.model.language_model, upstream["language_model"].model)
    _assert_same_state(model.lm_head, upstream["language_model"].lm_head)
    # The vocabulary is the upstream one: no rows are added for the <image>/<video> placeholders.
    assert model.config.text_config.vocab_size == upstream["vocab_size"]
    # Exactly once: as many converted values as upstream values.
    converted_numel = sum(tensor.numel() for tensor in model.state_dict().values())
    upstream_numel = sum(tensor.numel() for tensor in upstream["tensors"].values())
    assert converted_numel == upstream_numel


def test_each_output_shard_holds_exactly_one_input_shard(upstream, converted):
    output, _, _ = converted
    weight_map = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    written = {}
    for key, file in weight_map.items():
        written.setdefault(file, set()).add(key)
    for file, keys in written.items():
        with safe_open(output / file, framework="pt") as shard:
            assert set(shard.keys()) == keys
    # The tower comes from mm_vision_tower's folder, as upstream inference loads it: one shard of its own.
    expected = [{f"model.vision_tower.{key}" for key in upstream["tower"].state_dict()}]
    for file in sorted(upstream["checkpoint"].glob("model-*.safetensors")):
        with safe_open(file, framework="pt") as shard:
            keys = [key for key in shard.keys() if not key.startswith("model.vision_tower.")]
        expected.append({upstream_to_native_key(key) for key in keys})
    assert sorted(map(sorted, written.values())) == sorted(map(sorted, expected))
    for name in ("config.json", "generation_config.json", "processor_config.json", "chat_template.jinja",
                 "tokenizer.json", "modeling_videorefer.py", "configuration_videorefer.py"):  # fmt: skip
        assert (output / name).is_file(), name


# ---------------------------------------------------------------------------------------------------------- config


def test_config_tokenizer_processor_and_generation_config(upstream, converted):
    output, model, processor = converted
    config, tokenizer = model.config, processor.tokenizer
    assert config.model_type == "videorefer"
    assert config.connector_type == "stc_connector_v35"
    assert (config.connector_depth, config.connector_downsample, config.connector_mlp_depth) == (4, [2, 2, 2], 2)
    assert (config.object_encoder_depth, config.num_region_tokens) == (2, 4)
    assert config.vision_feature_layer == -2 and config.num_frames == NUM_FRAMES
    assert config.vision_config.hidden_size == VISION["hidden_size"]
    assert config.vision_config.image_size == IMAGE_SIZE
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (64, 2, 2)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    assert text.eos_token_id == upstream["tokenizer"].convert_tokens_to_ids("<|im_end|>")
    assert not hasattr(text, "mm_projector_type") and not hasattr(text, "tune_mm_mlp_adapter")
    # Tokens: the upstream ids are kept, <image> and <video> come next, past the upstream vocabulary.
    region = upstream["tokenizer"].convert_tokens_to_ids("<region>")
    assert config.region_token_id == tokenizer.convert_tokens_to_ids("<region>") == region
    assert (config.image_token_id, config.video_token_id) == (upstream["vocab_size"], upstream["vocab_size"] + 1)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [config.image_token_id, config.video_token_id]
    text_prompt = "What is <region> doing? It moves left."
    assert tokenizer(text_prompt)["input_ids"] == upstream["tokenizer"](text_prompt)["input_ids"]
    assert processor.chat_template == CHAT_TEMPLATE
    assert processor.num_frames == NUM_FRAMES
    assert (processor.image_processor.size["height"], processor.image_processor.size["width"]) == (IMAGE_SIZE,) * 2
    # The upstream prompt (Qwen2 template on "<video>\n" + question) is the processor's chat template output.
    question = "Describe the [<region>] in detail in the video."
    upstream_prompt = upstream["tokenizer"].apply_chat_template(
        [{"role": "user", "content": "<video>\n" + question}], tokenize=False, add_generation_prompt=True
    )
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == upstream_prompt
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["repetition_penalty"] == 1.05 and generation["do_sample"] is False
    # <image> and <video> have no logits to suppress; <region> has one.
    assert generation["suppress_tokens"] == [region]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model_type", "llava", "model_type"),
        ("mm_projector_type", "mlp2x_gelu", "mm_projector_type = 'mlp2x_gelu'"),
        ("mm_projector_type", "spatial_pool", "mm_projector_type = 'spatial_pool'"),
        ("image_aspect_ratio", "pad", "image_aspect_ratio = 'pad'"),
        ("mm_region_encoder_type", "onefusion", "mm_region_encoder_type = 'onefusion'"),
        ("mm_vision_select_feature", "cls_patch", "mm_vision_select_feature = 'cls_patch'"),
        ("mm_vision_tower", "openai/clip-vit-large-patch14-336", "not a SigLIP tower"),
        ("mm_hidden_size", 48, "mm_hidden_size = 48"),
        ("mm_hidden_size", None, "'mm_hidden_size' is missing"),
        ("image_aspect_ratio", None, "'image_aspect_ratio' is missing"),
    ],
)
def test_unsupported_config_values_are_named(upstream, field, value, message):
    config = json.loads((upstream["checkpoint"] / "config.json").read_text())
    config[field] = value
    vision = {"model_type": "siglip_vision_model", **VISION}
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_upstream_config(config, vision, region_token_id=5, image_token_id=600, video_token_id=601)


def test_missing_num_frames_takes_the_upstream_default_and_vocab_size_is_kept(upstream):
    config = json.loads((upstream["checkpoint"] / "config.json").read_text())
    del config["num_frames"]
    vision = {"model_type": "siglip_vision_model", **VISION}
    vocab_size = config["vocab_size"]
    # Placeholder ids past the vocabulary (the releases) and inside it (spare rows): the vocabulary never changes.
    for image_token_id in (vocab_size, vocab_size - 2):
        converted = convert_upstream_config(
            config, vision, region_token_id=5, image_token_id=image_token_id, video_token_id=image_token_id + 1
        )
        assert converted.num_frames == 8
        assert converted.text_config.vocab_size == vocab_size
        assert (converted.image_token_id, converted.video_token_id) == (image_token_id, image_token_id + 1)


def test_region_id_outside_the_vocabulary_is_an_error(upstream):
    config = json.loads((upstream["checkpoint"] / "config.json").read_text())
    vision = {"model_type": "siglip_vision_model", **VISION}
    with pytest.raises(ValueError, match="vocab_size"):
        convert_upstream_config(
            config, vision, region_token_id=config["vocab_size"], image_token_id=0, video_token_id=1
        )


# ---------------------------------------------------------------------------------------------------------- errors


def _copy_checkpoint(upstream, destination: Path, edit_tensors=None, edit_config=None) -> Path:
    destination.mkdir()
    tensors = dict(upstream["tensors"])
    if edit_tensors:
        edit_tensors(tensors)
    write_shards(destination, tensors, 2)
    config = json.loads((upstream["checkpoint"] / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (destination / "config.json").write_text(json.dumps(config))
    upstream["tokenizer"].save_pretrained(destination)
    return destination


def test_unknown_missing_and_misshaped_tensors_are_named(upstream, tmp_path):
    def edit(tensors):
        tensors["model.mm_projector.s3.b1.conv1.conv.weight"] = torch.zeros(1)
        del tensors["model.region_encoder.feat_linear.2.bias"]
        tensors["model.norm.weight"] = torch.ones(TEXT["hidden_size"] + 1)

    source = _copy_checkpoint(upstream, tmp_path / "broken", edit_tensors=edit)
    with pytest.raises(ValueError) as error:
        convert_checkpoint(source, tmp_path / "out")
    message = str(error.value)
    assert "model.mm_projector.s3.b1.conv1.conv.weight" in message
    assert "model.object_encoder.mlp.2.bias" in message
    assert "model.norm.weight has shape [65]" in message
    assert not (tmp_path / "out").exists()


def test_recomputed_buffers_of_older_checkpoints_are_accepted(upstream, tmp_path):
    def edit(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(16)[None]

    source = _copy_checkpoint(upstream, tmp_path / "old", edit_tensors=edit)
    convert_checkpoint(source, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


def test_tokenizer_without_region_and_non_empty_output_are_errors(upstream, tmp_path):
    source = _copy_checkpoint(upstream, tmp_path / "no-region")
    upstream_tokenizer(with_region=False).save_pretrained(source)
    with pytest.raises(ValueError, match="no <region> token"):
        convert_checkpoint(source, tmp_path / "out")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        convert_checkpoint(upstream["checkpoint"], occupied)
    with pytest.raises(ValueError, match="dtype"):
        convert_checkpoint(upstream["checkpoint"], tmp_path / "out2", dtype="int8")


# ------------------------------------------------------------------------------------------------------ tower sources


def test_tower_from_mm_vision_tower_wins_over_a_differing_copy(upstream, tmp_path):
    def edit(tensors):
        key = "model.vision_tower.vision_tower.vision_model.post_layernorm.bias"
        tensors[key] = tensors[key] + 1

    source = _copy_checkpoint(upstream, tmp_path / "edited-copy", edit_tensors=edit)
    with CaptureLogger(convert.logger) as captured:
        convert_checkpoint(source, tmp_path / "out")
    assert "differ from mm_vision_tower" in captured.out and "post_layernorm.bias" in captured.out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    _assert_same_state(model.model.vision_tower, upstream["tower"])


def test_checkpoint_copy_is_converted_when_the_tower_cannot_be_found(upstream, tmp_path, monkeypatch):
    monkeypatch.setitem(convert.KNOWN_VISION_TOWERS, "test/siglip-tiny", {"model_type": "siglip_vision_model", **VISION,
                        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE})  # fmt: skip

    def offline(repo_id, patterns, name):
        raise ValueError(f"{name}: {repo_id!r} cannot be fetched (offline)")

    monkeypatch.setattr(convert, "_download", offline)
    source = _copy_checkpoint(
        upstream, tmp_path / "hub-tower", edit_config=lambda c: c.update(mm_vision_tower="test/siglip-tiny")
    )
    with CaptureLogger(convert.logger) as captured:
        convert_checkpoint(source, tmp_path / "out", dtype="bfloat16")
    assert "converting the checkpoint's own copy" in captured.out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == torch.bfloat16
    for key, value in upstream["tower"].state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], value.to(torch.bfloat16)), key

    without_copy = _copy_checkpoint(
        upstream, tmp_path / "no-tower", edit_tensors=lambda t: [t.pop(k) for k in list(t) if "vision_tower" in k],
        edit_config=lambda c: c.update(mm_vision_tower="test/siglip-tiny"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="parameters that no tensor fills.*model.vision_tower"):
        convert_checkpoint(without_copy, tmp_path / "out2")
    unknown = _copy_checkpoint(
        upstream, tmp_path / "unknown", edit_config=lambda c: c.update(mm_vision_tower="me/siglip-x")
    )
    with pytest.raises(ValueError, match="pass --vision-tower"):
        convert_checkpoint(unknown, tmp_path / "out3")


def test_explicit_full_siglip_tower_and_checkpoint_without_tower(upstream, tmp_path):
    source = _copy_checkpoint(
        upstream, tmp_path / "no-tower", edit_tensors=lambda t: [t.pop(k) for k in list(t) if "vision_tower" in k],
        edit_config=lambda c: c.update(mm_vision_tower="google/siglip-somewhere-else"),
    )  # fmt: skip
    # A full SigLIP folder: vision config nested in a "siglip" config, text tower and logit scale beside the vision one.
    tower_dir = tmp_path / "siglip-full"
    tower_dir.mkdir()
    vision = json.loads((upstream["tower_dir"] / "config.json").read_text())
    (tower_dir / "config.json").write_text(
        json.dumps({"model_type": "siglip", "vision_config": vision, "text_config": {}})
    )
    with safe_open(upstream["tower_dir"] / "model.safetensors", framework="pt") as tower:
        tensors = {key: tower.get_tensor(key) for key in tower.keys()}
    tensors |= {"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2), "logit_scale": torch.zeros(1)}
    save_file(tensors, tower_dir / "model.safetensors")
    convert_checkpoint(source, tmp_path / "out", vision_tower=tower_dir)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    _assert_same_state(model.model.vision_tower, upstream["tower"])
    assert model.config.vision_config.hidden_size == VISION["hidden_size"]


def test_only_siglip_towers_are_accepted():
    with pytest.raises(ValueError, match="only SigLIP towers.*'clip_vision_model'"):
        convert.vision_config_from_tower_config({"model_type": "clip_vision_model", "hidden_size": 8})


# ---------------------------------------------------------------------------------------------------------- numbers


def test_connector_and_object_encoder_match_the_upstream_computation(upstream, converted):
    _, model, _ = converted
    generator = torch.Generator().manual_seed(1)
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    features = torch.randn(2, NUM_FRAMES, patches, VISION["hidden_size"], generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(
            model.model.connector(features), upstream["connector"](features), rtol=1e-5, atol=1e-5
        )

    frame_features = torch.randn(7, patches, VISION["hidden_size"], generator=generator)
    height, width = 30, 44
    masks = [
        [(2, box_mask(height, width, 3, 5, 20, 30))],  # single frame
        [(frame, box_mask(height, width, frame, 2 * frame, 12 + frame, 20 + 3 * frame)) for frame in range(6)],  # k=6
        [(1, box_mask(height, width, 0, 0, 9, 9)), (4, box_mask(height, width, 10, 10, 30, 44))],  # k=2
    ]
    flat = [(obj, frame, mask) for obj, object_masks in enumerate(masks) for frame, mask in object_masks]
    with torch.no_grad():
        native = model.model.object_encoder(
            frame_features,
            torch.as_tensor(np.stack([mask for _, _, mask in flat])),
            torch.tensor([[height, width]] * len(flat)),
            torch.tensor([frame for _, frame, _ in flat]),
            torch.tensor([obj for obj, _, _ in flat]),
        )
        reference = reference_region_tokens(frame_features, masks, upstream["region_mlp"])
    assert native.shape == (1 + 4 + 2, TEXT["hidden_size"])
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def region_inputs(converted):
    """Processor inputs for a single-frame and a multi-frame (k = 6 > 4, token merge) region, and the regions."""
    _, _, processor = converted
    frames = make_frames(12, 30, 44, seed=3)
    single = {5: box_mask(30, 44, 4, 6, 20, 30)}
    multi = {frame: box_mask(30, 44, frame, frame, 14 + frame, 24 + 2 * frame) for frame in (0, 2, 4, 6, 8, 10)}
    question = "There are two objects: <object0> [<region>], <object1> [<region>]. How do they interact?"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(videos=frames, masks=[single, multi], text=prompt, return_tensors="pt"), [single, multi]


def reference_input_embeddings(upstream: dict, config, inputs, regions: list[dict]) -> torch.Tensor:
    """The prompt's input embeddings computed from the upstream modules: the tower's second-to-last layer through the
    upstream connector for the video placeholders, the reference object encoding for the region placeholders."""
    tower, connector, language_model = upstream["tower"], upstream["connector"], upstream["language_model"]
    video = inputs["pixel_values_videos"][0]
    video_tokens = connector(tower(video, output_hidden_states=True).hidden_states[-2][None])[0]
    region_frames = sorted({frame for region in regions for frame in region})
    frame_features = tower(inputs["region_pixel_values"][0], output_hidden_states=True).hidden_states[-2]
    masks = [[(region_frames.index(frame), mask) for frame, mask in sorted(region.items())] for region in regions]
    region_tokens = reference_region_tokens(frame_features, masks, upstream["region_mlp"])
    input_ids = inputs["input_ids"][0]
    is_video, is_region = input_ids == config.video_token_id, input_ids == config.region_token_id
    assert int(is_video.sum()) == len(video_tokens) and int(is_region.sum()) == len(region_tokens)
    embeddings = language_model.model.embed_tokens(input_ids.masked_fill(is_video | is_region, 0))
    embeddings[is_video] = video_tokens
    embeddings[is_region] = region_tokens
    return embeddings


def test_logits_match_a_reference_built_from_the_upstream_tensors(upstream, converted, region_inputs):
    """End to end through the processor: the full logits, of the upstream vocabulary's width, are the reference's."""
    _, model, _ = converted
    inputs, regions = region_inputs
    assert model.config.video_token_id >= upstream["vocab_size"]  # the placeholder is past the vocabulary
    with torch.no_grad():
        logits = model(**inputs).logits
        embeddings = reference_input_embeddings(upstream, model.config, inputs, regions)
        reference = upstream["language_model"](inputs_embeds=embeddings[None]).logits
    assert int((inputs["input_ids"] == model.config.region_token_id).sum()) == 1 + 4
    assert logits.shape == reference.shape == (1, inputs["input_ids"].shape[1], upstream["vocab_size"])
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_generation_with_the_converted_generation_config_matches_a_reference_greedy_loop(
    upstream, converted, region_inputs
):
    """`generate` with the written generation config (repetition penalty 1.05, <region> suppressed) on a prompt whose
    <video> ids lie past the vocabulary, against greedy decoding by hand on the upstream language model."""
    _, model, _ = converted
    inputs, regions = region_inputs
    num_new_tokens, penalty = 20, model.generation_config.repetition_penalty
    assert penalty == 1.05
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=num_new_tokens)[0, inputs["input_ids"].shape[1] :]

        language_model = upstream["language_model"]
        embeddings = reference_input_embeddings(upstream, model.config, inputs, regions)
        seen = set(inputs["input_ids"][0].tolist())
        reference = []
        for _ in range(num_new_tokens):
            scores = language_model(inputs_embeds=embeddings[None]).logits[0, -1]
            repeated = torch.tensor(sorted(token for token in seen if token < len(scores)))
            scores[repeated] = torch.where(
                scores[repeated] < 0, scores[repeated] * penalty, scores[repeated] / penalty
            )
            scores[model.config.region_token_id] = -float("inf")
            token = int(scores.argmax())
            reference.append(token)
            if token in model.generation_config.eos_token_id:
                break
            seen.add(token)
            embeddings = torch.cat([embeddings, language_model.model.embed_tokens(torch.tensor([token]))])
    assert generated.tolist() == reference
    assert all(token < upstream["vocab_size"] for token in reference)


@pytest.mark.parametrize("projector", ["stc_connector", "stp_connector"])
def test_other_connectors_convert_and_match(projector, tmp_path):
    upstream = build_upstream(tmp_path, projector=projector, extra_vocab_rows=5, num_shards=2, seed=2)
    output = convert_checkpoint(upstream["checkpoint"], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert model.config.connector_type == projector
    assert model.config.text_config.vocab_size == upstream["vocab_size"]  # spare rows: placeholders inside
    assert model.config.video_token_id < upstream["vocab_size"]
    placeholders = {model.config.region_token_id, model.config.image_token_id, model.config.video_token_id}
    assert set(model.generation_config.suppress_tokens) == placeholders
    features = torch.randn(1, NUM_FRAMES, (IMAGE_SIZE // PATCH_SIZE) ** 2, VISION["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(
            model.model.connector(features), upstream["connector"](features), rtol=1e-5, atol=1e-5
        )


# -------------------------------------------------------------------------------------------------------------- CLI


def test_convert_subcommand(upstream, tmp_path):
    parser = argparse.ArgumentParser(prog="videorefer")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    output = tmp_path / "cli-out"
    args = parser.parse_args(["convert", str(upstream["checkpoint"]), str(output), "--dtype", "bfloat16"])
    assert args.func(args) == 0
    with safe_open(output / "model-00001-of-00004.safetensors", framework="pt") as shard:
        assert all(shard.get_slice(key).get_dtype() == "BF16" for key in shard.keys())
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", str(upstream["checkpoint"]), str(output), "--dtype", "int8"])
