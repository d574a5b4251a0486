"""
`otter demo`: few-shot prompting of the model the package ships (`otter.SHAPESWORLD_MODEL`), offline, on freshly
rendered ShapesWorld episodes. It prints every prompt, answer and the accuracy, and writes an HTML page showing the
images beside the answers. Registered by otter/cli.py.
"""

import argparse
import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

from .chat import DTYPE_HELP, DTYPES, add_placement_options
from .shapesworld import (
    BINDING_INSTRUCTION,
    MOTION_INSTRUCTION,
    VQA_KINDS,
    ShapesWorld,
    describe,
    describe_clip,
    nonce_words,
    render,
)


@dataclass
class Episode:
    """
    One few-shot prompt: demonstrations (turns of "scenes" or "clips", an instruction and an answer), then the query;
    filled in by `run`.
    """

    task: str
    shots: int
    demos: list[dict]
    query: dict
    prompt: str = ""
    answer: str = ""
    images: list = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return self.answer.strip().lower() == self.query["answer"].strip().lower()


def episodes(seed: int, count: int, shots: int, varied: bool = False) -> list[Episode]:
    """
    `count` episodes of each kind, drawn from `ShapesWorld(seed)`: fast binding with held-out nonce words (each
    query asked with no demonstrations, then with `shots`), VQA (2 demonstrations, query kinds in turn) and
    two-image comparisons (1 demonstration). `varied` draws them from the varied world's held-out split, with words
    of every form, and adds video episodes: questions on clips (0-shot) and motions named in context (`shots`).
    """
    world = ShapesWorld(seed, varied=varied, held_out=varied)
    words = nonce_words(200, seed, held_out=True, form="any" if varied else None)
    result = []
    for _ in range(count):
        episode = world.binding_episode(shots, words=words, ways=2)
        turns = [{"scenes": [turn["scene"]], "instruction": BINDING_INSTRUCTION, "answer": turn["answer"]}
                 for turn in [*episode["demos"], episode["query"]]]
        result.append(Episode("fast binding", 0, [], turns[-1]))
        result.append(Episode("fast binding", shots, turns[:-1], turns[-1]))
    for index in range(count):
        vqa = [world.vqa(VQA_KINDS[(index + offset) % len(VQA_KINDS)]) for offset in (1, 2, 0)]
        turns = [{"scenes": [record["scene"]], "instruction": record["question"], "answer": record["answer"]}
                 for record in vqa]
        result.append(Episode("VQA", 2, turns[:-1], turns[-1]))
    for _ in range(count):
        turns = [{"scenes": list(record["scenes"]), "instruction": record["question"], "answer": record["answer"]}
                 for record in (world.comparison(), world.comparison())]
        result.append(Episode("comparison", 1, turns[:-1], turns[-1]))
    if varied:
        for index in range(count):
            clip = world.clip(("motion", "colour change", "appear or vanish")[index % 3])
            result.append(Episode("video", 0, [], {"clips": [clip["frames"]], "instruction": clip["question"],
                                                   "answer": clip["answer"]}))
        for _ in range(count):
            episode = world.motion_naming_episode(shots, words=words, ways=2)
            turns = [{"clips": [turn["frames"]], "instruction": MOTION_INSTRUCTION, "answer": turn["answer"]}
                     for turn in [*episode["demos"], episode["query"]]]
            result.append(Episode("motion naming", shots, turns[:-1], turns[-1]))
    return result


def _media(turn: dict) -> list:
    """A turn's images, then its clips as `Video`s of their rendered frames."""
    from .processing_otter import Video

    return ([render(scene) for scene in turn.get("scenes", [])]
            + [Video([render(scene) for scene in frames]) for frames in turn.get("clips", [])])


def run(model, processor, episode: Episode, max_new_tokens: int) -> None:
    """Prompt the model with the episode in the chat format it was trained on; greedy answer."""
    from .chat import ChatTurn, answer, chat_prompt

    history = [ChatTurn(turn["instruction"], _media(turn), turn["answer"]) for turn in episode.demos]
    query_images = _media(episode.query)
    episode.prompt = chat_prompt(history, episode.query["instruction"], query_images)
    episode.images = [image for turn in history for image in turn.images] + query_images
    episode.answer = answer(model, processor, episode.prompt, episode.images, max_new_tokens=max_new_tokens,
                            do_sample=False)


def _descriptions(episode: Episode) -> list[str]:
    """What each medium of the episode shows, in order."""
    return [text for turn in [*episode.demos, episode.query]
            for text in [describe(scene) for scene in turn.get("scenes", [])]
            + [describe_clip(frames) for frames in turn.get("clips", [])]]


