"""
`otter serve`: an OpenAI-compatible HTTP server for any Otter folder (FastAPI + uvicorn), with batched, streamed
generation and a chat page. Needs the `serve` extra: `pip install "otter-flamingo[serve]"`.
"""

import argparse


def register(commands) -> None:
    from otter.chat import DTYPE_HELP, DTYPES, add_placement_options

    parser = commands.add_parser(
        "serve", help="an OpenAI-compatible server (chat and completions, streaming, batching) with a chat page",
        description="Serve an Otter folder over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health, "
                    "/metrics, and a chat page at /. See the README's 'Serving' section.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="an Otter model folder")
    parser.add_argument("--served-model-name", default=None, help="the model's id in the API (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    add_placement_options(parser)
    parser.add_argument("--max-batch-size", type=int, default=16, help="sequences per generate() call")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting for the model; more are answered 503 with Retry-After")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (also read from OTTER_API_KEY)")
    parser.add_argument("--max-images", type=int, default=16, help="images per request")
    parser.add_argument("--max-image-pixels", type=int, default=16_000_000,
                        help="width x height an image may have; larger ones are refused (413) before decoding")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="request body size")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="tokens generated when a request does not say (max_tokens), within the model's context")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (with --remote-image-timeout and a 20 MiB cap); off: data: "
                             "URLs only")
    parser.add_argument("--remote-image-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM or Ctrl-C, seconds in-flight requests get to finish")
    parser.set_defaults(func=run)


def run(args) -> None:
    import logging
    import os
    from pathlib import Path

    import uvicorn

    from otter.chat import load_model, placement_kwargs

    from .app import ServeOptions, create_app

    for name in ("max_batch_size", "max_queue", "max_images", "max_image_pixels", "max_body_bytes", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1-65535, got {args.port}")
    model, processor = load_model(args.model, args.device, args.dtype, **placement_kwargs(args))
    options = ServeOptions(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get("OTTER_API_KEY") or None,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_images=args.max_images,
        max_image_pixels=args.max_image_pixels, max_body_bytes=args.max_body_bytes,
        allow_remote_images=args.allow_remote_images, remote_image_timeout=args.remote_image_timeout,
        default_max_tokens=args.max_tokens,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        logging.getLogger(__name__).warning("listening on %s without --api-key: anyone who reaches it can use it",
                                            args.host)
    app = create_app(model, processor, options)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
