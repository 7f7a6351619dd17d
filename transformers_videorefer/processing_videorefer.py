"""Processor for VideoRefer: videos or images, the masks of the objects a prompt refers to, and text."""

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from .configuration_videorefer import stc_output_length
from .mask_utils import decode_mask
from .video_utils import load_image, load_video


DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PIXEL_SETTINGS = (
    "size",
    "resample",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)

# Qwen2 chat format; video and image content items become the `<video>`/`<image>` placeholder and a newline, as in
# the release's prompts ("<video>\n" + question).
CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if item['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ render(message['content']) + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class _Region:
    """One `<region>` of a sample: its masks (time order) and the source frames they are drawn on."""

    frame_indices: list[int]
    masks: list[np.ndarray]


def _is_frame_dict(entry) -> bool:
    return isinstance(entry, dict) and len(entry) > 0 and all(_frame_key(key) is not None for key in entry)


def _frame_key(key) -> int | None:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    return None


def _is_wrapped_visual(value) -> bool:
    """True for the element of a one-item list that stands for a whole video or image (not a single video frame)."""
    if isinstance(value, (str, list, tuple)):
        return True
    ndim = getattr(value, "ndim", None)
    return ndim is None or ndim == 4


class VideoReferProcessor(ProcessorMixin):
    r"""
    Builds VideoRefer inputs from videos (or images), the masks of the objects the prompt refers to, and text.

    `processor(videos=..., masks=..., text=...)` samples `num_frames` frames of each video the way the release does,
    resizes and normalises them with the SigLIP image processor, decodes every mask (binary array or tensor, PIL image,
    COCO RLE, polygons, box) at the frame's resolution, and expands the `<video>`/`<image>` and `<region>` placeholders
    of the text to the number of tokens the model fills.

    Args:
        image_processor: SigLIP image processor (PIL backend: the release's exact pixels).
        tokenizer: Qwen2 tokenizer with the `<image>`, `<video>` and `<region>` tokens.
        chat_template (`str`, *optional*): Jinja chat template; the Qwen2 format by default.
        num_frames (`int`, defaults to 16): frames sampled per video, and repeats of an image.
        num_region_tokens (`int`, defaults to 4): at most this many tokens per object.
        patches_per_side (`int`, defaults to 27): side of the vision tower's patch grid.
        connector_downsample (`list[int]`, defaults to `[2, 2, 2]`): the STC connector's down-sampling.
        connector_type (`str`, defaults to `"stc_connector_v35"`): the STC connector's type.
    """

    video_token = "<video>"
    image_token = "<image>"
    region_token = "<region>"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_frames: int = 16,
        num_region_tokens: int = 4,
        patches_per_side: int = 27,
        connector_downsample: Sequence[int] = (2, 2, 2),
        connector_type: str = "stc_connector_v35",
        **kwargs,
    ):
        self.num_frames = num_frames
        self.num_region_tokens = num_region_tokens
        self.patches_per_side = patches_per_side
        self.connector_downsample = list(connector_downsample)
        self.connector_type = connector_type
        if image_processor is not None and not isinstance(image_processor, PilBackend):
            # The release resized frames with PIL; the torchvision backend gives other pixels.
            settings = image_processor.to_dict()
            image_processor = SiglipImageProcessorPil(**{key: settings[key] for key in PIXEL_SETTINGS if key in settings})
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "pixel_values_videos",
            "region_pixel_values",
            "region_masks",
            "region_mask_sizes",
            "region_frame_ids",
            "region_object_ids",
        ]

    def num_visual_tokens(self, num_frames: int | None = None) -> int:
        """Tokens a `<video>` (or `<image>`) placeholder expands to."""
        return stc_output_length(
            num_frames or self.num_frames, self.patches_per_side, self.connector_downsample, self.connector_type
        )

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        masks=None,
        num_frames: int | None = None,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images: one image per sample (path, PIL image or [H, W, 3] array).
            text (`str` or `list[str]`): the prompts, with `<video>` or `<image>` and one `<region>` per object.
            videos: one video per sample: a video file, a folder of frame images, a list of frame paths, an array or
                tensor [T, H, W, 3], or a list of frames.
            masks: for one sample, a list with one entry per `<region>` in prompt order, each `{frame_index: mask}`
                (frame index in the source video; one key = single-frame region, several = multi-frame region); for
                an image the key is 0 or the entry is the bare mask. For a batch, one such list per sample.
            num_frames (`int`, *optional*): frames to sample per video; defaults to the processor's `num_frames`.
            padding, padding_side: passed to the tokenizer; left padding suits generation.
            return_tensors (`str`, *optional*): `"pt"` for PyTorch tensors.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, `pixel_values_videos` (or `pixel_values` for images)
            and, when the prompts have regions, `region_pixel_values`, `region_masks`, `region_mask_sizes`,
            `region_frame_ids` and `region_object_ids`; everything batch-first.
        """
        if text is None:
            raise ValueError("text is required: the prompt with <video> or <image> and one <region> per object")
        is_batched = not isinstance(text, str)
        texts = list(text) if is_batched else [text]
        if not all(isinstance(sample, str) for sample in texts):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        batch_size = len(texts)
        num_frames = num_frames or self.num_frames
        videos = self._per_sample(videos, batch_size, is_batched, "videos")
        images = self._per_sample(images, batch_size, is_batched, "images")
        masks = self._masks_per_sample(masks, batch_size, is_batched)
        has_video = [video is not None for video in videos]
        has_image = [image is not None for image in images]
        if any(has_video) and any(has_image):
            raise ValueError("A batch takes either videos or images, not both")
        for name, present in (("videos", has_video), ("images", has_image)):
            if any(present) and not all(present):
                raise ValueError(f"{name}: every sample of a batch needs one, got {sum(present)} for {batch_size} texts")

        visual_pixels, region_frames, regions, expanded = [], [], [], []
        for index in range(batch_size):
            sample_text, sample_masks = texts[index], masks[index]
            num_placeholders = sample_text.count(self.region_token)
            if num_placeholders != len(sample_masks):
                raise ValueError(
                    f"masks[{index}] has {len(sample_masks)} entries but text[{index}] has {num_placeholders} "
                    f"{self.region_token} placeholders: give one mask entry per {self.region_token}, in prompt order"
                )
            if videos[index] is not None:
                token, frames, sample_region_frames, sample_regions = self._load_video_sample(
                    videos[index], sample_masks, num_frames, index
                )
            elif images[index] is not None:
                token, frames, sample_region_frames, sample_regions = self._load_image_sample(
                    images[index], sample_masks, index
                )
            else:
                if sample_masks:
                    raise ValueError(f"masks[{index}]: regions need a video or an image to be drawn on")
                token, frames, sample_region_frames, sample_regions = None, [], [], []
            expanded.append(self._expand_placeholders(sample_text, token, sample_regions, num_frames, index))
            visual_pixels.append(self._pixels(frames))
            region_frames.append(sample_region_frames)
            regions.append(sample_regions)

        text_inputs = self.tokenizer(
            expanded, padding=padding, padding_side=padding_side, return_attention_mask=True, **kwargs
        )
        data = dict(text_inputs)
        if any(has_video):
            data["pixel_values_videos"] = np.stack(visual_pixels)
        elif any(has_image):
            data["pixel_values"] = np.stack(visual_pixels)[:, 0]
        if any(regions):
            data.update(self._region_inputs(region_frames, regions))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _per_sample(values, batch_size: int, is_batched: bool, name: str) -> list:
        """One video/image (or None) per sample; unwraps the nested lists that `apply_chat_template` passes."""
        if values is None:
            return [None] * batch_size
        if not is_batched:
            values = [values]
        if not isinstance(values, (list, tuple)) or len(values) != batch_size:
            raise ValueError(f"{name}: expected one entry per text ({batch_size}), got {values!r:.200}")
        samples = []
        for value in values:
            while isinstance(value, (list, tuple)) and len(value) == 1 and _is_wrapped_visual(value[0]):
                value = value[0]
            if isinstance(value, (list, tuple)) and len(value) == 0:
                value = None
            samples.append(value)
        return samples

    @staticmethod
    def _masks_per_sample(masks, batch_size: int, is_batched: bool) -> list[list]:
        if masks is None:
            return [[] for _ in range(batch_size)]
        if not isinstance(masks, (list, tuple)):
            raise TypeError(f"masks must be a list with one entry per <region>, got {type(masks).__name__}")
        if not is_batched:
            return [list(masks)]
        if len(masks) != batch_size or not all(isinstance(sample, (list, tuple)) for sample in masks):
            raise ValueError(
                f"masks: for a batch of {batch_size} texts give a list of {batch_size} lists (one entry per <region>)"
            )
        return [list(sample) for sample in masks]

    @staticmethod
    def _frame_entries(entry, name: str) -> dict[int, object]:
        if not _is_frame_dict(entry):
            raise ValueError(
                f"{name} must be a dict {{frame_index: mask}} with integer frame indices, got {type(entry).__name__}"
            )
        return {_frame_key(key): mask for key, mask in entry.items()}

    def _decode_region(self, frames: dict[int, object], height: int, width: int, name: str) -> _Region:
        frame_indices = sorted(frames)
        decoded = [decode_mask(frames[frame], height, width, name=f"{name}[{frame}]") for frame in frame_indices]
        if not any(mask.any() for mask in decoded):
            raise ValueError(
                f"{name}: the region has no pixels on any of its frames {frame_indices}; every object needs a "
                "non-empty mask on at least one frame"
            )
        return _Region(frame_indices, decoded)

    def _load_video_sample(self, video, sample_masks: list, num_frames: int, index: int):
        entries = [self._frame_entries(entry, f"masks[{index}][{r}]") for r, entry in enumerate(sample_masks)]
        wanted = sorted({frame for entry in entries for frame in entry})
        loaded = load_video(video, num_frames, extra_frame_indices=wanted, name=f"videos[{index}]")
        regions = [
            self._decode_region(entry, loaded.height, loaded.width, f"masks[{index}][{r}]")
            for r, entry in enumerate(entries)
        ]
        region_frames = [(frame, loaded.extra_frames[frame]) for frame in wanted]
        return self.video_token, loaded.frames, region_frames, regions

    def _load_image_sample(self, image, sample_masks: list, index: int):
        frame = load_image(image, name=f"images[{index}]")
        height, width = frame.shape[:2]
        regions = []
        for r, entry in enumerate(sample_masks):
            entries = self._frame_entries(entry, f"masks[{index}][{r}]") if _is_frame_dict(entry) else {0: entry}
            if set(entries) != {0}:
                raise ValueError(
                    f"masks[{index}][{r}]: an image has one frame, so use frame index 0 (got {sorted(entries)})"
                )
            regions.append(self._decode_region(entries, height, width, f"masks[{index}][{r}]"))
        region_frames = [(0, frame)] if regions else []
        return self.image_token, [frame], region_frames, regions

    def _expand_placeholders(
        self, text: str, visual_token: str | None, regions: list[_Region], num_frames: int, index: int
    ) -> str:
        for token in (self.video_token, self.image_token):
            count = text.count(token)
            if token == visual_token and count != 1:
                kind = "video" if token == self.video_token else "image"
                raise ValueError(f"text[{index}] must contain {token} exactly once for its {kind}, found {count}")
            if token != visual_token and count:
                raise ValueError(f"text[{index}] contains {token} but no matching input was given")
        if visual_token is not None:
            text = text.replace(visual_token, visual_token * self.num_visual_tokens(num_frames))
        pieces = text.split(self.region_token)
        counts = [min(len(region.frame_indices), self.num_region_tokens) for region in regions]
        return pieces[0] + "".join(self.region_token * n + piece for n, piece in zip(counts, pieces[1:]))

    def _pixels(self, frames: list[np.ndarray]) -> np.ndarray | None:
        if not frames:
            return None
        return np.asarray(self.image_processor(images=frames, return_tensors="np")["pixel_values"], dtype=np.float32)

    def _region_inputs(self, region_frames: list[list], regions: list[list[_Region]]) -> dict[str, np.ndarray]:
        """Pads the masks and mask frames of every sample into batch-first arrays."""
        batch_size = len(regions)
        max_frames = max(len(frames) for frames in region_frames)
        sample_masks = [[mask for region in sample for mask in region.masks] for sample in regions]
        max_masks = max(len(masks) for masks in sample_masks)
        max_height = max(mask.shape[0] for masks in sample_masks for mask in masks)
        max_width = max(mask.shape[1] for masks in sample_masks for mask in masks)

        pixels = [self._pixels([frame for _, frame in frames]) for frames in region_frames]
        pixel_shape = next(p.shape[1:] for p in pixels if p is not None)
        region_pixel_values = np.zeros((batch_size, max_frames, *pixel_shape), dtype=np.float32)
        region_masks = np.zeros((batch_size, max_masks, max_height, max_width), dtype=bool)
        region_mask_sizes = np.zeros((batch_size, max_masks, 2), dtype=np.int64)
        region_frame_ids = np.full((batch_size, max_masks), -1, dtype=np.int64)
        region_object_ids = np.full((batch_size, max_masks), -1, dtype=np.int64)
        for b, (frames, sample) in enumerate(zip(region_frames, regions)):
            if not frames:
                continue
            region_pixel_values[b, : len(frames)] = pixels[b]
            slot_of_frame = {frame_index: slot for slot, (frame_index, _) in enumerate(frames)}
            m = 0
            for object_id, region in enumerate(sample):
                for frame_index, mask in zip(region.frame_indices, region.masks):
                    region_masks[b, m, : mask.shape[0], : mask.shape[1]] = mask
                    region_mask_sizes[b, m] = mask.shape
                    region_frame_ids[b, m] = slot_of_frame[frame_index]
                    region_object_ids[b, m] = object_id
                    m += 1
        return {
            "region_pixel_values": region_pixel_values,
            "region_masks": region_masks,
            "region_mask_sizes": region_mask_sizes,
            "region_frame_ids": region_frame_ids,
            "region_object_ids": region_object_ids,
        }


__all__ = ["VideoReferProcessor", "CHAT_TEMPLATE"]
