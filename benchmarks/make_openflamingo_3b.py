"""
Writes the parts of a full-size OpenFlamingo-3B (ViT-L/14 + MPT-1B-RedPajama, cross-attention every layer) made of
random weights, in the formats of the real files, for timing `otter convert openflamingo` without the hub:

  OUT/ViT-L-14.pt         open_clip ViT-L-14 state dict (vision and text towers, as open_clip checkpoints are)
  OUT/mpt-1b-redpajama/   mosaic_gpt folder: config.json, pytorch_model.bin (50432-row vocabulary), tokenizer
  OUT/checkpoint.pt       OpenFlamingo checkpoint: perceiver, 24 gated cross-attention blocks, 50280-row wte

Usage: python benchmarks/make_openflamingo_3b.py OUT
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from otter.configuration_otter import OtterConfig
from otter.conversion.mosaic_gpt import mpt_config
from otter.modeling_otter import OtterForConditionalGeneration

MPT_1B = {
    "model_type": "mosaic_gpt", "architectures": ["MosaicGPT"], "d_model": 2048, "n_heads": 16, "n_layers": 24,
    "mlp_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": True,
    "attn_clip_qkv": None, "softmax_scale": None, "attn_pdrop": 0, "attn_impl": "torch", "no_bias": True,
    "prefix_lm": False, "attn_uses_sequence_id": False, "logit_scale": None, "embedding_fraction": 1.0,
    "emb_pdrop": 0, "resid_pdrop": 0, "low_precision_layernorm": False, "init_device": "cpu",
}
BASE_VOCAB = 50277  # EleutherAI/gpt-neox-20b's tokenizer; + <|endofchunk|>, <image>, <PAD> = 50280


def random_like_init(*shape):
    return torch.randn(*shape) * 0.02


def write_vit(out: Path) -> None:
    import open_clip

    model = open_clip.create_model("ViT-L-14")
    torch.save(model.state_dict(), out / "ViT-L-14.pt")


def write_mosaic(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MPT_1B, indent=2))
    d, layers = MPT_1B["d_model"], MPT_1B["n_layers"]
    state = {"transformer.wte.weight": random_like_init(MPT_1B["vocab_size"], d), "transformer.ln_f.weight": torch.ones(d)}
    for i in range(layers):
        block = f"transformer.blocks.{i}."
        state.update({
            block + "ln_1.weight": torch.ones(d), block + "ln_2.weight": torch.ones(d),
            block + "attn.Wqkv.weight": random_like_init(3 * d, d),
            block + "attn.q_ln.weight": torch.ones(d), block + "attn.k_ln.weight": torch.ones(d),
            block + "attn.out_proj.weight": random_like_init(d, d),
            block + "mlp.mlp_up.weight": random_like_init(4 * d, d),
            block + "mlp.mlp_down.weight": random_like_init(d, 4 * d),
        })
    torch.save(state, folder / "pytorch_model.bin")
    write_tokenizer(folder, BASE_VOCAB)


def write_tokenizer(folder: Path, size: int) -> None:
    """A word-level tokenizer of `size` tokens (gpt-neox-20b's size, without its merges), `<|endoftext|>` last."""
    vocab = {f"t{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)


def write_checkpoint(out: Path) -> None:
    text_config = mpt_config(MPT_1B).to_dict() | {"vocab_size": BASE_VOCAB + 3}
    vision_config = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"}
    config = OtterConfig(vision_config=vision_config, text_config=text_config, cross_attn_every_n_layers=1)
    with torch.device("meta"):
        model = OtterForConditionalGeneration(config)
    state = {}
    for name, parameter in model.named_parameters():
        if name.startswith("perceiver.") or ".gated_cross_attn_layer." in name or name.endswith("wte.weight"):
            key = name.replace("language_model.", "lang_encoder.", 1)
            state[key] = random_like_init(*parameter.shape)
    torch.save(state, out / "checkpoint.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    write_vit(out)
    write_mosaic(out / "mpt-1b-redpajama")
    write_checkpoint(out)
    print(f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size / 2**30:.2f} GiB" for p in
                                       [out / "ViT-L-14.pt", out / "mpt-1b-redpajama" / "pytorch_model.bin",
                                        out / "checkpoint.pt"]))


if __name__ == "__main__":
    main()
