"""
The mosaic_gpt architecture of MPT-1B-RedPajama (OpenFlamingo-3B's LM), written out from its published modelling code
(`mosaic_gpt.py`, `attention.py`: torch attention path, ALiBi, QK LayerNorm, no biases, logits from `wte`), as the
oracle of the mosaic_gpt -> MPT conversion. Works on a plain state dict with mosaic_gpt's names.
"""

import json
import math

import torch
import torch.nn.functional as F

TINY_MOSAIC = {
    "model_type": "mosaic_gpt", "architectures": ["MosaicGPT"], "d_model": 64, "n_heads": 4, "n_layers": 3,
    "mlp_ratio": 4, "max_seq_len": 128, "vocab_size": 330, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": True,
    "attn_clip_qkv": None, "softmax_scale": None, "attn_pdrop": 0.0, "attn_impl": "torch", "no_bias": True,
    "prefix_lm": False, "attn_uses_sequence_id": False, "logit_scale": None, "embedding_fraction": 1.0,
    "emb_pdrop": 0.0, "resid_pdrop": 0.0, "low_precision_layernorm": False, "init_device": "cpu",
}


def random_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    d, ratio, vocab = config["d_model"], config["mlp_ratio"], config["vocab_size"]

    def rand(*shape, scale=0.1, centre=0.0):
        return centre + scale * torch.randn(*shape, generator=generator)

    state = {"transformer.wte.weight": rand(vocab, d, scale=0.5), "transformer.ln_f.weight": rand(d, centre=1.0)}
    for i in range(config["n_layers"]):
        block = f"transformer.blocks.{i}."
        state.update({
            block + "ln_1.weight": rand(d, centre=1.0),
            block + "attn.Wqkv.weight": rand(3 * d, d, scale=d ** -0.5),
            block + "attn.q_ln.weight": rand(d, centre=1.0, scale=0.3),
            block + "attn.k_ln.weight": rand(d, centre=1.0, scale=0.3),
            block + "attn.out_proj.weight": rand(d, d, scale=d ** -0.5),
            block + "ln_2.weight": rand(d, centre=1.0),
            block + "mlp.mlp_up.weight": rand(ratio * d, d, scale=d ** -0.5),
            block + "mlp.mlp_down.weight": rand(d, ratio * d, scale=(ratio * d) ** -0.5),
        })
    return state


def write_folder(folder, config: dict, state: dict, tokenizer=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def alibi_bias(n_heads: int, seq_len: int, alibi_bias_max: int = 8) -> torch.Tensor:
    bias = torch.arange(1 - seq_len, 1, dtype=torch.float32).view(1, 1, 1, seq_len)
    m = torch.arange(1, n_heads + 1, dtype=torch.float32).mul(alibi_bias_max / n_heads)
    return bias * (1.0 / 2 ** m.view(1, n_heads, 1, 1))


def layer_norm(x, weight):
    return F.layer_norm(x, (x.shape[-1],), weight, None, 1e-5)


def attention(query, key, value, n_heads, attn_bias, key_padding_mask, softmax_scale=None):
    batch, s_q, d = query.shape
    s_k = key.shape[1]
    q = query.view(batch, s_q, n_heads, d // n_heads).transpose(1, 2)
    k = key.view(batch, s_k, n_heads, d // n_heads).permute(0, 2, 3, 1)
    v = value.view(batch, s_k, n_heads, d // n_heads).transpose(1, 2)
    softmax_scale = softmax_scale or 1 / math.sqrt(d // n_heads)
    weights = q.matmul(k) * softmax_scale + attn_bias
    min_value = torch.finfo(q.dtype).min
    if key_padding_mask is not None:
        weights = weights.masked_fill(~key_padding_mask.view(batch, 1, 1, s_k), min_value)
    causal = ~torch.ones(max(s_q, s_k), max(s_q, s_k), dtype=torch.bool).tril()[-s_q:, -s_k:]
    weights = weights.masked_fill(causal.view(1, 1, s_q, s_k), min_value)
    out = torch.softmax(weights, dim=-1).matmul(v)
    return out.transpose(1, 2).reshape(batch, s_q, d)


def forward(state: dict, config: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Logits `(batch, seq, vocab)` of mosaic_gpt on `input_ids`."""
    n_heads = config["n_heads"]
    seq_len = input_ids.shape[1]
    bias = alibi_bias(n_heads, config["max_seq_len"], config["alibi_bias_max"])[:, :, :, -seq_len:]
    key_padding_mask = attention_mask.bool() if attention_mask is not None else None
    x = F.embedding(input_ids, state["transformer.wte.weight"])
    for i in range(config["n_layers"]):
        block = f"transformer.blocks.{i}."
        a = layer_norm(x, state[block + "ln_1.weight"])
        query, key, value = F.linear(a, state[block + "attn.Wqkv.weight"]).chunk(3, dim=2)
        if config["attn_qk_ln"]:
            query = layer_norm(query, state[block + "attn.q_ln.weight"])
            key = layer_norm(key, state[block + "attn.k_ln.weight"])
        context = attention(query, key, value, n_heads, bias, key_padding_mask, config["softmax_scale"])
        x = x + F.linear(context, state[block + "attn.out_proj.weight"])
        m = layer_norm(x, state[block + "ln_2.weight"])
        x = x + F.linear(F.gelu(F.linear(m, state[block + "mlp.mlp_up.weight"])), state[block + "mlp.mlp_down.weight"])
    x = layer_norm(x, state["transformer.ln_f.weight"])
    return F.linear(x, state["transformer.wte.weight"])
