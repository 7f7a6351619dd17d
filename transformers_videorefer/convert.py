"""Conversion of the released VideoRefer checkpoints (upstream format, `model_type` `videorefer_qwen2`) to this package's
format: native parameter names, a `VideoReferConfig`, the processor, the chat template and a generation config.

The weights are streamed: each upstream safetensors shard becomes one output shard, written tensor by tensor, so the
memory a conversion needs is about its largest tensor (plus the pages of the shard being read), never the whole model.
"""

import argparse
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.utils import logging

from .configuration_videorefer import SIGLIP_SO400M_384, VideoReferConfig
from .modeling_videorefer import VideoReferForCausalLM
from .processing_videorefer import CHAT_TEMPLATE, PIXEL_SETTINGS
from .tiny import generation_config_for, processor_for_config


logger = logging.get_logger(__name__)

UPSTREAM_MODEL_TYPES = ("videorefer_qwen2", "videorefer")
SUPPORTED_PROJECTOR_TYPES = ("stc_connector", "stc_connector_v35", "stp_connector")
SUPPORTED_REGION_ENCODER_TYPES = ("pooling",)
SUPPORTED_ASPECT_RATIOS = ("square",)
# Fixed in the upstream code rather than stored in its config: the STC connector's stages and read-out, the object
# encoder's MLP depth and its token budget per object; and the frame count it uses when `num_frames` is absent.
UPSTREAM_FIXED_FIELDS = {
    "connector_depth": 4,
    "connector_downsample": [2, 2, 2],
    "connector_mlp_depth": 2,
    "object_encoder_depth": 2,
    "num_region_tokens": 4,
}
UPSTREAM_DEFAULT_NUM_FRAMES = 8
# The vision tower of every released checkpoint: its config is known, so an offline conversion still has it.
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": {"model_type": "siglip_vision_model", **SIGLIP_SO400M_384},
}
# Multimodal fields of the upstream config, read by `convert_upstream_config`.
MULTIMODAL_FIELDS = (
    "mm_vision_tower",
    "vision_tower",
    "mm_projector_type",
    "mm_hidden_size",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_region_encoder_type",
    "image_aspect_ratio",
    "num_frames",
)
# Training and bookkeeping fields of the upstream config that do not change what the model computes.
IGNORED_FIELDS = (
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "tune_region_encoder",
    "freeze_mm_mlp_adapter",
    "mm_projector_lr",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "architectures",
    "model_type",
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
)
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Generation settings that act in greedy decoding; the upstream `generate` inherits them from generation_config.json.
GREEDY_GENERATION_FIELDS = ("repetition_penalty", "no_repeat_ngram_size")
UPSTREAM_MAX_NEW_TOKENS = 2048
# Upstream parameter-name prefixes and their native replacements, most specific first.
UPSTREAM_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.", "model.connector."),
    ("model.region_encoder.feat_linear.", "model.object_encoder.mlp."),
    ("model.", "model.language_model."),
)
NATIVE_TOWER_PREFIX = "model.vision_tower."
# Buffers that older transformers versions saved and that the native model recomputes.
RECOMPUTED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
# Parts of a full SigLIP checkpoint that are not its vision tower.
SIGLIP_NON_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def upstream_to_native_key(key: str) -> str:
    """The native name of an upstream VideoRefer parameter name (whether the native model has it is checked later)."""
    for old, new in UPSTREAM_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def tower_to_native_key(key: str) -> str | None:
    """The native name of a parameter of a SigLIP checkpoint; `None` for its text half, which is not the tower."""
    if key.startswith(SIGLIP_NON_VISION_PREFIXES):
        return None
    return NATIVE_TOWER_PREFIX + key.removeprefix("vision_model.")


def vision_config_from_tower_config(tower_config: dict) -> dict:
    """The SigLIP vision config in a tower's `config.json`, which holds a full SigLIP config or a vision config."""
    model_type = tower_config.get("model_type")
    if model_type == "siglip":
        tower_config = {**tower_config.get("vision_config", {}), "model_type": "siglip_vision_model"}
    elif model_type != "siglip_vision_model":
        raise ValueError(
            "vision tower: only SigLIP towers are implemented (config.json model_type 'siglip' or "
            f"'siglip_vision_model'), got model_type {model_type!r}"
        )
    return {key: value for key, value in tower_config.items() if key == "model_type" or key not in IGNORED_FIELDS}


