"""Otter: Flamingo-style multimodal in-context learning on transformers. Importing it registers the Auto classes."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_otter import OtterConfig
from .factory import from_parts
from .language_models import load_language_model
from .modeling_otter import OtterForConditionalGeneration, OtterModel, OtterPreTrainedModel
from .processing_otter import OtterImageProcessor, OtterProcessor

# the tiny ShapesWorld model the package ships (trained by `otter train shapesworld`; see the README)
SHAPESWORLD_MODEL = Path(__file__).parent / "models" / "shapesworld"

AutoConfig.register("otter", OtterConfig)
AutoModel.register(OtterConfig, OtterModel)
AutoModelForCausalLM.register(OtterConfig, OtterForConditionalGeneration)
AutoModelForImageTextToText.register(OtterConfig, OtterForConditionalGeneration)
AutoProcessor.register(OtterConfig, OtterProcessor)
# one image processor for both of transformers' backends: its PIL pipeline is the one whose pixels equal open_clip's
AutoImageProcessor.register(OtterConfig, image_processor_classes={"pil": OtterImageProcessor,
                                                                  "torchvision": OtterImageProcessor})

__all__ = [
    "OtterConfig",
    "OtterModel",
    "OtterForConditionalGeneration",
    "OtterPreTrainedModel",
    "OtterProcessor",
    "OtterImageProcessor",
    "from_parts",
    "load_language_model",
    "SHAPESWORLD_MODEL",
]
