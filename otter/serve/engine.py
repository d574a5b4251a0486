"""
The serving engine: one worker thread runs the model, taking requests from a bounded queue and running as many as fit
(`max_batch_size` sequences) in one left-padded `generate()` call. Each request's tokens leave as they are generated:
a stopping criterion, called by `generate()` after every step, hands each row's new text to its request and ends the
rows that are done (end of chunk, a stop string, their own `max_tokens`, a client that left), so a batch ends when its
last row does. Requests of different sampling settings share a batch (temperature and top-p are applied per row);
only requests with a `seed` run in a batch of their own, so that their sampling is reproducible.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The engine holds `max_queue` requests already; the caller should come back later."""


class EngineStoppedError(Exception):
    """The engine is shutting down and takes no more requests."""


@dataclass
class Sampling:
    """How one request decodes: greedy when `temperature` is 0, else sampling at `temperature` within `top_p`."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Request:
    """
    One prompt (text with `<image>` markers, and its images as PIL images in marker order) to be answered `n` times.
    `emit(index, text_delta, finish_reason)` is called from the worker thread as text is generated (finish_reason
    None until the choice's last call, then "stop" or "length"); `done(error)` once, when every choice has finished
    (error None) or the request failed.
    """

    prompt: str
    images: list
    sampling: Sampling
    emit: Callable[[int, str, str | None], None]
    done: Callable[[BaseException | None], None]
    n: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (its client left): its rows end at the next step."""
        self.cancelled.set()


class TextStream:
    """
    One choice's text as its tokens arrive: decoded in full each step (so multi-token characters come out whole),
    special tokens dropped, leading and trailing whitespace held back (what `decode_answers` strips), and stop
    strings cut, with any text that might begin one held back until it cannot.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0  # characters of the answer sent

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token -> (new text ready to send, whether a stop string ended the answer)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            return "", False
        for stop in self.stop:
            found = text.find(stop)
            if found >= 0:
                return self._release(text[:found].rstrip()), True
        ready = len(text.rstrip())
        for stop in self.stop:  # hold back a tail that may be the start of a stop string
            for length in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:length]):
                    ready = min(ready, len(text) - length)
                    break
        return self._release(text[:ready]), False

    def flush(self) -> str:
        """The answer ended (end of chunk, or its length): what is left of it to send, trailing whitespace dropped."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        return self._release(text)

    def _release(self, text: str) -> str:
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta


class RowSampling(LogitsProcessor):
    """Per-row temperature and top-p; a row of temperature 0 keeps only its most likely token (greedy)."""

    def __init__(self, temperatures: list[float], top_ps: list[float]):
        self.temperatures, self.top_ps = temperatures, top_ps

    def __call__(self, input_ids, scores):
        scores = scores.float()
        for row, (temperature, top_p) in enumerate(zip(self.temperatures, self.top_ps)):
            if temperature == 0:
                best = scores[row].argmax()
                scores[row] = -float("inf")
                scores[row, best] = 0.0
                continue
            scores[row] = scores[row] / temperature
            if top_p < 1:
                ordered, order = scores[row].sort(descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                outside = cumulative - ordered.softmax(-1) >= top_p  # tokens past the nucleus (the first stays)
                scores[row, order[outside]] = -float("inf")
        return scores


class StepHook(StoppingCriteria):
    """Called by `generate()` after every step: streams each row's new token and says which rows are done."""

    def __init__(self, engine: "Engine", rows: list[tuple[Request, int]], prompt_length: int):
        self.engine, self.rows, self.prompt_length = engine, rows, prompt_length
        tokenizer = engine.processor.tokenizer
        self.streams = [TextStream(tokenizer, request.sampling.stop) for request, _ in rows]
        self.finished: list[str | None] = [None] * len(rows)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        eoc = self.engine.processor.eoc_token_id
        new = input_ids[:, -1].tolist()
        step = input_ids.shape[1] - self.prompt_length  # tokens generated so far
        produced = 0
        for index, ((request, choice), stream) in enumerate(zip(self.rows, self.streams)):
            if self.finished[index] is not None:
                continue
            if request.cancelled.is_set():
                self.finished[index] = "cancelled"
                continue
            produced += 1
            request.completion_tokens += 1
            if new[index] == eoc:
                self._finish(index, "stop", stream.flush())
                continue
            delta, stopped = stream.add(new[index])
            if stopped:
                self._finish(index, "stop", delta)
            elif step >= request.sampling.max_tokens:
                self._finish(index, "length", delta + stream.flush())
            elif delta:
                request.emit(choice, delta, None)
        self.engine.generated_tokens += produced
        return torch.tensor([reason is not None for reason in self.finished], device=input_ids.device)

    def _finish(self, index: int, reason: str, delta: str = "") -> None:
        request, choice = self.rows[index]
        self.finished[index] = reason
        request.emit(choice, delta, reason)


class Engine:
    """
    Runs `model` (an `OtterForConditionalGeneration` in eval mode) with `processor` from one worker thread. `submit`
    a `Request`; it raises `QueueFullError` when `max_queue` requests wait already. `start()` and `stop()` the worker;
    `stop` answers the requests still queued with `EngineStoppedError` and lets the running batch finish.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_queue: int = 256):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.pending: list[Request] = []
        self.lock = threading.Condition()
        self.worker: threading.Thread | None = None
        self.stopping = False
        # figures for /metrics
        self.batches = 0
        self.generated_tokens = 0
        self.on_batch: Callable[[int, int, float], None] | None = None  # (sequences, tokens, seconds) per batch

    # -- the queue -------------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        with self.lock:
            return len(self.pending)

    def submit(self, request: Request) -> None:
        with self.lock:
            if self.stopping:
                raise EngineStoppedError("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFullError(f"{len(self.pending)} requests are waiting already (--max-queue {self.max_queue})")
            self.pending.append(request)
            self.lock.notify()

    def start(self) -> None:
        self.worker = threading.Thread(target=self._work, name="otter-engine", daemon=True)
        self.worker.start()

    def stop(self, timeout: float | None = None) -> None:
        with self.lock:
            self.stopping = True
            left, self.pending = self.pending, []
            self.lock.notify_all()
        for request in left:
            request.done(EngineStoppedError("the server shut down before this request ran"))
        if self.worker is not None:
            self.worker.join(timeout)

    def _next_batch(self) -> list[Request] | None:
        """The oldest live request and the queued ones that may share its batch, up to max_batch_size rows."""
        with self.lock:
            while True:
                self.pending = [request for request in self.pending if not self._dropped(request)]
                if self.pending or self.stopping:
                    break
                self.lock.wait()
            if not self.pending:
                return None
            first = self.pending.pop(0)
            batch, rows = [first], first.n
            if first.sampling.seed is None:
                for request in list(self.pending):
                    if request.sampling.seed is None and rows + request.n <= self.max_batch_size:
                        self.pending.remove(request)
                        batch.append(request)
                        rows += request.n
            return batch

    @staticmethod
    def _dropped(request: Request) -> bool:
        if request.cancelled.is_set():
            request.done(None)
            return True
        return False

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.monotonic()
            tokens_before = self.generated_tokens
            try:
                self._run(batch)
            except Exception as error:  # the requests get the error; the engine keeps serving
                logger.exception("a batch of %d requests failed", len(batch))
                for request in batch:
                    request.done(error)
            else:
                for request in batch:
                    request.done(None)
            seconds = time.monotonic() - started
            rows = sum(request.n for request in batch)
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(rows, self.generated_tokens - tokens_before, seconds)

    # -- one batch ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, batch: list[Request]) -> None:
        rows = [(request, choice) for request in batch for choice in range(request.n)]
        processor, model = self.processor, self.model
        inputs = processor(text=[request.prompt for request, _ in rows], images=[request.images for request, _ in rows],
                           padding=True, padding_side="left", return_tensors="pt").to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        hook = StepHook(self, rows, prompt_length)
        temperatures = [request.sampling.temperature for request, _ in rows]
        sampling = any(temperatures)
        kwargs = dict(max_new_tokens=max(request.sampling.max_tokens for request in batch), do_sample=sampling,
                      num_beams=1, stopping_criteria=StoppingCriteriaList([hook]))
        if sampling:
            kwargs.update(temperature=1.0, top_p=1.0, top_k=None, logits_processor=LogitsProcessorList(
                [RowSampling(temperatures, [request.sampling.top_p for request, _ in rows])]))
            if batch[0].sampling.seed is not None:
                torch.manual_seed(batch[0].sampling.seed)
        model.generate(**inputs, **kwargs)
        for index, reason in enumerate(hook.finished):  # rows generate() ended without the hook (none expected)
            if reason is None:
                hook._finish(index, "length", hook.streams[index].flush())


__all__ = ["Engine", "Request", "Sampling", "QueueFullError", "EngineStoppedError", "TextStream", "RowSampling"]
