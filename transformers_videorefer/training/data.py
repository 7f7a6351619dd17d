"""Training data in VideoRefer's upstream JSON format: mixing datasets, lazy decoding, labels and batching."""

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from ..processing_videorefer import DEFAULT_SYSTEM_PROMPT


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
REGION_KEYS = ("annotation", "masks")
CONVERSATION_FORMATS = ("chat", "plain")
# Fill value of each batched input along its padded dimensions.
PAD_VALUES = {"labels": IGNORE_INDEX, "region_frame_ids": -1, "region_object_ids": -1}


@dataclass
class DatasetSource:
    """
    One dataset of a training mixture.

    Args:
        path: a JSON file holding a list of samples, or a JSONL file with one sample per line, in the upstream format.
        data_folder: folder that relative `video`/`image` paths start from; the JSON file's folder by default.
        ratio: share of the dataset used per epoch: 0.5 takes a seeded random half, 2.0 every sample twice.
        multi_frame_ratio: share of multi-frame regions kept multi-frame (the others keep one random frame);
            the mixture's `multi_frame_ratio` when unset.
        name: name in logs and sample ids; the file name without suffix by default.
    """

    path: str
    data_folder: str | None = None
    ratio: float = 1.0
    multi_frame_ratio: float | None = None
    name: str | None = None

    def __post_init__(self):
        if not os.path.isfile(self.path):
            raise ValueError(f"datasets: no such file {self.path!r}")
        if self.ratio <= 0:
            raise ValueError(f"datasets: ratio must be > 0, got {self.ratio} for {self.path!r}")
        if self.multi_frame_ratio is not None and not 0 <= self.multi_frame_ratio <= 1:
            raise ValueError(f"datasets: multi_frame_ratio must lie in [0, 1], got {self.multi_frame_ratio}")
        self.data_folder = self.data_folder or str(Path(self.path).parent)
        self.name = self.name or Path(self.path).stem


def parse_dataset_sources(value, data_folder: str | None = None) -> list[DatasetSource]:
    """
    The `datasets` argument as `DatasetSource`s: a list of dicts (YAML), a JSON/YAML string of that list (command
    line), or a list of JSON file paths. `data_folder` is the default folder of every source.
    """
    import yaml

    if isinstance(value, str):
        value = yaml.safe_load(value) if value.lstrip().startswith(("[", "{", "-")) else [value]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"datasets: expected a non-empty list of datasets, got {value!r:.200}")
    sources = []
    for entry in value:
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"datasets: each entry needs a `path` (JSON or JSONL file), got {entry!r:.200}")
        unknown = set(entry) - set(DatasetSource.__dataclass_fields__)
        if unknown:
            raise ValueError(f"datasets: unknown keys {sorted(unknown)} in {entry!r:.200}")
        sources.append(DatasetSource(**{"data_folder": data_folder, **entry}))
    return sources


def _read_samples(path: str) -> Iterator[dict]:
    """Samples of a JSON list file (read whole, then released) or of a JSONL file (read line by line)."""
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            for line in handle:
                if line.strip():
                    yield json.loads(line)
        else:
            samples = json.load(handle)
            if not isinstance(samples, list):
                raise ValueError(f"datasets: {path} must hold a JSON list of samples (or use .jsonl)")
            yield from samples


def _source_rows(path: str, source: int, name: str, data_folder: str, multi_frame_ratio: float, **_) -> Iterator[dict]:
    for row, sample in enumerate(_read_samples(path)):
        sample_id = str(sample.get("id", row)) if isinstance(sample, dict) else str(row)
        yield {
            "id": f"{name}/{sample_id}",
            "source": source,
            "data_folder": data_folder,
            "multi_frame_ratio": multi_frame_ratio,
            "sample": json.dumps(sample),
        }


