"""The model the package ships (`otter.SHAPESWORLD_MODEL`) and `otter demo`, the README's main command."""

import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from otter import SHAPESWORLD_MODEL
from otter.cli import main
from otter.demo import Episode, episodes, run
from otter.shapesworld import ShapesWorld


@pytest.fixture(scope="module")
def shipped():
    model = AutoModelForImageTextToText.from_pretrained(SHAPESWORLD_MODEL, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(SHAPESWORLD_MODEL)


def test_the_shipped_model_is_small_float32_safetensors():
    """float32, so that it loads in float32 (what runs well on a CPU) without a dtype; its values are fp16's."""
    weights = SHAPESWORLD_MODEL / "model.safetensors"
    assert weights.stat().st_size < 16 * 2**20
    with safe_open(weights, "pt") as tensors:
        assert {tensors.get_slice(name).get_dtype() for name in tensors.keys()} == {"F32"}
        assert all(torch.equal(tensor, tensor.half().float()) for tensor in map(tensors.get_tensor, tensors.keys()))


def test_the_shipped_model_answers_shape_colour_and_count_questions(shipped):
    """What the shipped model has learnt to see (otter/models/shapesworld/results.md: 97.5-100% on each)."""
    model, processor = shipped
    world = ShapesWorld(7)
    todo = [Episode("VQA", 0, [], {"scenes": [record["scene"]], "instruction": record["question"],
                                   "answer": record["answer"]})
            for record in (world.vqa(kind) for kind in ("shape", "colour", "count") * 10)]
    for episode in todo:
        run(model, processor, episode, max_new_tokens=8)
    assert sum(episode.correct for episode in todo) >= 27, [(e.query["answer"], e.answer) for e in todo]


def test_the_shipped_model_learns_in_context_and_compares_two_images(shipped):
    """
    Fresh episodes (otter/models/shapesworld/results.md: binding 50% / 96% at 0 / 4 shots, comparisons 93.5-95.5%):
    greedy answers name the held-out nonce word bound to the query's shape only when the demonstrations show it, and
    name both shapes of a two-image turn in order.
    """
    model, processor = shipped
    todo = episodes(seed=7, count=20, shots=4)
    for episode in todo:
        run(model, processor, episode, max_new_tokens=24)
    correct = {}
    for episode in todo:
        correct.setdefault((episode.task, episode.shots), []).append(episode.correct)
    assert sum(correct["fast binding", 0]) <= 1, "a held-out word cannot be known without the demonstrations"
    assert sum(correct["fast binding", 4]) >= 17
    assert sum(correct["comparison", 1]) >= 15


def test_demo_prints_prompts_answers_accuracy_and_writes_the_page(tmp_path, capsys):
    out = tmp_path / "demo.html"
    main(["demo", "--episodes", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("--- episode") == 8
    assert "<image>User: What is it called? GPT:<answer>" in printed
    assert re.search(r"fast binding, 4-shot: \d/2 correct", printed)
    assert re.search(r"comparison, 1-shot: \d/2 correct", printed)
    page = out.read_text()
    # 2 x (1 + 5) binding images, 2 x 3 VQA images, 2 x 4 comparison images
    assert page.count('<img src="data:image/png;base64,') == 12 + 6 + 8
    assert page.count("<tr class=") == 8


def test_demo_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["demo", "--model", str(tmp_path / "missing")])
