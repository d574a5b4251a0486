"""
Model cards: converted, trained and shipped folders carry the Hub's metadata (library "otter", the task, base model,
license, tags) and a usage snippet that runs as written, offline; trained folders' tokenizers know the LM's limit.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard
from transformers import AutoTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

import otter
from otter.conversion.mosaic_gpt import convert_mosaic_gpt
from otter.conversion.openflamingo import _model_card, convert_openflamingo
from otter.language_models import max_positions
from otter.model_card import model_card, usage
from otter.tiny import build_tiny_otter, tiny_tokenizer
from otter.train.shapesworld import Recipe, shipped_model_card
from otter.train.trainer import TrainingConfig, train

from . import mosaic_gpt_reference as mosaic
from .conversion_fixtures import reference_model, released_checkpoint, train_randomly, write_language_model, write_open_clip
from .train_fixtures import quick_config, write_jsonl


def python_block(card: ModelCard) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card.text, re.DOTALL)
    assert len(blocks) == 1, card.text
    return blocks[0]


def run_snippet(card: ModelCard, cwd) -> str:
    """Runs the card's Python block as written, in `cwd`, offline; returns what it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", python_block(card)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def assert_hub_metadata(card: ModelCard, pipeline_tag: str = "image-text-to-text"):
    assert card.data.library_name == "otter"
    assert card.data.pipeline_tag == pipeline_tag
    assert "otter" in card.data.tags
    assert "import otter" in python_block(card)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_a_converted_folder_has_a_card_with_its_sources_command_and_a_snippet_that_runs(tmp_path, monkeypatch):
    vision = write_open_clip(tmp_path / "open_clip")
    lm_folder = write_language_model(tmp_path / "lm", "gpt_neox")
    reference, _, _ = reference_model(*vision, lm_folder, 2, monkeypatch)
    train_randomly(reference)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(released_checkpoint(reference), checkpoint)
    out = tmp_path / "converted"
    convert_openflamingo(out, checkpoint=str(checkpoint), lang_encoder=str(lm_folder), vision_encoder=str(vision[0]),
                         vision_pretrained=str(vision[1]), cross_attn_every_n_layers=2,
                         command="otter convert openflamingo --checkpoint checkpoint.pt ...")

    card = ModelCard.load(out / "README.md")
    assert_hub_metadata(card)
    assert "openflamingo" in card.data.tags
    assert card.data.license == "other" and card.data.base_model is None  # a checkpoint of unknown terms, a local LM
    assert str(checkpoint) in card.text and str(lm_folder) in card.text
    assert "otter convert openflamingo --checkpoint checkpoint.pt ..." in card.text
    assert '"<image>Output:"' in python_block(card)  # OpenFlamingo's prompt, not Otter's chat format
    assert run_snippet(card, cwd=tmp_path).strip() != ""  # `path = "converted"`, run from the folder's parent


@pytest.mark.parametrize("preset, license", [("OpenFlamingo-3B-vitl-mpt1b", "apache-2.0"),
                                             ("OpenFlamingo-3B-vitl-mpt1b-langinstruct", "cc-by-sa-3.0"),
                                             ("OpenFlamingo-4B-vitl-rpj3b", "apache-2.0"),
                                             ("OpenFlamingo-9B-vitl-mpt7b", "apache-2.0")])
def test_a_converted_release_takes_its_language_models_license_and_names_its_base_model(tmp_path, preset, license):
    model, _ = build_tiny_otter()
    from otter.conversion.openflamingo import PRESETS

    release = PRESETS[preset]
    card = _model_card(tmp_path / preset, preset, "checkpoint.pt", release.lang_encoder, tmp_path / "not-there",
                       None, "ViT-L-14", "openai", model.config, "float32", None)
    assert card.data.license == license
    assert card.data.base_model == [release.repo]
    assert "MIT" in card.text  # OpenFlamingo's weights and OpenAI's CLIP


