"""Evaluation reliability (issue 17): a resumed run reuses its log only for the same weights, processor, precision,
device kind, data and task settings; an unreadable image is named, from whichever thread decoded it; bad paths and
missing images are found before the model is loaded or the first sample is evaluated."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from otter import OtterForConditionalGeneration, OtterProcessor
from otter.cli import main
from otter.eval import evaluate
from otter.eval import fingerprint as fingerprints
from otter.eval.demos import ImageEmbedder
from otter.eval.fingerprint import processor_fingerprint, weights_fingerprint
from otter.processing_otter import UnreadableImageError
from otter.tiny import build_tiny_otter

from .conftest import set_gates
from .eval_fixtures import make_vqa

LOG_SUFFIX = ".samples.jsonl"


@pytest.fixture(scope="module")
def tiny_model():
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    return model.eval(), processor


@pytest.fixture
def data_dir(tmp_path):
    return make_vqa(tmp_path / "data", "vqav2", num_pool=4, num_test=3)


def run(model, processor, data_dir, out, **kwargs):
    return evaluate(model, processor, "vqav2", data_dir, out, **{"shots": [0], "batch_size": 2, **kwargs})


def count_generated_samples(monkeypatch, model):
    counter = {"samples": 0}
    generate = model.generate

    def counting_generate(*args, **kwargs):
        counter["samples"] += kwargs["input_ids"].shape[0]
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    return counter


def last_line(stderr: str) -> str:
    """The last line of what a command wrote to stderr (progress bars come before it); it must end the output."""
    assert stderr.endswith("\n"), stderr
    return stderr[:-1].rsplit("\n", 1)[-1]


DATA_CHANGED = r"\(the data set changed \(its samples' annotations, or the sizes of their image or video files\)\)"


# -- item 2: the resume key is what determines the results ------------------------------------------------------------
def test_changed_weights_refuse_the_log_and_say_how_to_start_fresh(tmp_path, tiny_model, data_dir):
    model, processor = copy.deepcopy(tiny_model)
    out = tmp_path / "out" / "results.json"
    run(model, processor, data_dir, out)
    with torch.no_grad():  # the weights change in place by the smallest step one value can take
        weight = model.get_input_embeddings().weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"results\.samples\.jsonl holds the results of another evaluation "
                                         r"\(the model's weights changed\); remove it to start fresh, or choose "
                                         r"another --out"):
        run(model, processor, data_dir, out)


def test_the_same_weights_in_another_folder_resume(tmp_path, tiny_model, data_dir, monkeypatch):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "out" / "results.json"
    first = run(OtterForConditionalGeneration.from_pretrained(tmp_path / "model").eval(),
                OtterProcessor.from_pretrained(tmp_path / "model"), data_dir, out)
    shutil.move(tmp_path / "model", tmp_path / "moved")
    moved = OtterForConditionalGeneration.from_pretrained(tmp_path / "moved").eval()
    counter = count_generated_samples(monkeypatch, moved)
    again = run(moved, OtterProcessor.from_pretrained(tmp_path / "moved"), data_dir, out)
    assert counter["samples"] == 0 and again["results"] == first["results"]
    assert again["model"] == str(tmp_path / "moved")  # the path is recorded, as information


def test_moved_data_resumes_and_changed_data_refuses(tmp_path, tiny_model, data_dir, monkeypatch):
    model, processor = tiny_model
    out = tmp_path / "out" / "results.json"
    first = run(model, processor, data_dir, out)
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    shutil.rmtree(data_dir)
    counter = count_generated_samples(monkeypatch, model)
    assert run(model, processor, moved, out)["results"] == first["results"] and counter["samples"] == 0

    annotations = moved / "v2_mscoco_val2014_annotations.json"
    original = annotations.read_text()
    content = json.loads(original)
    content["annotations"][0]["answers"][0]["answer"] = "blue"  # one annotator's answer
    annotations.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=DATA_CHANGED):
        run(model, processor, moved, out)
    annotations.write_text(original)

    image = sorted((moved / "val2014").iterdir())[0]  # an image replaced by another of another size
    Image.new("RGB", (64, 64), (1, 2, 3)).save(image)
    with pytest.raises(ValueError, match=DATA_CHANGED):
        run(model, processor, moved, out)
    assert counter["samples"] == 0


def test_a_changed_processor_refuses(tmp_path, tiny_model, data_dir):
    model, processor = tiny_model
    out = tmp_path / "out" / "results.json"
    run(model, processor, data_dir, out)
    other_preprocessing = copy.deepcopy(processor)
    other_preprocessing.image_processor.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"\(the processor changed \(its tokenizer or image preprocessing\)\)"):
        run(model, other_preprocessing, data_dir, out)
    other_vocabulary = copy.deepcopy(processor)
    other_vocabulary.tokenizer.add_tokens(["<new-token>"])
    with pytest.raises(ValueError, match=r"\(the processor changed \(its tokenizer or image preprocessing\)\)"):
        run(model, other_vocabulary, data_dir, out)


def test_another_dtype_refuses_naming_it(tmp_path, tiny_model, data_dir):
    model, processor = tiny_model
    out = tmp_path / "out" / "results.json"
    run(model, processor, data_dir, out)
    with pytest.raises(ValueError, match=r"dtype changed \('float32' in the log, 'bfloat16' now\)"):
        run(copy.deepcopy(model).to(torch.bfloat16), processor, data_dir, out)


def test_task_settings_refuse_naming_the_setting(tmp_path, tiny_model, data_dir):
    model, processor = tiny_model
    out = tmp_path / "out" / "results.json"
    run(model, processor, data_dir, out)
    with pytest.raises(ValueError, match=r"\(seed changed \(42 in the log, 7 now\)\)"):
        run(model, processor, data_dir, out, seed=7)


def test_a_log_of_the_earlier_version_is_refused_clearly(tmp_path, tiny_model, data_dir):
    model, processor = tiny_model
    out = tmp_path / "results.json"
    settings = {"task": "vqav2", "model": "/models/otter", "data_dir": str(data_dir), "seed": 42, "num_samples": None,
                "query_set_size": 2048, "rices": False}  # what the earlier code keyed the log on: the model's path
    record = {"id": 101, "demos": [1, 2], "output": "red", "prediction": "red", "shots": 0, "trial": 0}
    out.with_suffix(LOG_SUFFIX).write_text(json.dumps({"settings": settings}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"written by an earlier version of Otter.*remove it to start fresh"):
        run(model, processor, data_dir, out)
    out.with_suffix(LOG_SUFFIX).write_text("not a log\n")
    with pytest.raises(ValueError, match=r"not an evaluation log"):
        run(model, processor, data_dir, out)


class ManyDtypes(torch.nn.Module):
    """Every kind of state_dict entry: several dtypes (1, 2, 4 and 8 bytes), a 0-d and an empty buffer, a
    non-contiguous parameter, and a tensor of more than 65521 values (two chunks of one period of the weights)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(40, 30, generator=generator).T)  # non-contiguous
        self.fp16 = torch.nn.Parameter(torch.randn(17, generator=generator).half())
        self.bf16 = torch.nn.Parameter(torch.randn(9, generator=generator).bfloat16())
        self.register_buffer("long", torch.arange(-5, 6) * 2 ** 40)
        self.register_buffer("int8", torch.arange(-100, 100, 7, dtype=torch.int8))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("scalar", torch.tensor(2.5))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("big", torch.randn(40000, generator=generator))  # 80,000 int16 values


