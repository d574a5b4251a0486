"""
Writes a full-size OTTER-Image-MPT7B (ViT-L/14 + MPT-7B, cross-attention every 4 layers) of random weights in the
Otter project's release layout, for timing `otter convert otter` without the hub:

  OUT/release/     config.json (model_type "otter", Otter's vendored MPT config) and pytorch_model-0000i-of-0000N.bin
                   shards (bfloat16, `torch.save` of state-dict chunks, as transformers 4.30 wrote them) + the index
  OUT/tokenizer/   a word-level tokenizer of gpt-neox-20b's size (50277 tokens; the model has 50432 embedding rows)

The tensors are made one shard at a time, so writing needs about one shard of memory.
Usage: python benchmarks/make_otter_mpt7b.py OUT [--shard-gib 4]
"""

import argparse
import json
import re
from pathlib import Path

import torch

from otter.configuration_otter import OtterConfig
from otter.conversion.otter_hf import vendored_mpt_config
from otter.modeling_otter import OtterForConditionalGeneration

from make_openflamingo_3b import BASE_VOCAB, write_tokenizer

MPT_7B = {  # Otter's otter9B-mpt7b config's text_config (its vendored llm-foundry MPT)
    "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32,
    "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432, "resid_pdrop": 0.0, "emb_pdrop": 0.0,
    "learned_pos_emb": True, "attn_config": {"attn_type": "multihead_attention", "attn_pdrop": 0.0, "attn_impl": "torch",
                                             "qk_ln": False, "clip_qkv": None, "softmax_scale": None,
                                             "prefix_lm": False, "attn_uses_sequence_id": False, "alibi": True,
                                             "alibi_bias_max": 8},
    "init_device": "cpu", "logit_scale": None, "no_bias": True, "verbose": 0, "embedding_fraction": 1.0,
    "norm_type": "low_precision_layernorm", "use_cache": False,
}
VIT_L_14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768}


def otter_project_name(name: str) -> str:
    """This library's parameter name -> the Otter project's (the inverse of conversion.otter_hf.otter_name)."""
    if name.startswith("vision_model."):
        return "vision_encoder." + name
    if name.startswith("perceiver."):
        name = re.sub(r"^perceiver\.layers\.(\d+)\.1\.", r"perceiver.layers.\1.feed_forward.", name)
        return re.sub(r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1.", name)
    return "lang_encoder." + name[len("language_model."):].replace(".gated_cross_attn_layer.ff.",
                                                                   ".gated_cross_attn_layer.feed_forward.")


def write_release(folder: Path, shard_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = OtterConfig(vision_config=VIT_L_14, text_config=vendored_mpt_config(MPT_7B).to_dict(),
                         cross_attn_every_n_layers=4)
    with torch.device("meta"):
        model = OtterForConditionalGeneration(config)
    tied = model.get_output_embeddings().weight
    tensors = [(otter_project_name(name), tuple(parameter.shape)) for name, parameter in model.named_parameters()
               if parameter is not tied or name.endswith("wte.weight")]
    tensors.append(("vision_encoder.vision_model.embeddings.position_ids", (1, 257)))  # a 4.30-era buffer
    shards, current, size = [], [], 0
    for name, shape in tensors:
        current.append((name, shape))
        size += torch.Size(shape).numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for index, shard in enumerate(shards, 1):
        filename = f"pytorch_model-{index:05d}-of-{len(shards):05d}.bin"
        state = {}
        for name, shape in shard:
            if name.endswith("position_ids"):
                state[name] = torch.arange(shape[1])[None]
            elif "norm" in name and len(shape) == 1:
                state[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                state[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            total += state[name].numel() * state[name].element_size()
            weight_map[name] = filename
        torch.save(state, folder / filename)
        del state
        print(f"wrote {filename}", flush=True)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "otter", "architectures": ["OtterForConditionalGeneration"], "cross_attn_every_n_layers": 4,
        "use_media_placement_augmentation": True, "torch_dtype": "float32", "text_config": MPT_7B,
        "vision_config": {**VIT_L_14, "model_type": "clip_vision_model"}}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shard-gib", type=float, default=4.0)
    args = parser.parse_args()
    write_release(args.out / "release", int(args.shard_gib * 2**30))
    write_tokenizer(args.out / "tokenizer", BASE_VOCAB)
    size = sum(path.stat().st_size for path in (args.out / "release").glob("*.bin"))
    print(f"wrote {args.out}: {size / 2**30:.2f} GiB of shards")


if __name__ == "__main__":
    main()
