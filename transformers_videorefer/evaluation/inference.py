"""
Batched, data-parallel, resumable generation over a benchmark.

Every process appends its predictions to the output file, one complete JSON line per item as soon as its batch is
generated, under the file's lock. Item `i` of the benchmark belongs to process `i % world_size`, so processes never
answer the same item, and they need no other coordination. A rerun skips every item already in the file; a line
that a killed process left half-written is cut off and its item answered again.

Items are prepared one at a time. An item whose annotation, video or masks are rejected (a `ValueError` or
`TypeError`, e.g. an object whose masks are all empty) is written with an empty prediction and its `error`, and the
rest of its batch is generated without it.
"""

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import MASK_MODES, BenchItem, region_masks
from .prompts import BENCH_D_QUESTION, REGION_PLACEHOLDER, bench_q_question, video_user_message
from .records import JsonlAppender, record_key


logger = logging.getLogger(__name__)

# Item ids listed in the closing warning about items that could not be preprocessed.
_LISTED_FAILURES = 20


@dataclass(frozen=True)
class GenerationRequest:
    """
    One item to answer: the video, the question (without the video placeholder), one mask dict per `<region>`, and
    `error`, the reason the item cannot be answered when its annotation or video was already found unusable.
    """

    id: int | str
    video: str
    question: str
    masks: list[dict[int, dict]]
    fields: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        return record_key(self.id)


def _checked_masks(item: BenchItem, video: str | None, mode: str, prompt: str) -> list[dict[int, dict]]:
    """The item's masks for the processor; a `ValueError` naming the item when its annotation or video is unusable."""
    if video is None:
        raise ValueError(f"item {item.id!r} needs `video`, its path relative to the video root, got {item.video!r}")
    masks = region_masks(item, mode)
    if prompt.count(REGION_PLACEHOLDER) != len(masks):
        raise ValueError(
            f"item {item.id!r}: the question has {prompt.count(REGION_PLACEHOLDER)} {REGION_PLACEHOLDER} but the "
            f"annotation has {len(masks)} objects"
        )
    if not os.path.exists(video):
        raise ValueError(f"item {item.id!r}: no video or frame folder at {video}")
    return masks


def _request(
    item: BenchItem, video_root: str | os.PathLike, mode: str, prompt: str, fields: dict
) -> GenerationRequest:
    video = os.path.join(video_root, item.video) if isinstance(item.video, str) else None
    try:
        masks = _checked_masks(item, video, mode, prompt)
    except ValueError as error:
        return GenerationRequest(item.id, video or "", prompt, [], fields, str(error))
    return GenerationRequest(item.id, video, prompt, masks, fields)


def _requests(
    items: Sequence[BenchItem],
    video_root: str | os.PathLike,
    mode: str,
    question: Callable[[BenchItem], str],
    fields: Callable[[BenchItem], dict],
) -> list[GenerationRequest]:
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    requests = [
        _request(item, video_root, mode, question(item), {"video": item.video, "mode": mode, **fields(item)})
        for item in items
    ]
    if requests and not any(request.video and os.path.exists(request.video) for request in requests):
        raise FileNotFoundError(
            f"none of the {len(requests)} videos exist under {video_root} (first: {requests[0].video}); check the "
            "video root"
        )
    if requests and all(request.error for request in requests):
        reasons = "; ".join(request.error for request in requests[:3])
        raise ValueError(f"no item of the benchmark can be answered (first reasons: {reasons})")
    return requests


def bench_q_requests(
    items: Sequence[BenchItem], video_root: str | os.PathLike, mode: str = "single"
) -> list[GenerationRequest]:
    """
    Generation requests for Bench-Q items: the benchmark's multiple-choice prompt and each object's masks. An item
    whose annotation or video is unusable gets a request with its `error` set (it is written unanswered). Raises
    `FileNotFoundError` when no video exists under `video_root` and `ValueError` when no item is usable.
    """
    return _requests(
        items,
        video_root,
        mode,
        lambda item: bench_q_question(item.question, item.options),
        lambda item: {"type": item.type, "answer": item.answer},
    )


