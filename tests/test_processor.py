import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from otter.processing_otter import load_image


@pytest.fixture
def processor():
    from otter.tiny import build_tiny_otter

    return build_tiny_otter("gpt_neox")[1]


def test_returns_ids_mask_and_the_images_in_marker_order(processor, images):
    batch = processor(text=["<image>Output:a<|endofchunk|><image>Output:", "<image>Output:"],
                      images=[images[:2], images[2:3]])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # every image of the batch, in marker order
    alone = [processor(text="<image>", images=[image])["pixel_values"][0] for image in images[:3]]
    assert torch.equal(batch["pixel_values"], torch.stack(alone))
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # left padding
    image_id = processor.image_token_id
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [2, 1]


def test_flat_image_list_follows_marker_order(processor, images):
    texts = ["<image>a<image>b", "<image>c"]
    nested = processor(text=texts, images=[images[:2], images[2:3]])
    flat = processor(text=texts, images=images[:3])
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    single = processor(text="<image>a", images=images[0])
    assert single["pixel_values"].shape == (1, 3, 32, 32)


def test_text_only_has_zero_images(processor):
    batch = processor(text=["no images here"])
    assert batch["pixel_values"].shape == (0, 3, 32, 32)  # so that pipelines can batch it with samples that have some


def test_marker_and_image_counts_must_agree_and_the_error_names_the_sample(processor, images):
    with pytest.raises(ValueError, match=r"sample 1 has 1 <image> markers but 2 images: '<image>second'"):
        processor(text=["<image>first", "<image>second"], images=[[images[0]], images[1:3]])
    with pytest.raises(ValueError, match=r"2 <image> markers \(\[1, 1\] per sample\) but 3 images"):
        processor(text=["<image>first", "<image>second"], images=images[:3])
    with pytest.raises(ValueError, match="image lists for 1 samples but 2 texts"):
        processor(text=["<image>first", "<image>second"], images=[[images[0]]])
    with pytest.raises(ValueError, match="needs text"):
        processor(images=images[:1])


def test_pixel_values_are_clip_normalised(processor):
    red = Image.new("RGB", (50, 70), (255, 0, 0))
    pixels = processor(text="<image>", images=[red])["pixel_values"][0]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=1e-4)


def test_image_modes_become_rgb(processor):
    rgba = Image.new("RGBA", (40, 40), (10, 200, 30, 0))
    grey = Image.new("L", (40, 40), 128)
    palette = Image.new("RGB", (40, 40), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    for image in (rgba, grey, palette):
        assert load_image(image).mode == "RGB"
    assert load_image(rgba).getpixel((0, 0)) == (10, 200, 30)  # alpha dropped as open_clip does
    assert load_image(palette).getpixel((0, 0)) == (0, 0, 255)
    batch = processor(text="<image><image><image>", images=[rgba, grey, palette])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    upright = load_image(path)
    assert upright.size == (20, 60)
    top = np.asarray(upright)[:5].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60  # the stripe is now at the top
    with open(path, "rb") as handle:
        assert load_image(Image.open(io.BytesIO(handle.read()))).size == (20, 60)


def test_truncation_keeps_markers_and_images_paired(processor, images):
    text = "<image>one two three<image>four five six<image>seven"
    full = processor(text=[text], images=[images[:3]])
    length = full["input_ids"].shape[1]
    marker = processor.image_token_id
    second = full["input_ids"][0].tolist().index(marker, 1)
    right = processor(text=[text], images=[images[:3]], max_length=second + 1)
    assert (right["input_ids"] == marker).sum() == 2 and torch.equal(right["pixel_values"], full["pixel_values"][:2])
    right_cut = processor(text=[text], images=[images[:3]], truncation=True, max_length=second)
    assert (right_cut["input_ids"] == marker).sum() == 1 and right_cut["pixel_values"].shape[0] == 1
    assert processor(text=[text], images=[images[:3]], truncation=False, max_length=second)["input_ids"].shape[1] == length
    left = processor(text=[text], images=[images[:3]], max_length=length - 1, truncation_side="left")
    assert (left["input_ids"] == marker).sum() == 2
    assert torch.equal(left["pixel_values"], full["pixel_values"][1:])
    assert torch.equal(left["input_ids"][0], full["input_ids"][0, 1:])
    processor.tokenizer.truncation_side = "left"  # the tokenizer's side is the default
    assert torch.equal(processor(text=[text], images=[images[:3]], max_length=length - 1)["input_ids"],
                       left["input_ids"])


def test_decode_answers_returns_only_the_answer(processor):
    prompt = processor(text=["<image>Question:what? Short answer:", "<image>Output:"], images=[[Image.new("RGB", (8, 8))]] * 2)
    length = prompt["input_ids"].shape[1]
    tok = processor.tokenizer
    answer = tok(" blue circle", add_special_tokens=False)["input_ids"]
    other = tok("red", add_special_tokens=False)["input_ids"]
    eoc, pad = processor.eoc_token_id, tok.pad_token_id
    rows = [answer + [eoc] + other, other + [eoc] + [pad] * (len(answer))]
    width = max(map(len, rows))
    rows = [row + [pad] * (width - len(row)) for row in rows]
    sequences = torch.cat([prompt["input_ids"], torch.tensor(rows)], dim=1)
    assert processor.decode_answers(sequences, length) == ["blue circle", "red"]


def test_saved_next_to_the_weights_and_loaded_offline(tmp_path, images):
    from otter.tiny import build_tiny_otter

    model, processor = build_tiny_otter("llama")
    processor.tokenizer.truncation_side = "left"
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    expected = processor(text=["<image>Output:"], images=[images[0]])
    torch.save(dict(expected), tmp_path / "expected.pt")
    images[0].save(tmp_path / "image.png")
    script = f"""
import torch, otter
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
processor = AutoProcessor.from_pretrained({str(tmp_path)!r})
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r})
batch = processor(text=["<image>Output:"], images=[Image.open({str(tmp_path / "image.png")!r})])
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
assert type(processor).__name__ == "OtterProcessor", type(processor)
assert (processor.tokenizer.padding_side, processor.tokenizer.truncation_side) == ("left", "left")
for key in expected:
    assert torch.allclose(batch[key].float(), expected[key].float()), key
print(model.generate(**batch, max_new_tokens=2).shape)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
