"""VideoRefer for Hugging Face transformers: importing this package registers the Auto classes."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .configuration_videorefer import VideoReferConfig
from .modeling_videorefer import VideoReferForCausalLM, VideoReferModel, VideoReferPreTrainedModel
from .processing_videorefer import VideoReferProcessor


__version__ = "0.1.0"

AutoConfig.register(VideoReferConfig.model_type, VideoReferConfig, exist_ok=True)
AutoModel.register(VideoReferConfig, VideoReferModel, exist_ok=True)
AutoModelForCausalLM.register(VideoReferConfig, VideoReferForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(VideoReferConfig, VideoReferForCausalLM, exist_ok=True)
AutoProcessor.register(VideoReferConfig, VideoReferProcessor, exist_ok=True)
AutoImageProcessor.register(VideoReferConfig, image_processor_classes={"pil": SiglipImageProcessorPil}, exist_ok=True)

# Saved checkpoints carry `auto_map` and these files, so they load with `trust_remote_code=True` without this package.
VideoReferConfig.register_for_auto_class()
VideoReferModel.register_for_auto_class("AutoModel")
VideoReferForCausalLM.register_for_auto_class("AutoModelForCausalLM")
VideoReferProcessor.register_for_auto_class()

__all__ = [
    "VideoReferConfig",
    "VideoReferForCausalLM",
    "VideoReferModel",
    "VideoReferPreTrainedModel",
    "VideoReferProcessor",
]