def build_mixture(
    sources: Sequence[DatasetSource], multi_frame_ratio: float = 0.5, seed: int = 0, cache_dir: str | None = None
):
    """
    A `datasets.Dataset` mixing the sources by their ratios: one row per sample with its `id`, its raw JSON
    (`sample`, decoded only when a batch needs it), its folder, its multi-frame share and its `position` in the
    mixture. The rows live in Arrow files on disk (memory-mapped), not in memory.
    """
    from datasets import Dataset, concatenate_datasets

    parts = []
    for index, source in enumerate(sources):
        stat = os.stat(source.path)
        ratio = source.multi_frame_ratio if source.multi_frame_ratio is not None else multi_frame_ratio
        gen_kwargs = {
            "path": source.path,
            "source": index,
            "name": source.name,
            "data_folder": source.data_folder,
            "multi_frame_ratio": float(ratio),
            "version": (stat.st_size, stat.st_mtime_ns),
        }
        fingerprint = hashlib.sha256(json.dumps(gen_kwargs, sort_keys=True).encode()).hexdigest()[:32]
        dataset = Dataset.from_generator(
            _source_rows, gen_kwargs=gen_kwargs, cache_dir=cache_dir, fingerprint=fingerprint
        )
        if len(dataset) == 0:
            raise ValueError(f"datasets: {source.path} holds no samples")
        count = round(len(dataset) * source.ratio)
        if count == 0:
            raise ValueError(f"datasets: ratio {source.ratio} of the {len(dataset)} samples of {source.path} is none")
        if count != len(dataset):
            rng = np.random.default_rng([seed, index])
            repeats = -(-count // len(dataset))
            order = np.concatenate([rng.permutation(len(dataset)) for _ in range(repeats)])[:count]
            dataset = dataset.select(np.sort(order))
        parts.append(dataset)
    mixture = concatenate_datasets(parts)
    return mixture.add_column("position", list(range(len(mixture))))


@dataclass
class PreparedSample:
    """A sample ready for the processor: chat text, its video or image, and one `{frame: mask}` per `<region>`."""

    text: str
    roles: list[str]
    video: object = None
    image: object = None
    masks: list = field(default_factory=list)


def _is_frame_key(key) -> bool:
    return (isinstance(key, int) and key >= 0) or (isinstance(key, str) and key.isdigit())


def _regions(sample: dict, is_image: bool) -> list[dict[int, object]]:
    """The sample's regions as `{frame_index: annotation}` in time order; an image region sits on frame 0."""
    key = next((key for key in REGION_KEYS if key in sample), None)
    if key is None:
        return []
    if not isinstance(sample[key], list):
        raise TypeError(f"`{key}` must be a list with one entry per <region>")
    regions = []
    for index, entry in enumerate(sample[key]):
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"{key}[{index}] must be a non-empty dict {{frame_index: {{'segmentation': ...}}}}")
        if not all(_is_frame_key(frame) for frame in entry):
            entry = {0: entry}  # a bare annotation, as image samples may give it
        if is_image:
            if len(entry) != 1:
                raise ValueError(f"{key}[{index}]: an image region has one mask, got {len(entry)}")
            entry = {0: next(iter(entry.values()))}
        regions.append(dict(sorted((int(frame), annotation) for frame, annotation in entry.items())))
    return regions


def _single_frame(regions: list[dict[int, object]], rng: np.random.Generator) -> list[dict[int, object]]:
    """One frame per region: a random frame that all regions share when there is one, else one per region."""
    shared = sorted(set.intersection(*(set(region) for region in regions)))
    if shared:
        frame = shared[rng.integers(len(shared))]
        return [{frame: region[frame]} for region in regions]
    singles = []
    for region in regions:
        frame = list(region)[rng.integers(len(region))]
        singles.append({frame: region[frame]})
    return singles