def test_the_weights_fingerprint_is_exact_and_independent_of_chunking(monkeypatch):
    module = ManyDtypes()
    reference = weights_fingerprint(module)
    assert weights_fingerprint(copy.deepcopy(module)) == reference
    monkeypatch.setattr(fingerprints, "CHUNK", fingerprints._MODULUS)  # sums over two chunks equal sums over one
    assert weights_fingerprint(module) == reference
    monkeypatch.undo()

    def changed(change) -> str:
        other = copy.deepcopy(module)
        with torch.no_grad():
            change(other)
        return weights_fingerprint(other)

    last_bit = changed(lambda m: m.big.view(torch.int32)[-1].add_(1))  # the lowest bit of the last value
    swapped = changed(lambda m: m.big[:2].copy_(m.big[:2].flip(0)))  # two values trade places: the same sum
    flag = changed(lambda m: m.flags[1].fill_(True))
    small = changed(lambda m: m.int8[0].add_(1))
    dtype = changed(lambda m: setattr(m, "fp16", torch.nn.Parameter(m.fp16.bfloat16())))
    renamed = weights_fingerprint(torch.nn.ModuleDict({"inner": module}))
    fingerprints_seen = [reference, last_bit, swapped, flag, small, dtype, renamed]
    assert len(set(fingerprints_seen)) == len(fingerprints_seen)