def test_a_converted_mosaic_gpt_folder_has_a_language_model_card_whose_snippet_runs(tmp_path):
    tokenizer = tiny_tokenizer()
    config = dict(mosaic.TINY_MOSAIC, vocab_size=len(tokenizer))
    mosaic.write_folder(tmp_path / "mosaic", config, mosaic.random_state_dict(config), tokenizer)
    convert_mosaic_gpt(str(tmp_path / "mosaic"), tmp_path / "mpt", command="otter convert mosaic-gpt ...")
    card = ModelCard.load(tmp_path / "mpt" / "README.md")
    assert_hub_metadata(card, pipeline_tag="text-generation")
    assert "otter.load_language_model" in python_block(card) and "otter convert mosaic-gpt ..." in card.text
    run_snippet(card, cwd=tmp_path)


def test_a_trained_folder_has_its_lms_length_limit_and_a_card_that_trains_it_again(tmp_path):
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    start = tmp_path / "start"
    model.save_pretrained(start)
    processor.tokenizer.model_max_length = VERY_LARGE_INTEGER  # as many source tokenizers: no limit
    processor.save_pretrained(start)
    model_card("start", "A tiny model.", usage("start"), base_model="org/base-model",
               license="apache-2.0").save(start / "README.md")
    assert AutoTokenizer.from_pretrained(start).model_max_length == VERY_LARGE_INTEGER

    config = quick_config(start, [write_jsonl(tmp_path / "data")], tmp_path / "trained", max_steps=2)
    out = train(config)
    limit = max_positions(model.config.text_config)
    assert AutoTokenizer.from_pretrained(out).model_max_length == limit == 512
    assert otter.OtterProcessor.from_pretrained(out).tokenizer.model_max_length == limit

    card = ModelCard.load(out / "README.md")
    assert_hub_metadata(card)
    assert card.data.license == "apache-2.0"  # carried over from the folder it started from
    assert card.data.base_model == ["org/base-model"]
    assert "otter train finetune --config config.yaml" in card.text
    settings = re.search(r"```yaml\n(.*?)```", card.text, re.DOTALL).group(1)
    (tmp_path / "config.yaml").write_text(settings)
    again = TrainingConfig.load(tmp_path / "config.yaml", out=str(config.out))
    assert again == config
    assert "<answer>" in python_block(card)  # instruction-tuned: Otter's chat format
    run_snippet(card, cwd=tmp_path)


def test_the_shipped_model_has_an_mit_card_with_its_results_and_a_snippet_that_runs_as_written(tmp_path):
    card = ModelCard.load(otter.SHAPESWORLD_MODEL / "README.md")
    assert_hub_metadata(card)
    assert card.data.license == "mit" and card.data.base_model is None  # trained here, from nothing
    assert (otter.SHAPESWORLD_MODEL / "results.md").read_text().strip() in card.text
    assert "otter train shapesworld --out runs/shapesworld" in card.text
    regenerated = shipped_model_card(otter.SHAPESWORLD_MODEL, Recipe(),
                                     (otter.SHAPESWORLD_MODEL / "results.md").read_text(), minutes=53)
    assert regenerated.content == card.content, "the card is what `otter train shapesworld` writes"
    printed = run_snippet(card, cwd=tmp_path)  # no path to substitute: the package's own folder
    assert printed.startswith("What colour is the shape?")


def test_save_pretrained_writes_a_card_when_the_folder_has_none_and_never_overwrites_one(tmp_path):
    model, processor = build_tiny_otter()
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert_hub_metadata(card)
    assert card.data.license == "other" and card.data.base_model is None  # built from parts: nothing to carry over
    run_snippet(card, cwd=tmp_path)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my own card\n")
    model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "my own card\n"

    model_card("saved", "A tiny model.", usage("saved"), base_model="org/base-model",
               license="apache-2.0").save(tmp_path / "saved" / "README.md")
    otter.OtterForConditionalGeneration.from_pretrained(tmp_path / "saved").save_pretrained(tmp_path / "again")
    again = ModelCard.load(tmp_path / "again" / "README.md")
    assert again.data.license == "apache-2.0" and again.data.base_model == ["org/base-model"]
