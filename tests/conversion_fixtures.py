"""
Tiny OpenFlamingo releases for the conversion tests: an open_clip ViT (model-config JSON + weights file), a language
model folder with its tokenizer, and a `checkpoint.pt` made by the reference code (open-flamingo 2.0.1's own
`create_model_and_transforms`) and filtered as its training script filters it.
"""

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
factory = pytest.importorskip("open_flamingo.src.factory", reason="pip install --no-deps open-flamingo==2.0.1 einops-exts")

from otter.tiny import tiny_language_model, tiny_tokenizer  # noqa: E402

from .reference import FlamingoLMForTransformers5  # noqa: E402

TINY_VIT = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
ALIASES = ("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")


def write_open_clip(folder, name: str = "tiny-vit", seed: int = 0):
    """(model-config JSON, weights file) of a random tiny open_clip model, registered with open_clip under `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return config_path, weights


def write_language_model(folder, family: str, seed: int = 0):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    tiny_language_model(family, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_model(vision_config, vision_weights, lm_folder, every_n: int, monkeypatch):
    """OpenFlamingo built by its own factory (with the transformers-5 shim and the released models' vision tokens)."""
    monkeypatch.setattr(factory, "FlamingoLMMixin", FlamingoLMForTransformers5)
    model, image_processor, tokenizer = factory.create_model_and_transforms(
        vision_config.stem, str(vision_weights), str(lm_folder), str(lm_folder), cross_attn_every_n_layers=every_n)
    model.vision_encoder.final_ln_after_pool = True  # pre-ln_post tokens, as open_clip <= 2.22 returned
    return model.eval(), image_processor, tokenizer


def train_randomly(model, seed: int = 0) -> None:
    """Stand-in for training: new values for everything OpenFlamingo trains, gates open."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(noise * 0.6 if name.endswith("_gate") else parameter + 0.05 * noise)


def released_checkpoint(model) -> dict[str, torch.Tensor]:
    """
    The state dict OpenFlamingo's train_utils.filter_state_dict_to_trainable saves, in the names the released files
    have (saved under transformers 4): trainable parameters plus every parameter whose name contains `embed`; no
    aliases, no vision encoder, no tied copies; GPT-NeoX's head as `embed_out`.
    """
    state = model.state_dict()
    for name, parameter in model.named_parameters():
        if "embed" not in name and not parameter.requires_grad:
            state.pop(name, None)
    state = {name: tensor for name, tensor in state.items()
             if not name.startswith(ALIASES) and not name.startswith("vision_encoder.")}
    head = "lang_encoder.lm_head.weight"
    if head in state:  # a tied copy of the input embeddings (MPT, tied LLaMA): mosaic_gpt had no lm_head at all
        del state[head]
    if model.lang_encoder.config.model_type == "gpt_neox":
        state["lang_encoder.embed_out.weight"] = model.lang_encoder.get_output_embeddings().weight.detach().clone()
    return state