def test_the_processor_fingerprint_ignores_the_tokenizers_call_state(tiny_model):
    processor = copy.deepcopy(tiny_model[1])
    before = processor_fingerprint(processor)
    processor.tokenizer(["a b c", "a"], padding="longest", truncation=True, max_length=2)  # leaves its settings behind
    assert processor_fingerprint(processor) == before


# -- item 9: a truncated image is named, whichever thread decodes it ---------------------------------------------------
def truncate(path):
    """`path` replaced by the first half of a JPEG of noise."""
    pixels = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_image_loaded_ahead_is_named(tmp_path, tiny_model, data_dir):
    model, processor = tiny_model
    query = sorted((data_dir / "val2014").iterdir())[-1]  # the last batch's query image: loaded in the background
    truncate(query)
    with pytest.raises(UnreadableImageError, match=rf"{query.name} could not be read \(image file is truncated"):
        run(model, processor, data_dir, tmp_path / "out.json")


def test_a_truncated_image_embedded_for_rices_is_named(tmp_path, tiny_model, data_dir):
    model, processor = tiny_model
    pool_image = sorted((data_dir / "train2014").iterdir())[1]
    truncate(pool_image)
    with pytest.raises(UnreadableImageError, match=rf"{pool_image.name} could not be read \(image file is truncated"):
        run(model, processor, data_dir, tmp_path / "out.json", rices=True, shots=[2])
    embedder = ImageEmbedder(model.vision_model, processor.image_processor, tmp_path / "cache")
    with pytest.raises(UnreadableImageError, match=pool_image.name):
        embedder([pool_image])


@pytest.mark.parametrize("rices", [False, True])
def test_the_command_names_a_truncated_image_in_one_line(tmp_path, tiny_model, data_dir, capsys, rices):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image = sorted((data_dir / ("train2014" if rices else "val2014")).iterdir())[0]  # embedded for RICES, or shown
    truncate(image)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(tmp_path / "model"), "--task", "vqav2", "--data-dir", str(data_dir),
              "--out", str(tmp_path / "out" / "results.json"), *(["--rices", "--shots", "2"] if rices else ["--shots", "0"])])
    error = last_line(capsys.readouterr().err)
    assert exit_.value.code == 1 and error.startswith("otter: image ")
    assert f"{image} could not be read (image file is truncated" in error


# -- item 12: bad paths and missing images are found before the model is loaded or a sample evaluated -----------------
def no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.fixture
def no_model_loading(monkeypatch):
    monkeypatch.setattr(OtterForConditionalGeneration, "from_pretrained", no_loading)
    monkeypatch.setattr(OtterProcessor, "from_pretrained", no_loading)


def command_error(capsys, *arguments) -> str:
    """The one line `otter eval ARGUMENTS` prints as it exits with status 1."""
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "unused-model", "--task", "vqav2", "--shots", "0", "2", *arguments])
    error = last_line(capsys.readouterr().err)
    assert exit_.value.code == 1 and error.startswith("otter: "), error
    return error


