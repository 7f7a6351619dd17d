"""The `videorefer` command: tiny checkpoints, describing objects in a video, conversion, training, evaluation."""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _read_mask_file(path: str):
    """A mask from a file: an image (nonzero = inside), a .npy array, or .json (COCO RLE, polygons or a box)."""
    if not os.path.isfile(path):
        raise ValueError(f"--mask: no such file {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return np.load(path)
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as image:
            image.load()
            return image.copy()
    raise ValueError(f"--mask: {path!r} is not a mask file (expected {', '.join(IMAGE_SUFFIXES)}, .npy or .json)")


def parse_region(spec: str) -> dict[int, object]:
    """`FRAME:FILE[,FRAME:FILE...]` -> {frame_index: mask}: one region, on one frame or several."""
    region = {}
    for part in spec.split(","):
        frame, sep, path = part.partition(":")
        if not sep or not frame.strip().isdigit():
            raise ValueError(f"--mask {spec!r}: expected FRAME:MASK_FILE[,FRAME:MASK_FILE...] with integer frames")
        region[int(frame)] = _read_mask_file(path)
    return region


def _write_example(directory: str, size: tuple[int, int] = (96, 128), num_video_frames: int = 24) -> None:
    """A short clip of a red square moving right and a blue disc moving down, with a mask PNG of each on frame 3."""
    from PIL import Image

    from .video_utils import write_video

    os.makedirs(directory, exist_ok=True)
    height, width = size
    rows, cols = np.mgrid[:height, :width]
    frames, square_masks, disc_masks = [], [], []
    for t in range(num_video_frames):
        frame = np.full((height, width, 3), 235, dtype=np.uint8)
        square = (abs(rows - 30) < 12) & (abs(cols - (16 + 3 * t)) < 12)
        disc = (rows - (20 + 2 * t)) ** 2 + (cols - 96) ** 2 < 11**2
        frame[square] = (220, 30, 30)
        frame[disc] = (30, 60, 220)
        frames.append(frame)
        square_masks.append(square)
        disc_masks.append(disc)
    write_video(os.path.join(directory, "clip.mp4"), np.stack(frames), fps=8)
    for name, masks in (("square", square_masks), ("disc", disc_masks)):
        Image.fromarray(masks[3].astype(np.uint8) * 255).save(os.path.join(directory, f"{name}_3.png"))


def run_tiny(args: argparse.Namespace) -> int:
    from .tiny import save_tiny_checkpoint

    save_tiny_checkpoint(args.out_dir, seed=args.seed)
    print(f"Wrote a tiny random VideoRefer checkpoint to {args.out_dir}")
    if args.example:
        _write_example(args.example)
        print(f"Wrote an example clip and masks to {args.example} (clip.mp4, square_3.png, disc_3.png)")
    return 0


def _is_image(path: str) -> bool:
    return isinstance(path, str) and os.path.isfile(path) and path.lower().endswith(IMAGE_SUFFIXES)


def run_describe(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from . import VideoReferProcessor  # noqa: F401  (registers the Auto classes)

    regions = [parse_region(spec) for spec in args.mask]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    loaded = time.perf_counter()

    visual = "image" if _is_image(args.video) else "video"
    question = args.question
    if f"<{visual}>" not in question:
        question = f"<{visual}>\n{question}"
    if "<region>" not in question and regions:
        question = question + " " + " ".join("<region>" for _ in regions)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    visual_input = {"images" if visual == "image" else "videos": args.video}
    inputs = processor(text=prompt, masks=regions, return_tensors="pt", **visual_input).to(model.device)
    prepared = time.perf_counter()

    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    generated = output[0, inputs["input_ids"].shape[1] :]
    done = time.perf_counter()

    ids = inputs["input_ids"][0]
    config = model.config
    counts = {
        "prompt": int(ids.numel()),
        "visual": int((ids == config.video_token_id).sum() + (ids == config.image_token_id).sum()),
        "region": int((ids == config.region_token_id).sum()),
        "generated": int(generated.numel()),
    }
    answer = processor.decode(generated, skip_special_tokens=True).strip()
    print(answer)
    print(
        f"tokens: prompt {counts['prompt']} (visual {counts['visual']}, region {counts['region']}), "
        f"generated {counts['generated']}"
    )
    generate_seconds = done - prepared
    print(
        f"time: load {loaded - start:.2f}s, preprocess {prepared - loaded:.2f}s, generate {generate_seconds:.2f}s "
        f"({counts['generated'] / max(generate_seconds, 1e-9):.1f} tokens/s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .convert import add_convert_parser
    from .evaluation.cli import add_eval_parser
    from .training.cli import add_training_parsers

    parser = argparse.ArgumentParser(prog="videorefer", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)

    tiny = subparsers.add_parser("tiny", help="write a tiny random checkpoint (no download)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--example", metavar="DIR", help="also write an example clip and mask PNGs to DIR")
    tiny.set_defaults(func=run_tiny)

    describe = subparsers.add_parser("describe", help="answer a question about the objects masks point at")
    describe.add_argument("--model", required=True, help="checkpoint folder or hub id")
    describe.add_argument("video", help="video file, folder of frames, or an image file")
    describe.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="FRAME:MASK_FILE[,FRAME:MASK_FILE...]",
        help="one region per --mask, in the order of <region> in the question; several FRAME:FILE pairs make a "
        "multi-frame region. FILE: image (nonzero = inside), .npy, or .json (COCO RLE, polygons, or a box)",
    )
    describe.add_argument("question", help="the question; <video>/<image> is added in front when missing")
    describe.add_argument("--max-new-tokens", type=int, default=128)
    describe.add_argument("--dtype", default="auto", help="e.g. auto, float32, bfloat16")
    describe.set_defaults(func=run_describe)

    add_convert_parser(subparsers)
    add_training_parsers(subparsers)
    add_eval_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"videorefer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
