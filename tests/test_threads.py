"""
One model, many calls at once: the media of a call travel down its forward (`CrossAttentionMedia`), never on the
model's modules, so `generate` from many threads gives each caller exactly what it gives alone.
"""

from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from otter import SHAPESWORLD_MODEL
from otter.cross_attention import OtterDecoderLayer
from otter.shapesworld import ShapesWorld, render


def _generate(model, processor, prompt, images, barrier=None):
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    if barrier is not None:
        barrier.wait()  # every thread starts generating at once
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def test_sixteen_threads_on_one_shipped_model_each_get_their_own_answer():
    model = AutoModelForImageTextToText.from_pretrained(SHAPESWORLD_MODEL).eval()
    processor = AutoProcessor.from_pretrained(SHAPESWORLD_MODEL)
    world = ShapesWorld(11)
    records = [world.vqa(kind) for kind in ("colour", "shape", "count", "colour") * 4]
    prompts = [(processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}],
        add_generation_prompt=True), [render(record["scene"])]) for record in records]
    alone = [_generate(model, processor, prompt, images) for prompt, images in prompts]
    assert len({tuple(tokens) for tokens in alone}) > 3  # the images decide the answers

    barrier = Barrier(len(prompts))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # threads interleave inside each other's forward passes, not one after another
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda item: _generate(model, processor, *item, barrier), prompts))
    finally:
        torch.set_num_threads(threads)
    assert together == alone
    assert not any(hasattr(layer, "media") for layer in model.modules() if isinstance(layer, OtterDecoderLayer))


@pytest.mark.parametrize("family", ["mpt", "gpt_neox", "llama"])
def test_every_family_passes_the_media_down_its_forward(family, images):
    """The layers read the call's media; a language model that dropped them would be caught, not silently wrong."""
    from otter.tiny import build_tiny_otter

    from .conftest import set_gates

    model, processor = build_tiny_otter(family, cross_attn_every_n_layers=2)
    set_gates(model)
    inputs = processor(text=["<image>a photo of", "<image>a photo"], images=[[images[0]], [images[2]]],
                       padding=True, return_tensors="pt")
    with_images = model.eval()(**inputs).logits
    without = model(input_ids=inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.media_token_id,
                                                              model.config.pad_token_id),
                    attention_mask=inputs["attention_mask"]).logits
    assert not torch.allclose(with_images, without, atol=1e-3)  # the images reach the blocks

    language_model = model.language_model
    forward = type(language_model).forward

    def dropping(self, *args, otter_media=None, **kwargs):  # a family whose forward drops extra keyword arguments
        return forward(self, *args, **kwargs)

    language_model.forward = dropping.__get__(language_model)
    with pytest.raises(RuntimeError, match="did not pass the keyword argument otter_media"):
        model(**inputs)