def test_the_command_checks_paths_before_loading_the_model(tmp_path, data_dir, capsys, no_model_loading):
    out = str(tmp_path / "out" / "results.json")
    error = command_error(capsys, "--data-dir", str(tmp_path / "nowhere"), "--out", out)
    assert f"{tmp_path / 'nowhere'}" in error and "does not exist" in error

    (tmp_path / "empty").mkdir()
    error = command_error(capsys, "--data-dir", str(tmp_path / "empty"), "--out", out)
    assert f"{tmp_path / 'empty' / 'v2_OpenEnded_mscoco_train2014_questions.json'}" in error

    (tmp_path / "a-folder").mkdir()
    error = command_error(capsys, "--data-dir", str(data_dir), "--out", str(tmp_path / "a-folder"))
    assert f"--out {tmp_path / 'a-folder'} is a directory" in error

    (tmp_path / "a-file").write_text("")
    error = command_error(capsys, "--data-dir", str(data_dir), "--out", str(tmp_path / "a-file" / "results.json"))
    assert f"{tmp_path / 'a-file'}" in error and "not a directory" in error

    questions = data_dir / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(questions.read_text()[:-10])  # cut short
    error = command_error(capsys, "--data-dir", str(data_dir), "--out", out)
    assert f"vqav2 val2014 questions {questions} is not a JSON file" in error

    error = command_error(capsys, "--data-dir", str(data_dir), "--out", out, "--rices",
                          "--rices-encoder", str(tmp_path / "no-clip"))
    assert f"--rices-encoder {tmp_path / 'no-clip'} does not exist" in error
    error = command_error(capsys, "--data-dir", str(data_dir), "--out", out, "--rices-encoder", str(tmp_path))
    assert "--rices-encoder is the encoder of --rices" in error
    assert not (tmp_path / "out" / "results.samples.jsonl").exists()


def test_a_log_of_other_task_settings_or_data_is_refused_before_the_model_is_loaded(tmp_path, tiny_model, data_dir,
                                                                                   capsys, monkeypatch):
    out = tmp_path / "out" / "results.json"
    run(*tiny_model, data_dir, out, shots=[0, 2])
    monkeypatch.setattr(OtterForConditionalGeneration, "from_pretrained", no_loading)
    error = command_error(capsys, "--data-dir", str(data_dir), "--out", str(out), "--seed", "7")
    assert error == (f"otter: {out.with_suffix(LOG_SUFFIX)} holds the results of another evaluation (seed changed (42 "
                     "in the log, 7 now)); remove it to start fresh, or choose another --out")
    (data_dir / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        (data_dir / "v2_OpenEnded_mscoco_val2014_questions.json").read_text().replace("how many", "how much"))
    assert "the data set changed" in command_error(capsys, "--data-dir", str(data_dir), "--out", str(out))


def test_missing_images_are_listed_before_the_model_is_loaded(tmp_path, capsys, no_model_loading):
    data_dir = make_vqa(tmp_path / "data", "vqav2", num_pool=4, num_test=6)
    missing = sorted((data_dir / "val2014").iterdir())[:2] + sorted((data_dir / "train2014").iterdir())[:4]
    for path in missing:
        path.unlink()
    error = command_error(capsys, "--data-dir", str(data_dir), "--out", str(tmp_path / "out" / "results.json"))
    assert "6 image files this run shows are missing" in error, error
    assert str(missing[0]) in error and str(missing[1]) in error
    assert not (tmp_path / "out" / "results.samples.jsonl").exists()


def test_missing_images_and_a_folder_as_out_fail_before_the_first_sample(tmp_path, tiny_model, data_dir, monkeypatch):
    model, processor = tiny_model
    counter = count_generated_samples(monkeypatch, model)
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        run(model, processor, data_dir, tmp_path / "a-folder")
    last_query = sorted((data_dir / "val2014").iterdir())[-1]  # shown by the last batch only
    last_query.unlink()
    with pytest.raises(ValueError, match=rf"1 image file this run shows is missing.*{last_query.name}"):
        run(model, processor, data_dir, tmp_path / "out.json")
    assert counter["samples"] == 0 and not (tmp_path / "out.samples.jsonl").exists()
