"""mmtune's native LLaVA (``model_type = "llava_llama"``): any CLIP / SigLIP tower + a
projector + any Llama-architecture LM, trained in LLaVA's two stages and loadable with
``AutoModelForCausalLM.from_pretrained`` once this package is imported."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration import LlavaConfig
from .constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from .builder import load_pretrained_model
from .encoders import VisionTower, build_vision_tower
from .meta import LlavaMetaForCausalLM, LlavaMetaModel, load_state_file
from .mm_utils import (
    expand2square,
    get_model_name_from_path,
    preprocess_images,
    process_images,
    tokenizer_image_token,
)
from .modeling_llava_llama import LlavaLlamaForCausalLM, LlavaLlamaModel
from .processing import LlavaLlamaProcessor
from .projectors import build_vision_projector

AutoConfig.register("llava_llama", LlavaConfig, exist_ok=True)
AutoModel.register(LlavaConfig, LlavaLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM, exist_ok=True)
AutoProcessor.register(LlavaConfig, LlavaLlamaProcessor, exist_ok=True)

__all__ = [
    "DEFAULT_IMAGE_PATCH_TOKEN", "DEFAULT_IMAGE_TOKEN", "DEFAULT_IM_END_TOKEN", "DEFAULT_IM_START_TOKEN",
    "IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "LlavaConfig", "LlavaLlamaForCausalLM", "LlavaLlamaModel",
    "LlavaLlamaProcessor", "LlavaMetaForCausalLM", "LlavaMetaModel", "VisionTower", "build_vision_projector",
    "build_vision_tower", "expand2square", "get_model_name_from_path", "load_pretrained_model", "load_state_file",
    "preprocess_images", "process_images", "tokenizer_image_token",
]