def convert_upstream_config(
    upstream_config: dict,
    vision_config: dict,
    *,
    region_token_id: int,
    image_token_id: int,
    video_token_id: int,
) -> VideoReferConfig:
    """
    Translates an upstream VideoRefer `config.json` (a Qwen2 config plus multimodal fields) into a `VideoReferConfig`.

    `mm_projector_type` becomes `connector_type`, `mm_vision_select_layer` `vision_feature_layer`, `num_frames` stays
    (8, the upstream default, when absent), the Qwen2 fields make `text_config`; the connector and object-encoder
    sizes that the upstream code fixes are set to its values. `text_config.vocab_size` stays the upstream one, so every
    token-indexed tensor keeps its shape. The `<image>` and `<video>` ids may lie past it (the upstream training sizes
    the embeddings to its tokenizer, which has neither token): the model never embeds nor predicts them.

    Args:
        upstream_config: the upstream `config.json` as a dict.
        vision_config: the SigLIP vision config of the tower (see `vision_config_from_tower_config`).
        region_token_id, image_token_id, video_token_id: the placeholder ids of the converted tokenizer.

    Raises:
        ValueError: naming the field, for a missing required field or a value this package does not implement (model
            type, projector, region encoder, aspect ratio, vision feature, a tower other than SigLIP, an
            `mm_hidden_size` that is not the tower's width, a `vocab_size` without the `<region>` row).
    """
    model_type = upstream_config.get("model_type")
    if model_type not in UPSTREAM_MODEL_TYPES:
        raise ValueError(f"config.json: model_type must be one of {UPSTREAM_MODEL_TYPES}, got {model_type!r}")
    for required in (
        "vocab_size",
        "mm_projector_type",
        "mm_hidden_size",
        "mm_vision_select_layer",
        "image_aspect_ratio",
    ):
        if upstream_config.get(required) is None:
            raise ValueError(f"config.json: the upstream field {required!r} is missing; conversion needs it")
    tower_name = str(upstream_config.get("mm_vision_tower") or upstream_config.get("vision_tower") or "")
    if "siglip" not in tower_name.lower():
        raise ValueError(
            f"config.json: mm_vision_tower = {tower_name!r} is not a SigLIP tower; only SigLIP is implemented"
        )
    checks = (
        ("mm_projector_type", upstream_config["mm_projector_type"], SUPPORTED_PROJECTOR_TYPES),
        (
            "mm_region_encoder_type",
            upstream_config.get("mm_region_encoder_type", "pooling"),
            SUPPORTED_REGION_ENCODER_TYPES,
        ),
        ("image_aspect_ratio", upstream_config["image_aspect_ratio"], SUPPORTED_ASPECT_RATIOS),
        ("mm_vision_select_feature", upstream_config.get("mm_vision_select_feature", "patch"), ("patch",)),
    )
    for name, value, supported in checks:
        if value not in supported:
            raise ValueError(
                f"config.json: {name} = {value!r} is not implemented by this package (supported: {supported})"
            )
    if upstream_config["mm_hidden_size"] != vision_config.get("hidden_size"):
        raise ValueError(
            f"config.json: mm_hidden_size = {upstream_config['mm_hidden_size']} is not the vision tower's hidden_size "
            f"({vision_config.get('hidden_size')})"
        )
    upstream_vocab_size = upstream_config["vocab_size"]
    if not 0 <= region_token_id < upstream_vocab_size:
        raise ValueError(
            f"config.json: vocab_size = {upstream_vocab_size} has no row for the tokenizer's <region> (id {region_token_id})"
        )

    not_text = {*MULTIMODAL_FIELDS, *IGNORED_FIELDS, *GenerationConfig().to_dict()} - set(TOKEN_ID_FIELDS)
    text_config = {key: value for key, value in upstream_config.items() if key not in not_text}
    if text_config.get("rope_scaling") is None:
        text_config.pop("rope_scaling", None)
    text_config["model_type"] = "qwen2"
    return VideoReferConfig(
        vision_config=vision_config,
        text_config=text_config,
        num_frames=upstream_config.get("num_frames") or UPSTREAM_DEFAULT_NUM_FRAMES,
        vision_feature_layer=upstream_config["mm_vision_select_layer"],
        connector_type=upstream_config["mm_projector_type"],
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        region_token_id=region_token_id,
        tie_word_embeddings=upstream_config.get("tie_word_embeddings", False),
        **UPSTREAM_FIXED_FIELDS,
    )


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _safetensors_files(folder: Path, name: str) -> list[Path]:
    """The safetensors shards of a folder in index order (or its single file); empty when it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{name}: {index} has no weight_map")
        files = [folder / shard for shard in dict.fromkeys(weight_map.values())]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise ValueError(f"{name}: shards listed in {index.name} are missing: {missing}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("*.bin")):
        raise ValueError(f"{name}: {folder} holds PyTorch .bin weights only; the conversion reads safetensors")
    return []


def _download(repo_id: str, patterns: list[str], name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repository, not a repository id, no access
        raise ValueError(
            f"{name}: {repo_id!r} is not a local folder and cannot be fetched from the hub ({error})"
        ) from error


@dataclass
class VisionTowerSource:
    """Where the vision tower's config, pixel settings and weights come from (`weight_files` empty: none found)."""

    origin: str
    config: dict
    pixel_settings: dict | None = None
    weight_files: list[Path] = field(default_factory=list)


