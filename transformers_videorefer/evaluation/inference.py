"""
Batched, data-parallel, resumable generation over a benchmark.

Every process appends its predictions to the output file, one complete JSON line per item as soon as its batch is
generated, under the file's lock. Item `i` of the benchmark belongs to process `i % world_size`, so processes never
answer the same item, and they need no other coordination. A rerun skips every item already in the file; a line
that a killed process left half-written is cut off and its item answered again.
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

from .data import BenchItem, region_masks
from .prompts import BENCH_D_QUESTION, REGION_PLACEHOLDER, bench_q_question, video_user_message
from .records import JsonlAppender, record_key


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One item to answer: the video, the question (without the video placeholder), one mask dict per `<region>`."""

    id: int | str
    video: str
    question: str
    masks: list[dict[int, dict]]
    fields: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return record_key(self.id)


def _requests(
    items: Sequence[BenchItem],
    video_root: str | os.PathLike,
    mode: str,
    question: Callable[[BenchItem], str],
    fields: Callable[[BenchItem], dict],
) -> list[GenerationRequest]:
    requests, missing = [], []
    for item in items:
        if not isinstance(item.video, str):
            raise ValueError(f"item {item.id!r} needs `video`, its path relative to the video root")
        video = os.path.join(video_root, item.video)
        if not os.path.exists(video):
            missing.append(video)
        prompt = question(item)
        masks = region_masks(item, mode)
        if prompt.count(REGION_PLACEHOLDER) != len(masks):
            raise ValueError(
                f"item {item.id!r}: the question has {prompt.count(REGION_PLACEHOLDER)} {REGION_PLACEHOLDER} but the "
                f"annotation has {len(masks)} objects"
            )
        requests.append(
            GenerationRequest(item.id, video, prompt, masks, {"video": item.video, "mode": mode, **fields(item)})
        )
    if missing:
        raise FileNotFoundError(f"{len(missing)} videos are missing under {video_root} (first: {missing[:3]})")
    return requests


def bench_q_requests(
    items: Sequence[BenchItem], video_root: str | os.PathLike, mode: str = "single"
) -> list[GenerationRequest]:
    """Generation requests for Bench-Q items: the benchmark's multiple-choice prompt and each object's masks."""
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
    """Generation requests for Bench-D items: the benchmark's description prompt and the object's masks."""
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


class _Collator:
    """Turns a list of requests into model inputs with the processor (runs in DataLoader workers)."""

    def __init__(self, processor, num_frames: int):
        self.processor = processor
        self.num_frames = num_frames

    def __call__(self, requests: list[GenerationRequest]):
        texts = [
            self.processor.tokenizer.apply_chat_template(
                [video_user_message(request.question)], tokenize=False, add_generation_prompt=True
            )
            for request in requests
        ]
        try:
            inputs = self.processor(
                videos=[request.video for request in requests],
                masks=[request.masks for request in requests],
                text=texts,
                num_frames=self.num_frames,
                padding=True,
                return_tensors="pt",
            )
        except Exception as error:
            ids = [request.id for request in requests]
            raise RuntimeError(f"preparing items {ids} failed: {error}") from error
        return requests, inputs


def _to_model(inputs, device: torch.device, dtype: torch.dtype | None) -> dict:
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
        moved[name] = value
    return moved


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
            with tqdm(
                total=len(mine), unit="item", desc=description, disable=not progress or context.rank != 0
            ) as bar:
                for batch, inputs in loader:
                    inputs = _to_model(inputs, context.device, getattr(model, "dtype", None))
                    with torch.inference_mode():
                        generated = model.generate(**inputs, **generate_kwargs)
                    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                    for request, reply in zip(batch, processor.batch_decode(new_tokens, skip_special_tokens=True)):
                        appender.write(
                            {
                                "id": request.id,
                                "prediction": reply.strip(),
                                "question": request.question,
                                **request.fields,
                            }
                        )
                    bar.update(len(batch))
        finished = {record_key(record["id"]) for record in appender.records()}
    return sum(key in finished for key in keys)
