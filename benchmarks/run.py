"""
Otter against the reference implementation (open-flamingo 2.0.1), side by side in one run, on identical weights.

    python benchmarks/run.py [--device cpu|cuda] [--parts generation training conversion] [--out FILE]

CPU mode builds a model big enough that compute dominates overhead (ViT-B/32's tower: 12 layers of width 768; MPT 8
layers of width 512; OpenFlamingo's perceiver and cross-attention sizes); GPU mode (`--device cuda`) builds the OpenFlamingo-9B
architecture (ViT-L/14, MPT-7B, cross-attention every 4 layers) in bf16. Weights are random: speed does not depend on
them. The reference is built around deep copies of Otter's own parts (tests/reference.py), so both compute the same
function. Writes a Markdown table (stdout, and --out).
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otter.configuration_otter import OtterConfig  # noqa: E402
from otter.modeling_otter import OtterForConditionalGeneration  # noqa: E402
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


def build(spec, device, dtype):
    config = OtterConfig(vision_config=spec["vision"], text_config=spec["text"],
                         cross_attn_every_n_layers=spec["cross_attn_every_n_layers"], media_token_id=MEDIA,
                         eoc_token_id=EOC, pad_token_id=PAD)
    torch.manual_seed(0)
    model = OtterForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
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


def _peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (the peak resident set) to the current RSS


def _peak_rss():
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _current_rss():
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def train_step(which, model, reference, spec, device, dtype, repeats, batch=8, images=4):
    """
    One perceiver + cross-attention AdamW step (forward, backward, update) at batch 8 for `which` implementation:
    samples/s and the peak memory above what the process held before the timed steps.
    """
    input_ids, mask = prompt(batch, images, device, seed=3)
    vision = pixels(batch, images, spec["vision"]["image_size"], device, dtype)
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
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _peak_rss_reset()
        base = _current_rss()
    seconds = median_time(step, device, repeats)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()) - base
    return {"samples_s": batch / seconds, "peak_extra_bytes": peak}


def bench_training(device, repeats):
    """Each implementation in a fresh process: memory an earlier run freed (and the allocator kept) would otherwise
    make whichever runs second look smaller."""
    result = {}
    for which in ("otter", "reference"):
        finished = subprocess.run([sys.executable, __file__, "--training-worker", which, "--device", device,
                                   "--repeats", str(repeats)], capture_output=True, text=True, check=True)
        result[which] = json.loads(finished.stdout.strip().splitlines()[-1])
    return result


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


def machine(device):
    lines = [f"- {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} RAM; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads"]
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    return "\n".join(lines)


def report(results, device, spec):
    lines = [f"## Results ({device})", "", machine(device), "",
             f"Model: ViT {spec['vision']['num_hidden_layers']} layers x {spec['vision']['hidden_size']} "
             f"({spec['vision']['image_size']} px, patch {spec['vision']['patch_size']}), MPT "
             f"{spec['text']['n_layers']} layers x {spec['text']['d_model']}, cross-attention every "
             f"{spec['cross_attn_every_n_layers']} layer(s), perceiver 6 x 8 x 64, 64 latents.", ""]
    if "generation" in results:
        lines += ["### Generation (greedy, 32 new tokens, KV cache)", "",
                  "| batch | images | prompt tokens | decode tok/s Otter | reference | ratio | first token Otter | reference |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in results["generation"]:
            ours, theirs = row["otter"], row["reference"]
            lines.append(f"| {row['batch']} | {row['images']} | {row['prompt_tokens']} | {ours['decode_tok_s']:.1f} | "
                         f"{theirs['decode_tok_s']:.1f} | {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x | "
                         f"{ours['ttft_s'] * 1000:.0f} ms | {theirs['ttft_s'] * 1000:.0f} ms |")
        lines.append("")
    if "training" in results:
        ours, theirs = results["training"]["otter"], results["training"]["reference"]
        lines += ["### Training step (perceiver + cross-attention, AdamW, batch 8, 4 images per sample)", "",
                  "| | samples/s | peak extra memory |", "|---|---|---|",
                  f"| Otter | {ours['samples_s']:.2f} | {gib(ours['peak_extra_bytes'])} |",
                  f"| reference | {theirs['samples_s']:.2f} | {gib(theirs['peak_extra_bytes'])} |",
                  f"| ratio | {ours['samples_s'] / theirs['samples_s']:.2f}x | "
                  f"{ours['peak_extra_bytes'] / max(theirs['peak_extra_bytes'], 1):.2f}x |", ""]
    if "conversion" in results:
        row = results["conversion"]
        lines += ["### Conversion (OpenFlamingo-3B architecture, random weights, fp32)", "",
                  "| wall time | peak RSS | converted model | peak RSS / model |", "|---|---|---|---|",
                  f"| {row['wall_s']:.1f} s | {gib(row['peak_rss_bytes'])} | {gib(row['output_bytes'])} | "
                  f"{row['peak_rss_bytes'] / row['output_bytes']:.2f} |", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parts", nargs="+", default=["generation", "training", "conversion"],
                        choices=["generation", "training", "conversion"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "otter-benchmarks")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--training-worker", choices=["otter", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = GPU_MODEL if args.device == "cuda" else CPU_MODEL
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.training_worker:
        model, reference = build(spec, args.device, dtype)
        print(json.dumps(train_step(args.training_worker, model, reference, spec, args.device, dtype, args.repeats)))
        return
    results = {}
    if "generation" in args.parts:
        model, reference = build(spec, args.device, dtype)
        results["generation"] = bench_generation(model, reference, spec, args.device, dtype, args.repeats)
        del model, reference
    if "training" in args.parts:
        results["training"] = bench_training(args.device, args.repeats)
    if "conversion" in args.parts:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results["conversion"] = bench_conversion(args.workdir)
    table = report(results, args.device, spec)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
