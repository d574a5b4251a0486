"""
`otter train finetune|pretrain|shapesworld ...`: registered by otter/cli.py. Imports of torch-heavy modules wait
until a command runs. Every finetune/pretrain flag maps to a `TrainingConfig` field; `--config YAML` sets any field,
and flags given override it.
Multi-process: `accelerate launch --config_file train/configs/ddp.yaml -m otter.cli train finetune ...`.
"""

import argparse

COMMANDS = {
    "finetune": ("instruction", "instruction-tune on custom JSONL or MIMIC-IT data (loss on answers only)"),
    "pretrain": ("pretraining", "train on MMC4-style interleaved and LAION-style pair webdataset shards"),
}


def _add_options(parser: argparse.ArgumentParser) -> None:
    # defaults are None: an option not given leaves the YAML's value, or TrainingConfig's default
    parser.add_argument("--model", help="Otter folder to start from")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="data files (see train/README.md)")
    parser.add_argument("--out", help="output folder: checkpoints, metrics.jsonl, then the trained Otter folder")
    parser.add_argument("--config", metavar="YAML", help="YAML of TrainingConfig fields; flags override it")
    parser.add_argument("--max-steps", type=int, help="optimizer steps to run")
    parser.add_argument("--epochs", type=int, help="passes over the data (finetune; default 1 without --max-steps)")
    parser.add_argument("--batch-size", type=int, help="examples per process per micro-batch (default 4)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    parser.add_argument("--schedule", choices=["cosine", "constant"], help="after warmup (default cosine)")
    parser.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    parser.add_argument("--save-every", type=int, help="checkpoint period in steps (default 500)")
    parser.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint")
    parser.add_argument("--allow-data-change", action="store_true", default=None,
                        help="with --resume: continue although the data files changed since the checkpoint")
    parser.add_argument("--max-skipped-share", type=float, metavar="SHARE",
                        help="fail the run when more than this share of the records is skipped (default 1: fail "
                             "only when every record is)")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="mixed precision (weights stay fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None,
                        help="recompute activations in the backward pass to save memory")
    parser.add_argument("--train-embeddings", action="store_true", default=None,
                        help="also train the embedding rows of <image>, <|endofchunk|> and <answer> (only those)")
    parser.add_argument("--lora", action="store_true", default=None, help="also train LoRA adapters on the LM")
    parser.add_argument("--lora-output", choices=["merged", "adapter"],
                        help="merge LoRA into the weights (default) or save it as out/lora-adapter")
    parser.add_argument("--full", action="store_true", default=None, help="train every parameter of the model")
    parser.add_argument("--freeze-vision", action="store_true", default=None,
                        help="with --full: keep the vision encoder frozen")
    parser.add_argument("--max-length", type=int, help="tokens kept per instruction example (default 512)")
    parser.add_argument("--resample-frames", type=int, metavar="N",
                        help="frames sampled uniformly from each video (finetune; default 16, as Otter)")
    parser.add_argument("--video-sets", nargs="*", metavar="NAME",
                        help="the MIMIC-IT subsets whose instructions are videos (finetune; default: Otter's DC, E4D, "
                             "TVC, FunQA, VideoQA; none given: no subset)")
    parser.add_argument("--seed", type=int, help="data order, augmentation and initialisation (default 42)")
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes per process (default 2)")
    parser.add_argument("--tensorboard", action="store_true", default=None, help="log to out/logs for TensorBoard")


def register(commands) -> None:
    train_parser = commands.add_parser("train", help="fine-tune or pretrain an Otter model (on accelerate)")
    subcommands = train_parser.add_subparsers(dest="train_command", required=True)
    for name, (objective, help_text) in COMMANDS.items():
        parser = subcommands.add_parser(name, help=help_text, description=help_text)
        _add_options(parser)
        parser.set_defaults(func=run, objective=objective)
    parser = subcommands.add_parser(
        "shapesworld", help="reproduce the shipped ShapesWorld model from nothing (about an hour on 2 CPU cores)",
        description="Every stage of the model the package ships, with the project's own code: data, CLIP, "
                    "tokenizer and language model, perceiver + cross-attention pretraining, instruction tuning, fp16 "
                    "export, held-out evaluation. Rerun on the same --out to continue an interrupted run.",
    )
    parser.add_argument("--out", required=True, help="run folder; the model lands in OUT/model, results in OUT/eval")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every step and sample count (0.01 runs the whole pipeline in about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--varied", action="store_true",
                        help="the varied world (VARIED_RECIPE): every axis of variation, video, 2-5-way binding")
    parser.set_defaults(func=run_shapesworld)


def run(args: argparse.Namespace) -> None:
    import dataclasses

    from .trainer import TrainingConfig, train

    fields = {field.name for field in dataclasses.fields(TrainingConfig)}
    options = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    train(TrainingConfig.load(args.config, **options))


def run_shapesworld(args: argparse.Namespace) -> None:
    import dataclasses

    from .shapesworld import VARIED_RECIPE, Recipe, reproduce

    if args.scale <= 0:
        raise SystemExit(f"otter: --scale must be positive, got {args.scale}")
    recipe = VARIED_RECIPE if args.varied else Recipe()
    model_dir = reproduce(args.out, dataclasses.replace(recipe, seed=args.seed, scale=args.scale))
    print((model_dir.parent / "eval" / "results.md").read_text(encoding="utf-8"), end="")
    print(f"\nmodel: {model_dir}")
