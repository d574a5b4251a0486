"""Every prompt template of the project: OpenFlamingo's evaluation prompts and Otter's chat format."""

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
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

    def query(self, **fields: str) -> str:
        head, marker, _ = self.template.partition("{" + self.answer_field + "}")
        if not marker:
            raise ValueError(f"template {self.template!r} has no {{{self.answer_field}}} field")
        # the space before the answer belongs to the answer's first token (" A" in BPE), as in training
        return head.format(**fields).rstrip(" ")


# OpenFlamingo's evaluation prompts (open_flamingo/eval/models/open_flamingo.py)
VQA = PromptTemplate("<image>Question:{question} Short answer:{answer}", "answer")
CAPTION = PromptTemplate("<image>Output:{caption}", "caption")
# OpenFlamingo 2.0.1's evaluate_classification joins classification demos with no separator
CLASSIFICATION = PromptTemplate("<image>Output:{label}", "label", separator="")
HATEFUL_MEMES = PromptTemplate(
    "<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}", "answer", separator=""
)
# Otter's MIMIC-IT chat format: the loss covers only what follows <answer>
OTTER_CHAT = PromptTemplate("<image>User: {instruction} GPT:<answer> {answer}", "answer")


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
