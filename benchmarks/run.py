"""
Otter against the reference implementation (open-flamingo 2.0.1), side by side in one run, on identical weights.

    python benchmarks/run.py [--device cpu|cuda] [--parts generation evaluation training conversion] [--out FILE]

CPU mode builds a model big enough that compute dominates overhead (ViT-B/32's tower: 12 layers of width 768; MPT 8
layers of width 512; OpenFlamingo's perceiver and cross-attention sizes); GPU mode (`--device cuda`) builds the
OpenFlamingo-9B architecture (ViT-L/14, MPT-7B, cross-attention every 4 layers) in bf16. Weights are random: speed does
not depend on them. The reference is built around deep copies of Otter's own parts (tests/reference.py; its MPT runs
transformers' eager attention, as OpenFlamingo does), so both compute the same function. The training step runs on three
prompt shapes (TRAINING_PROMPTS), from short chunks to a long instruction context. Decode speed is set against the
memory-bandwidth bound (batch x bandwidth / weight bytes) and the training step's FLOPs (counted by torch's
FlopCounterMode) against the matmul rate measured on the machine and, on a GPU whose data sheet GPU_SPECS knows (or
--peak-tflops), the MFU. Writes a Markdown table (stdout, and --out, rewritten after each part). `--tiny` runs every
part on a tiny model, to check the script (its figures measure overhead, not the implementations).
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path

import torch
from PIL import Image
from torch.utils import flop_counter
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otter.configuration_otter import OtterConfig  # noqa: E402
from otter.eval.demos import random_demos  # noqa: E402
from otter.eval.evaluator import evaluate  # noqa: E402
from otter.factory import clip_image_processor  # noqa: E402
from otter.modeling_otter import OtterForConditionalGeneration  # noqa: E402
from otter.processing_otter import OtterProcessor  # noqa: E402
from otter.prompts import END_OF_CHUNK, IMAGE_TOKEN  # noqa: E402
from tests.reference import reference_twin  # noqa: E402

VOCAB = 32000
MEDIA, EOC, PAD = VOCAB, VOCAB + 1, VOCAB + 2
CPU_MODEL = dict(  # ViT-B/32's tower, an LM of 8 layers x 512
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                patch_size=32, hidden_act="quick_gelu"),
    text=dict(model_type="mpt", d_model=512, n_heads=8, n_layers=8, expansion_ratio=4, max_seq_len=2048,
              vocab_size=VOCAB + 3),
    cross_attn_every_n_layers=1,
)
GPU_MODEL = dict(  # OpenFlamingo-9B: ViT-L/14 (openai), MPT-7B, cross-attention every 4 layers
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                patch_size=14, hidden_act="quick_gelu"),
    text=dict(model_type="mpt", d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048,
              vocab_size=50280),
    cross_attn_every_n_layers=4,
)
TINY_MODEL = dict(  # checks that the script runs; its figures are overhead
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                patch_size=16, hidden_act="quick_gelu"),
    text=dict(model_type="mpt", d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=2048,
              vocab_size=VOCAB + 3),
    cross_attn_every_n_layers=1,
)


# Data-sheet figures (dense bf16 TFLOP/s, HBM TB/s) for the MFU and the decode bound; other GPUs take --peak-tflops
# and --hbm-tbs. Checked in order: the first name contained in torch.cuda.get_device_name() wins.
GPU_SPECS = [
    ("H200 NVL", 835, 4.8),
    ("H200", 989, 4.8),
    ("H100 80GB HBM3", 989, 3.35),  # SXM
    ("A100-SXM4-80GB", 312, 2.039),
    ("A100-SXM4-40GB", 312, 1.555),
]


# Training prompts, each `images` chunks `<image> ...shot_tokens... <|endofchunk|>` and a last `<image>
# ...query_tokens...`: short chunks; MMC4 documents as OpenFlamingo trains on them (6 images, 256 tokens); a long
# instruction context (in-context examples before the query, MIMIC-IT style), where the language model dominates.
TRAINING_PROMPTS = {
    "short": dict(label="short chunks", images=4, shot_tokens=14, query_tokens=10),
    "mmc4": dict(label="MMC4 (OpenFlamingo's)", images=6, shot_tokens=41, query_tokens=40),
    "long": dict(label="long instruction context", images=4, shot_tokens=126, query_tokens=127),
}

PARTS = ["generation", "video", "evaluation", "eval-processes", "training", "conversion"]
GPU_PARTS = ["generation", "video", "evaluation", "training"]


def build(spec, device, dtype):
    config = OtterConfig(vision_config=spec["vision"], text_config=spec["text"],
                         cross_attn_every_n_layers=spec["cross_attn_every_n_layers"], media_token_id=MEDIA,
                         eoc_token_id=EOC, pad_token_id=PAD)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: the 9B model would take minutes on the host
        model = OtterForConditionalGeneration(config)
    model = model.to(dtype=dtype).eval()
    with torch.no_grad():
        for block in model.cross_attention_blocks():  # open gates, so that the images matter
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    reference = reference_twin(model).to(device=device, dtype=dtype).eval()
    return model, reference


def prompt(batch, images, device, seed=0, shot_tokens=14, query_tokens=10):
    """`images` few-shot chunks `<image> ...14 tokens... <|endofchunk|>`, the last one an open query."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row = []
        for index in range(images):
            last = index == images - 1
            row += [MEDIA] + torch.randint(0, VOCAB, (query_tokens if last else shot_tokens,), generator=generator).tolist()
            row += [] if last else [EOC]
        rows.append(row)
    input_ids = torch.tensor(rows, device=device)
    return input_ids, torch.ones_like(input_ids)


