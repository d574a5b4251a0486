"""
Model cards: the README.md of an Otter folder, as the Hugging Face Hub reads it (the metadata) and as people read it
(what the folder is, how it was made, a snippet that loads it). `model_card` writes every one of them: converted
folders, trained folders, the model the package ships, and `save_pretrained`.

The metadata's `library_name` is "otter", not "transformers". An Otter folder loads with transformers' Auto classes
only once `import otter` has registered them; for "transformers" the Hub shows its own snippet
(`pipeline("image-text-to-text", model=...)`, `AutoModelForImageTextToText.from_pretrained(...)`) without that import,
and it fails on the folder's `model_type: otter`. The Hub takes any library name; for one it has no snippet for it
shows none, so the card's own snippet, which imports otter, is the one a reader sees. Without a `library_name` the Hub
would guess "transformers" from config.json.
"""

import json
import logging
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

logger = logging.getLogger(__name__)

LIBRARY_NAME = "otter"
PIPELINE_TAG = "image-text-to-text"
TAGS = ["otter", "flamingo", "multimodal"]
CODE_LICENSE = "mit"  # Otter's own code, and the weights this project trained itself (the shipped model)
DISTRIBUTION = "otter-flamingo"
# what the usage snippet asks: a chat-tuned model (its tokenizer has <answer>), or OpenFlamingo's captioning prompt
CHAT_PROMPT = "<image>User: What is in the image? GPT:<answer>"
CAPTION_PROMPT = "<image>Output:"


