"""PyTorch VideoRefer: a video LLM that answers questions about the objects that masks point at."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import PreTrainedModel

from .configuration_videorefer import CONNECTOR_PADDING, VideoReferConfig
from .region_ops import mask_pool, temporal_token_merge


REGION_INPUT_NAMES = (
    "region_pixel_values",
    "region_masks",
    "region_mask_sizes",
    "region_frame_ids",
    "region_object_ids",
)


@dataclass
class VideoReferModelOutputWithPast(ModelOutput):
    """Output of [`VideoReferModel`]: the language model's outputs plus the visual and region tokens it was given."""

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    visual_hidden_states: torch.FloatTensor | None = None
    region_hidden_states: torch.FloatTensor | None = None


@dataclass
class VideoReferCausalLMOutputWithPast(ModelOutput):
    """Output of [`VideoReferForCausalLM`]."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    visual_hidden_states: torch.FloatTensor | None = None
    region_hidden_states: torch.FloatTensor | None = None


def build_mlp(depth: int, input_size: int, output_size: int) -> nn.Sequential:
    """Linear layers with GELU between them: `Linear(input, output)`, then `depth - 1` times `GELU, Linear(output, output)`."""
    layers = [nn.Linear(input_size, output_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(output_size, output_size)]
    return nn.Sequential(*layers)


class VideoReferLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [batch, channels, height, width] tensor."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.permute(0, 2, 3, 1)
        hidden_states = F.layer_norm(hidden_states, self.normalized_shape, self.weight, self.bias, self.eps)
        return hidden_states.permute(0, 3, 1, 2)


class VideoReferConvNormAct(nn.Module):
    """Bias-free convolution, channel LayerNorm and optional SiLU (parameter names `conv`, `bn` as in timm)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1, activate: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = VideoReferLayerNorm2d(out_channels, eps=1e-5)
        self.act = nn.SiLU() if activate else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(hidden_states)))


class VideoReferSqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate over channels."""

    def __init__(self, channels: int, reduced_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_channels, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(hidden_states.mean((2, 3), keepdim=True))))
        return hidden_states * gate.sigmoid()


class VideoReferRegNetBlock(nn.Module):
    """RegNet bottleneck block (1x1 conv, depthwise 3x3 conv, SE, 1x1 conv, residual), as timm's `Bottleneck`
    with bottle_ratio 1, group size 1, SE ratio 0.25, SiLU and LayerNorm2d."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = VideoReferConvNormAct(in_channels, out_channels, 1)
        self.conv2 = VideoReferConvNormAct(out_channels, out_channels, 3, groups=out_channels)
        self.se = VideoReferSqueezeExcite(out_channels, round(in_channels * 0.25))
        self.conv3 = VideoReferConvNormAct(out_channels, out_channels, 1, activate=False)
        self.downsample = (
            VideoReferConvNormAct(in_channels, out_channels, 1, activate=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.act3 = nn.SiLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.downsample(hidden_states)
        hidden_states = self.conv3(self.se(self.conv2(self.conv1(hidden_states))))
        return self.act3(hidden_states + residual)


class VideoReferRegNetStage(nn.Module):
    """A stack of RegNet blocks named `b1`, `b2`, ... like timm's `RegStage` with stride 1 and dilation 1."""

    def __init__(self, depth: int, in_channels: int, out_channels: int):
        super().__init__()
        for index in range(depth):
            block = VideoReferRegNetBlock(in_channels if index == 0 else out_channels, out_channels)
            self.add_module(f"b{index + 1}", block)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            hidden_states = block(hidden_states)
        return hidden_states


class VideoReferSTCConnector(nn.Module):
    """Spatial-temporal convolution connector: RegNet stage per frame, 3D down-sampling over (time, height, width),
    RegNet stage, MLP read-out. Maps [batch, frames, patches, vision_dim] to [batch, tokens, text_dim]."""

    def __init__(self, config: VideoReferConfig):
        super().__init__()
        vision_size = config.vision_config.hidden_size
        text_size = config.text_config.hidden_size
        downsample = tuple(config.connector_downsample)
        depth = config.connector_depth
        self.s1 = VideoReferRegNetStage(depth, vision_size, text_size) if depth else nn.Identity()
        if config.connector_type == "stp_connector":
            resample = nn.AvgPool3d(downsample)
        else:
            resample = nn.Conv3d(
                text_size, text_size, downsample, stride=downsample, padding=CONNECTOR_PADDING[config.connector_type]
            )
        self.sampler = nn.Sequential(resample, nn.SiLU())
        self.s2 = VideoReferRegNetStage(depth, text_size, text_size) if depth else nn.Identity()
        self.readout = build_mlp(config.connector_mlp_depth, text_size, text_size)

    def forward(self, frame_features: torch.Tensor) -> torch.Tensor:
        batch_size, num_frames, num_patches, channels = frame_features.shape
        side = int(num_patches**0.5)
        hidden_states = frame_features.reshape(batch_size * num_frames, side, side, channels).permute(0, 3, 1, 2)
        hidden_states = self.s1(hidden_states)
        channels = hidden_states.shape[1]
        hidden_states = hidden_states.reshape(batch_size, num_frames, channels, side, side).transpose(1, 2)
        hidden_states = self.sampler(hidden_states)
        _, _, new_frames, new_height, new_width = hidden_states.shape
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size * new_frames, channels, new_height, new_width)
        hidden_states = self.s2(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, new_frames, channels, new_height * new_width)
        hidden_states = hidden_states.permute(0, 1, 3, 2).reshape(batch_size, -1, channels)
        return self.readout(hidden_states)


class VideoReferObjectEncoder(nn.Module):
    """Turns masks into region tokens: mask pooling of frame features, temporal token merge of each object's
    per-frame tokens to at most `num_region_tokens`, then an MLP into the language model's embedding space."""

    def __init__(self, config: VideoReferConfig):
        super().__init__()
        self.num_region_tokens = config.num_region_tokens
        self.kernel_backend = None if config.kernel_backend == "auto" else config.kernel_backend
        self.mlp = build_mlp(config.object_encoder_depth, config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(
        self,
        frame_features: torch.Tensor,
        masks: torch.Tensor,
        mask_sizes: torch.Tensor,
        frame_index: torch.Tensor,
        object_index: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            frame_features: [num_frames, num_patches, vision_dim] features of the frames the masks are drawn on.
            masks: [num_masks, height, width] masks at frame resolution (zero-padded canvas).
            mask_sizes: [num_masks, 2] real (height, width) of each mask.
            frame_index: [num_masks] frame of each mask in `frame_features`.
            object_index: [num_masks] object of each mask, objects numbered 0.. in the order of their placeholders;
                the masks of one object are in time order.

        Returns:
            [num_region_tokens_total, text_dim] region tokens, object by object, `min(k, num_region_tokens)` for an
            object with k masks.
        """
        device = frame_features.device
        masks, mask_sizes, frame_index, object_index = (
            tensor.to(device) for tensor in (masks, mask_sizes, frame_index, object_index)
        )
        pooled = mask_pool(
            frame_features, masks, frame_index, mask_sizes, out_dtype=torch.float32, backend=self.kernel_backend
        )
        object_index, order = torch.sort(object_index, stable=True)
        pooled = pooled[order]
        num_objects = int(object_index[-1]) + 1
        lengths = torch.bincount(object_index, minlength=num_objects)
        if bool((lengths == 0).any()):
            raise ValueError("region_object_ids must number the objects of a sample 0, 1, ... without gaps")
        starts = lengths.cumsum(0) - lengths
        position = torch.arange(len(object_index), device=object_index.device) - starts[object_index]
        tokens = pooled.new_zeros(num_objects, int(lengths.max()), pooled.shape[-1])
        tokens[object_index, position] = pooled

        merged, counts = temporal_token_merge(tokens, lengths, self.num_region_tokens, backend=self.kernel_backend)
        # Ties in the release's merge can leave fewer tokens than placeholders: repeat the last one into the rest.
        slots = torch.arange(merged.shape[1], device=merged.device)
        source = torch.minimum(slots[None, :], (counts - 1)[:, None])
        merged = merged.gather(1, source[..., None].expand(-1, -1, merged.shape[-1]))
        region_tokens = self.mlp(merged.to(self.mlp[0].weight.dtype))
        keep = slots[None, :] < torch.clamp(lengths, max=self.num_region_tokens)[:, None]
        return region_tokens[keep]


class VideoReferPreTrainedModel(PreTrainedModel):
    config: VideoReferConfig
    config_class = VideoReferConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class VideoReferModel(VideoReferPreTrainedModel):
    """VideoRefer without the language-modelling head: vision tower, STC connector, object encoder, Qwen2 decoder."""

    def __init__(self, config: VideoReferConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.connector = VideoReferSTCConnector(config)
        self.object_encoder = VideoReferObjectEncoder(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_frames, 3, size, size] pixels -> [num_frames, num_patches, vision_dim] features of the selected layer."""
        outputs = self.vision_tower(
            pixel_values=pixel_values.to(self.vision_tower.dtype), output_hidden_states=True, return_dict=True
        )
        return outputs.hidden_states[self.config.vision_feature_layer]

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """[batch, frames, 3, size, size] -> [batch, num_visual_tokens, text_dim] visual tokens."""
        batch_size, num_frames = pixel_values_videos.shape[:2]
        features = self.get_frame_features(pixel_values_videos.flatten(0, 1))
        return self.connector(features.reshape(batch_size, num_frames, *features.shape[1:]))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[batch, 3, size, size] -> [batch, num_visual_tokens, text_dim]; an image is a still video of `num_frames`."""
        features = self.get_frame_features(pixel_values)
        return self.connector(features[:, None].expand(-1, self.config.num_frames, -1, -1))

    def get_region_features(
        self,
        region_pixel_values: torch.Tensor,
        region_masks: torch.Tensor,
        region_mask_sizes: torch.Tensor,
        region_frame_ids: torch.Tensor,
        region_object_ids: torch.Tensor,
    ) -> torch.Tensor:
        """
        Region tokens of a batch, sample by sample and object by object (the order of the `<region>` placeholders).

        Args:
            region_pixel_values: [batch, max_frames, 3, size, size] pixels of the frames that masks are drawn on.
            region_masks: [batch, max_masks, height, width] masks at frame resolution, zero-padded.
            region_mask_sizes: [batch, max_masks, 2] real (height, width) of each mask.
            region_frame_ids: [batch, max_masks] frame of each mask in `region_pixel_values`, -1 for padding.
            region_object_ids: [batch, max_masks] object of each mask within its sample, -1 for padding.
        """
        valid = region_frame_ids >= 0
        used_frames = torch.zeros(region_pixel_values.shape[:2], dtype=torch.bool, device=valid.device)
        used_frames[valid.nonzero(as_tuple=True)[0], region_frame_ids[valid]] = True
        frame_features = self.get_frame_features(region_pixel_values[used_frames])
        flat_frame_index = used_frames.flatten().cumsum(0).view_as(used_frames) - 1

        objects_per_sample = (region_object_ids.amax(dim=1) + 1).clamp(min=0)
        object_offsets = objects_per_sample.cumsum(0) - objects_per_sample
        batch_index = valid.nonzero(as_tuple=True)[0]
        return self.object_encoder(
            frame_features,
            region_masks[valid],
            region_mask_sizes[valid],
            flat_frame_index[batch_index, region_frame_ids[valid]],
            object_offsets[batch_index] + region_object_ids[valid],
        )

    def _fill_placeholders(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        token_id: int,
        features: torch.Tensor,
        name: str,
    ) -> torch.Tensor:
        """Writes `features` (any leading shape, last dim = hidden) into the positions of the `token_id` placeholders."""
        if input_ids is None:
            raise ValueError(f"Pass input_ids (not inputs_embeds) with {name} inputs: they locate the placeholders")
        mask = input_ids == token_id
        num_placeholders = int(mask.sum())
        num_features = features.numel() // features.shape[-1]
        if num_placeholders != num_features:
            raise ValueError(
                f"The text has {num_placeholders} {name} placeholder tokens but the inputs give {num_features} {name} "
                "tokens; let the processor expand the placeholders of the prompt."
            )
        features = features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask[..., None], features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        region_pixel_values: torch.FloatTensor | None = None,
        region_masks: torch.Tensor | None = None,
        region_mask_sizes: torch.LongTensor | None = None,
        region_frame_ids: torch.LongTensor | None = None,
        region_object_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> VideoReferModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, size, size)`, *optional*):
            One image per sample, filling the `<image>` placeholders.
        pixel_values_videos (`torch.FloatTensor` of shape `(batch_size, num_frames, 3, size, size)`, *optional*):
            The sampled frames of one video per sample, filling the `<video>` placeholders.
        region_pixel_values, region_masks, region_mask_sizes, region_frame_ids, region_object_ids:
            The masks of the objects in the prompt and the frames they are drawn on, filling the `<region>`
            placeholders; see [`VideoReferModel.get_region_features`]. Made by [`VideoReferProcessor`].
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            # Placeholder ids may lie past the vocabulary (the released models have no rows for <image>/<video>);
            # their embeddings are replaced below anyway.
            placeholder_ids = torch.tensor(self.config.placeholder_token_ids, device=input_ids.device)
            text_ids = input_ids.masked_fill(torch.isin(input_ids, placeholder_ids), 0)
            inputs_embeds = self.get_input_embeddings()(text_ids)

        visual_features = None
        if pixel_values_videos is not None:
            visual_features = self.get_video_features(pixel_values_videos)
            inputs_embeds = self._fill_placeholders(
                input_ids, inputs_embeds, self.config.video_token_id, visual_features, "<video>"
            )
        if pixel_values is not None:
            visual_features = self.get_image_features(pixel_values)
            inputs_embeds = self._fill_placeholders(
                input_ids, inputs_embeds, self.config.image_token_id, visual_features, "<image>"
            )
        region_features = None
        if region_masks is not None and region_masks.numel() > 0 and bool((region_frame_ids >= 0).any()):
            region_features = self.get_region_features(
                region_pixel_values, region_masks, region_mask_sizes, region_frame_ids, region_object_ids
            )
        is_prefill = past_key_values is None or past_key_values.get_seq_length() == 0
        if region_features is not None or (input_ids is not None and is_prefill):
            # Also checks that a prompt with <region> placeholders came with masks.
            empty = inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
            inputs_embeds = self._fill_placeholders(
                input_ids,
                inputs_embeds,
                self.config.region_token_id,
                region_features if region_features is not None else empty,
                "<region>",
            )

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return VideoReferModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_hidden_states=visual_features,
            region_hidden_states=region_features,
        )


class VideoReferForCausalLM(VideoReferPreTrainedModel, GenerationMixin):
    """VideoRefer with a language-modelling head, for training and `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VideoReferConfig):
        super().__init__(config)
        self.model = VideoReferModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        region_pixel_values: torch.FloatTensor | None = None,
        region_masks: torch.Tensor | None = None,
        region_mask_sizes: torch.LongTensor | None = None,
        region_frame_ids: torch.LongTensor | None = None,
        region_object_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VideoReferCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the language-modelling loss, aligned with `input_ids` (shifted inside); -100 is ignored.

        The other inputs are those of [`VideoReferModel.forward`].
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            region_pixel_values=region_pixel_values,
            region_masks=region_masks,
            region_mask_sizes=region_mask_sizes,
            region_frame_ids=region_frame_ids,
            region_object_ids=region_object_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return VideoReferCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            visual_hidden_states=outputs.visual_hidden_states,
            region_hidden_states=outputs.region_hidden_states,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in REGION_INPUT_NAMES:
                model_inputs.pop(name, None)
        return model_inputs


__all__ = ["VideoReferPreTrainedModel", "VideoReferModel", "VideoReferForCausalLM"]
