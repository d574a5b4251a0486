"""otter.train data: every format's reader, the label rules token by token, the collator, OpenFlamingo's web rules."""

import base64
import importlib
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from otter.prompts import ANSWER_TOKEN, END_OF_CHUNK, IMAGE_TOKEN
from otter.tiny import build_tiny_otter
from otter.train.collate import IGNORE_INDEX, Collator
from otter.train.data import (
    INSTRUCTION,
    INTERLEAVED,
    PAIR,
    Example,
    JsonlInstructions,
    MimicItInstructions,
    Skipped,
    WebDataOptions,
    instruction_source,
    laion_example,
    mmc4_example,
)
from otter.train.trainer import add_answer_token

from .train_fixtures import COLOURS, QUESTION, mmc4_document, png_bytes, write_image_parquet, write_jsonl, write_mimicit


@pytest.fixture(scope="module")
def processor():
    """The tiny model's processor with <answer> added, as `otter train finetune` prepares it."""
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    add_answer_token(model, processor.tokenizer)
    return processor


def pieces(processor, segments):
    """Token ids of `segments` [(text, trained?)] and the labels that rule gives: each segment tokenized alone."""
    ids, labels = [], []
    for text, trained in segments:
        segment = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += segment
        labels += segment if trained else [IGNORE_INDEX] * len(segment)
    full = processor.tokenizer("".join(text for text, _ in segments))["input_ids"]
    assert full == ids, "the segments must tokenize as the whole text does"
    return ids, labels


def image(colour):
    return Image.open(io.BytesIO(png_bytes(colour))).convert("RGB")


# -- labels, token by token ---------------------------------------------------------------------------------------
def test_instruction_labels_cover_answers_and_end_of_chunk_only(processor):
    segments = [
        (f"{IMAGE_TOKEN}User: {QUESTION} GPT:", False), (ANSWER_TOKEN, False), (" It is red.", True),
        (END_OF_CHUNK, True), ("\n", False),
        (f"{IMAGE_TOKEN}{IMAGE_TOKEN}User: Which is darker? GPT:", False), (ANSWER_TOKEN, False),
        (" The second.", True), (END_OF_CHUNK, True),
    ]
    ids, expected = pieces(processor, segments)
    example = Example("".join(text for text, _ in segments), [image("red"), image("blue"), image("green")],
                      INSTRUCTION, "k")
    encoded = Collator(processor).encode(example)
    assert encoded["input_ids"].tolist() == ids
    assert encoded["labels"].tolist() == expected
    assert encoded["pixel_values"].shape == (3, 1, 3, 32, 32)


def test_interleaved_labels_follow_openflamingo(processor):
    eos = processor.tokenizer.eos_token
    segments = [
        ("An intro before any image.", False),           # before the first <image>
        (IMAGE_TOKEN, False), ("A red square.", True), (END_OF_CHUNK, True),
        (" text between chunks", False),                 # after <|endofchunk|>, up to the next <image>
        (IMAGE_TOKEN, False), ("Then a blue one.", True), (END_OF_CHUNK, True),
        (eos, False),                                    # eos follows the last <|endofchunk|>
    ]
    ids, expected = pieces(processor, segments)
    example = Example("".join(text for text, _ in segments), [image("red"), image("blue")], INTERLEAVED, "k")
    encoded = Collator(processor, web=WebDataOptions(single_image_keep_prob=1.0)).encode(example)
    assert encoded["input_ids"].tolist() == ids
    assert encoded["labels"].tolist() == expected


def test_pair_labels_follow_openflamingo(processor):
    eos = processor.tokenizer.eos_token
    segments = [(IMAGE_TOKEN, False), ("a plain red picture", True), (END_OF_CHUNK, True), (eos, True)]
    ids, expected = pieces(processor, segments)
    encoded = Collator(processor).encode(Example("".join(t for t, _ in segments), [image("red")], PAIR, "k"))
    assert encoded["input_ids"].tolist() == ids
    assert encoded["labels"].tolist() == expected


def test_truncation_that_cuts_every_answer_drops_the_example(processor):
    text = f"{IMAGE_TOKEN}User: {QUESTION} GPT:{ANSWER_TOKEN} It is red.{END_OF_CHUNK}"
    prompt_length = len(processor.tokenizer(f"{IMAGE_TOKEN}User: {QUESTION} GPT:{ANSWER_TOKEN}")["input_ids"])
    collator = Collator(processor, max_length=prompt_length)
    skipped = collator.encode(Example(text, [image("red")], INSTRUCTION, "cut"))
    assert isinstance(skipped, Skipped) and skipped.reason == "no answer tokens after truncation"
    kept = Collator(processor, max_length=prompt_length + 1).encode(Example(text, [image("red")], INSTRUCTION, "k"))
    assert (kept["labels"] != IGNORE_INDEX).sum() == 1


