"""
`otter serve`, as users reach it: the real server (uvicorn on a free local port) answering OpenAI's own Python client,
plain, streamed and 16 at once, on the shipped model, each answer checked against `generate` called directly; every
bad input of the issue answered with a 4xx in OpenAI's format while the server keeps serving; the API key; the queue
limit; a client that leaves; SIGTERM; and the chat page driven in a real headless Chromium.
"""

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="pip install 'otter-flamingo[serve]'")
openai = pytest.importorskip("openai", reason="the tests drive the server with OpenAI's client: pip install openai")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from otter import SHAPESWORLD_MODEL, OtterForConditionalGeneration, OtterProcessor  # noqa: E402
from otter.serve.app import ServeOptions, create_app  # noqa: E402
from otter.shapesworld import ShapesWorld, render  # noqa: E402

from .train_fixtures import free_port  # noqa: E402

KEY = "sk-otter-test"


class Server:
    """A real uvicorn server of `create_app` in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, model, processor, **options):
        self.port = free_port()
        self.app = create_app(model, processor, ServeOptions(model_name="shapesworld", **options))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def shipped():
    model = OtterForConditionalGeneration.from_pretrained(SHAPESWORLD_MODEL).eval()
    return model, OtterProcessor.from_pretrained(SHAPESWORLD_MODEL)


@pytest.fixture(scope="module")
def server(shipped):
    server = Server(*shipped, api_key=KEY, max_body_bytes=4 * 2**20, max_image_pixels=4_000_000)
    yield server
    server.close()


def data_url(image: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def questions(count: int, seed: int = 5) -> list[tuple[Image.Image, str]]:
    world = ShapesWorld(seed)
    records = [world.vqa(kind) for kind in ("colour", "shape", "count", "position") * (count // 4 + 1)][:count]
    return [(render(record["scene"]), record["question"]) for record in records]


def direct(shipped, messages_or_prompt, images, max_new_tokens=16) -> str:
    """What `generate` answers, called directly (greedy), for a chat (rendered by the template) or a raw prompt."""
    model, processor = shipped
    prompt = messages_or_prompt if isinstance(messages_or_prompt, str) else processor.apply_chat_template(
        messages_or_prompt, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode_answers(output, inputs["input_ids"].shape[1])[0]


def chat(images, question):
    """An OpenAI chat: one user message with `images` (one PIL image, or a list) as data: URLs, then `question`."""
    images = images if isinstance(images, list) else [images]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}
                                         for image in images] + [{"type": "text", "text": question}]}]


def template_chat(question, images=1):
    """The same chat as the chat template takes it."""
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]


# -- the OpenAI client, plain and streamed --------------------------------------------------------------------------
def test_the_openai_client_chats_plain_and_streamed_and_completes_raw_prompts(server, shipped):
    client = server.client()
    assert [model.id for model in client.models.list()] == ["shapesworld"]
    image, question = questions(1)[0]
    expected = direct(shipped, template_chat(question), [image])
    assert expected

    answer = client.chat.completions.create(model="shapesworld", messages=chat(image, question), temperature=0,
                                            max_tokens=16)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"  # the model ended its answer (<|endofchunk|>)
    assert answer.usage.prompt_tokens > 0 and answer.usage.total_tokens == (answer.usage.prompt_tokens
                                                                            + answer.usage.completion_tokens)

    chunks = list(client.chat.completions.create(model="shapesworld", messages=chat(image, question), temperature=0,
                                                 max_tokens=16, stream=True, stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(deltas) == expected
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    cut = client.chat.completions.create(model="shapesworld", messages=chat(image, question), temperature=0,
                                         max_tokens=1)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    assert expected.startswith(cut.choices[0].message.content)

    last_word = expected.split()[-1]
    stopped = client.chat.completions.create(model="shapesworld", messages=chat(image, question), temperature=0,
                                             max_tokens=16, stop=[last_word])
    assert stopped.choices[0].message.content == expected[: expected.rindex(last_word)].strip()
    assert stopped.choices[0].finish_reason == "stop"

    raw = "<image>User: " + question + " GPT:<answer>"
    completion = client.completions.create(model="shapesworld", prompt=raw, max_tokens=16, temperature=0,
                                           extra_body={"images": [data_url(image)]})
    assert completion.choices[0].text == direct(shipped, raw, [image])

    sampled = client.chat.completions.create(model="shapesworld", messages=chat(image, question), temperature=1.0,
                                             top_p=0.9, n=3, seed=7, max_tokens=8)
    again = client.chat.completions.create(model="shapesworld", messages=chat(image, question), temperature=1.0,
                                           top_p=0.9, n=3, seed=7, max_tokens=8)
    assert len(sampled.choices) == 3 and [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]


def test_sixteen_concurrent_clients_are_batched_and_each_gets_its_own_answer(server, shipped):
    asked = [([image], question) for image, question in questions(16, seed=9)]
    comparison = ShapesWorld(3).comparison()
    asked[5] = ([render(scene) for scene in comparison["scenes"]], comparison["question"])  # two images
    asked[7] = ([], "Hello, who are you?")  # none
    expected = [direct(shipped, template_chat(question, len(images)), images) for images, question in asked]
    assert len(set(expected)) > 3
    client = server.client()
    # one of them streamed: it shares batches with the others, as do requests of 0, 1 and 2 images

    def ask(index):
        images, question = asked[index]
        messages = chat(images, question)
        if index == 3:
            chunks = client.chat.completions.create(model="shapesworld", messages=messages, temperature=0,
                                                    max_tokens=16, stream=True)
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        return client.chat.completions.create(model="shapesworld", messages=messages, temperature=0,
                                              max_tokens=16).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    figures = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line and not line.startswith("#")}
    assert figures["otter_batch_size_count"] < figures["otter_batch_size_sum"]  # some batch held several requests
    assert figures['otter_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 16
    assert figures["otter_generated_tokens_total"] > 0 and "otter_queue_depth" in figures


# -- bad input: a 4xx in OpenAI's format, and the server keeps serving -------------------------------------------
def test_every_bad_request_gets_a_named_4xx_and_the_server_keeps_serving(server, shipped):
    url, auth = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    image, question = questions(1)[0]

    def post(body, status, code=None, path=url, **kwargs):
        response = httpx.post(path, headers={**auth, **kwargs.pop("headers", {})}, timeout=60,
                              **({"content": body} if isinstance(body, (bytes, str)) else {"json": body}), **kwargs)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and set(error) == {"message", "type", "param", "code"}
        if code is not None:
            assert error["code"] == code, error
        return error

    def with_image(url_or_part, text=question):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_or_part}},
                                                          {"type": "text", "text": text}]}], "max_tokens": 4}

    post(b'{"messages": [', 400, "invalid_json", headers={"Content-Type": "application/json"})
    post({"messages": "hello"}, 400)
    post(with_image("data:image/png;base64,@@not-base64@@"), 400, "invalid_image")
    post(with_image("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()), 400,
         "invalid_image")
    assert "pixels" in post(with_image(data_url(Image.new("L", (2500, 2000)))), 413, "image_too_large")["message"]
    assert "remote" in post(with_image("https://example.com/cat.png"), 400, "invalid_image")["message"]
    assert "local files" in post(with_image(str(SHAPESWORLD_MODEL / "chat_template.jinja")), 400,
                                 "invalid_image")["message"]
    assert "local files" in post(with_image("file:///etc/passwd"), 400, "invalid_image")["message"]
    small = data_url(Image.new("RGB", (8, 8)))
    many = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small}}] * 17
                          + [{"type": "text", "text": "?"}]}]}
    post(many, 400, "too_many_images")
    post({**with_image(data_url(image)), "max_tokens": 100_000}, 400, "context_length_exceeded")
    post({"messages": [{"role": "user", "content": "x " * 600}]}, 400, "context_length_exceeded")
    post({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400)
    post({**with_image(data_url(image)), "model": "gpt-4o"}, 404, "model_not_found")
    post({**with_image(data_url(image)), "temperature": -1}, 400)
    post(b"x" * (5 * 2**20), 413, "request_too_large", headers={"Content-Type": "application/json"})
    post({"prompt": "<image><image>two markers", "images": [data_url(image)]}, 400, "image_count_mismatch",
         path=server.url + "/v1/completions")

    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model="shapesworld", messages=chat(image, question))
    assert httpx.post(url, json=with_image(data_url(image))).status_code == 401  # no key at all
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # open, for load balancers

    answer = server.client().chat.completions.create(model="shapesworld", messages=chat(image, question),
                                                     temperature=0, max_tokens=16)
    assert answer.choices[0].message.content == direct(shipped, template_chat(question), [image])


def test_remote_images_are_fetched_only_when_allowed_with_a_size_cap(shipped, tmp_path):
    import http.server
    import functools

    image, question = questions(1, seed=21)[0]
    image.save(tmp_path / "shape.png")
    (tmp_path / "big.bin").write_bytes(b"\0" * 300_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    server = Server(*shipped, allow_remote_images=True, remote_image_bytes=200_000, remote_image_timeout=5)
    try:
        def ask(url):
            return httpx.post(server.url + "/v1/chat/completions", timeout=60, json={"temperature": 0, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]})

        answer = ask(base + "/shape.png")
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == direct(shipped, template_chat(question), [image])
        assert ask(base + "/big.bin").json()["error"]["code"] == "image_too_large"
        missing = ask(base + "/missing.png")
        assert missing.status_code == 400 and "could not be fetched" in missing.json()["error"]["message"]
    finally:
        server.close()
        files.shutdown()


# -- the queue, a client that leaves -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server():
    """A random tiny model (it rarely ends an answer), a batch of one sequence and a queue of one request."""
    from otter.tiny import build_tiny_otter

    model, processor = build_tiny_otter("gpt_neox")
    server = Server(model.eval(), processor, max_batch_size=1, max_queue=1)
    yield server
    server.close()


def test_a_full_queue_answers_503_with_retry_after(tiny_server):
    engine = tiny_server.app.state.engine
    release, running = threading.Event(), threading.Event()
    run = engine._run

    def held(batch):  # the model is busy until the test says
        running.set()
        release.wait(30)
        return run(batch)

    engine._run = held
    body = {"prompt": "hello there", "max_tokens": 2}
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, tiny_server.url + "/v1/completions", json=body, timeout=60)
            assert running.wait(30)
            second = pool.submit(httpx.post, tiny_server.url + "/v1/completions", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while engine.queue_depth < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            release.set()
            assert first.result().status_code == second.result().status_code == 200
    finally:
        release.set()
        engine._run = run


def test_tokens_leave_as_they_are_generated(tiny_server):
    arrivals, texts = [], []
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=60,
                      json={"prompt": "once upon a time", "max_tokens": 24, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"]:
                    arrivals.append(time.monotonic())
                    texts.append(choice["text"])
    assert len(texts) >= 8  # a chunk per token or few, not one at the end
    assert arrivals[-1] - arrivals[0] > 0.01


def test_a_client_that_leaves_stops_costing_compute(tiny_server):
    metrics, engine = tiny_server.app.state.metrics, tiny_server.app.state.engine
    before, batches = metrics.tokens._value.get(), engine.batches
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=60,
                      json={"prompt": "tell me a long story", "max_tokens": 400, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generation has started
    deadline = time.monotonic() + 60
    while engine.batches == batches:  # the batch has ended
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metrics.tokens._value.get() - before < 400  # the rest of the 400 tokens were never generated


# -- the command: SIGTERM lets in-flight requests finish ----------------------------------------------------------
def test_otter_serve_finishes_in_flight_requests_on_sigterm_and_logs_each_request(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "otter", "serve", "--model", str(SHAPESWORLD_MODEL),
                                "--port", str(port), "--served-model-name", "shapes"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        image, question = questions(1)[0]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="shapes", messages=chat(image, question), temperature=0,
                                                max_tokens=16, stream=True)
        first = next(iter(stream))  # the request is in flight
        process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant"
        assert [chunk.choices[0].finish_reason for chunk in rest][-1] == "stop"
        assert "".join(chunk.choices[0].delta.content or "" for chunk in rest)
        assert process.wait(60) == -signal.SIGTERM  # uvicorn shuts down gracefully, then dies of the signal
    finally:
        if process.poll() is None:
            process.kill()
    log = [json.loads(line.split(": ", 1)[1]) for line in process.stderr.read().splitlines()
           if line.startswith("INFO otter.serve.access:")]
    assert {"path": "/v1/chat/completions", "status": 200, "method": "POST"}.items() <= log[-1].items()
    assert log[-1]["request_id"] and log[-1]["ms"] > 0


# -- the chat page, in a real headless browser ------------------------------------------------------------------------
def test_the_chat_page_streams_an_answer_in_headless_chromium(server, shipped, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("OTTER_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromium-driver are not installed (apt install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, question = questions(2, seed=13)[1]
    path = tmp_path / "shape.png"
    image.save(path)
    expected = direct(shipped, template_chat(question), [image])

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.ID, "image-input").send_keys(str(path))
        wait.until(lambda b: b.find_element(By.ID, "attachments").get_attribute("data-count") == "1")
        browser.find_element(By.ID, "prompt").send_keys(question)
        browser.find_element(By.ID, "send").click()
        reply = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-finish]"))
        assert reply.get_attribute("data-finish") == "stop"
        assert reply.find_element(By.CLASS_NAME, "text").text == expected
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user img")  # the question shows its image
    finally:
        browser.quit()
