import io
import sys

import pytest
import torch
from PIL import Image

from otter import OtterForConditionalGeneration, OtterProcessor
from otter.chat import ChatTurn, chat_prompt, chat_template, single_prompt
from otter.cli import main
from otter.prompts import END_OF_CHUNK
from otter.shapesworld import Scene, Shape, render
from otter.tiny import build_tiny_otter
from otter.train.data import Turn, instruction_text
from otter.train.trainer import add_answer_token


def shape_image(colour: str):
    """A circle of `colour` in the centre of a ShapesWorld image."""
    return render(Scene((Shape("circle", colour, 0.5, 0.5, 0.2),), "centre"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two saved tiny models: `raw` (OpenFlamingo-style tokenizer) and `chat` (with `<answer>`, as training adds it)."""
    root = tmp_path_factory.mktemp("chat")
    model, processor = build_tiny_otter("mpt", seed=1)
    model.save_pretrained(root / "raw")
    processor.save_pretrained(root / "raw")
    assert add_answer_token(model, processor.tokenizer)
    model.save_pretrained(root / "chat")
    processor.save_pretrained(root / "chat")
    for colour in ("red", "green"):
        shape_image(colour).save(root / f"{colour}.png")
    return root


def reference_answer(folder, prompt, images, max_new_tokens):
    model = OtterForConditionalGeneration.from_pretrained(folder).eval()
    processor = OtterProcessor.from_pretrained(folder)
    inputs = processor(text=[prompt], images=[[Image.open(path) for path in images]])
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode_answers(sequences, inputs["input_ids"].shape[1])[0]


@pytest.mark.parametrize("kind, prompt, expected_prompt", [
    ("chat", "what is this?", "<image>Image 1. <image>Image 2. User: what is this? GPT:<answer>"),
    ("raw", "a photo of", "<image><image>a photo of"),
    ("raw", "<image>Output:a<|endofchunk|><image>Output:", "<image>Output:a<|endofchunk|><image>Output:"),
])
def test_generate_prints_the_greedy_answer(folders, capsys, kind, prompt, expected_prompt):
    images = [folders / "red.png", folders / "green.png"]
    main(["generate", "--model", str(folders / kind), "--image", str(images[0]), "--image", str(images[1]),
          "--prompt", prompt, "--max-new-tokens", "6"])
    expected = reference_answer(folders / kind, expected_prompt, images, 6)
    assert capsys.readouterr().out == expected + "\n"


def test_generate_format_can_be_forced(folders, capsys, monkeypatch):
    seen = []
    original = OtterForConditionalGeneration.generate

    def spy(self, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original(self, **kwargs)

    monkeypatch.setattr(OtterForConditionalGeneration, "generate", spy)
    main(["generate", "--model", str(folders / "chat"), "--image", str(folders / "red.png"), "--prompt", "a photo of",
          "--format", "raw", "--max-new-tokens", "2"])
    tokenizer = OtterProcessor.from_pretrained(folders / "chat").tokenizer
    assert seen == [tokenizer("<image>a photo of")["input_ids"]]


def test_generate_errors_name_the_problem(folders):
    red = str(folders / "red.png")
    with pytest.raises(SystemExit, match="holds the markers <image><image>, but 1 images and videos"):
        main(["generate", "--model", str(folders / "raw"), "--image", red, "--prompt", "<image>a<image>b"])
    missing = str(folders / "nowhere.png")
    with pytest.raises(SystemExit, match="nowhere.png does not exist"):
        main(["generate", "--model", str(folders / "raw"), "--image", missing, "--prompt", "hi"])
    (folders / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png could not be read"):
        main(["generate", "--model", str(folders / "raw"), "--image", str(folders / "broken.png"), "--prompt", "hi"])
    with pytest.raises(SystemExit, match=f"{folders} is not a model folder: it has no config.json"):
        main(["generate", "--model", str(folders), "--image", red, "--prompt", "hi"])
    with pytest.raises(SystemExit, match="add --do-sample"):
        main(["generate", "--model", str(folders / "raw"), "--prompt", "hi", "--temperature", "0.7"])


def test_single_prompt_formats():
    assert single_prompt("hi", 0, None, has_answer_token=True) == "User: hi GPT:<answer>"
    assert single_prompt("hi", 1, None, has_answer_token=False) == "<image>hi"
    assert single_prompt("hi", 1, "chat", has_answer_token=False) == "<image>User: hi GPT:<answer>"
    with pytest.raises(ValueError, match="holds the markers <image>, but 3 images and videos"):
        single_prompt("<image>hi", 3, None, has_answer_token=True)


def test_chat_prompt_is_the_training_text_cut_before_the_last_answer():
    red, green = shape_image("red"), shape_image("green")
    turns = [Turn("describe the image", "a red circle", [red, green]), Turn("and the colour?", "red", []),
             Turn("now this one", "green", [green])]
    history = [ChatTurn(turn.instruction, turn.images, turn.answer) for turn in turns[:-1]]
    prompt = chat_prompt(history, turns[-1].instruction, len(turns[-1].images))
    assert prompt + " " + turns[-1].answer + END_OF_CHUNK == instruction_text(turns)
    assert prompt == ("<image>Image 1. <image>Image 2. "
                      "User: describe the image GPT:<answer> a red circle<|endofchunk|>\n"
                      "User: and the colour? GPT:<answer> red<|endofchunk|>\n"
                      "<image>User: now this one GPT:<answer>")
    assert chat_prompt(history[:1], "hi", 0, chat_template("raw")).endswith("<|endofchunk|>\nUser: hi GPT:")


def test_chat_over_piped_stdin_keeps_history_until_reset(folders, capsys, monkeypatch):
    calls = []
    original = OtterForConditionalGeneration.generate

    def spy(self, **kwargs):
        sequences = original(self, **kwargs)
        pixels = kwargs.get("pixel_values")
        calls.append((kwargs["input_ids"], pixels.shape[0], sequences))  # the images of the prompt
        return sequences

    monkeypatch.setattr(OtterForConditionalGeneration, "generate", spy)
    script = (f"/image {folders / 'red.png'}\nwhat is this?\n\n/image {folders / 'missing.png'}\nand now?\n"
              "/reset\nhello\n/quit\nnever read\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    main(["chat", "--model", str(folders / "chat"), "--max-new-tokens", "4"])
    captured = capsys.readouterr()

    processor = OtterProcessor.from_pretrained(folders / "chat")
    answers = [processor.decode_answers(sequences, ids.shape[1])[0] for ids, _, sequences in calls]
    assert len(calls) == 3 and answers[0]  # a non-empty first answer, so the history check below means something
    assert captured.out == "".join(reply + "\n" for reply in answers)  # no "> " prompt when stdin is not a TTY
    assert "missing.png does not exist" in captured.err

    red = shape_image("red")
    first = ChatTurn("what is this?", [red], answers[0])
    expected = [chat_prompt([], "what is this?", 1), chat_prompt([first], "and now?", 0), chat_prompt([], "hello", 0)]
    assert f"GPT:<answer> {answers[0]}<|endofchunk|>\nUser: and now? GPT:<answer>" in expected[1]
    for (ids, _, _), prompt in zip(calls, expected):
        assert ids[0].tolist() == processor.tokenizer(prompt)["input_ids"]
    # the first turn's image stays in context for the second turn; none after /reset
    assert [media for _, media, _ in calls] == [1, 1, 0]
