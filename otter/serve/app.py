"""
`otter serve`'s HTTP API (FastAPI): OpenAI's chat and completions endpoints, streamed as server-sent events, over the
batching `Engine`; `/v1/models`, `/health`, `/metrics` (Prometheus) and the chat page at `/`.

Every bad request is answered with a 4xx and OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`),
and the server keeps serving. Images come as `data:` URLs (remote URLs only with `allow_remote_images`); local files
are never read on a request's behalf.
"""

import asyncio
import base64
import binascii
import copy
import hmac
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from otter.language_models import max_positions
from otter.processing_otter import load_image
from otter.prompts import IMAGE_TOKEN

from .engine import Engine, EngineStoppedError, QueueFullError, Request, Sampling

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("otter.serve.access")


@dataclass
class ServeOptions:
    """What `otter serve` takes besides the model (see its --help)."""

    model_name: str
    api_key: str | None = None
    max_batch_size: int = 16
    max_queue: int = 256
    max_images: int = 16
    max_image_pixels: int = 16_000_000
    max_body_bytes: int = 32 * 2**20
    allow_remote_images: bool = False
    remote_image_timeout: float = 10.0
    remote_image_bytes: int = 20 * 2**20
    default_max_tokens: int = 256


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# -- request bodies ----------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's other fields (user, logit_bias, ...) are accepted, unused

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[str]
    images: list[str | dict[str, Any]] = []  # Otter's addition: the images of the prompt's <image> markers, in order