def _tower_from_folder(folder: Path, origin: str) -> VisionTowerSource:
    if not (folder / "config.json").is_file():
        raise ValueError(f"vision tower: {folder} has no config.json")
    preprocessor = folder / "preprocessor_config.json"
    return VisionTowerSource(
        origin=origin,
        config=vision_config_from_tower_config(_read_json(folder / "config.json")),
        pixel_settings=_read_json(preprocessor) if preprocessor.is_file() else None,
        weight_files=_safetensors_files(folder, "vision tower"),
    )


def resolve_vision_tower(upstream_config: dict, vision_tower: str | os.PathLike | None = None) -> VisionTowerSource:
    """
    Finds the vision tower as the upstream code loads it at inference: `vision_tower` (a folder or hub id) when given,
    else the one `mm_vision_tower` names, a local folder or a hub id. A known tower that cannot be fetched keeps its
    built-in config and no weights (the checkpoint's own copy is converted then).
    """
    if vision_tower is not None:
        folder = Path(vision_tower)
        if not folder.is_dir():
            folder = _download(str(vision_tower), ["*.json", "*.safetensors"], "--vision-tower")
        return _tower_from_folder(folder, f"--vision-tower {vision_tower}")
    name = upstream_config.get("mm_vision_tower") or upstream_config.get("vision_tower")
    if not name:
        raise ValueError("config.json names no vision tower (mm_vision_tower): pass --vision-tower")
    if Path(name).is_dir():
        return _tower_from_folder(Path(name), f"mm_vision_tower {name}")
    try:
        return _tower_from_folder(
            _download(name, ["*.json", "*.safetensors"], "mm_vision_tower"), f"mm_vision_tower {name}"
        )
    except ValueError as error:
        if name not in KNOWN_VISION_TOWERS:
            raise ValueError(f"{error}; pass --vision-tower with a local SigLIP folder") from error
        logger.warning(f"{error}; using the built-in config of {name}")
        return VisionTowerSource(
            origin=f"mm_vision_tower {name} (built-in config)", config=dict(KNOWN_VISION_TOWERS[name])
        )