def pixels(batch, images, size, device, dtype):
    return torch.randn(batch, images, 1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data_sheet(device, peak_tflops=None, hbm_tbs=None):
    """(peak FLOP/s, HBM bytes/s) from the flags, else from GPU_SPECS; None where unknown (always, on CPU)."""
    if device == "cuda" and (peak_tflops is None or hbm_tbs is None):
        name = torch.cuda.get_device_name()
        known = next(((flops, bandwidth) for key, flops, bandwidth in GPU_SPECS if key in name), (None, None))
        peak_tflops = peak_tflops if peak_tflops is not None else known[0]
        hbm_tbs = hbm_tbs if hbm_tbs is not None else known[1]
    return (peak_tflops * 1e12 if peak_tflops else None), (hbm_tbs * 1e12 if hbm_tbs else None)


def measured_peaks(device, dtype):
    """What this machine sustains: FLOP/s of a large square matmul in `dtype` and bytes/s of a large copy."""
    size = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    flops = 2 * size**3 / median_time(lambda: a @ b, device, 5)
    source = torch.empty(2**28 if device == "cuda" else 2**26, device=device)  # 1 GiB / 256 MiB of fp32
    target = torch.empty_like(source)
    bandwidth = 2 * source.numel() * source.element_size() / median_time(lambda: target.copy_(source), device, 5)
    return {"matmul_flops_s": flops, "copy_bytes_s": bandwidth}


def decode_weight_bytes(model):
    """Bytes of the weights one decoding step reads: the language model with its cross-attention blocks (the
    vision tower and perceiver run once per prompt); an untied input embedding is only gathered from, not read."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return sum(p.numel() * p.element_size() for p in model.language_model.parameters() if tied or p is not embedding)


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn):
    """FLOPs of the matmuls, convolutions and attention `fn` runs, forward and backward (torch's FlopCounterMode,
    taught the CPU flash-attention kernels it does not know)."""
    aten = torch.ops.aten
    custom = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
              aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def bench_generation(model, reference, spec, device, dtype, repeats, new_tokens=32):
    rows = []
    size = spec["vision"]["image_size"]
    for batch in (1, 8):
        for images in (1, 8):
            input_ids, mask = prompt(batch, images, device)
            vision = pixels(batch, images, size, device, dtype)
            # use_cache explicitly: MPT configs say False, which would make the reference recompute every step
            settings = dict(do_sample=False, num_beams=1, pad_token_id=PAD, eos_token_id=None, use_cache=True)

            def run(which, tokens):
                if which == "otter":
                    return model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=vision,
                                          max_new_tokens=tokens, min_new_tokens=tokens, **settings)
                return reference.generate(vision, input_ids, attention_mask=mask, max_new_tokens=tokens,
                                          min_new_tokens=tokens, **settings)

            result = {}
            for which in ("otter", "reference"):
                first = median_time(lambda: run(which, 1), device, repeats)
                full = median_time(lambda: run(which, new_tokens), device, repeats)
                result[which] = {"ttft_s": first, "decode_tok_s": batch * (new_tokens - 1) / (full - first)}
            rows.append({"batch": batch, "images": images, "prompt_tokens": input_ids.shape[1], **result})
    return rows


# -- video: a 16-frame question, Otter against the Otter project's own generate ---------------------------------------
# The Otter project's code (otter-ai 0.0.0a8) takes a 1024-wide vision tower only (ViT-L/14's): every video model has
# one. CPU: ViT-L/14's layers (224 px, patch 14: 257 tokens a frame), 6 of its 24, and CPU_MODEL's language model;
# GPU: OTTER-Image-MPT7B's architecture (GPU_MODEL) with frame embeddings; tiny: checks that the part runs.
VIDEO_FRAMES = 16
VIDEO_QUESTION_TOKENS = 20  # `<image>` then a question of this many tokens: "User: what happens in the video? GPT:"
VIDEO_MODELS = {
    "tiny": dict(vision=dict(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
                             image_size=32, patch_size=16, hidden_act="quick_gelu"),
                 text=dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=2048, vocab_size=384),
                 cross_attn_every_n_layers=1),
    "cpu": dict(vision=dict(GPU_MODEL["vision"], num_hidden_layers=6),
                text={k: CPU_MODEL["text"][k] for k in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size")},
                cross_attn_every_n_layers=CPU_MODEL["cross_attn_every_n_layers"]),
    "cuda": dict(vision=GPU_MODEL["vision"],
                 text={k: GPU_MODEL["text"][k] for k in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size")},
                 cross_attn_every_n_layers=GPU_MODEL["cross_attn_every_n_layers"]),
}
VIDEO_IMPLEMENTATIONS = ("otter", "otter-project")


def video_configs(spec):
    """
    (this library's `OtterConfig`, the Otter project's config.json dict) of one video model: a vendored-MPT
    Otter-Video (frame embeddings for VIDEO_FRAMES frames), the project's token ids (the tiny base tokenizer, then
    `<|endofchunk|>`, `<image>`, `<answer>`, `<PAD>`), and the MPT config `otter convert otter` derives from it.
    """
    from otter.conversion.otter_hf import vendored_mpt_config
    from otter.tiny import tiny_tokenizer
    from tests.otter_releases import otter_tokenizer_length, release_config

    base = tiny_tokenizer()
    release = release_config("video", "mpt", n_tokens=otter_tokenizer_length(base), max_num_frames=VIDEO_FRAMES,
                             config_overrides={"cross_attn_every_n_layers": spec["cross_attn_every_n_layers"]},
                             text_overrides={**spec["text"], "hidden_size": spec["text"]["d_model"],
                                             "init_device": "meta"})
    release["vision_config"].update(spec["vision"])
    tokens = len(base)  # the Otter project adds its tokens in this order (the base tokenizer has no pad token)
    config = OtterConfig(vision_config=dict(spec["vision"]), text_config=vendored_mpt_config(release["text_config"]).to_dict(),
                         cross_attn_every_n_layers=spec["cross_attn_every_n_layers"], max_num_frames=VIDEO_FRAMES,
                         eoc_token_id=tokens, media_token_id=tokens + 1, pad_token_id=tokens + 3)
    return config, release


def video_weights(model, device, seed=0):
    """
    (name, value) for every parameter of Otter's `model` (built on the meta device will do), in order, drawn on
    `device` from one seeded generator: both implementations get the same weights, and neither process holds the
    other's model. Gates half open (the video matters), norms near 1, matrices of unit gain (std 1/sqrt(fan_in)),
    frame embeddings of unit scale, other vectors small.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    norms = {name for name, module in model.named_modules() if "norm" in type(module).__name__.lower()}
    for name, parameter in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        noise = torch.randn(parameter.shape, generator=generator, device=device)
        if leaf in ("attn_gate", "ff_gate"):
            value = torch.full(parameter.shape, 0.5, device=device)
        elif owner in norms:
            value = (1.0 if leaf == "weight" else 0.0) + 0.2 * noise
        elif leaf == "frame_embs":
            value = noise
        elif parameter.ndim == 1:
            value = 0.1 * noise
        else:
            value = noise * parameter.shape[1:].numel() ** -0.5
        yield name, value


def build_video_model(spec, device, dtype):
    """This library's Otter-Video of `spec`, on `device` in `dtype`, with `video_weights`."""
    config, _ = video_configs(spec)
    with torch.device(device):
        model = OtterForConditionalGeneration(config)
    model = model.to(dtype=dtype).eval()
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in video_weights(model, device):
            parameters[name].copy_(value)
    return model