def bench_d_requests(
    items: Sequence[BenchItem], video_root: str | os.PathLike, mode: str = "single"
) -> list[GenerationRequest]:
    """
    Generation requests for Bench-D items: the benchmark's description prompt and the object's masks (unusable items
    as in `bench_q_requests`).
    """
    return _requests(items, video_root, mode, lambda item: BENCH_D_QUESTION, lambda item: {})


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run: its rank, the number of processes, its local GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank}, world_size={self.world_size}")

    @classmethod
    def from_environment(cls) -> "DistributedContext":
        """
        The rank from an initialised `torch.distributed`, else from `RANK`, `WORLD_SIZE` and `LOCAL_RANK` (as
        `accelerate launch` and `torchrun` set them); a single process when they are not set.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        return cls(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)))

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


@contextlib.contextmanager
def _rank_lock(output: Path, rank: int):
    """Refuses a second process with the same rank on the same output (it would answer the same items)."""
    path = output.with_name(f"{output.name}.rank{rank}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise RuntimeError(f"another process with rank {rank} is already writing {output}") from error
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


# How the processor pads a batch: token-aligned inputs on the left (for generation), the others at the end of every
# dimension; `input_ids` with the tokenizer's pad token, these with -1, everything else with 0.
_LEFT_PADDED = ("input_ids", "attention_mask")
_FILL_VALUES = {"region_frame_ids": -1, "region_object_ids": -1}


def _pad_and_stack(tensors: Sequence[torch.Tensor], fill_value: float, left: bool) -> torch.Tensor:
    """Concatenates `[1, ...]` tensors along dim 0, padding every other dimension to the largest size."""
    shape = [max(tensor.shape[dim] for tensor in tensors) for dim in range(1, tensors[0].dim())]
    stacked = tensors[0].new_full((len(tensors), *shape), fill_value)
    for index, tensor in enumerate(tensors):
        where = [slice(0, size) for size in tensor.shape[1:]]
        if left:
            where[0] = slice(shape[0] - tensor.shape[1], shape[0])
        stacked[(index, *where)] = tensor[0]
    return stacked


@dataclass
class _PreparedBatch:
    """A DataLoader batch: the requests ready to generate, their padded inputs, and `(request, reason)` failures."""

    requests: list[GenerationRequest]
    inputs: dict[str, torch.Tensor] | None
    failures: list[tuple[GenerationRequest, str]]


class _Collator:
    """
    Prepares each request of a batch alone with the processor (in DataLoader workers), so that an item the processor
    rejects with a `ValueError`/`TypeError` becomes a failure of that item only, then pads the others into one batch
    exactly as the processor pads a batch (token inputs on the left).
    """

    def __init__(self, processor, num_frames: int):
        self.processor = processor
        self.num_frames = num_frames

    def _encode(self, request: GenerationRequest) -> dict[str, torch.Tensor]:
        text = self.processor.tokenizer.apply_chat_template(
            [video_user_message(request.question)], tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(
            videos=[request.video],
            masks=[request.masks],
            text=[text],
            num_frames=self.num_frames,
            padding=False,
            return_tensors="pt",
        )
        return dict(inputs)

    def _pad(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if any(sample.keys() != encoded[0].keys() for sample in encoded):
            raise RuntimeError(f"the processor returned different inputs for items of one batch: {encoded[0].keys()}")
        pad_token_id = self.processor.tokenizer.pad_token_id
        if pad_token_id is None:
            if len({sample["input_ids"].shape[1] for sample in encoded}) > 1:
                raise ValueError(
                    "the tokenizer has no pad_token_id; set one to generate batches (or use batch_size=1)"
                )
            pad_token_id = 0
        return {
            key: _pad_and_stack(
                [sample[key] for sample in encoded],
                pad_token_id if key == "input_ids" else _FILL_VALUES.get(key, 0),
                left=key in _LEFT_PADDED,
            )
            for key in encoded[0]
        }

    def __call__(self, requests: list[GenerationRequest]) -> _PreparedBatch:
        ready, encoded, failures = [], [], []
        for request in requests:
            if request.error is not None:
                failures.append((request, request.error))
                continue
            try:
                encoded.append(self._encode(request))
            except (ValueError, TypeError) as error:
                failures.append((request, str(error)))
                continue
            except Exception as error:
                raise RuntimeError(f"preparing item {request.id!r} failed: {error}") from error
            ready.append(request)
        return _PreparedBatch(ready, self._pad(encoded) if encoded else None, failures)


def _to_model(inputs, device: torch.device, dtype: torch.dtype | None) -> dict:
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
        moved[name] = value
    return moved


def _generate(model, processor, inputs: dict, device: torch.device, generate_kwargs: dict) -> list[str]:
    """The stripped replies of the model to one padded batch."""
    inputs = _to_model(inputs, device, getattr(model, "dtype", None))
    with torch.inference_mode():
        generated = model.generate(**inputs, **generate_kwargs)
    replies = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


def _record(request: GenerationRequest, prediction: str, error: str | None = None) -> dict:
    """The predictions-file line of an item; an item that could not be preprocessed also has its `error`."""
    record = {"id": request.id, "prediction": prediction, "question": request.question, **request.fields}
    return record if error is None else {**record, "error": error}


def generate_predictions(
    requests: Sequence[GenerationRequest],
    output: str | os.PathLike,
    load_model: Callable[[torch.device], tuple],
    num_frames: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 2048,
    num_workers: int = 2,
    context: DistributedContext | None = None,
    progress: bool = True,
    **generate_kwargs,
) -> int:
    """
    Answers every request this process owns that `output` does not hold yet, appending one JSON line per item:
    `{"id", "prediction", "question", "video", "mode", ...request fields}`.

    Each item is prepared alone (in the DataLoader workers). An item that cannot be (its request's `error`, or a
    `ValueError`/`TypeError` of the processor: a region without pixels, a mask of the wrong size, a frame index past
    the video's end, an unreadable video) is logged with its reason and written once like the others, with
    `"prediction": ""` and `"error": reason`; a rerun does not retry it. The rest of its batch is generated without
    it. Any other error stops the run.

    Args:
        requests: from `bench_q_requests` / `bench_d_requests`, in benchmark order.
        output (`str` or `os.PathLike`): the predictions file (JSON lines), shared by all processes.
        load_model: `device -> (model, processor)`; called only when this process has items left to answer.
        num_frames (`int`, *optional*): frames sampled per video; defaults to `model.config.num_frames`.
        batch_size (`int`, defaults to 8): items per `generate` call.
        max_new_tokens (`int`, defaults to 2048): the release's evaluation limit.
        num_workers (`int`, defaults to 2): DataLoader processes that decode videos and masks ahead of the GPU.
        context (`DistributedContext`, *optional*): this process's rank; read from the environment by default.
        progress (`bool`, defaults to True): show a progress bar (rate and ETA) on rank 0.
        generate_kwargs: passed to `model.generate` (decoding is greedy unless overridden).

    Returns:
        How many of the requests `output` holds when this process is done (all of them once every process is).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    keys = [request.key for request in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("requests must have unique ids")
    context = context or DistributedContext.from_environment()
    output = Path(output)
    with _rank_lock(output, context.rank), JsonlAppender(output, shared=True) as appender:
        done = {record_key(record["id"]) for record in appender.records()}
        mine = [
            request
            for index, request in enumerate(requests)
            if index % context.world_size == context.rank and request.key not in done
        ]
        logger.info("rank %d/%d: %d items to answer", context.rank, context.world_size, len(mine))
        if mine:
            model, processor = load_model(context.device)
            num_frames = num_frames or getattr(model.config, "num_frames", None)
            if num_frames is None:
                raise ValueError("the model config has no `num_frames`; pass num_frames (--num-frames) explicitly")
            loader = DataLoader(
                mine, batch_size=batch_size, num_workers=num_workers, collate_fn=_Collator(processor, num_frames)
            )
            generate_kwargs = {"do_sample": False, **generate_kwargs, "max_new_tokens": max_new_tokens}
            description = "answering" if context.world_size == 1 else f"answering (rank 0 of {context.world_size})"
            failed = []
            with tqdm(
                total=len(mine), unit="item", desc=description, disable=not progress or context.rank != 0
            ) as bar:
                for batch in loader:
                    for request, reason in batch.failures:
                        logger.warning("item %r could not be preprocessed, written unanswered: %s", request.id, reason)
                        appender.write(_record(request, "", error=reason))
                        failed.append(request.id)
                    if batch.requests:
                        replies = _generate(model, processor, batch.inputs, context.device, generate_kwargs)
                        for request, reply in zip(batch.requests, replies):
                            appender.write(_record(request, reply))
                    bar.update(len(batch.requests) + len(batch.failures))
            if failed:
                listed = ", ".join(map(repr, failed[:_LISTED_FAILURES])) + (
                    ", ..." if len(failed) > _LISTED_FAILURES else ""
                )
                logger.warning(
                    "%d items could not be preprocessed: %s (see their `error` in %s)", len(failed), listed, output
                )
        finished = {record_key(record["id"]) for record in appender.records()}
    return sum(key in finished for key in keys)