def _data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _html_medium(medium, text: str) -> str:
    """An image, or a video's frames side by side in a box."""
    from .processing_otter import Video

    if isinstance(medium, Video):
        frames = "".join(f'<img src="{_data_uri(frame)}">' for frame in medium.frames)
        return f'<span class="video" title="{html.escape(text)}">{frames}</span>'
    return f'<img src="{_data_uri(medium)}" title="{html.escape(text)}">'


def write_html(path: Path, episodes: list[Episode], summary: list[str], model_path: str) -> None:
    """One row per episode: its images (demonstrations, then the query), the prompt, the answer and the target."""
    rows = []
    for episode in episodes:
        images = "".join(_html_medium(medium, text)
                         for medium, text in zip(episode.images, _descriptions(episode)))
        mark = "&#10004;" if episode.correct else "&#10008;"
        rows.append(
            f'<tr class="{"ok" if episode.correct else "bad"}"><td>{html.escape(episode.task)}<br>{episode.shots}-shot'
            f'</td><td class="images">{images}</td><td><pre>{html.escape(episode.prompt)}</pre></td>'
            f"<td><b>{html.escape(episode.answer)}</b> {mark}<br><small>expected: "
            f"{html.escape(episode.query['answer'])}</small></td></tr>")
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary)
    path.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>otter demo</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td {{ border: 1px solid #ccc; padding: 6px; vertical-align: top; }} pre {{ white-space: pre-wrap; max-width: 40em; }}
img {{ width: 64px; height: 64px; margin: 2px; border: 1px solid #ddd; image-rendering: pixelated; }}
.images {{ max-width: 380px; }} .ok b {{ color: #176f2c; }} .bad b {{ color: #b00020; }}
.video {{ display: inline-block; border: 2px solid #888; margin: 2px; }}
</style></head><body><h1>otter demo</h1><p>model: {html.escape(model_path)}</p><ul>{items}</ul>
<table><tr><th>task</th><th>images (demonstrations, then the query)</th><th>prompt</th><th>answer</th></tr>
{''.join(rows)}</table></body></html>
""", encoding="utf-8")


def main(args) -> None:
    from . import SHAPESWORLD_MODEL
    from .chat import load_model, placement_kwargs

    if args.episodes < 1 or args.shots < 1:
        raise SystemExit(f"otter: --episodes and --shots must be at least 1, got {args.episodes} and {args.shots}")
    start = time.perf_counter()
    model_path = args.model or str(SHAPESWORLD_MODEL)
    model, processor = load_model(model_path, args.device, args.dtype, **placement_kwargs(args))
    print(f"otter demo: {model_path} ({sum(p.numel() for p in model.parameters()):,} parameters), few-shot "
          f"prompting on freshly rendered ShapesWorld episodes (seed {args.seed})\n")
    todo = episodes(args.seed, args.episodes, args.shots)
    for number, episode in enumerate(todo, 1):
        run(model, processor, episode, args.max_new_tokens)
        images = "; ".join(f"{i + 1}: {text}" for i, text in enumerate(_descriptions(episode)))
        print(f"--- episode {number}: {episode.task}, {episode.shots}-shot ({images})")
        print(episode.prompt)
        print(f"answer: {episode.answer!r}   expected: {episode.query['answer']!r}   "
              f"{'correct' if episode.correct else 'WRONG'}\n")
    summary = []
    for task, shots in dict.fromkeys((episode.task, episode.shots) for episode in todo):
        done = [episode for episode in todo if (episode.task, episode.shots) == (task, shots)]
        right = sum(episode.correct for episode in done)
        summary.append(f"{task}, {shots}-shot: {right}/{len(done)} correct ({100 * right / len(done):.0f}%)")
    summary.append("fast binding names shapes with nonce words bound only inside the prompt: the answer cannot be "
                   "known with 0 shots, only read off the demonstrations")
    out = Path(args.out)
    write_html(out, todo, summary, model_path)
    print("accuracy:\n  " + "\n  ".join(summary[:-1]))
    print(f"\nwrote {out} (images beside the answers) in {time.perf_counter() - start:.1f} s")


def register(commands) -> None:
    parser = commands.add_parser(
        "demo", help="few-shot prompting of the shipped ShapesWorld model, offline",
        description="Few-shot prompting of the model the package ships on freshly rendered ShapesWorld episodes: "
                    "prints the prompts, the answers and the accuracy, and writes an HTML page of the images beside "
                    "the answers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="an Otter folder (default: the model the package ships)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes of each kind")
    parser.add_argument("--shots", type=int, default=4, help="demonstrations in a fast-binding prompt")
    parser.add_argument("--seed", type=int, default=0, help="which episodes are drawn")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default="otter-demo.html", help="the HTML page to write")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help=DTYPE_HELP)
    add_placement_options(parser)
    parser.set_defaults(func=main)