# -- the app -------------------------------------------------------------------------------------------------------------
class Metrics:
    """The Prometheus figures of one server."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("otter_requests", "HTTP requests answered", ["endpoint", "status"], registry=registry)
        self.latency = Histogram("otter_request_seconds", "time to answer a generation request", ["endpoint"],
                                 registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        queue_depth = Gauge("otter_queue_depth", "requests waiting for the model", registry=registry)
        queue_depth.set_function(lambda: engine.queue_depth)
        self.in_flight = Gauge("otter_requests_in_flight", "generation requests being answered", registry=registry)
        self.batch_size = Histogram("otter_batch_size", "sequences per generate() call", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.tokens = Counter("otter_generated_tokens", "tokens generated", registry=registry)
        self.tokens_per_second = Gauge("otter_tokens_per_second", "tokens/s of the last batch", registry=registry)
        self.prompt_tokens = Counter("otter_prompt_tokens", "prompt tokens processed", registry=registry)

    def batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.tokens.inc(tokens)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)


def create_app(model, processor, options: ServeOptions) -> FastAPI:
    """The server's app for `model` (eval mode, on its device) and `processor`; its engine runs while the app does."""
    from contextlib import asynccontextmanager

    engine = Engine(model, processor, options.max_batch_size, options.max_queue)
    metrics = Metrics(engine)
    engine.on_batch = metrics.batch
    positions = max_positions(model.config.text_config)
    # the event loop counts prompt tokens with a tokenizer of its own: a fast tokenizer is not to be used from two
    # threads at once, and the engine's thread sets padding on the processor's while it encodes batches
    counter = copy.deepcopy(processor.tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        logger.info("serving %s (%s, %s) with batches of up to %d sequences", options.model_name, model.device,
                    model.dtype, options.max_batch_size)
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="Otter", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON ({first.get('msg')})",
                            code="invalid_json").response()
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return APIError(400, message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        if isinstance(error.__cause__, BodyTooLargeError):  # a body without Content-Length, cut while read
            return error.__cause__.response()
        return APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None,
                        headers=getattr(error, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        logger.exception("unexpected error answering %s", request.url.path)
        return APIError(500, f"the server failed: {type(error).__name__}: {error}", type="server_error").response()

    def authorize(request: HTTPRequest) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(body: _Body) -> None:
        if body.model is not None and body.model != options.model_name:
            raise APIError(404, f"The model {body.model!r} does not exist: this server serves {options.model_name!r}",
                           param="model", code="model_not_found")

    # -- images ------------------------------------------------------------------------------------------------------
    def decode_image(data: bytes, where: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as error:
            raise APIError(413, f"{where} is too large to decode ({error})", code="image_too_large") from None
        except (OSError, ValueError) as error:
            raise APIError(400, f"{where} is not an image ({error})", code="invalid_image") from None
        pixels = image.width * image.height
        if pixels > options.max_image_pixels:
            raise APIError(413, f"{where} is {image.width} x {image.height} = {pixels} pixels, more than the "
                                f"{options.max_image_pixels} this server decodes (--max-image-pixels)",
                           code="image_too_large")
        try:
            return load_image(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise APIError(400, f"{where} could not be decoded ({error})", code="invalid_image") from None

    def fetch(url: str, where: str) -> bytes:
        import httpx

        try:
            with httpx.stream("GET", url, timeout=options.remote_image_timeout, follow_redirects=True) as response:
                response.raise_for_status()
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > options.remote_image_bytes:
                        raise APIError(413, f"{where} ({url}) is larger than {options.remote_image_bytes} bytes",
                                       code="image_too_large")
                return bytes(data)
        except httpx.HTTPError as error:
            raise APIError(400, f"{where} ({url}) could not be fetched ({error})", code="invalid_image") from None

    def read_image(url: Any, where: str) -> Image.Image:
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str):
            raise APIError(400, f"{where} has no url", code="invalid_image")
        if url.startswith("data:"):
            header, comma, payload = url.partition(",")
            if not comma or not header.endswith(";base64"):
                raise APIError(400, f"{where} is not a base64 data: URL (data:image/...;base64,...)",
                               code="invalid_image")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as error:
                raise APIError(400, f"{where} is not valid base64 ({error})", code="invalid_image") from None
            return decode_image(data, where)
        if url.startswith(("http://", "https://")):
            if not options.allow_remote_images:
                raise APIError(400, f"{where} is a remote URL, which this server does not fetch: send the image as a "
                                    "data: URL (or start the server with --allow-remote-images)", code="invalid_image")
            return decode_image(fetch(url, where), where)
        raise APIError(400, f"{where} must be a data: URL (or an http(s) URL with --allow-remote-images); local "
                            "files are never read", code="invalid_image")

    async def read_images(urls: list, param: str) -> list[Image.Image]:
        if len(urls) > options.max_images:
            raise APIError(400, f"the request holds {len(urls)} images, more than the {options.max_images} this server "
                                "takes (--max-images)", param=param, code="too_many_images")
        return [await run_in_threadpool(read_image, url, f"image {index + 1}") for index, url in enumerate(urls)]

    # -- prompts ----------------------------------------------------------------------------------------------------
    def chat_prompt(body: ChatBody) -> tuple[str, list]:
        messages, urls = [], []
        for position, message in enumerate(body.messages):
            content = message.content or ""
            if isinstance(content, list):
                parts = []
                for part in content:
                    kind = part.get("type")
                    if kind == "text" and isinstance(part.get("text"), str):
                        parts.append({"type": "text", "text": part["text"]})
                    elif kind == "image_url":
                        parts.append({"type": "image"})
                        urls.append(part.get("image_url"))
                    else:
                        raise APIError(400, f"messages[{position}]: content parts are text or image_url, got "
                                            f"{str(part)[:80]}", param=f"messages.{position}.content")
                content = parts
            messages.append({"role": message.role, "content": content})
        try:
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template's raise_exception: a conversation it cannot write
            raise APIError(400, f"the chat template cannot render these messages: {error}", param="messages") from None
        return prompt, urls

    def prepare(body: _Body, prompt: str, images: list, max_tokens: int | None) -> Request:
        if prompt.count(IMAGE_TOKEN) != len(images):
            raise APIError(400, f"the prompt holds {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} markers but "
                                f"{len(images)} images were given", param="prompt", code="image_count_mismatch")
        prompt_tokens = len(counter(prompt)["input_ids"])
        if not prompt_tokens:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = positions - prompt_tokens if positions is not None else None
        if max_tokens is None:
            max_tokens = options.default_max_tokens if room is None else min(options.default_max_tokens, room)
        if room is not None and (room < 1 or max_tokens > room):
            raise APIError(400, f"this model's maximum context length is {positions} tokens; the prompt holds "
                                f"{prompt_tokens} and {max_tokens} more were asked for (max_tokens): shorten the "
                                "prompt or ask for fewer tokens", param="max_tokens", code="context_length_exceeded")
        if body.n > options.max_batch_size:
            raise APIError(400, f"n is {body.n}, but this server generates at most {options.max_batch_size} sequences "
                                "at once (--max-batch-size)", param="n")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not item for item in stop):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop")
        temperature = body.temperature
        if temperature is None:
            config = model.generation_config
            temperature = (config.temperature or 1.0) if config.do_sample else 0.0
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=body.top_p or 1.0, stop=stop,
                            seed=body.seed)
        return Request(prompt=prompt, images=images, sampling=sampling, n=body.n, prompt_tokens=prompt_tokens,
                       emit=None, done=None)

    # -- answering -----------------------------------------------------------------------------------------------------
    async def answer(http: HTTPRequest, body: _Body, request: Request, endpoint: str, kind: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request.emit = lambda index, delta, reason: loop.call_soon_threadsafe(events.put_nowait,
                                                                              ("delta", index, delta, reason))
        request.done = lambda error: loop.call_soon_threadsafe(events.put_nowait, ("done", error))
        started = time.monotonic()
        try:
            engine.submit(request)
        except QueueFullError as error:
            raise APIError(503, f"the server is busy: {error}; retry shortly", type="server_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStoppedError as error:
            raise APIError(503, str(error), type="server_error", code="shutting_down") from None
        metrics.prompt_tokens.inc(request.prompt_tokens)
        identifier = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        base = {"id": identifier, "created": created, "model": options.model_name}
        usage = lambda: {"prompt_tokens": request.prompt_tokens, "completion_tokens": request.completion_tokens,  # noqa: E731
                         "total_tokens": request.prompt_tokens + request.completion_tokens}

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def chunk(index, delta, reason):
                if kind == "chat":
                    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
                else:
                    choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": reason}
                return "data: " + json.dumps({**base, "object": chunk_object, "choices": [choice]}) + "\n\n"

            async def stream():
                metrics.in_flight.inc()
                try:
                    if kind == "chat":
                        for index in range(request.n):
                            yield chunk(index, {"role": "assistant", "content": ""}, None)
                    while True:
                        event = await events.get()
                        if event[0] == "done":
                            if event[1] is not None:
                                error = {"error": {"message": f"generation failed: {event[1]}", "type": "server_error",
                                                   "param": None, "code": None}}
                                yield "data: " + json.dumps(error) + "\n\n"
                            break
                        _, index, delta, reason = event
                        if kind == "chat":
                            yield chunk(index, {"content": delta} if delta or reason is None else {}, reason)
                        else:
                            yield chunk(index, delta, reason)
                    if include_usage:
                        yield "data: " + json.dumps({**base, "object": chunk_object, "choices": [],
                                                     "usage": usage()}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client left (the stream was cancelled) or it ended: either way nothing more to compute
                    request.cancel()
                    metrics.in_flight.dec()
                    metrics.latency.labels(endpoint).observe(time.monotonic() - started)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        metrics.in_flight.inc()
        texts, reasons = [""] * request.n, [None] * request.n
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        raise APIError(499, "the client closed the request", code="client_closed") from None
                    continue
                if event[0] == "done":
                    if isinstance(event[1], EngineStoppedError):
                        raise APIError(503, str(event[1]), type="server_error", code="shutting_down")
                    if event[1] is not None:
                        raise APIError(500, f"generation failed: {event[1]}", type="server_error")
                    break
                _, index, delta, reason = event
                texts[index] += delta
                reasons[index] = reason or reasons[index]
        finally:  # answered, failed, or abandoned (the client left, the server stopped waiting): nothing more to compute
            request.cancel()
            metrics.in_flight.dec()
            metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        if kind == "chat":
            choices = [{"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": reason} for index, (text, reason) in enumerate(zip(texts, reasons))]
            return {**base, "object": "chat.completion", "choices": choices, "usage": usage()}
        choices = [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}
                   for index, (text, reason) in enumerate(zip(texts, reasons))]
        return {**base, "object": "text_completion", "choices": choices, "usage": usage()}

    # -- endpoints -------------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest, body: ChatBody):
        authorize(http)
        check_model(body)
        prompt, urls = chat_prompt(body)
        images = await read_images(urls, "messages")
        request = prepare(body, prompt, images, body.max_completion_tokens or body.max_tokens)
        return await answer(http, body, request, "/v1/chat/completions", "chat")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest, body: CompletionBody):
        authorize(http)
        check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "this server takes one prompt per request (its images go with it)",
                               param="prompt")
            prompt = prompt[0]
        images = await read_images(body.images, "images")
        request = prepare(body, prompt, images, body.max_tokens)
        return await answer(http, body, request, "/v1/completions", "completion")

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        authorize(http)
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "otter", "max_model_len": positions}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus(http: HTTPRequest):
        authorize(http)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(resources.files("otter.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    return Gateway(app, options.max_body_bytes, metrics)


class BodyTooLargeError(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes", code="request_too_large")


class Gateway:
    """
    ASGI middleware in front of the app: a request body over `limit` bytes (by its Content-Length, or as it arrives)
    is answered 413; every request gets an id (`x-request-id`, the client's or a new one) and one structured access
    log line (JSON: id, client, method, path, status, milliseconds); API requests are counted in `metrics`.
    """

    def __init__(self, app: FastAPI, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), 500
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLargeError(self.limit)
            return message

        async def tagged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                response = BodyTooLargeError(self.limit).response()
                await response(scope, receive, tagged)
            else:
                await self.app(scope, counted, tagged)
        finally:
            path = scope["path"]
            if path.startswith("/v1/"):
                self.metrics.requests.labels(path, str(status)).inc()
            client = scope.get("client")
            access_logger.info(json.dumps({
                "request_id": request_id, "client": client[0] if client else None, "method": scope["method"],
                "path": path, "status": status, "ms": round(1000 * (time.monotonic() - started), 1)}))


__all__ = ["create_app", "ServeOptions", "APIError", "Gateway"]
