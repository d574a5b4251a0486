"""`otter convert openflamingo | otter | open-clip | mosaic-gpt`, registered by otter/cli.py. Imports stay inside the
commands so that `otter --help` does not load torch."""

import argparse


def _openflamingo(args) -> None:
    from .openflamingo import convert_openflamingo

    convert_openflamingo(
        args.out, checkpoint=args.checkpoint, lang_encoder=args.lang_encoder, vision_encoder=args.vision_encoder,
        vision_pretrained=args.vision_pretrained, tokenizer=args.tokenizer,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers, preset=args.preset, dtype=args.dtype,
        max_shard_size=args.max_shard_size, quick_gelu=args.quick_gelu,
        vision_feature_post_layernorm=args.vision_post_layernorm, command=args.command_line,
    )
    print(f"wrote {args.out}")


def _otter(args) -> None:
    from .otter_hf import convert_otter

    convert_otter(args.out, model=args.model, checkpoint=args.checkpoint, tokenizer=args.tokenizer, lora=args.lora,
                  dtype=args.dtype, max_shard_size=args.max_shard_size, command=args.command_line)
    print(f"wrote {args.out}")


def _open_clip(args) -> None:
    from .open_clip import convert_open_clip

    convert_open_clip(args.vision_encoder, args.vision_pretrained, args.out, dtype=args.dtype, quick_gelu=args.quick_gelu,
                      max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}")


def _mosaic_gpt(args) -> None:
    from .mosaic_gpt import convert_mosaic_gpt

    convert_mosaic_gpt(args.source, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       command=args.command_line)
    print(f"wrote {args.out}")


def _common(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder; must not exist (written atomically)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")


def _vision(parser, required: bool) -> None:
    parser.add_argument("--vision-encoder", required=required,
                        help="open_clip model name (ViT-L-14) or path to an open_clip model-config JSON")
    parser.add_argument("--vision-pretrained", required=required,
                        help="open_clip pretrained tag (openai) or a local weights file")
    parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                        help="vision activation; default: what the weights were trained with (QuickGELU for openai)")


def register(commands) -> None:
    convert = commands.add_parser("convert", help="convert OpenFlamingo checkpoints and their parts to Otter folders")
    sources = convert.add_subparsers(dest="source_format", required=True)

    openflamingo = sources.add_parser("openflamingo", help="OpenFlamingo checkpoint.pt + its parts -> Otter folder")
    openflamingo.add_argument("--checkpoint", help="OpenFlamingo checkpoint.pt (default with --preset: from the hub cache)")
    openflamingo.add_argument("--lang-encoder", help="language-model folder or hub id (mosaic_gpt folders convert too)")
    openflamingo.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the language model's)")
    _vision(openflamingo, required=False)
    openflamingo.add_argument("--cross-attn-every-n-layers", type=int,
                              help="checked against the checkpoint; read off it when omitted")
    openflamingo.add_argument("--preset", help="a released model: OpenFlamingo-3B-vitl-mpt1b, OpenFlamingo-4B-vitl-rpj3b, "
                                               "OpenFlamingo-9B-vitl-mpt7b, ... (-langinstruct variants)")
    openflamingo.add_argument("--vision-post-layernorm", action="store_true",
                              help="feed the perceiver CLIP tokens after ln_post (the releases were trained without)")
    _common(openflamingo)
    openflamingo.set_defaults(func=_openflamingo)

    otter = sources.add_parser("otter", help="an Otter-project checkpoint (Luodian's Otter, its Flamingo folders) -> "
                                             "Otter folder")
    otter.add_argument("--model", required=True,
                       help="the Otter-project model folder or hub id (config.json + weights; e.g. luodian/OTTER-Image-MPT7B)")
    otter.add_argument("--checkpoint", help="a trainable-only checkpoint (final_weights.pt, checkpoint_N.pt) over --model")
    otter.add_argument("--tokenizer", help="the language model's tokenizer, folder or hub id (default: what the Otter "
                                           "project loads: mosaicml/mpt-7b-instruct for MPT, the LLaMA config's path)")
    otter.add_argument("--lora", choices=["merge", "adapter"], default="merge",
                       help="LoRA adapters: merged into the weights, or kept as OUT/lora-adapter")
    _common(otter)
    otter.set_defaults(func=_otter)

    clip = sources.add_parser("open-clip", help="an open_clip vision tower -> CLIPVisionModel folder")
    _vision(clip, required=True)
    _common(clip)
    clip.set_defaults(func=_open_clip)

    mosaic = sources.add_parser("mosaic-gpt", help="mosaic_gpt (MPT-1B-RedPajama) -> native MPT folder with QK LayerNorm")
    mosaic.add_argument("source", help="mosaic_gpt folder or hub id")
    _common(mosaic)
    mosaic.set_defaults(func=_mosaic_gpt)