def _messages(conversations: list[dict], modal_token: str | None, other_tokens: Sequence[str]) -> list[dict]:
    """Upstream `conversations` as chat messages (system prompt first), the video/image placeholder leading its turn
    (the first human turn when no turn has it)."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations must be a non-empty list of {from, value} turns")
    messages = []
    for turn in conversations:
        role = ROLES.get(turn.get("from", turn.get("role"))) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(content, str):
            raise ValueError(f"each turn needs `from` (human/gpt/system) and a string `value`, got {turn!r:.200}")
        if any(token in content for token in other_tokens):
            raise ValueError(f"a turn has a {'/'.join(other_tokens)} placeholder that no video or image fills")
        messages.append({"role": role, "content": content})
    if modal_token is not None:
        user_turns = [message for message in messages if message["role"] == "user"]
        if not user_turns:
            raise ValueError("conversations need a human turn to carry the video or image")
        target = next((message for message in user_turns if modal_token in message["content"]), user_turns[0])
        target["content"] = f"{modal_token}\n" + target["content"].replace(modal_token, "", 1).strip()
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("conversations have no gpt turn to train on")
    return messages


def prepare_sample(
    sample: dict, data_folder: str, processor, conversation_format: str, multi_frame: bool, rng: np.random.Generator
) -> PreparedSample:
    """
    Turns one upstream sample into text, visual and masks: resolves paths, reads `annotation` (or `masks`) regions,
    keeps one frame per region unless `multi_frame`, and renders the conversation (`"chat"`: the processor's chat
    template; `"plain"`: the placeholder, a newline, the first answer and the end token, as stage 1 pre-training does).
    """
    if not isinstance(sample, dict):
        raise TypeError(f"a sample must be a JSON object, got {type(sample).__name__}")
    video, image = sample.get("video"), sample.get("image")
    if video is not None and image is not None:
        raise ValueError("a sample has either `video` or `image`, not both")
    if isinstance(video, list):
        video = [os.path.join(data_folder, frame) for frame in video]
    elif video is not None:
        video = os.path.join(data_folder, video)
        if not os.path.exists(video):
            raise ValueError(f"no such video file or frame folder: {video}")
    if image is not None:
        image = os.path.join(data_folder, image)
        if not os.path.isfile(image):
            raise ValueError(f"no such image file: {image}")
    modal_token = processor.video_token if video is not None else processor.image_token if image is not None else None
    other_tokens = [t for t in (processor.video_token, processor.image_token) if t != modal_token]

    regions = _regions(sample, is_image=image is not None)
    if video is not None and regions and not multi_frame:
        regions = _single_frame(regions, rng)
    messages = _messages(sample.get("conversations"), modal_token, other_tokens)
    region_count = sum(m["content"].count(processor.region_token) for m in messages)
    if region_count != len(regions):
        raise ValueError(f"the conversation has {region_count} {processor.region_token} but {len(regions)} regions")

    if conversation_format == "plain":
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        prefix = f"{modal_token}\n" if modal_token else ""
        text = f"{prefix}{answer}{processor.tokenizer.eos_token}"
        if regions and processor.region_token not in text:
            raise ValueError("the plain format keeps only the answer, which has no <region> for the regions")
    else:
        text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False)
    roles = [message["role"] for message in messages]
    return PreparedSample(text=text, roles=roles, video=video, image=image, masks=regions)


def chat_labels(input_ids: Sequence[int], tokenizer, roles: Sequence[str]) -> list[int]:
    """
    Labels of a Qwen2 chat: the tokens of each assistant turn's content and its `<|im_end|>` keep their id, all other
    tokens get -100 (the span the chat template marks with `{% generation %}`).
    """
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    starts = [i for i, token in enumerate(input_ids) if token == start_id]
    if len(starts) != len(roles):
        raise ValueError(f"the rendered chat has {len(starts)} turns but the conversation has {len(roles)}")
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, role in zip(starts, roles):
        if role != "assistant":
            continue
        header = tokenizer.encode(f"{role}\n", add_special_tokens=False)
        content_start = start + 1 + len(header)
        if list(input_ids[start + 1 : content_start]) != header:
            raise ValueError(
                "an assistant turn does not start with its role header (content starting with a newline?)"
            )
        end = next((i for i in range(content_start, len(input_ids)) if input_ids[i] == end_id), None)
        if end is None:
            raise ValueError("an assistant turn has no <|im_end|>")
        labels[content_start : end + 1] = input_ids[content_start : end + 1]
    return labels


def plain_labels(input_ids: Sequence[int], tokenizer, placeholder_ids: Sequence[int]) -> list[int]:
    """Labels of the plain format: everything after the placeholders and their newline."""
    positions = [i for i, token in enumerate(input_ids) if token in placeholder_ids]
    start = 0
    if positions:
        newline = tokenizer.encode("\n", add_special_tokens=False)
        start = positions[-1] + 1 + len(newline)
    return [IGNORE_INDEX] * start + list(input_ids[start:])


def pad_and_stack(tensors: Sequence[torch.Tensor], pad_value: float = 0) -> torch.Tensor:
    """Concatenates `[1, ...]` tensors along dim 0, padding every other dimension at its end to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = tensors[0].new_full((len(tensors), *shape), pad_value)
    for index, tensor in enumerate(tensors):
        out[(index, *(slice(0, size) for size in tensor.shape[1:]))] = tensor[0]
    return out