def test_collator_pads_right_and_counts_skipped_records(processor):
    collator = Collator(processor)
    short = collator.encode(Example(f"User: hi GPT:{ANSWER_TOKEN} yes{END_OF_CHUNK}", [], INSTRUCTION, "a"))
    long = collator.encode(Example(f"{IMAGE_TOKEN}{IMAGE_TOKEN}User: {QUESTION} GPT:{ANSWER_TOKEN} It is red."
                                   f"{END_OF_CHUNK}", [image("red"), image("green")], INSTRUCTION, "b"))
    batch = collator([short, Skipped("unreadable image", "x"), long, Skipped("unreadable image", "y")])
    assert batch["num_examples"] == 2 and batch["skipped"] == {"unreadable image": 2}
    length = len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, length)
    size = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * size + [0] * (length - size)
    assert (batch["input_ids"][0, size:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, size:] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][1], long["labels"])
    assert batch["pixel_values"].shape == (2, 2, 1, 3, 32, 32)
    assert not batch["pixel_values"][0].any(), "a text-only example's media slots are zeros"
    assert collator([Skipped("malformed record", "z")]) == {"num_examples": 0, "skipped": {"malformed record": 1},
                                                              "skipped_details": ["z"]}


def test_augmentation_flips_all_images_of_an_example_reproducibly(processor):
    left_red = Image.new("RGB", (32, 32), "white")
    left_red.paste((220, 30, 30), (0, 0, 16, 32))
    text = f"{IMAGE_TOKEN}User: {QUESTION} GPT:{ANSWER_TOKEN} It is red.{END_OF_CHUNK}"
    plain = Collator(processor).encode(Example(text, [left_red], INSTRUCTION, "k"))["pixel_values"]
    flips = set()
    for key in "abcdefgh":
        augmented = Collator(processor, augment=True, seed=3)
        first = augmented.encode(Example(text, [left_red], INSTRUCTION, key), epoch=1)["pixel_values"]
        again = augmented.encode(Example(text, [left_red], INSTRUCTION, key), epoch=1)["pixel_values"]
        assert torch.equal(first, again), "the flip is decided by seed, epoch and key"
        flipped = torch.equal(first, plain.flip(-1))
        assert flipped or torch.equal(first, plain)
        flips.add(flipped)
    assert flips == {True, False}


# -- custom JSONL -------------------------------------------------------------------------------------------------
def test_jsonl_reads_context_first_with_paths_relative_to_the_file(tmp_path, processor):
    path = write_jsonl(tmp_path / "set")
    source = instruction_source(path)
    assert isinstance(source, JsonlInstructions) and len(source) == 4 and not source.malformed
    example = source.example(0)
    assert example.text == (f"{IMAGE_TOKEN}User: {QUESTION} GPT:{ANSWER_TOKEN} It is green.{END_OF_CHUNK}\n"
                            f"{IMAGE_TOKEN}User: {QUESTION} GPT:{ANSWER_TOKEN} It is red.{END_OF_CHUNK}")
    assert [im.getpixel((0, 0)) for im in example.images] == [COLOURS["green"], COLOURS["red"]]


def test_jsonl_counts_malformed_records_and_skips_unreadable_images(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes("red"))
    (tmp_path / "broken.png").write_bytes(png_bytes("red")[:40])
    good = {"images": ["ok.png"], "instruction": "q", "answer": "a"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"images": ["ok.png"], "instruction": "q"}),                   # no answer
        json.dumps({**good, "answers": "typo"}),                                  # unexpected key
        json.dumps({**good, "answer": f"a{END_OF_CHUNK}"}),                       # special token in the text
        json.dumps({**good, "images": "ok.png"}),                                 # images not a list
        json.dumps({**good, "context": [{"instruction": "q"}]}),                  # broken in-context example
        json.dumps({**good, "images": ["broken.png"]}),                           # readable record, corrupt image
        json.dumps({**good, "images": ["missing.png"]}),
        "",
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    source = JsonlInstructions(path)
    assert len(source) == 3
    assert [s.reason for s in source.malformed] == ["malformed record"] * 6
    assert [s.detail.split(":")[1].split(" ")[0] for s in source.malformed] == ["2", "3", "4", "5", "6", "7"]
    assert isinstance(source.example(0), Example)
    for index in (1, 2):
        skipped = source.example(index)
        assert isinstance(skipped, Skipped) and skipped.reason == "unreadable image"