def build_otter_project_video_model(spec, device, dtype):
    """
    The Otter project's own `OtterForConditionalGeneration` (otter-ai 0.0.0a8: its vendored MPT, perceiver,
    cross-attention and CLIP, built by tests/otter_releases.py under transformers 5, CLIP's attention eager as in
    transformers 4.30), on `device` in `dtype`, holding `video_weights` of this library's model of `spec` (names mapped
    by `otter convert otter`'s table, every parameter of both accounted for).
    """
    from otter.conversion.otter_hf import otter_name
    from tests.otter_releases import build_otter_ai_model
    from otter.tiny import tiny_tokenizer

    config, release = video_configs(spec)
    with torch.device("meta"):  # built empty: the weights come from video_weights
        ours = OtterForConditionalGeneration(config)
        project = build_otter_ai_model(release, tiny_tokenizer())
    if (project.media_token_id, project.eoc_token_id) != (config.media_token_id, config.eoc_token_id):
        raise RuntimeError(f"the Otter project's <image>, <|endofchunk|> are {project.media_token_id}, "
                           f"{project.eoc_token_id}; this library's config says {config.media_token_id}, "
                           f"{config.eoc_token_id}")
    project = project.to(dtype=dtype).to_empty(device=device).eval()
    theirs = dict(project.named_parameters())
    names = {}  # this library's name -> the project's
    for name in theirs:
        stored = name.replace("vision_encoder.", "vision_encoder.vision_model.", 1)  # transformers 4.30's names
        names[otter_name(stored, "mpt")] = name
    filled = set()
    with torch.no_grad():
        for name, value in video_weights(ours, device):
            if name not in names:
                raise RuntimeError(f"the Otter project's model has no counterpart of {name}")
            theirs[names[name]].copy_(value)
            filled.add(names[name])
        if filled != set(theirs):
            raise RuntimeError(f"parameters of the Otter project's model left unset: {sorted(set(theirs) - filled)}")
        for name, buffer in project.named_buffers():  # to_empty left them uninitialised
            if not name.endswith("embeddings.position_ids"):
                raise RuntimeError(f"unexpected buffer {name} in the Otter project's model")
            buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    return project


