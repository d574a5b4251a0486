"""Every prompt template of the project: OpenFlamingo's evaluation prompts and Otter's chat format."""

from dataclasses import dataclass
from functools import cache
from pathlib import Path

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # marks a video in a prompt; the processor writes <image> for it
END_OF_CHUNK = "<|endofchunk|>"
ANSWER_TOKEN = "<answer>"


@dataclass(frozen=True)
class PromptTemplate:
    """
    One interleaved example. `template` holds `{fields}`, and ends with `{<answer_field>}`; a demo is the filled
    template followed by `<|endofchunk|>`, a query is the template cut just before the answer and the space before it.
    `separator` follows every demo in a few-shot prompt.
    """

    template: str
    answer_field: str
    separator: str = "\n"

    def demo(self, **fields: str) -> str:
        return self.template.format(**fields) + END_OF_CHUNK

    def _head(self) -> str:
        head, marker, _ = self.template.partition("{" + self.answer_field + "}")
        if not marker:
            raise ValueError(f"template {self.template!r} has no {{{self.answer_field}}} field")
        return head

    def query(self, **fields: str) -> str:
        # the space before the answer belongs to the answer's first token (" A" in BPE), as in training
        return self._head().format(**fields).rstrip(" ")

    @property
    def answer_lead(self) -> str:
        """What the answer starts with after `query()`: the spaces `query()` cuts (" " in OTTER_CHAT, none in VQA)."""
        head = self._head()
        return head[len(head.rstrip(" ")):]


# OpenFlamingo's evaluation prompts (open_flamingo/eval/models/open_flamingo.py)
VQA = PromptTemplate("<image>Question:{question} Short answer:{answer}", "answer")
CAPTION = PromptTemplate("<image>Output:{caption}", "caption")
# OpenFlamingo 2.0.1's evaluate_classification joins classification demos with no separator
CLASSIFICATION = PromptTemplate("<image>Output:{label}", "label", separator="")
HATEFUL_MEMES = PromptTemplate(
    "<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}", "answer", separator=""
)
VIDEO_QA = PromptTemplate("<video>Question:{question} Short answer:{answer}", "answer")  # VQA's, a video shown
# Otter's MIMIC-IT chat format: the loss covers only what follows <answer>
OTTER_CHAT = PromptTemplate("<image>User: {instruction} GPT:<answer> {answer}", "answer")
OTTER_VIDEO_CHAT = PromptTemplate("<video>User: {instruction} GPT:<answer> {answer}", "answer")  # a video shown


def with_images(text: str, count: int) -> str:
    """
    `text`, one filled template turn that starts with a single `<image>`, made to show `count` images: none drops the
    marker; several put each image before its own label (`<image>Image 1. <image>Image 2. User: ...`). Flamingo's
    cross-attention shows a text token only the latest image before it, so with the markers side by side
    (`<image><image>User: ...`) only the first marker itself would see the first image; each label's tokens see
    their image, and the text after them reads it through self-attention. Training, evaluation and chat all write
    turns this way.
    """
    if not text.startswith(IMAGE_TOKEN):
        raise ValueError(f"a turn to show {count} images must start with {IMAGE_TOKEN}, got {text[:40]!r}")
    if count < 0:
        raise ValueError(f"a turn shows 0 or more images, got {count}")
    rest = text[len(IMAGE_TOKEN):]
    if count <= 1:
        return IMAGE_TOKEN * count + rest
    return "".join(f"{IMAGE_TOKEN}Image {i}. " for i in range(1, count + 1)) + rest


def few_shot_prompt(template: PromptTemplate, demos: list[dict], query: dict, text_only_demos: bool = False) -> str:
    """
    `demos` (each a dict of the template's fields, answer included) then `query` (without the answer).
    `text_only_demos=True` removes `<image>` from the demos, as OpenFlamingo's zero-shot protocol does with its
    two text-only demos; only the query's image is then passed to the model.
    """
    context = "".join(template.demo(**demo) + template.separator for demo in demos)
    if text_only_demos:
        context = context.replace(IMAGE_TOKEN, "")
    return context + template.query(**query)


_ANSWER_SETTING = '{%- set answer_token = "<answer>" -%}'


@cache
def chat_template(answer_token: bool = True) -> str:
    """
    The chat template (Jinja, `otter/chat_template.jinja`) that renders transformers' messages in Otter's chat format:
    `OTTER_CHAT` turns, each showing its images as `with_images` does, joined by newlines. `answer_token=False` is the
    same dialogue without `<answer>`, for tokenizers that lack it (OpenFlamingo's releases), which would otherwise read
    it as a handful of unrelated sub-word pieces.
    """
    template = (Path(__file__).parent / "chat_template.jinja").read_text(encoding="utf-8")
    if _ANSWER_SETTING not in template:
        raise RuntimeError(f"otter/chat_template.jinja lost its line {_ANSWER_SETTING!r}")
    return template if answer_token else template.replace(_ANSWER_SETTING, '{%- set answer_token = "" -%}')


def render_chat(messages: list[dict], add_generation_prompt: bool = False, template: str | None = None) -> str:
    """`messages` (transformers' chat format) as text, through `template` (default: `chat_template()`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=template or chat_template(),
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def chat_messages(turns: list[tuple[str, int | list[str], str | None]]) -> list[dict]:
    """
    (text, its media: a number of images or a list of "image" / "video", answer or None) per turn -> transformers'
    messages: a user message with its media and text, then, when the turn has an answer, the assistant's.
    """
    messages = []
    for text, media, answer in turns:
        kinds = ["image"] * media if isinstance(media, int) else list(media)
        content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