def hub_id(name) -> str | None:
    """`name` if it reads as a Hugging Face Hub id (owner/name) and is not a local path, else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(name) if name is not None else ""
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or Path(text).exists():
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def source_card(name_or_path) -> ModelCard | None:
    """The card of the folder (or hub id, when it is in the local cache: nothing is downloaded) a model came from."""
    if not name_or_path:
        return None
    path = Path(name_or_path) / "README.md"
    if not path.is_file() and hub_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name_or_path), "README.md")
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path, ignore_metadata_errors=True)
    except (OSError, ValueError) as error:
        logger.warning("cannot read the model card %s (%s): its license and base model are not carried over", path,
                       error)
        return None


def usage(path: str, prompt: str = CHAT_PROMPT, dtype: str = "auto", path_is_code: bool = False) -> str:
    """
    The Python snippet a card shows: load the folder `path` (a folder name or hub id; with `path_is_code`, a Python
    expression), prompt it with one image and print the answer. It runs as written from the folder's parent.
    """
    location = path if path_is_code else f"{json.dumps(path)}  # this folder, or its id on the Hugging Face Hub"
    return f'''import otter  # registers Otter with transformers' Auto classes (pip install {DISTRIBUTION})
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

path = {location}
model = AutoModelForImageTextToText.from_pretrained(path, dtype="{dtype}")
processor = AutoProcessor.from_pretrained(path)

image = Image.new("RGB", (224, 224), "red")  # any PIL image, e.g. Image.open("photo.jpg")
inputs = processor(images=[image], text={json.dumps(prompt)}, return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=20)
print(processor.decode_answers(generated, inputs["input_ids"].shape[1])[0])
'''


def language_model_usage(path: str) -> str:
    """The snippet of a language-model folder (`otter convert mosaic-gpt`): loaded by `otter.load_language_model`."""
    return f'''import otter  # otter.load_language_model honours MPT's QK LayerNorm, which MptForCausalLM drops
from transformers import AutoTokenizer

path = {json.dumps(path)}  # this folder, or its id on the Hugging Face Hub
model = otter.load_language_model(path)
tokenizer = AutoTokenizer.from_pretrained(path)
inputs = tokenizer("A red circle is", return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
'''


def model_card(
    title: str,
    summary: str,
    snippet: str,
    *,
    pipeline_tag: str = PIPELINE_TAG,
    base_model: str | list[str] | None = None,
    license: str | None = None,
    license_note: str | None = None,
    sources: dict[str, str] | None = None,
    command: str | None = None,
    sections: dict[str, str] | None = None,
    notes: list[str] | tuple = (),
    tags: list[str] | tuple = (),
) -> ModelCard:
    """
    A model card: Hub metadata (library "otter", the task, base model, license, tags) and the text.

    title / summary: the heading and the paragraph under it. snippet: the Python code that loads and runs the folder
        (`usage`, `language_model_usage`). pipeline_tag: the Hub's task. base_model: hub id(s) the weights come from.
    license: a Hub license id ("mit", "apache-2.0"); None when unknown, which is "other", and `license_note` says what
        applies. sources: {what: where} it was made from; command: the exact command that made it; sections:
        {heading: markdown} after the usage; notes: bullets.
    """
    if license is not None and (not isinstance(license, str) or not license.strip() or license != license.lower()):
        raise ValueError(f"license must be a Hub license id in lower case (e.g. 'mit', 'apache-2.0'), got {license!r}")
    if isinstance(base_model, str):
        base_model = [base_model]
    base_model = [name for name in dict.fromkeys(base_model or []) if name] or None
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        license=license or "other",
        tags=list(dict.fromkeys([*TAGS, *tags])),
    )
    lines = [f"# {title}", "", summary.strip(), "", "## Usage", "",
             f"It needs Otter (`pip install {DISTRIBUTION}`), and loads offline, with no `trust_remote_code`:", "",
             "```python", snippet.rstrip(), "```"]
    for heading, text in (sections or {}).items():
        lines += ["", f"## {heading}", "", text.strip()]
    if sources:
        lines += ["", "## Sources", ""] + [f"- {what}: `{where}`" for what, where in sources.items()]
    if command:
        lines += ["", "## Command", "", "```bash", command, "```"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    license_text = license_note or (f"`{license}`" if license else
                                    "Not stated: the licenses of the weights this model was made from apply.")
    lines += ["", "## License", "", license_text]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def describe(config) -> str:
    """One sentence on an Otter model's parts, from its config."""
    vision, text = config.vision_config, config.text_config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layers", "?")
    width = getattr(text, "hidden_size", None) or getattr(text, "d_model", "?")
    every = ("each decoder layer" if config.cross_attn_every_n_layers == 1
             else f"every {config.cross_attn_every_n_layers} decoder layers")
    return (f"A Flamingo-style model: a CLIP vision tower ({vision.num_hidden_layers} layers, width "
            f"{vision.hidden_size}, {vision.image_size} px images), a Perceiver resampler, and gated cross-attention "
            f"before {every} of the language model (`{text.model_type}`, {layers} layers, width {width}).")


def saved_model_card(model, folder: str | os.PathLike) -> ModelCard:
    """
    The card `save_pretrained` writes: what the model is, and the license and base model of the folder it was loaded
    from (a hub id is the base model itself; a local folder passes on its card's base model).
    """
    name_or_path = getattr(model, "name_or_path", "") or ""
    source = source_card(name_or_path)
    source_data = source.data if source is not None else None
    base_model = hub_id(name_or_path) or (source_data.base_model if source_data is not None else None)
    license = source_data.license if source_data is not None else None
    license_note = None
    if license == "other" or license is None:
        license = None
        license_note = ("Not stated: the licenses of the weights this model was made from apply"
                        + (f" (see the card of {name_or_path})." if source is not None else "."))
    folder = Path(folder)
    return model_card(
        f"{folder.name}: an Otter model",
        describe(model.config) + (f" Saved from `{name_or_path}`." if name_or_path else ""),
        usage(folder.name),
        base_model=base_model,
        license=license,
        license_note=license_note,
        notes=["Written by `save_pretrained`; save the processor in the same folder "
               "(`processor.save_pretrained`) so that the snippet above loads it."],
    )


__all__ = ["model_card", "usage", "language_model_usage", "describe", "saved_model_card", "hub_id", "source_card", "LIBRARY_NAME",
           "PIPELINE_TAG", "CHAT_PROMPT", "CAPTION_PROMPT", "CODE_LICENSE"]
