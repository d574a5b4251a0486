"""
What Otter needs to know about each language-model family, in one table keyed by `model_type`.

A family is supported when its causal-LM class keeps its decoder layers in one `nn.ModuleList` whose layers take the
hidden states as their first argument. Other families work by naming that list in `OtterConfig.decoder_layers_attr`.
"""

from torch import nn

# model_type -> dotted path from the *ForCausalLM model to its decoder layers
DECODER_LAYERS = {
    "mpt": "transformer.blocks",
    "gpt_neox": "gpt_neox.layers",
    "llama": "model.layers",
}


def decoder_layers_path(model_type: str, override: str | None = None) -> str:
    if override:
        return override
    if model_type not in DECODER_LAYERS:
        raise ValueError(
            f"Otter does not know where a {model_type!r} language model keeps its decoder layers (known: "
            f"{', '.join(sorted(DECODER_LAYERS))}). Name the nn.ModuleList of decoder layers with "
            "OtterConfig(decoder_layers_attr='path.to.layers'), e.g. 'model.layers'."
        )
    return DECODER_LAYERS[model_type]


def get_decoder_layers(language_model: nn.Module, path: str) -> nn.ModuleList:
    module = language_model
    for name in path.split("."):
        if not hasattr(module, name):
            raise ValueError(
                f"{type(language_model).__name__} has no attribute path {path!r} (stopped at {name!r}); set "
                "OtterConfig(decoder_layers_attr=...) to the dotted path of its nn.ModuleList of decoder layers"
            )
        module = getattr(module, name)
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"{path!r} in {type(language_model).__name__} is a {type(module).__name__}, not an nn.ModuleList")
    return module


def set_decoder_layers(language_model: nn.Module, path: str, layers: nn.ModuleList) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = language_model
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    setattr(parent, name, layers)