class VideoReferDataCollator:
    """
    Turns raw mixture rows into a model batch: reads each sample's video or image and masks (only now, one batch at a
    time), renders the conversation, expands placeholders with the processor, builds labels (assistant tokens only)
    and pads. A sample that fails (missing file, `segmentation: null`, region count mismatch, undecodable video,
    longer than `max_length`, ...) is logged with its id and replaced by a (seeded) random sample of the mixture, so
    the batch keeps its size; the batch lists the skipped ids under `skipped_samples`.

    Args:
        processor: the model's [`VideoReferProcessor`].
        dataset: the mixture the rows come from (replacements are drawn from it).
        conversation_format: `"chat"` (Qwen2 chat, loss on assistant turns) or `"plain"` (stage 1 captions).
        max_length: longest accepted sequence after expansion, in tokens; `None` for no limit.
        num_frames: frames sampled per video; the processor's by default.
        seed: seed of the per-sample choices (single- or multi-frame, which frame).
        max_replacements: how many replacements to try for one bad sample before giving up.
    """

    def __init__(
        self,
        processor,
        dataset,
        conversation_format: str = "chat",
        max_length: int | None = None,
        num_frames: int | None = None,
        seed: int = 0,
        max_replacements: int = 64,
    ):
        if conversation_format not in CONVERSATION_FORMATS:
            raise ValueError(f"conversation_format must be one of {CONVERSATION_FORMATS}, got {conversation_format!r}")
        self.processor = processor
        self.dataset = dataset
        self.conversation_format = conversation_format
        self.max_length = max_length
        self.num_frames = num_frames
        self.seed = seed
        self.max_replacements = max_replacements
        tokenizer = processor.tokenizer
        self.placeholder_ids = [
            tokenizer.convert_tokens_to_ids(t) for t in (processor.video_token, processor.image_token)
        ]

    def encode(self, row: dict) -> dict[str, torch.Tensor]:
        """Model inputs `[1, ...]` with `labels` for one mixture row; raises (mostly `ValueError`) on bad data."""
        rng = np.random.default_rng([self.seed, row["position"]])
        multi_frame = bool(rng.random() < row["multi_frame_ratio"])
        prepared = prepare_sample(
            json.loads(row["sample"]), row["data_folder"], self.processor, self.conversation_format, multi_frame, rng
        )
        inputs = self.processor(
            text=prepared.text,
            videos=prepared.video,
            images=prepared.image,
            masks=prepared.masks,
            num_frames=self.num_frames,
            padding=False,
            return_tensors="pt",
        )
        input_ids = inputs["input_ids"][0].tolist()
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise ValueError(f"{len(input_ids)} tokens after expansion exceed max_length={self.max_length}")
        tokenizer = self.processor.tokenizer
        if self.conversation_format == "plain":
            labels = plain_labels(input_ids, tokenizer, self.placeholder_ids)
        else:
            labels = chat_labels(input_ids, tokenizer, prepared.roles)
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError("no token to train on")
        inputs["labels"] = torch.tensor([labels])
        return dict(inputs)

    def __call__(self, rows: list[dict]) -> dict:
        encoded, skipped = [], {}
        for row in rows:
            first = row
            for attempt in range(self.max_replacements + 1):
                try:
                    encoded.append(self.encode(row))
                    break
                except Exception as error:  # real data fails in many ways; a systematic bug trips the limit below
                    if row["id"] not in skipped:
                        logger.warning(f"Skipping training sample {row['id']}: {error}")
                    skipped[row["id"]] = str(error)
                    replacement = np.random.default_rng([self.seed, first["position"], attempt])
                    row = self.dataset[int(replacement.integers(len(self.dataset)))]
            else:
                raise RuntimeError(
                    f"{self.max_replacements + 1} samples in a row failed to load, the last {row['id']}: "
                    "check the data (or the code, when every sample fails)"
                )
        return {**self.collate(encoded), "skipped_samples": list(skipped)}

    def collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pads per-sample inputs (right padding) into one batch; samples without a key (e.g. no regions) are left out
        of that key, since the model fills placeholders in order."""
        batch = {}
        pad_token_id = self.processor.tokenizer.pad_token_id
        for key in encoded[0].keys() | {key for sample in encoded for key in sample}:
            tensors = [sample[key] for sample in encoded if key in sample]
            pad_value = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
            if key.startswith("region_") and len(tensors) < len(encoded):
                # Samples without regions still need a row so that region inputs stay batch-first.
                tensors = [sample.get(key, self._empty_region_input(key, tensors[0])) for sample in encoded]
            batch[key] = pad_and_stack(tensors, pad_value)
        return batch

    @staticmethod
    def _empty_region_input(key: str, like: torch.Tensor) -> torch.Tensor:
        shape = list(like.shape)
        shape[1] = 0
        return like.new_zeros(shape)


__all__ = [
    "DatasetSource",
    "parse_dataset_sources",
    "build_mixture",
    "prepare_sample",
    "chat_labels",
    "plain_labels",
    "pad_and_stack",
    "VideoReferDataCollator",
    "IGNORE_INDEX",
]
