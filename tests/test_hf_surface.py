"""The processor, chat template and pipeline as transformers' own VLMs offer them (issue 18)."""

import base64
import functools
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from otter.prompts import chat_template
from otter.tiny import build_tiny_otter

from .conftest import set_gates


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    return model.eval(), processor


def picture(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


# -- the processor on transformers' conventions -------------------------------------------------------------------
def test_standard_text_and_image_kwargs(tiny):
    _, processor = tiny
    texts, images = ["<image>a red one", "<image>b"], [picture("red"), picture("blue")]
    default = processor(images=images, text=texts)
    assert default["input_ids"].shape[1] > 3 and (default["attention_mask"][1, 0] == 0)  # padded left
    explicit = processor(images, texts, return_tensors="pt", padding=True)  # the call every VLM snippet makes
    assert torch.equal(explicit["input_ids"], default["input_ids"])
    right = processor(images=images, text=texts, padding_side="right")
    assert right["attention_mask"][1, -1] == 0 and right["attention_mask"][1, 0] == 1
    assert torch.equal(processor(images=images, text=texts, text_kwargs={"padding_side": "right"})["input_ids"],
                       right["input_ids"])
    assert processor(images=images, text=texts, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    assert processor(images=images, text=texts, padding="max_length", max_length=20)["input_ids"].shape[1] == 20
    assert "attention_mask" not in processor(images=images, text=texts, return_attention_mask=False)
    raw = processor(images=images, text=texts, do_normalize=False)["pixel_values"]
    assert raw.min() >= 0 and raw.max() <= 1 and torch.equal(
        raw, processor(images=images, text=texts, images_kwargs={"do_normalize": False})["pixel_values"])
    assert not torch.equal(raw, default["pixel_values"])
    processor(images=images, text=texts, timeout=3.0, some_pipeline_option=1)  # unknown kwargs are ignored, as there


def test_return_tensors_pt_np_and_none(tiny):
    _, processor = tiny
    kwargs = dict(images=[picture("red")], text=["<image>a", "bb c"])
    pt = processor(**kwargs)
    as_np = processor(**kwargs, return_tensors="np")
    plain = processor(**kwargs, return_tensors=None)
    assert isinstance(as_np["input_ids"], np.ndarray) and isinstance(as_np["pixel_values"], np.ndarray)
    assert np.array_equal(as_np["input_ids"], pt["input_ids"].numpy())
    assert np.allclose(as_np["pixel_values"], pt["pixel_values"].numpy())
    assert isinstance(plain["input_ids"], list) and plain["input_ids"] == pt["input_ids"].tolist()


def test_the_tokenizer_holds_the_padding_side(tiny, tmp_path):
    from otter import OtterProcessor

    _, processor = tiny
    assert processor.tokenizer.padding_side == "left"
    processor.tokenizer.padding_side = "right"
    try:
        batch = processor(text=["a", "b c d e"])
        assert batch["attention_mask"][0, -1] == 0
        processor.save_pretrained(tmp_path)
        assert OtterProcessor.from_pretrained(tmp_path).tokenizer.padding_side == "right"
    finally:
        processor.tokenizer.padding_side = "left"


def test_images_as_arrays_tensors_paths_and_urls(tiny, tmp_path):
    _, processor = tiny
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    expected = processor(images=[image], text="<image>")["pixel_values"]
    array = np.array(image)
    png = io.BytesIO()
    image.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        for given in (array, torch.from_numpy(array).permute(2, 0, 1), array / 255.0, str(tmp_path / "a.png"),
                      tmp_path / "a.png", data_url, url):
            assert torch.allclose(processor(images=[given], text="<image>")["pixel_values"], expected, atol=1e-6)
        missing = url.replace("a.png", "missing.png")
        with pytest.raises(ValueError, match="missing.png could not be read"):
            processor(images=[missing], text="<image>")
    finally:
        server.shutdown()


def test_generated_text_is_decoded(tiny):
    model, processor = tiny
    inputs = processor(images=[picture("red")], text="<image>Output:")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    texts = processor.post_process_image_text_to_text(generated)
    assert texts == processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert "<image>" not in texts[0]


# -- the chat template -----------------------------------------------------------------------------------------
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is red?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
]
RENDERED = ("Answer briefly.\n<image>Image 1. <image>Image 2. User: Which is red? GPT:<answer> The first.<|endofchunk|>\n"
            "<image>User: And this one? GPT:<answer>")


def test_the_chat_template_renders_otters_format():
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([MESSAGES], chat_template=chat_template(), add_generation_prompt=True)
    assert rendered[0] == RENDERED
    raw, _ = render_jinja_template([MESSAGES[1:]], chat_template=chat_template(answer_token=False),
                                   add_generation_prompt=True)
    assert raw[0] == RENDERED.replace("Answer briefly.\n", "").replace("<answer>", "")
    for bad, message in ((MESSAGES[1:2] * 2, "two user messages in a row"),
                         (MESSAGES[2:3], "answers the user message before it"),
                         ([{"role": "tool", "content": "x"}], "not tool")):
        with pytest.raises(Exception, match=message):
            render_jinja_template([bad], chat_template=chat_template())


def test_apply_chat_template_tokenizes_with_the_images(tiny):
    model, processor = tiny
    images = [picture("red"), picture("green"), picture("blue")]
    messages = [{**message, "content": [{**part, "image": images.pop(0)} if part["type"] == "image" else part
                                        for part in message["content"]]}
                if isinstance(message["content"], list) else message for message in MESSAGES]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == RENDERED.replace("<answer>", "" if "<answer>" not in processor.tokenizer.get_vocab() else "<answer>")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    shown = [part["image"] for message in messages if isinstance(message["content"], list)
             for part in message["content"] if part["type"] == "image"]
    expected = processor(images=shown, text=text)
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    assert processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text


# -- the pipeline ------------------------------------------------------------------------------------------------
def chat(question, *colours):
    return [{"role": "user", "content": [*({"type": "image", "image": picture(colour)} for colour in colours),
                                         {"type": "text", "text": question}]}]


def generated(outputs):
    """The assistant's reply in each of the pipeline's outputs (chat inputs return the whole conversation)."""
    replies = [output[0]["generated_text"][-1]["content"] if isinstance(output, list)
               else output["generated_text"][-1]["content"] for output in outputs]
    return [reply.strip() for reply in replies]  # the answer's first token carries its space (" red"), as in training


@pytest.fixture(scope="module")
def shipped_pipeline():
    import otter
    from transformers import pipeline

    return pipeline("image-text-to-text", model=str(otter.SHAPESWORLD_MODEL))


def test_the_pipeline_answers_chats_one_by_one_and_batched(shipped_pipeline):
    from otter.chat import answer, chat_prompt
    from otter.shapesworld import Scene, Shape, render

    pipe = shipped_pipeline
    circle = render(Scene((Shape("circle", "red", 0.5, 0.5, 0.25),), "centre"))
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": circle},
                                      {"type": "text", "text": "What colour is the shape?"}]}],
        chat("What are the two shapes?", "green", "blue"),
        chat("Say hello."),
    ]
    alone = [generated([pipe(text=conversation, max_new_tokens=8)])[0] for conversation in chats]
    assert alone[0] == "red"  # the shipped model reads the image
    assert alone[0] == answer(pipe.model, pipe.processor, chat_prompt([], "What colour is the shape?", 1), [circle],
                              max_new_tokens=8, do_sample=False)
    batched = generated(pipe(text=chats, batch_size=3, max_new_tokens=8))
    assert batched == alone  # three chats with 1, 2 and 0 images in one batch
    raw = pipe(images=[circle], text="<image>User: What colour is the shape? GPT:<answer>", max_new_tokens=8,
               return_full_text=False)
    assert raw[0]["generated_text"].strip() == "red"


# -- loading without `import otter` ----------------------------------------------------------------------------------
def test_a_folder_loaded_without_import_otter_fails_loudly_or_loads_from_the_package(tiny, tmp_path):
    import json
    import os
    import subprocess
    import sys

    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "otter_auto.OtterProcessor"}
    script = f"""
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = {str(tmp_path / "model")!r}
try:
    AutoProcessor.from_pretrained(folder)
    raise SystemExit("a bare AutoProcessor loaded the folder")
except ValueError as error:
    assert "trust_remote_code=True" in str(error), error
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
print(type(processor).__module__, type(model).__module__)
model.save_pretrained({str(tmp_path / "again")!r})
processor.save_pretrained({str(tmp_path / "again")!r})
"""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # (transformers' question about trust_remote_code goes to stdout first) the classes are the installed package's
    assert result.stdout.split()[-2:] == ["otter.processing_otter", "otter.modeling_otter"]
    assert sorted(path.name for path in (tmp_path / "again").glob("*.py")) == ["otter_auto.py"]  # no source copied
    assert "backend is not available" not in result.stderr  # one image processor for both backends