@torch.no_grad()
def otter_project_generate(model, vision_x, input_ids, attention_mask, new_tokens, suppress, logits_out=None):
    """
    The Otter project's `generate()` as it ran (transformers 4.30, greedy): the video encoded once
    (`_encode_vision_x`), then its vendored MPT's `generate`, which reads `use_cache` from the model's config (False in
    every MPT release): each step runs `prepare_inputs_for_generation` and a forward over the whole sequence (every
    decoder layer and cross-attention block, the media keys/values recomputed), and picks the next token from the last
    position's logits. `suppress`: the ids min_new_tokens and suppress_tokens keep out (`<|endofchunk|>`, `<image>`).
    `logits_out`: a list that gets each step's logits `(batch, vocab)` before suppression.
    """
    model._encode_vision_x(vision_x=vision_x)
    language_model = model.lang_encoder
    sequences, mask = input_ids, attention_mask
    for _ in range(new_tokens):
        inputs = language_model.prepare_inputs_for_generation(sequences, past_key_values=None, attention_mask=mask,
                                                              use_cache=False)
        logits = language_model(**inputs).logits[:, -1, :]
        if logits_out is not None:
            logits_out.append(logits.clone())
        logits[:, suppress] = -float("inf")
        sequences = torch.cat([sequences, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    language_model.clear_conditioned_layers()
    return sequences


def video_inputs(spec, config, device, dtype):
    """One `<image>` + VIDEO_QUESTION_TOKENS-token question, and a VIDEO_FRAMES-frame video (1, 1, F, 3, S, S)."""
    generator = torch.Generator().manual_seed(5)
    question = torch.randint(0, config.eoc_token_id, (VIDEO_QUESTION_TOKENS,), generator=generator).tolist()
    input_ids = torch.tensor([[config.media_token_id] + question], device=device)
    size = spec["vision"]["image_size"]
    video = torch.randn(1, 1, VIDEO_FRAMES, 3, size, size, generator=generator).to(device, dtype)
    return input_ids, torch.ones_like(input_ids), video


def video_worker(which, spec, device, dtype, repeats, logits_file, new_tokens=32):
    """
    For `which` implementation, in a process of its own: time to first token (encoding the video, then the prompt), of
    which encoding, decode tokens/s, peak memory above the loaded model, the tokens generated, and (to `logits_file`)
    each step's logits `(new_tokens, vocab)`. Prints "ready" once the model is built and waits for a line on stdin
    before measuring: both workers build at once, and measure one after the other.
    """
    model = (build_video_model if which == "otter" else build_otter_project_video_model)(spec, device, dtype)
    config, _ = video_configs(spec)
    input_ids, mask, video = video_inputs(spec, config, device, dtype)
    if which == "otter":
        def run(tokens, **kwargs):
            return model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=video, max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, num_beams=1, use_cache=True,
                                  eos_token_id=config.eoc_token_id, pad_token_id=config.pad_token_id,
                                  suppress_tokens=[config.media_token_id], bad_words_ids=None, **kwargs)

        def encode():
            with torch.no_grad():
                return model.get_media_key_values(model.get_image_features(video))
    else:
        # min_new_tokens keeps out <|endofchunk|>, suppress_tokens <image>
        suppress = [config.eoc_token_id, config.media_token_id]

        def run(tokens, logits=None):
            return otter_project_generate(model, video, input_ids, mask, tokens, suppress, logits)

        def encode():
            with torch.no_grad():
                model._encode_vision_x(vision_x=video)
            model.lang_encoder.clear_conditioned_layers()

    print("ready", flush=True)
    sys.stdin.readline()
    sync(device)
    base = _memory_mark(device)
    if which == "otter":
        output = run(new_tokens, output_logits=True, return_dict_in_generate=True)
        sequences, logits = output.sequences, torch.cat(output.logits)
    else:
        steps = []
        sequences = run(new_tokens, logits=steps)
        logits = torch.cat(steps)
    torch.save(logits.float().cpu(), logits_file)
    encoding = median_time(encode, device, repeats)
    first = median_time(lambda: run(1), device, repeats)
    full = median_time(lambda: run(new_tokens), device, repeats)
    peak = _peak_since(device, base)
    return {"ttft_s": first, "encoding_s": encoding, "decode_tok_s": (new_tokens - 1) / (full - first),
            "peak_extra_bytes": peak, "tokens": sequences[0, input_ids.shape[1]:].tolist(),
            "prompt_tokens": input_ids.shape[1],
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def bench_video(device, dtype, repeats, tiny=False):
    """
    Each implementation in a fresh process (as the training step: memory one run freed would sway the other's); both
    build their models at once, then measure one after the other. Same tokens: how many of the first new tokens agree;
    logits: the largest difference between the two at those steps (and one past them).
    """
    spec = VIDEO_MODELS["tiny" if tiny else device]
    row = {"frames": VIDEO_FRAMES, "model": spec, "device": device,
           "frame_tokens": (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2 + 1}
    scratch = tempfile.TemporaryDirectory()  # the workers' logits
    workdir = Path(scratch.name)
    workers = {}
    try:
        for which in VIDEO_IMPLEMENTATIONS:
            command = [sys.executable, __file__, "--video-worker", which, "--device", device, "--dtype",
                       str(dtype).removeprefix("torch."), "--repeats", str(repeats), "--workdir", str(workdir)]
            log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a worker's warnings never block it
            workers[which] = (subprocess.Popen(command + (["--tiny"] if tiny else []), stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=log, text=True), log)

        def failed(which):
            process, log = workers[which]
            process.wait()
            log.seek(0)
            return subprocess.CalledProcessError(process.returncode, process.args, stderr=log.read())

        for which, (process, _) in workers.items():
            if not any(line.strip() == "ready" for line in iter(process.stdout.readline, "")):
                raise failed(which)
        for which, (process, _) in workers.items():
            output, _ = process.communicate("go\n")
            if process.returncode:
                raise failed(which)
            row[which] = json.loads(output.strip().splitlines()[-1])
    finally:
        for process, log in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    try:
        logits = {which: torch.load(workdir / f"video-logits-{which}.pt", weights_only=True)
                  for which in VIDEO_IMPLEMENTATIONS}
    finally:
        scratch.cleanup()
    ours, theirs = row["otter"]["tokens"], row["otter-project"]["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    compared = [logits[which][:same + 1] for which in VIDEO_IMPLEMENTATIONS]
    row.update(same_tokens=same, new_tokens=len(ours), max_logit_difference=(compared[0] - compared[1]).abs().max().item(),
               logit_std=compared[0].std().item())
    return row


# -- few-shot evaluation ---------------------------------------------------------------------------------------------
EVAL_WORDS = ["<|endoftext|>", "Question", "Short", "answer", ":", "?"]


def eval_tokenizer(vocab_size):
    """
    A word-level tokenizer of `vocab_size` entries (the model's vocabulary: the prompt's fixed words, `w<id>` fillers,
    and `<image>`, `<|endofchunk|>`, `<PAD>` at MEDIA, EOC, PAD), so that the evaluation runs on the same LM head as
    the other parts and every generated id decodes.
    """
    specials = {IMAGE_TOKEN: MEDIA, END_OF_CHUNK: EOC, "<PAD>": PAD}
    vocab = {word: index for index, word in enumerate(EVAL_WORDS)}
    vocab.update({f"w{index}": index for index in range(len(EVAL_WORDS), vocab_size) if index not in specials.values()})
    vocab.update(specials)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, END_OF_CHUNK], "pad_token": "<PAD>"})
    ids = tokenizer.convert_tokens_to_ids(list(specials))
    if ids != list(specials.values()) or len(tokenizer) != vocab_size:
        raise RuntimeError(f"special token ids {ids}, expected {list(specials.values())}; {len(tokenizer)} tokens")
    return tokenizer


def write_vqa(root: Path, pool_size, test_size, shots, seed, query_set_size, image_size, question_words=6):
    """
    A synthetic VQAv2 in eval/README.md's layout: `pool_size` training questions and `test_size` val questions, each on
    an image of its own (`image_size` (width, height), smooth random colours, JPEG), questions of `question_words`
    random words, one-word answers. Only the images that the run reads are written: the test images and the
    demonstrations `random_demos` picks (as `evaluate` will, with `seed` and `query_set_size`). Returns that plan.
    """
    generator = torch.Generator().manual_seed(seed)
    plan = random_demos(pool_size, test_size, shots, seed, query_set_size)
    used = {"train2014": sorted({index for row in plan for index in row}), "val2014": range(test_size)}
    for split, count, first_id in (("train2014", pool_size, 1), ("val2014", test_size, 1_000_000)):
        questions, annotations = [], []
        for n in range(count):
            words = torch.randint(len(EVAL_WORDS), VOCAB, (question_words + 1,), generator=generator).tolist()
            questions.append({"image_id": first_id + n, "question": " ".join(f"w{w}" for w in words[:-1]) + "?",
                              "question_id": first_id + n})
            answers = [{"answer": f"w{words[-1]}", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
            annotations.append({"question_id": first_id + n, "image_id": first_id + n, "answer_type": "other",
                                "question_type": "what", "multiple_choice_answer": f"w{words[-1]}", "answers": answers})
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for n in used[split]:
            colours = torch.randint(0, 256, (6, 8, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(colours).resize(image_size, Image.Resampling.BILINEAR).save(
                folder / f"COCO_{split}_{first_id + n:012d}.jpg", quality=90)
        header = {"info": {}, "license": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split}
        questions_file = root / f"v2_OpenEnded_mscoco_{split}_questions.json"
        questions_file.write_text(json.dumps({**header, "questions": questions}))
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({**header, "annotations": annotations}))
    return plan


class ReferenceEvalModel:
    """
    OpenFlamingo 2.0.1's `open_flamingo/eval/models/open_flamingo.py` `EvalModel` (which the PyPI wheel does not ship),
    its generation path: per-image preprocessing into a zero-padded `(B, T_img, 1, C, H, W)` tensor,
    left-padded tokenization truncated at 2000 tokens, `Flamingo.generate` under inference mode, the new tokens
    decoded with special tokens skipped. One change: `use_cache=True`. The EvalModel leaves caching to the language
    model's config, and MPT configs say False, which would recompute the whole prompt for every new token.
    """

    def __init__(self, model, tokenizer, image_processor, device, dtype):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.device, self.cast_dtype = device, dtype
        self.tokenizer.padding_side = "left"

    def _prepare_images(self, batch):
        images_per_example = max(len(x) for x in batch)
        batch_images = None
        for iexample, example in enumerate(batch):
            for iimage, image in enumerate(example):
                preprocessed = self.image_processor(image)
                if batch_images is None:
                    batch_images = torch.zeros((len(batch), images_per_example, 1) + preprocessed.shape,
                                               dtype=preprocessed.dtype)
                batch_images[iexample, iimage, 0] = preprocessed
        return batch_images.to(self.device, dtype=self.cast_dtype, non_blocking=True)

    def _prepare_text(self, batch, padding="longest", truncation=True, max_length=2000):
        encodings = self.tokenizer(batch, padding=padding, truncation=truncation, return_tensors="pt",
                                   max_length=max_length)
        input_ids, attention_mask = encodings["input_ids"], encodings["attention_mask"]
        input_ids = input_ids.to(self.device, non_blocking=True)
        attention_mask = attention_mask.to(self.device, non_blocking=True)
        return input_ids, attention_mask.bool()

    def get_outputs(self, batch_text, batch_images, min_generation_length, max_generation_length, num_beams,
                    length_penalty):
        batch_images = self._prepare_images(batch_images)
        input_ids, attention_mask = self._prepare_text(batch_text)
        with torch.inference_mode():
            outputs = self.model.generate(batch_images, input_ids, attention_mask,
                                          min_new_tokens=min_generation_length, max_new_tokens=max_generation_length,
                                          num_beams=num_beams, length_penalty=length_penalty, use_cache=True)
        outputs = outputs[:, len(input_ids[0]):]
        return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)

    def get_vqa_prompt(self, question, answer=None):
        return (f"<image>Question:{question} Short answer:{answer if answer is not None else ''}"
                f"{'<|endofchunk|>' if answer is not None else ''}")


def reference_evaluate_vqa(eval_model, data_dir: Path, plan, demos, batch_size, shots, workdir: Path):
    """
    OpenFlamingo 2.0.1's `evaluate_vqa` loop (open_flamingo/eval/evaluate.py) on its own dataset class, prompts,
    post-processing and VQA accuracy, with the demonstrations of `plan` (`demos`: the pool examples, loaded up
    front as its `get_query_set` does) instead of its random draw, so that both sides see the same prompts. Its
    distributed gather is left out (one process). Returns {question_id: prediction} and the accuracy.
    """
    from open_flamingo.eval.eval_datasets import VQADataset
    from open_flamingo.eval.utils import custom_collate_fn
    from open_flamingo.eval.vqa_metric import compute_vqa_accuracy, postprocess_vqa_generation

    questions = data_dir / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations = data_dir / "v2_mscoco_val2014_annotations.json"
    test_dataset = VQADataset(image_dir_path=str(data_dir / "val2014"), question_path=str(questions),
                              annotations_path=str(annotations), is_train=False, dataset_name="vqav2")
    predictions = []
    for start in range(0, len(test_dataset), batch_size):
        indices = range(start, min(start + batch_size, len(test_dataset)))
        batch = custom_collate_fn([test_dataset[i] for i in indices])  # what its DataLoader does
        batch_demo_samples = [[demos[j] for j in plan[i]] for i in indices]
        batch_images, batch_text = [], []
        for i in range(len(batch["image"])):
            context_images = [x["image"] for x in batch_demo_samples[i]] if shots > 0 else []
            batch_images.append(context_images + [batch["image"][i]])
            context_text = "".join([eval_model.get_vqa_prompt(question=x["question"], answer=x["answers"][0]) + "\n"
                                    for x in batch_demo_samples[i]])
            if shots == 0:
                context_text = context_text.replace("<image>", "")
            batch_text.append(context_text + eval_model.get_vqa_prompt(question=batch["question"][i]))
        outputs = eval_model.get_outputs(batch_images=batch_images, batch_text=batch_text, min_generation_length=0,
                                         max_generation_length=5, num_beams=3, length_penalty=0.0)
        for prediction, sample_id in zip(map(postprocess_vqa_generation, outputs), batch["question_id"]):
            predictions.append({"answer": prediction, "question_id": sample_id})
    results = workdir / "reference_vqa_results.json"
    results.write_text(json.dumps(predictions, indent=4))
    with redirect_stdout(open(os.devnull, "w")):  # the VQA API prints its progress
        accuracy = compute_vqa_accuracy(str(results), str(questions), str(annotations))
    results.unlink()
    return {p["question_id"]: p["answer"] for p in predictions}, accuracy


EVAL_QUERY_SETS = (2048, 8)


def bench_evaluation(model, reference, spec, device, dtype, repeats, batch_size=8, shots=8, batches=2, seed=42):
    """
    Examples/s of an 8-shot VQAv2 run (OpenFlamingo's protocol: 3 beams, 5 new tokens, length penalty 0) on a
    synthetic data set, `batches` batches of `batch_size`: Otter's `otter.eval.evaluate` against OpenFlamingo 2.0.1's
    evaluation loop, with the same prompts, images and batches, timed from the data on disk to the score (median of
    `repeats` runs). Twice: with demonstrations drawn from OpenFlamingo's 2048-example query set, where a short run
    shows no demonstration image twice; and from an 8-example query set, where each demonstration image is shown about
    as often as in a full run (5000 samples x 8 demonstrations over 2048: ~20 times).
    """
    from open_clip import image_transform
    from open_flamingo.eval.eval_datasets import VQADataset

    size = spec["vision"]["image_size"]
    tokenizer = eval_tokenizer(spec["text"]["vocab_size"])
    processor = OtterProcessor(image_processor=clip_image_processor(size), tokenizer=tokenizer)
    eval_model = ReferenceEvalModel(reference, tokenizer, image_transform(size, is_train=False), device, dtype)
    test_size = batch_size * batches
    image_size = (640, 480) if size >= 224 else (160, 120)  # COCO-sized photos for the real models
    rows = []
    for query_set_size in EVAL_QUERY_SETS:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir, out_dir = Path(tmp) / "vqav2", Path(tmp) / "out"
            plan = write_vqa(data_dir, 2048, test_size, shots, seed, query_set_size, image_size)
            runs = iter(range(1_000_000))

            def run_otter():
                report = evaluate(model, processor, "vqav2", data_dir, out_dir / f"run{next(runs)}.json", shots=[shots],
                                  seed=seed, batch_size=batch_size, query_set_size=query_set_size)
                trial = report["results"][0]["trials"][0]
                return {p["id"]: p["prediction"] for p in trial["predictions"]}, trial["score"]

            pool = VQADataset(image_dir_path=str(data_dir / "train2014"),
                              question_path=str(data_dir / "v2_OpenEnded_mscoco_train2014_questions.json"),
                              annotations_path=str(data_dir / "v2_mscoco_train2014_annotations.json"), is_train=True,
                              dataset_name="vqav2")
            demos = {j: pool[j] for j in sorted({j for sample_demos in plan for j in sample_demos})}  # loaded up front

            def run_reference():
                return reference_evaluate_vqa(eval_model, data_dir, plan, demos, batch_size, shots, Path(tmp))

            row = {"examples": test_size, "batch": batch_size, "shots": shots, "query_set": query_set_size,
                   "demo_images": len({j for sample_demos in plan for j in sample_demos})}
            predictions = {}
            for which, run in (("otter", run_otter), ("reference", run_reference)):
                times = []
                for _ in range(repeats):  # each run is long: no separate warm-up, the median drops the first
                    sync(device)
                    start = time.perf_counter()
                    predictions[which], score = run()
                    sync(device)
                    times.append(time.perf_counter() - start)
                row[which] = {"examples_s": test_size / statistics.median(times), "score": score}
            row["same_predictions"] = sum(answer == predictions["reference"].get(key)
                                          for key, answer in predictions["otter"].items())
            rows.append(row)
    return rows


def bench_eval_processes(model, spec, dtype, tiny=False, shots=8, batch_size=8, seed=42, process_counts=(1, 2)):
    """
    Examples/s of `otter eval` (8-shot VQAv2 on the synthetic data set) run by `accelerate launch` with 1 and with 2
    processes on the CPU (gloo), the machine's cores shared among the processes (torch threads: cores / processes):
    the examples over the pass's time as the evaluator logs it (from its start to every process's records read;
    loading and checks excluded), and the whole command's time. The predictions of every process count are compared.
    """
    cores = os.cpu_count() or 1
    test_size = batch_size * (2 if tiny else 8)
    size = spec["vision"]["image_size"]
    image_size = (640, 480) if size >= 224 else (160, 120)
    config = Path(__file__).resolve().parents[1] / "train" / "configs" / "ddp.yaml"
    rows, scores = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, data_dir = Path(tmp) / "model", Path(tmp) / "vqav2"
        model.save_pretrained(folder)
        OtterProcessor(image_processor=clip_image_processor(size),
                       tokenizer=eval_tokenizer(spec["text"]["vocab_size"])).save_pretrained(folder)
        write_vqa(data_dir, 2048, test_size, shots, seed, 2048, image_size)
        for processes in process_counts:
            out = Path(tmp) / f"p{processes}" / "vqav2.json"
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                       "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(port),
                       "-m", "otter.cli", "eval", "--model", str(folder), "--task", "vqav2", "--data-dir",
                       str(data_dir), "--out", str(out), "--shots", str(shots), "--batch-size", str(batch_size),
                       "--seed", str(seed), "--device", "cpu", "--dtype", str(dtype).removeprefix("torch.")]
            threads = str(max(1, cores // processes))
            env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   "TOKENIZERS_PARALLELISM": "false"}
            start = time.perf_counter()
            run = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=3600)
            command_s = time.perf_counter() - start
            evaluated = re.search(r"(\d+) samples evaluated in ([\d.]+) s", run.stderr)
            trial = json.loads(out.read_text())["results"][0]["trials"][0]
            scores[processes] = [(p["id"], p["output"]) for p in trial["predictions"]]
            rows.append({"processes": processes, "threads": int(threads), "examples": test_size,
                         "command_s": command_s, "pass_s": float(evaluated[2]),
                         "examples_s": test_size / float(evaluated[2]), "score": trial["score"]})
    for row in rows:
        row["same_predictions"] = sum(a == b for a, b in zip(scores[row["processes"]], scores[process_counts[0]]))
    return rows


def _memory_mark(device) -> int:
    """Resets the peak (CUDA allocations, or the process's resident set on the CPU) and returns what is held now."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _peak_rss_reset()
    return _current_rss()


def _peak_since(device, base: int) -> int:
    """The peak since `_memory_mark` returned `base`, above it."""
    return (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()) - base


def _peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (the peak resident set) to the current RSS


def _peak_rss():
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _current_rss():
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def train_step(which, model, reference, spec, device, dtype, repeats, prompt_name, batch=8):
    """
    One perceiver + cross-attention AdamW step (forward, backward, update) at batch 8 on `TRAINING_PROMPTS[prompt_name]`
    for `which` implementation: samples/s and the peak memory above what the process held before the timed steps.
    """
    shape = TRAINING_PROMPTS[prompt_name]
    input_ids, mask = prompt(batch, shape["images"], device, seed=3, shot_tokens=shape["shot_tokens"],
                             query_tokens=shape["query_tokens"])
    vision = pixels(batch, shape["images"], spec["vision"]["image_size"], device, dtype)
    labels = input_ids.clone()
    net = model if which == "otter" else reference
    net.train()
    net.requires_grad_(False)
    blocks = (net.cross_attention_blocks() if which == "otter" else
              [block for block in net.lang_encoder.gated_cross_attn_layers if block is not None])
    for module in [net.perceiver, *blocks]:
        module.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def step():
        if which == "otter":
            loss = net(input_ids=input_ids, attention_mask=mask, pixel_values=vision, labels=labels).loss
        else:
            loss = net(vision, input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here on, as in a training run
    base = _memory_mark(device)
    seconds = median_time(step, device, repeats)
    peak = _peak_since(device, base)
    flops = count_flops(step)  # after the timed steps: counting slows the step and keeps shapes alive
    return {"samples_s": batch / seconds, "peak_extra_bytes": peak, "flops": flops, "flops_s": flops / seconds,
            "saved_bytes": saved_for_backward_bytes(step, net), "images": shape["images"],
            "tokens": input_ids.shape[1]}


def saved_for_backward_bytes(fn, net):
    """Bytes of the distinct tensors (parameters aside) autograd keeps from the forward pass for the backward one: the
    activation memory of a step, exact where a peak RSS depends on the allocator."""
    parameters = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


def bench_training(device, dtype, repeats, tiny=False, rows=None):
    """Each implementation in a fresh process: memory an earlier run freed (and the allocator kept) would otherwise
    make whichever runs second look smaller. Each prompt's row is appended to `rows` as soon as it is measured, so
    that a later prompt failing (say, out of memory) leaves the earlier ones."""
    rows = [] if rows is None else rows
    for name in TRAINING_PROMPTS:
        row = {"prompt": name}
        for which in ("otter", "reference"):
            finished = subprocess.run([sys.executable, __file__, "--training-worker", which, "--training-prompt", name,
                                       "--device", device, "--dtype", str(dtype).removeprefix("torch."),
                                       "--repeats", str(repeats)] + (["--tiny"] if tiny else []),
                                      capture_output=True, text=True, check=True)
            row[which] = json.loads(finished.stdout.strip().splitlines()[-1])
        rows.append(row)
    return rows


def bench_conversion(workdir: Path):
    """`otter convert openflamingo` on full-size OpenFlamingo-3B parts of random weights, under /usr/bin/time -v."""
    parts = workdir / "of3b"
    if not (parts / "checkpoint.pt").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_openflamingo_3b.py"), str(parts)], check=True)
    out = workdir / "of3b-otter"
    shutil.rmtree(out, ignore_errors=True)  # a previous run's output; the converter never overwrites
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "otter.cli", "convert", "openflamingo",
               "--checkpoint", str(parts / "checkpoint.pt"), "--lang-encoder", str(parts / "mpt-1b-redpajama"),
               "--vision-encoder", "ViT-L-14", "--vision-pretrained", str(parts / "ViT-L-14.pt"), "--quick-gelu",
               "--cross-attn-every-n-layers", "1", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    report = finished.stderr
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", report).group(1)
    seconds = sum(float(part) * 60 ** index for index, part in enumerate(reversed(wall.split(":"))))
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1)) * 1024
    size = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    return {"wall_s": seconds, "peak_rss_bytes": peak, "output_bytes": size}


def gib(value):
    return f"{value / 2**30:.2f} GiB"


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else None
    name = found.group(1).strip() if found else platform.processor()
    return f"{name} ({platform.machine()})" if name else platform.machine()


def machine(device, peaks):
    lines = [f"- {cpu_name()}, {os.cpu_count()} CPU cores, "
             f"{gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} RAM; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads"]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    lines.append(f"- measured here: {peaks['matmul_flops_s'] / 1e12:.3g} TFLOP/s on a large square matmul "
                 f"({peaks['dtype']}), {peaks['copy_bytes_s'] / 1e9:.3g} GB/s copying a large tensor")
    if peaks["peak_flops_s"] or peaks["hbm_bytes_s"]:
        sheet = [f"{peaks['peak_flops_s'] / 1e12:.0f} TFLOP/s dense bf16" if peaks["peak_flops_s"] else None,
                 f"{peaks['hbm_bytes_s'] / 1e12:.3g} TB/s HBM" if peaks["hbm_bytes_s"] else None]
        lines.append("- data sheet (or --peak-tflops / --hbm-tbs): " + ", ".join(x for x in sheet if x))
    return "\n".join(lines)


def _wrap(line, width=120):
    """Prose lines of the report wrapped at `width`; table rows left whole."""
    if line.startswith("|"):
        return line
    return textwrap.fill(line, width, subsequent_indent="  " if line.startswith("- ") else "")


def seconds(value):
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def video_report(row):
    spec, ours, theirs = row["model"], row["otter"], row["otter-project"]
    vision, text = spec["vision"], spec["text"]
    lines = [f"### Video (a {row['frames']}-frame video and a {ours['prompt_tokens']}-token question; greedy, "
             f"{row['new_tokens']} new tokens, batch 1)", "",
             f"Model: ViT {vision['num_hidden_layers']} layers x {vision['hidden_size']} ({vision['image_size']} px, "
             f"patch {vision['patch_size']}: {row['frames']} frames x {row['frame_tokens']} tokens, the perceiver "
             f"attending over {row['frames'] * (row['frame_tokens'] - 1)} keys), MPT {text['n_layers']} layers x "
             f"{text['d_model']}, cross-attention every {spec['cross_attn_every_n_layers']} layer(s); "
             f"{gib(ours['weights_bytes'])} of weights.", "",
             "| | first token | encoding the video (timed alone) | decode tok/s | peak memory above the weights |", "|---|---|---|---|---|",
             f"| Otter (video encoded once, media keys/values once, KV cache) | {seconds(ours['ttft_s'])} | "
             f"{seconds(ours['encoding_s'])} | {ours['decode_tok_s']:.1f} | {gib(ours['peak_extra_bytes'])} |",
             f"| the Otter project's generate (otter-ai 0.0.0a8: video encoded once, every step recomputes the "
             f"sequence) | {seconds(theirs['ttft_s'])} | {seconds(theirs['encoding_s'])} | "
             f"{theirs['decode_tok_s']:.1f} | {gib(theirs['peak_extra_bytes'])} |",
             f"| Otter's gain (time: project / Otter; memory: Otter / project) | "
             f"{theirs['ttft_s'] / ours['ttft_s']:.2f}x | {theirs['encoding_s'] / ours['encoding_s']:.2f}x | "
             f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x | "
             f"{ours['peak_extra_bytes'] / max(theirs['peak_extra_bytes'], 1):.2f}x |", "",
             f"Same tokens: {row['same_tokens']} of {row['new_tokens']} (greedy, `<|endofchunk|>` and `<image>` kept "
             f"out); the logits of those steps differ by at most {row['max_logit_difference']:.1e} (their standard "
             f"deviation: {row['logit_std']:.2f}). Both run in processes of their own on the same weights; the Otter project's model is its own code "
             "(otter-ai 0.0.0a8's OtterForConditionalGeneration, vendored MPT) under transformers 5, decoding as its "
             "generate() did with the MPT config's use_cache=False. First token: encoding the video and running the "
             "prompt; peak memory: " + ("`torch.cuda.max_memory_allocated`" if "cuda" in str(row.get("device"))
                                        else "peak RSS") + " above what the process held with the model loaded.", ""]
    return lines


def report(results, device, spec):
    peaks = results["peaks"]
    lines = [f"## Results ({device})", "", machine(device, peaks), "",
             f"Model: ViT {spec['vision']['num_hidden_layers']} layers x {spec['vision']['hidden_size']} "
             f"({spec['vision']['image_size']} px, patch {spec['vision']['patch_size']}), MPT "
             f"{spec['text']['n_layers']} layers x {spec['text']['d_model']}, cross-attention every "
             f"{spec['cross_attn_every_n_layers']} layer(s), perceiver 6 x 8 x 64, 64 latents.", ""]
    if "generation" in results:
        weights = results["decode_weight_bytes"]
        bandwidth, source = ((peaks["hbm_bytes_s"], "the data sheet's HBM bandwidth") if peaks["hbm_bytes_s"] else
                             (peaks["copy_bytes_s"], "the copy bandwidth measured here"))
        lines += ["### Generation (greedy, 32 new tokens, KV cache)", "",
                  "| batch | images | prompt tokens | decode tok/s Otter | reference | ratio | bound | Otter / bound | "
                  "reference / bound | first token Otter | reference |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["generation"]:
            ours, theirs = row["otter"], row["reference"]
            bound = row["batch"] * bandwidth / weights
            lines.append(f"| {row['batch']} | {row['images']} | {row['prompt_tokens']} | {ours['decode_tok_s']:.1f} | "
                         f"{theirs['decode_tok_s']:.1f} | {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x | "
                         f"{bound:.0f} | {ours['decode_tok_s'] / bound:.0%} | {theirs['decode_tok_s'] / bound:.0%} | "
                         f"{ours['ttft_s'] * 1000:.0f} ms | {theirs['ttft_s'] * 1000:.0f} ms |")
        lines += ["", f"Bound: the tokens/s at which each decoding step only reads the weights it uses once, batch x "
                  f"bandwidth / weight bytes, with {source} and {gib(weights)} of language model and cross-attention "
                  "weights (KV cache reads left out).", ""]
    if "video" in results:
        lines += video_report(results["video"])
    if "eval-processes" in results:
        rows = results["eval-processes"]
        first = rows[0]
        lines += [f"### Few-shot evaluation on several processes (`accelerate launch -m otter.cli eval`, 8-shot VQAv2, "
                  f"{first['examples']} synthetic examples, CPU, gloo)", "",
                  "| processes | torch threads each | examples/s | vs 1 process | the pass | whole command "
                  "| same predictions |", "|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['processes']} | {row['threads']} | {row['examples_s']:.2f} | "
                         f"{row['examples_s'] / first['examples_s']:.2f}x | {row['pass_s']:.1f} s | "
                         f"{row['command_s']:.1f} s | {row['same_predictions']} of {row['examples']} |")
        lines += ["", "Examples/s: the examples over the pass's time as the evaluator logs it (from its start until "
                  "every process has read the others' records); the whole command adds starting the processes, "
                  "loading the model and the checks.", ""]
    if "evaluation" in results:
        first = results["evaluation"][0]
        lines += [f"### Few-shot evaluation ({first['shots']}-shot VQAv2, OpenFlamingo's protocol: 3 beams, 5 new "
                  f"tokens, length penalty 0; {first['examples']} synthetic examples in batches of {first['batch']})", "",
                  "| demonstrations drawn from | distinct demo images | examples/s Otter | reference | ratio | "
                  "same predictions |", "|---|---|---|---|---|---|"]
        for row in results["evaluation"]:
            ours, theirs = row["otter"], row["reference"]
            lines.append(f"| {row['query_set']} examples | {row['demo_images']} of {row['examples'] * row['shots']} | "
                         f"{ours['examples_s']:.2f} | {theirs['examples_s']:.2f} | "
                         f"{ours['examples_s'] / theirs['examples_s']:.2f}x | {row['same_predictions']} of "
                         f"{row['examples']} |")
        lines += ["", "Otter runs `otter.eval.evaluate`; the reference runs OpenFlamingo 2.0.1's `evaluate_vqa` loop "
                  "and `EvalModel.get_outputs` (benchmarks/run.py), with the KV cache on. From a 2048-example query "
                  "set (OpenFlamingo's default) a short run shows each demonstration image once; from 8 examples, each "
                  "is shown about as often as in a full 5000-sample run over 2048.", ""]
    if "training" in results:
        sheet = peaks["peak_flops_s"]
        header = ("| prompt | | samples/s | peak extra memory | saved for backward | FLOPs per step | TFLOP/s | "
                  "of the measured matmul rate |")
        lines += ["### Training step (perceiver + cross-attention, AdamW, batch 8)", "",
                  header + (" MFU |" if sheet else ""), "|---" * (header.count("|") - 1 + bool(sheet)) + "|"]
        for row in results["training"]:
            ours, theirs = row["otter"], row["reference"]
            setup = f"{TRAINING_PROMPTS[row['prompt']]['label']}: {ours['images']} images, {ours['tokens']} tokens"
            for label, name, figures in ((setup, "Otter", ours), ("", "reference", theirs)):
                lines.append(f"| {label} | {name} | {figures['samples_s']:.2f} | {gib(figures['peak_extra_bytes'])} | "
                             f"{gib(figures['saved_bytes'])} | {figures['flops'] / 1e12:.3f} T | "
                             f"{figures['flops_s'] / 1e12:.3g} | {figures['flops_s'] / peaks['matmul_flops_s']:.0%} |"
                             + (f" {figures['flops_s'] / sheet:.1%} |" if sheet else ""))
            lines.append(f"| | ratio | {ours['samples_s'] / theirs['samples_s']:.2f}x | "
                         f"{ours['peak_extra_bytes'] / max(theirs['peak_extra_bytes'], 1):.2f}x | "
                         f"{ours['saved_bytes'] / theirs['saved_bytes']:.2f}x | {ours['flops'] / theirs['flops']:.3f}x "
                         "| | |" + (" |" if sheet else ""))
        lines += ["", "Peak extra memory: above what the process held before the timed steps (" +
                  ("`torch.cuda.max_memory_allocated`" if device == "cuda" else "peak RSS, which the allocator sways") +
                  "). Saved for backward: the distinct activation tensors autograd keeps for the backward pass. "
                  "FLOPs: the matmuls and attention of one step, forward and backward, as torch's FlopCounterMode "
                  "counts them" + ("; MFU against the data sheet's dense bf16 peak." if sheet else "."), ""]
    if "conversion" in results:
        row = results["conversion"]
        lines += ["### Conversion (OpenFlamingo-3B architecture, random weights, fp32)", "",
                  "| wall time | peak RSS | converted model | peak RSS / model |", "|---|---|---|---|",
                  f"| {row['wall_s']:.1f} s | {gib(row['peak_rss_bytes'])} | {gib(row['output_bytes'])} | "
                  f"{row['peak_rss_bytes'] / row['output_bytes']:.2f} |", ""]
    return "\n".join(_wrap(line) for line in "\n".join(lines).split("\n"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parts", nargs="+", choices=PARTS,
                        help="default: all on CPU; on GPU all but conversion, which runs on the host")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, to check that the script runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "otter-benchmarks")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="weights and activations of both implementations (default: float32 on CPU, bfloat16 on "
                        "GPU)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 TFLOP/s, for the MFU (else GPU_SPECS)")
    parser.add_argument("--hbm-tbs", type=float, help="the GPU's memory bandwidth in TB/s, for the decode bound")
    parser.add_argument("--training-worker", choices=["otter", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--training-prompt", choices=list(TRAINING_PROMPTS), help=argparse.SUPPRESS)
    parser.add_argument("--video-worker", choices=VIDEO_IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = TINY_MODEL if args.tiny else GPU_MODEL if args.device == "cuda" else CPU_MODEL
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.training_worker:
        model, reference = build(spec, args.device, dtype)
        print(json.dumps(train_step(args.training_worker, model, reference, spec, args.device, dtype, args.repeats,
                                    args.training_prompt)))
        return
    if args.video_worker:
        video_spec = VIDEO_MODELS["tiny" if args.tiny else args.device]
        print(json.dumps(video_worker(args.video_worker, video_spec, args.device, dtype, args.repeats,
                                      args.workdir / f"video-logits-{args.video_worker}.pt")))
        return
    peak_flops, hbm = data_sheet(args.device, args.peak_tflops, args.hbm_tbs)
    results = {"peaks": {**measured_peaks(args.device, dtype), "dtype": str(dtype).removeprefix("torch."),
                         "peak_flops_s": peak_flops, "hbm_bytes_s": hbm}}

    def generation():
        model, reference = build(spec, args.device, dtype)
        results["decode_weight_bytes"] = decode_weight_bytes(model)
        return bench_generation(model, reference, spec, args.device, dtype, args.repeats)

    def evaluation():
        model, reference = build(spec, args.device, dtype)
        return bench_evaluation(model, reference, spec, args.device, dtype, args.repeats)

    def conversion():
        args.workdir.mkdir(parents=True, exist_ok=True)
        return bench_conversion(args.workdir)

    parts = {"generation": generation, "evaluation": evaluation, "conversion": conversion,
             "video": lambda: bench_video(args.device, dtype, args.repeats, args.tiny),
             "eval-processes": lambda: bench_eval_processes(build(spec, "cpu", dtype)[0], spec, dtype, args.tiny),
             "training": lambda: bench_training(args.device, dtype, args.repeats, args.tiny,
                                                rows=results.setdefault("training", []))}
    failed = []
    for name in args.parts or (GPU_PARTS if args.device == "cuda" else PARTS):
        # one part failing (a GPU run is one shot) leaves the others' figures, written after each part
        try:
            results[name] = parts[name]()
        except Exception as error:  # reported, and the exit status says so
            detail = error.stderr if isinstance(error, subprocess.CalledProcessError) else ""
            print(f"benchmark part {name!r} failed:\n{traceback.format_exc()}{detail}", file=sys.stderr)
            failed.append(name)
        table = report(results, args.device, spec)
        if args.out:
            args.out.write_text(table + "\n")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    print(table)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