def test_instruction_source_rejects_unknown_formats(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        instruction_source(path)
    with pytest.raises(ValueError, match="does not exist"):
        instruction_source(tmp_path / "nope.jsonl")


# -- MIMIC-IT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images", ["json", "parquet"])
def test_mimicit_reads_in_context_examples_and_lazy_images(tmp_path, images):
    path = write_mimicit(tmp_path, images=images)
    source = instruction_source(path)
    assert isinstance(source, MimicItInstructions) and len(source) == 4 and not source.malformed
    for index, colour in enumerate(COLOURS):
        example = source.example(index)
        demo = list(COLOURS)[(index + 1) % 4]
        assert example.text.endswith(f"It is {demo}.{END_OF_CHUNK}\n{IMAGE_TOKEN}User: {QUESTION} GPT:"
                                     f"{ANSWER_TOKEN} It is {colour}.{END_OF_CHUNK}")
        assert [im.getpixel((0, 0)) for im in example.images] == [COLOURS[demo], COLOURS[colour]]


def test_mimicit_without_train_config_has_no_context(tmp_path):
    source = instruction_source(write_mimicit(tmp_path, train_config=False))
    assert len(source) == 4 and source.example(2).text.count(IMAGE_TOKEN) == 1


def test_mimicit_json_images_with_escapes_and_standard_base64(tmp_path):
    data = {"I1": {"instruction": "q", "answer": "a", "image_ids": ["a/b"]},
            "I2": {"instruction": "q", "answer": "a", "image_ids": ["gone"]}}
    (tmp_path / "X_instructions.json").write_text(json.dumps({"meta": {}, "data": data}))
    encoded = base64.b64encode(png_bytes("blue")).decode().replace("/", "\\/")  # as some JSON writers escape it
    (tmp_path / "X.json").write_text('{\n  "a\\/b": "' + encoded + '"\n}')
    source = instruction_source(tmp_path / "X_instructions.json")
    assert len(source) == 1 and source.example(0).images[0].getpixel((0, 0)) == COLOURS["blue"]
    assert len(source.malformed) == 1 and "gone" in source.malformed[0].detail


def test_mimicit_parquet_random_access_across_row_groups(tmp_path):
    from otter.train.data import ParquetImageStore

    encoded = {f"id{i}": base64.urlsafe_b64encode(png_bytes(colour)).decode() for i, colour in enumerate(COLOURS)}
    write_image_parquet(tmp_path / "P.parquet", encoded, row_group_size=1)
    store = ParquetImageStore(tmp_path / "P.parquet")
    for image_id in ["id3", "id0", "id2", "id1", "id3"]:
        assert store.base64(image_id) == encoded[image_id]
    assert "id9" not in store


def test_mimicit_needs_its_image_file(tmp_path):
    path = write_mimicit(tmp_path)
    (tmp_path / "CO.json").unlink()
    with pytest.raises(ValueError, match="CO.parquet or CO.json"):
        instruction_source(path)


# -- web data -----------------------------------------------------------------------------------------------------
def test_mmc4_images_go_before_their_sentences_in_text_order():
    document = mmc4_document(["blue", "red", "green"], ["First.", "Second.", "Third."], [2, 0, 1])
    document["similarity_matrix"][2][1] = 0.1  # green's best match falls under the threshold: dropped
    example = mmc4_example(document, "k", WebDataOptions(min_image_bytes=0), "<eos>")
    assert example.text == f"{IMAGE_TOKEN}First. Second.{END_OF_CHUNK}{IMAGE_TOKEN}Third.{END_OF_CHUNK}<eos>"
    assert [im.getpixel((0, 0)) for im in example.images] == [COLOURS["red"], COLOURS["blue"]]


def test_mmc4_filters_small_images_and_keeps_max_images():
    document = mmc4_document(["red", "green", "blue"], ["a.", "b.", "c."], [0, 1, 2])
    small = mmc4_example(document, "k", WebDataOptions(), "")  # the PNGs are far below OpenFlamingo's 10 KB
    assert isinstance(small, Skipped) and small.reason == "no usable images"
    kept = mmc4_example(document, "k", WebDataOptions(min_image_bytes=0, max_images=2), "")
    assert kept.text.count(IMAGE_TOKEN) == 2 and len(kept.images) == 2


def test_web_records_that_are_not_usable_are_skipped_with_a_reason():
    broken = mmc4_document(["red"], ["a."], [0])
    broken["image_info"][0]["image_base64"] = base64.b64encode(b"not an image").decode()
    assert mmc4_example(broken, "k", WebDataOptions(min_image_bytes=0), "").reason == "unreadable image"
    assert mmc4_example({"text_list": ["a"]}, "k", WebDataOptions(), "").reason == "no usable images"
    assert mmc4_example({"text_list": 3, "image_info": [{}], "similarity_matrix": [[1]]}, "k", WebDataOptions(),
                        "").reason == "malformed record"
    assert laion_example(b"garbage", b"a caption", "k", "").reason == "unreadable image"
    assert laion_example(png_bytes("red"), f"a {IMAGE_TOKEN}".encode(), "k", "").reason == "malformed record"


def test_single_image_documents_are_kept_at_openflamingos_rate(processor):
    collator = Collator(processor, web=WebDataOptions(min_image_bytes=0))
    document = mmc4_document(["red"], ["One red square."], [0])
    kept = 0
    for index in range(200):
        example = mmc4_example(document, f"doc{index}", collator.web, processor.tokenizer.eos_token)
        kept += not isinstance(collator.encode(example), Skipped)
    assert 70 < kept < 130  # half of them, decided per document


# -- parity with OpenFlamingo's own preprocessing -----------------------------------------------------------------
class OpenFlamingoTokenizer:
    """What open_flamingo/train/data.py expects of a transformers-4 tokenizer, over a transformers-5 one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.additional_special_tokens = [END_OF_CHUNK, IMAGE_TOKEN]
        self.additional_special_tokens_ids = tokenizer.convert_tokens_to_ids(self.additional_special_tokens)
        self.eos_token = tokenizer.eos_token
        self.padding_side = "right"

    def __call__(self, text, **kwargs):
        return self.tokenizer(text, padding_side="right", **kwargs)


@pytest.fixture
def openflamingo_data(monkeypatch):
    open_flamingo = pytest.importorskip("open_flamingo")
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(open_flamingo.__file__), "train"))
    for name in ("data", "data_utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("data")
    yield module
    for name in ("data", "data_utils"):
        sys.modules.pop(name, None)


def noise_png(seed: int) -> bytes:
    """Incompressible pixels: a PNG over OpenFlamingo's 10 KB minimum."""
    pixels = np.random.default_rng(seed).integers(0, 256, (72, 72, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_mmc4_tokens_match_openflamingo(processor, openflamingo_data):
    sentences = ["Intro words.", "A first picture here.", "Some text.", "Another picture.", "The end."]
    images = [noise_png(0), noise_png(1), png_bytes("red"), noise_png(2)]  # the third is too small for both
    similarity = [[0.01] * 5 for _ in images]
    similarity[0][1], similarity[1][3], similarity[2][4], similarity[3][4] = 0.3, 0.5, 0.9, 0.1  # last: too dissimilar
    document = {"text_list": sentences, "similarity_matrix": similarity,
                "image_info": [{"image_base64": base64.b64encode(raw).decode()} for raw in images]}
    _, (reference_ids, reference_mask) = openflamingo_data.preprocess_interleaved(
        [json.dumps(document)], OpenFlamingoTokenizer(processor.tokenizer), lambda im: torch.zeros(3, 8, 8),
        sim_threshold=0.24, min_num_images=1, max_num_images=6, max_tokens=256,
    )
    options = WebDataOptions(max_tokens_interleaved=256)
    example = mmc4_example(document, "k", options, processor.tokenizer.eos_token)
    encoded = Collator(processor, web=options).encode(example)
    assert encoded["input_ids"].tolist() == reference_ids[0][reference_mask[0].bool()].tolist()
    assert len(example.images) == 2


@pytest.mark.parametrize("caption", ["  a plain red picture ", "a very long caption " * 10])
def test_laion_tokens_match_openflamingo(processor, openflamingo_data, caption):
    reference_ids, reference_mask = openflamingo_data.preprocess_laion_text(
        [caption], OpenFlamingoTokenizer(processor.tokenizer), max_tokens=32)
    example = laion_example(png_bytes("red"), caption.encode(), "k", processor.tokenizer.eos_token)
    encoded = Collator(processor).encode(example)
    assert encoded["input_ids"].tolist() == reference_ids[0][reference_mask[0].bool()].tolist()
