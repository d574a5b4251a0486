import pytest
import torch
from PIL import Image

from otter.tiny import build_tiny_otter

FAMILIES = ["mpt", "gpt_neox", "llama"]


def set_gates(model, attn=0.8, ff=0.5):
    """Open the gates (they start at 0, where the model is exactly its LM) so that images matter."""
    with torch.no_grad():
        for block in model.cross_attention_blocks():
            block.attn_gate.fill_(attn)
            block.ff_gate.fill_(ff)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    """A tiny Otter of each LM family, cross-attention every 2 layers, gates open, in eval mode."""
    model, processor = build_tiny_otter(family, cross_attn_every_n_layers=2)
    set_gates(model)
    return model.eval(), processor


@pytest.fixture
def images():
    colours = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (240, 200, 20)]
    return [Image.new("RGB", (48 + 8 * i, 40), colour) for i, colour in enumerate(colours)]
