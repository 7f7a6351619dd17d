"""VideoRefer model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


# Defaults describe the released VideoRefer-7B: SigLIP so400m-patch14-384 and Qwen2-7B-Instruct.
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}
QWEN2_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
CONNECTOR_PADDING = {"stc_connector": 1, "stc_connector_v35": 0, "stp_connector": 0}


def stc_output_length(
    num_frames: int, patches_per_side: int, downsample: tuple[int, int, int] | list[int], connector_type: str
) -> int:
    """Number of visual tokens the spatio-temporal connector makes from `num_frames` frames of a square patch grid."""
    if connector_type not in CONNECTOR_PADDING:
        raise ValueError(
            f"connector_type must be one of {sorted(CONNECTOR_PADDING)}, got {connector_type!r}"
        )
    padding = CONNECTOR_PADDING[connector_type]
    time_kernel, space_kernel, _ = downsample
    frames = (num_frames + 2 * padding - time_kernel) // time_kernel + 1
    side = (patches_per_side + 2 * padding - space_kernel) // space_kernel + 1
    return frames * side * side


@strict
class VideoReferConfig(PreTrainedConfig):
    r"""
    Configuration of a VideoRefer model: a SigLIP vision tower, the STC connector that turns the frames of a video into
    visual tokens, the object encoder that turns masks into region tokens, and a Qwen2 language model.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision tower (a SigLIP vision model by default).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the language model (Qwen2 by default).
        num_frames (`int`, *optional*, defaults to 16):
            Frames sampled per video; an image is repeated this many times, as in the release.
        num_region_tokens (`int`, *optional*, defaults to 4):
            At most this many tokens per object: temporal token merge reduces k > num_region_tokens frames to it.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden state of the vision tower used for both the video tokens and mask pooling.
        connector_type (`str`, *optional*, defaults to `"stc_connector_v35"`):
            `"stc_connector_v35"` (3D conv without padding, the released models), `"stc_connector"` (3D conv with
            padding 1) or `"stp_connector"` (3D average pooling).
        connector_depth (`int`, *optional*, defaults to 4):
            Blocks in each of the connector's two RegNet stages.
        connector_downsample (`list[int]`, *optional*, defaults to `[2, 2, 2]`):
            Temporal, height and width down-sampling of the connector.
        connector_mlp_depth (`int`, *optional*, defaults to 2):
            Linear layers of the connector's read-out MLP (GELU between them).
        object_encoder_depth (`int`, *optional*, defaults to 2):
            Linear layers of the object encoder's MLP (GELU between them).
        kernel_backend (`str`, *optional*, defaults to `"auto"`):
            Which implementation computes mask pooling and token merge: `"auto"` (Triton on CUDA, PyTorch elsewhere),
            `"torch"` or `"triton"`. The `VIDEOREFER_KERNELS` environment variable overrides `"auto"`.
        image_token_id, video_token_id, region_token_id (`int`, *optional*):
            Ids of the `<image>`, `<video>` and `<region>` placeholder tokens.
    """

    model_type = "videorefer"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=SIGLIP_SO400M_384
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=QWEN2_7B),
    }
    keys_to_ignore_at_inference = ["past_key_values"]

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_frames: int = 16
    num_region_tokens: int = 4
    vision_feature_layer: int = -2
    connector_type: str = "stc_connector_v35"
    connector_depth: int = 4
    connector_downsample: list[int] | tuple[int, ...] = (2, 2, 2)
    connector_mlp_depth: int = 2
    object_encoder_depth: int = 2
    kernel_backend: str = "auto"
    image_token_id: int = 151647
    video_token_id: int = 151648
    region_token_id: int = 151646
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.connector_downsample = list(self.connector_downsample)
        if self.connector_type not in CONNECTOR_PADDING:
            raise ValueError(
                f"connector_type must be one of {sorted(CONNECTOR_PADDING)}, got {self.connector_type!r}"
            )
        if len(self.connector_downsample) != 3 or self.connector_downsample[1] != self.connector_downsample[2]:
            raise ValueError(
                f"connector_downsample must be [time, height, width] with height == width, got {self.connector_downsample}"
            )
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_backend must be 'auto', 'torch' or 'triton', got {self.kernel_backend!r}")
        if self.num_region_tokens < 1 or self.num_frames < 1:
            raise ValueError("num_region_tokens and num_frames must be >= 1")
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def patches_per_side(self) -> int:
        """Side of the vision tower's square patch grid."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def placeholder_token_ids(self) -> tuple[int, int, int]:
        """Ids of the `<image>`, `<video>` and `<region>` placeholders, whose embeddings the model replaces."""
        return (self.image_token_id, self.video_token_id, self.region_token_id)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per video of `num_frames` frames (and per image, which is repeated to `num_frames`)."""
        return stc_output_length(
            self.num_frames, self.patches_per_side, self.connector_downsample, self.connector_type
        )


__all__ = ["VideoReferConfig", "stc_output_length"]
