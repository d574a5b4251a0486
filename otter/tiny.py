"""
Tiny randomly initialised Otter models, built offline in seconds: what the tests use, and what `otter demo` runs
until the project ships a trained model. Same structure as the released models, at width 32-64.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

from .factory import from_parts

CORPUS = [
    "a photo of a red circle next to a blue square",
    "Question:what colour is the triangle? Short answer:green",
    "Question:how many shapes are there? Short answer:three",
    "Output:a yellow star above a purple hexagon",
    "User: describe the image GPT: there is an orange circle on a white background",
    "is an image with: 'hello' written on it. Is it hateful? Answer:no",
]

TEXT_CONFIGS = {
    "mpt": dict(model_type="mpt", d_model=64, n_heads=4, n_layers=4, expansion_ratio=2, max_seq_len=512,
                no_bias=True),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=4, num_hidden_layers=4,
                     intermediate_size=128, max_position_embeddings=512, use_parallel_residual=False,
                     tie_word_embeddings=False),
    "llama": dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=4, intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True),
}

TINY_OTTER = dict(perceiver_depth=2, perceiver_heads=2, perceiver_dim_head=16, perceiver_num_latents=4,
                  cross_attn_heads=2, cross_attn_dim_head=16)


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences: encodes any text, GPT-NeoX style (no pad token)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_vision_model(image_size: int = 32) -> CLIPVisionModel:
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=8, hidden_act="quick_gelu")
    return CLIPVisionModel(config)


def tiny_language_model(family: str, vocab_size: int):
    if family not in TEXT_CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(TEXT_CONFIGS)}")
    kwargs = dict(TEXT_CONFIGS[family])
    config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=vocab_size, **kwargs)
    return AutoModelForCausalLM.from_config(config)


def build_tiny_otter(family: str = "mpt", cross_attn_every_n_layers: int = 1, seed: int = 0, **config_kwargs):
    """A tiny random Otter (vision width 32, LM width 64, 4 layers) and its processor; deterministic by `seed`."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    language_model = tiny_language_model(family, vocab_size=len(tokenizer))
    return from_parts(tiny_vision_model(), language_model, tokenizer, cross_attn_every_n_layers,
                      **{**TINY_OTTER, **config_kwargs})