def _load_tokenizer(source: Path, vocab_size: int) -> Qwen2Tokenizer:
    """The upstream tokenizer with `<image>` and `<video>` added as special tokens and the processor's chat template."""
    tokenizer = Qwen2Tokenizer.from_pretrained(source)
    if "<region>" not in tokenizer.get_vocab():
        raise ValueError(f"tokenizer: {source} has no <region> token; is it an upstream VideoRefer checkpoint?")
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer: {source} has {len(tokenizer)} tokens but config.json's vocab_size is {vocab_size}: the "
            "tokenizer does not belong to these weights"
        )
    missing = [token for token in ("<image>", "<video>") if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _image_processor(tower: VisionTowerSource, image_size: int) -> SiglipImageProcessorPil | None:
    """The tower's pixel settings with the PIL backend (the release's resize), or `None` for SigLIP's defaults."""
    if tower.pixel_settings is None:
        return None
    settings = {key: tower.pixel_settings[key] for key in PIXEL_SETTINGS if key in tower.pixel_settings}
    image_processor = SiglipImageProcessorPil(**settings)
    size = image_processor.size
    if (size.get("height"), size.get("width")) != (image_size, image_size):
        raise ValueError(
            f"vision tower: preprocessor_config.json resizes to {dict(size)}, not to its image_size {image_size}"
        )
    return image_processor


def _generation_config(config: VideoReferConfig, tokenizer, source: Path) -> GenerationConfig:
    """Greedy decoding up to 2048 new tokens, as the upstream inference runs, with the settings of the checkpoint's
    generation_config.json that still act in greedy decoding (e.g. `repetition_penalty`)."""
    generation_config = generation_config_for(config, tokenizer)
    generation_config.max_new_tokens = UPSTREAM_MAX_NEW_TOKENS
    if (source / "generation_config.json").is_file():
        upstream = _read_json(source / "generation_config.json")
        for name in GREEDY_GENERATION_FIELDS:
            if upstream.get(name) is not None:
                setattr(generation_config, name, upstream[name])
    return generation_config


def _tensor_infos(path: Path) -> Iterator[tuple[str, list[int], str]]:
    """(key, shape, safetensors dtype) of every tensor of a shard, read from its header only."""
    with safe_open(path, framework="pt") as shard:
        for key in shard.keys():
            tensor_slice = shard.get_slice(key)
            yield key, tensor_slice.get_shape(), tensor_slice.get_dtype()


@dataclass
class _PlannedShard:
    """An input shard: the tensors it writes (key -> native name) and its tower copies to check (key -> tower tensor)."""

    path: Path
    renames: dict[str, str] = field(default_factory=dict)
    tower_copies: dict[str, tuple[Path, str]] = field(default_factory=dict)


def _plan(source_files: list[Path], tower_files: list[Path], expected: dict[str, torch.Size]) -> list[_PlannedShard]:
    """
    Assigns every tensor to exactly one native parameter and checks names and shapes before anything is written.

    With `tower_files`, the tower parameters come from them and the checkpoint's copies of them are only compared.
    Raises `ValueError` naming every unknown, duplicated, missing and mis-shaped tensor.
    """
    producers: dict[str, str] = {}
    unknown, duplicates, shape_errors = [], [], []

    def claim(native: str, origin: str, shape: list[int], dtype: str) -> bool:
        if dtype not in SAFETENSORS_DTYPES:
            shape_errors.append(f"{origin} has dtype {dtype}, which the conversion does not read")
        if native not in expected:
            unknown.append(origin)
            return False
        if native in producers:
            duplicates.append(f"{origin} and {producers[native]} (both {native})")
            return False
        expected_shape = list(expected[native])
        if expected_shape != list(shape):
            shape_errors.append(f"{origin} has shape {list(shape)}, {native} needs {expected_shape}")
        producers[native] = origin
        return True

    tower_shards = [_PlannedShard(path) for path in tower_files]
    tower_tensors = {}
    for shard in tower_shards:
        for key, shape, dtype in _tensor_infos(shard.path):
            native = tower_to_native_key(key)
            if native is None or key.endswith(RECOMPUTED_BUFFER_SUFFIXES):
                continue
            if claim(native, f"vision tower {shard.path.name}:{key}", shape, dtype):
                shard.renames[key] = native
                tower_tensors[native] = (shard.path, key)

    source_shards = [_PlannedShard(path) for path in source_files]
    for shard in source_shards:
        for key, shape, dtype in _tensor_infos(shard.path):
            if key.endswith(RECOMPUTED_BUFFER_SUFFIXES):
                continue
            native = upstream_to_native_key(key)
            if tower_files and native.startswith(NATIVE_TOWER_PREFIX):
                if native not in tower_tensors:
                    unknown.append(f"{shard.path.name}:{key} (the vision tower has no {native})")
                else:
                    shard.tower_copies[key] = tower_tensors[native]
            elif claim(native, f"{shard.path.name}:{key}", shape, dtype):
                shard.renames[key] = native

    problems = []
    if unknown:
        problems.append(f"unknown tensors (no native parameter of that name): {unknown}")
    if duplicates:
        problems.append(f"tensors filling the same parameter twice: {duplicates}")
    missing = sorted(set(expected) - set(producers))
    if missing:
        problems.append(f"parameters that no tensor fills: {missing}")
    if shape_errors:
        problems.append(f"shape or dtype mismatches: {shape_errors}")
    if problems:
        raise ValueError("Cannot convert the checkpoint: " + "; ".join(problems))
    return source_shards + tower_shards


def _write_safetensors(path: Path, source, renames: dict[str, str], dtype: torch.dtype) -> int:
    """
    Writes the renamed tensors of an open shard to a safetensors file one tensor at a time: the header is computed
    from the shapes, then each tensor is read, cast and written before the next is read. Returns the data size.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, native in renames.items():
        tensor_slice = source.get_slice(key)
        shape = list(tensor_slice.get_shape())
        source_dtype = SAFETENSORS_DTYPES[tensor_slice.get_dtype()]
        out_dtype = dtype if source_dtype.is_floating_point else source_dtype
        size = out_dtype.itemsize * int(torch.Size(shape).numel())
        header[native] = {
            "dtype": SAFETENSORS_NAMES[out_dtype],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for key in renames:
            tensor = source.get_tensor(key)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def _same_weight(source, key: str, tower_file: Path, tower_key: str) -> bool:
    """Whether the checkpoint's copy of a tower weight is the tower's weight, cast to the copy's dtype."""
    copy = source.get_tensor(key)
    with safe_open(tower_file, framework="pt") as tower:
        original = tower.get_tensor(tower_key)
    return original.shape == copy.shape and torch.equal(original.to(copy.dtype), copy)


def _write_shards(
    shards: list[_PlannedShard], dtype: torch.dtype, folder: Path
) -> tuple[dict[str, str], int, list[str]]:
    """
    Streams the planned shards into `folder`, one output shard per input shard that has tensors to write.

    Returns the weight map, the total size in bytes, and the tower copies that differ from the tower's weights.
    """
    num_outputs = sum(1 for shard in shards if shard.renames)
    weight_map, total_size, differing = {}, 0, []
    for shard in shards:
        with safe_open(shard.path, framework="pt") as source:
            differing += [
                key for key, tower_tensor in shard.tower_copies.items() if not _same_weight(source, key, *tower_tensor)
            ]
            if not shard.renames:
                continue
            number = len(set(weight_map.values())) + 1
            name = "model.safetensors" if num_outputs == 1 else f"model-{number:05d}-of-{num_outputs:05d}.safetensors"
            total_size += _write_safetensors(folder / name, source, shard.renames, dtype)
        weight_map.update(dict.fromkeys(shard.renames.values(), name))
        logger.info(f"{shard.path.name} -> {name} ({len(shard.renames)} tensors)")
    return weight_map, total_size, differing


def _resolve_source(source: str | os.PathLike) -> Path:
    folder = Path(source)
    if folder.is_dir():
        return folder
    return _download(str(source), ["*.json", "*.safetensors", "*.txt", "*.jinja"], "source")


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    dtype: str = "auto",
    push_to_hub: str | None = None,
) -> Path:
    """
    Converts an upstream VideoRefer checkpoint into a folder that loads with `AutoModelForCausalLM` and
    `AutoProcessor`: config, safetensors shards and index, tokenizer, processor, chat template, generation config and
    the remote code (so that it also loads with `trust_remote_code=True` without this package).

    The vision tower's weights come from where the upstream code loads them at inference: `vision_tower` when given,
    else the tower `mm_vision_tower` names (a local folder or hub id). The checkpoint's own copy of the (frozen) tower
    is compared with them, and converted instead only when that tower cannot be found.

    Every upstream tensor keeps its shape, and `text_config.vocab_size` the upstream vocabulary size. The upstream
    training resizes the embeddings to its tokenizer, so the `<image>` and `<video>` placeholders this package adds
    to the tokenizer get ids past the vocabulary: the model never looks them up in the embeddings (it replaces
    placeholder embeddings) and has no logits for them, so the logits are exactly the upstream model's.

    Args:
        source: a local upstream checkpoint folder or a hub id (e.g. `DAMO-NLP-SG/VideoRefer-7B`).
        output_dir: the folder to write; it must not exist or be empty.
        vision_tower: a SigLIP folder (config.json, safetensors weights, preprocessor_config.json) or hub id.
        dtype: `"auto"` (the checkpoint's `torch_dtype`), `"float32"`, `"bfloat16"` or `"float16"`.
        push_to_hub: a hub repository id to upload the converted folder to.

    Raises:
        ValueError: for an unknown, missing, duplicated or mis-shaped tensor (all named), an upstream config value this
            package does not implement (named), a tokenizer without `<region>` or larger than the vocabulary, or a
            vision tower that cannot be found.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {dtype!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"output_dir {output_dir} already exists and is not an empty folder")
    source_dir = _resolve_source(source)
    if not (source_dir / "config.json").is_file():
        raise ValueError(f"source: {source_dir} has no config.json")
    upstream_config = _read_json(source_dir / "config.json")
    if not isinstance(upstream_config.get("vocab_size"), int):
        raise ValueError(f"source: {source_dir / 'config.json'} has no integer vocab_size")
    source_files = _safetensors_files(source_dir, "source")
    if not source_files:
        raise ValueError(f"source: {source_dir} has no safetensors weights")

    tower = resolve_vision_tower(upstream_config, vision_tower)
    tokenizer = _load_tokenizer(source_dir, upstream_config["vocab_size"])
    config = convert_upstream_config(
        upstream_config,
        tower.config,
        region_token_id=tokenizer.convert_tokens_to_ids("<region>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
    )
    with torch.device("meta"):
        meta_model = VideoReferForCausalLM(config)  # names and shapes, no memory
    expected = {name: tensor.shape for name, tensor in meta_model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    if not tower.weight_files:
        logger.warning(
            f"No weights found for the vision tower {tower.origin}: converting the checkpoint's own copy. The upstream "
            "code loads the tower's original weights at inference, which the copy may round (bf16); pass "
            "--vision-tower for exact parity"
        )
    shards = _plan(source_files, tower.weight_files, expected)

    declared = upstream_config.get("torch_dtype") or upstream_config.get("dtype")
    if dtype != "auto":
        target_dtype = DTYPES[dtype]
    elif declared in DTYPES:
        target_dtype = DTYPES[declared]
    else:
        stored = [SAFETENSORS_DTYPES.get(info[2]) for info in _tensor_infos(source_files[0])]
        target_dtype = next((d for d in stored if d is not None and d.is_floating_point), torch.float32)
    config.dtype = target_dtype
    processor = processor_for_config(config, tokenizer)
    image_processor = _image_processor(tower, config.vision_config.image_size)
    if image_processor is not None:
        processor.image_processor = image_processor

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".videorefer-convert-", dir=output_dir.parent))
    try:
        weight_map, total_size, differing = _write_shards(shards, target_dtype, staging)
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            with open(staging / "model.safetensors.index.json", "w", encoding="utf-8") as file:
                json.dump(index, file, indent=2)
        custom_object_save(meta_model, staging, config=config)
        config.save_pretrained(staging)
        _generation_config(config, tokenizer, source_dir).save_pretrained(staging)
        processor.save_pretrained(staging)
        output_dir.mkdir(exist_ok=True)
        for path in staging.iterdir():
            shutil.move(str(path), output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if differing:
        logger.warning(
            f"{len(differing)} tensors of the checkpoint's vision tower copy differ from {tower.origin} (first: "
            f"{differing[0]}); the converted model uses {tower.origin}, as the upstream code does at inference"
        )
    logger.info(f"Converted {source} to {output_dir} ({target_dtype})")

    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=output_dir)
    return output_dir


def _run_convert(args: argparse.Namespace) -> int:
    output = convert_checkpoint(
        args.source, args.output_dir, vision_tower=args.vision_tower, dtype=args.dtype, push_to_hub=args.push_to_hub
    )
    print(f"Converted checkpoint written to {output}")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `videorefer convert SRC OUT [--vision-tower DIR_OR_ID] [--dtype ...] [--push-to-hub ID]`."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a released (upstream-format) VideoRefer checkpoint to this package's format",
        description=(
            "Convert an upstream VideoRefer checkpoint (model_type videorefer_qwen2, e.g. DAMO-NLP-SG/VideoRefer-7B) "
            "into a folder that loads with AutoModelForCausalLM and AutoProcessor, streaming it shard by shard."
        ),
    )
    parser.add_argument("source", help="upstream checkpoint folder or hub id")
    parser.add_argument("output_dir", help="folder to write (must not exist or be empty)")
    parser.add_argument(
        "--vision-tower",
        default=None,
        metavar="DIR_OR_ID",
        help="SigLIP folder or hub id of the vision tower (default: the one config.json's mm_vision_tower names; the "
        "checkpoint's own copy when that cannot be found)",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="dtype of the written weights (auto: torch_dtype)"
    )
    parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="upload the converted folder to this repo"
    )
    parser.set_defaults(func=_run_convert)
    return parser


__all__ = [
    "VisionTowerSource",
    "add_convert_parser",
    "convert_checkpoint",
    "convert_upstream_config",
    "resolve_vision_tower",
    "tower_to_native_key",
    "upstream_to_native_key",
    "vision_config_from_tower_config",
]
