"""`otter eval ...`: registered by otter/cli.py."""

import argparse
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def run(args) -> None:
    import dataclasses

    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from otter import OtterProcessor
    from otter.chat import load_otter, placement_kwargs

    from .evaluator import Evaluation, evaluation_processes
    from .tasks import get_task

    task = get_task(args.task)
    if task.generation is not None:
        overrides = {key: value for key, value in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
                     if value is not None}
        task = dataclasses.replace(task, generation={**task.generation, **overrides})
    elif args.num_beams is not None or args.max_new_tokens is not None:
        raise ValueError(f"--num-beams and --max-new-tokens apply to generation tasks; {task.name} ranks class names")
    if args.rices_encoder is not None:
        if not args.rices:
            raise ValueError("--rices-encoder is the encoder of --rices; add --rices, or leave --rices-encoder out")
        encoder = Path(args.rices_encoder)
        if not encoder.is_dir():
            raise ValueError(f"--rices-encoder {encoder} {'is not a folder' if encoder.exists() else 'does not exist'}; "
                             "expected a transformers CLIP folder")
    processes = evaluation_processes()  # several when launched by `accelerate launch` or torchrun: each on its device
    placement = placement_kwargs(args)
    if placement["device_map"] is not None:
        if processes.num_processes > 1:
            raise ValueError("--device-map spreads one model over the devices; with several processes each loads the "
                             "model on a device of its own: leave --device-map out")
        if args.device is not None:
            raise ValueError("--device and --device-map cannot be used together: --device puts the whole model on "
                             "one device, --device-map spreads it over several (auto: every GPU, then the CPU)")
        device = None
    else:
        device = _device(args.device) if args.device is not None or processes.num_processes == 1 else processes.device
    # the data, the images the run shows and --out are checked before the model is loaded (minutes, on a large one)
    evaluation = Evaluation(
        task, data_dir=args.data_dir, out=args.out, shots=args.shots, trials=args.trials, seed=args.seed,
        rices=args.rices, rices_cache=args.rices_cache, batch_size=args.batch_size, num_samples=args.num_samples,
        query_set_size=args.query_set_size, num_frames=args.num_frames,
    )
    model_dir = Path(args.model).resolve()  # recorded in the results; resuming checks the weights themselves
    model = load_otter(model_dir, None if device is None else str(device), args.dtype, **placement)
    processor = OtterProcessor.from_pretrained(model_dir)
    rices_encoder = None
    if args.rices_encoder is not None:
        dtype = model.vision_model.dtype
        rices_encoder = (CLIPVisionModelWithProjection.from_pretrained(args.rices_encoder, dtype=dtype)
                         .to(model.vision_model.device), CLIPImageProcessor.from_pretrained(args.rices_encoder))
    evaluation.run(model, processor, rices_encoder=rices_encoder)
    if not processes.is_main_process:
        return
    out = Path(args.out)
    print(out.with_suffix(".md").read_text(encoding="utf-8"), end="")
    print(f"\nresults: {out}  summary: {out.with_suffix('.md')}  per-sample log: {out.with_suffix('.samples.jsonl')}")


def _device(name: str | None):
    """`--device`, checked before anything is loaded onto it: default cuda when available, else cpu."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; expected e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def register(commands) -> None:
    from .tasks import TASKS

    parser = commands.add_parser(
        "eval", help="few-shot evaluation on the OpenFlamingo benchmarks and video QA",
        description="Few-shot evaluation with OpenFlamingo's protocol. Dataset layouts: eval/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="an Otter model folder (weights, tokenizer, processor)")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--data-dir", required=True, help="the task's data set, in the layout eval/README.md documents")
    parser.add_argument("--out", required=True, help="results JSON; the .md summary and the .samples.jsonl log go beside it")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--trials", type=int, default=1, help="random demonstrations: trial t uses seed + t")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rices", action="store_true", help="retrieve demonstrations by image similarity (RICES)")
    parser.add_argument("--rices-encoder", default=None,
                        help="a transformers CLIP folder for RICES embeddings (default: the model's own vision tower)")
    parser.add_argument("--rices-cache", default=None, help="folder of cached RICES embeddings (default: beside --out)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=None, help="evaluate a seeded random subset (default: all)")
    parser.add_argument("--query-set-size", type=int, default=2048, help="random demonstrations come from this many")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="video tasks: frames sampled uniformly from each video (default: the processor's "
                             "num_frames, else 8)")
    parser.add_argument("--num-beams", type=int, default=None, help="override the task's beam count")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the task's generation length")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="the dtype the weights are cast to on load; unset, what runs well on the device: "
                             "float32 on a CPU, bfloat16 on a CUDA GPU (float16 on one without bfloat16)")
    from otter.chat import add_placement_options

    add_placement_options(parser)  # --device-map, --offload-folder, --load-in-8bit / --load-in-4bit
    parser.set_defaults(func=run)
