"""
ShapesWorld: a procedural world of coloured geometric shapes on 64x64 images, deterministic by seed.

It holds what Otter's shipped model is trained and measured on: captions, VQA (colour, shape, count, position,
yes/no), two-image comparisons, and few-shot "fast binding" episodes in which nonce words are bound to shape classes
inside the prompt only, so that their answers cannot be known without reading the demonstrations.

    world = ShapesWorld(seed=0)
    scene = world.scene(objects=1)
    image = render(scene)
    world.vqa("colour")            # {"scene": ..., "question": "What colour is the shape?", "answer": "red"}
    world.binding_episode(shots=4) # demos bound to nonce words, and a query
"""

import math
import random
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "hexagon", "star", "diamond", "pentagon", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 230),
    "yellow": (240, 205, 30), "purple": (145, 60, 200), "orange": (250, 135, 25),
}
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
NUMBERS = ("zero", "one", "two", "three", "four")
BACKGROUND = (205, 205, 205)
VQA_KINDS = ("colour", "shape", "count", "position", "yes/no")
BINDING_INSTRUCTION = "What is it called?"  # the question of every fast-binding turn, in training and evaluation
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    """One object: its class, colour, centre and radius as fractions of the image side."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float

    def describe(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    position: str | None = None  # the named region of a one-object scene


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n, radius, start):
        return [(cx + radius * math.cos(start + 2 * math.pi * i / n), cy + radius * math.sin(start + 2 * math.pi * i / n))
                for i in range(n)]

    up = -math.pi / 2
    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "diamond":
        return ring(4, r, up)
    if shape == "triangle":
        return ring(3, r * 1.1, up)
    if shape == "pentagon":
        return ring(5, r, up)
    if shape == "hexagon":
        return ring(6, r, 0)
    if shape == "star":
        outer, inner = ring(5, r * 1.1, up), ring(5, r * 0.45, up + math.pi / 5)
        return [point for pair in zip(outer, inner) for point in pair]
    if shape == "cross":
        a, b = r, r * 0.36
        offsets = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
                   (-b, -b)]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def describe(scene: Scene) -> str:
    """A scene in words, objects from left to right: "a red star on the left", "a red star and a blue circle"."""
    objects = sorted(scene.objects, key=lambda obj: (obj.x, obj.y))
    text = " and ".join(obj.describe() for obj in objects)
    if scene.position is not None:
        text += " in the centre" if scene.position == "centre" else f" on the {scene.position}"
    return text


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image of `size` x `size` (drawn larger, then downsampled: smooth edges)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, obj.radius * big
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def is_held_out(word: str) -> bool:
    """One nonce word in eight is held out: never trained on, kept for measuring in-context learning."""
    return zlib.crc32(word.encode()) % 8 == 0


def nonce_words(count: int, seed: int, held_out: bool = False) -> list[str]:
    """
    `count` distinct pronounceable nonce words (consonant-vowel-consonant, some with a second syllable), from the
    training split or, with `held_out=True`, from the held-out split (see `is_held_out`): the two never share a word.
    """
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvwz", "aeiou"
    words = set()
    while len(words) < count:
        word = rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants)
        if rng.random() < 0.5:
            word += rng.choice(vowels) + rng.choice(consonants)
        if word not in SHAPES and word not in COLOURS and is_held_out(word) == held_out:
            words.add(word)
    return sorted(words)


class ShapesWorld:
    """Samples scenes and tasks from one seeded random stream; the same seed gives the same data."""

    def __init__(self, seed: int = 0, shapes=SHAPES, colours=tuple(COLOURS)):
        self.rng = random.Random(seed)
        self.shapes, self.colours = tuple(shapes), tuple(colours)

    def shape(self, shape=None, colour=None, x=0.5, y=0.5, radius=None) -> Shape:
        return Shape(shape or self.rng.choice(self.shapes), colour or self.rng.choice(self.colours), x, y,
                     radius if radius is not None else self.rng.uniform(0.17, 0.23))

    def scene(self, objects: int = 1, shape=None, colour=None) -> Scene:
        """One object in a named region (left, right, top, bottom, centre), or 2-4 objects in distinct quadrants."""
        jitter = lambda: self.rng.uniform(-0.04, 0.04)  # noqa: E731
        if objects == 1:
            position = self.rng.choice(tuple(POSITIONS))
            x, y = POSITIONS[position]
            return Scene((self.shape(shape, colour, x + jitter(), y + jitter()),), position)
        if not 2 <= objects <= 4:
            raise ValueError(f"a scene holds 1 to 4 objects, got {objects}")
        cells = self.rng.sample([(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)], objects)
        return Scene(tuple(self.shape(None, None, x + jitter(), y + jitter(), self.rng.uniform(0.12, 0.16))
                           for x, y in cells))

    def caption(self) -> dict:
        scene = self.scene(self.rng.choice((1, 1, 2, 3, 4)))
        return {"scene": scene, "caption": describe(scene) + "."}

    def vqa(self, kind: str | None = None) -> dict:
        """A question about one scene: `kind` is one of VQA_KINDS (random when None)."""
        kind = kind or self.rng.choice(VQA_KINDS)
        if kind == "count":
            scene = self.scene(self.rng.randint(1, 4))
            return {"scene": scene, "kind": kind, "question": QUESTIONS[kind], "answer": NUMBERS[len(scene.objects)]}
        scene = self.scene(1)
        obj = scene.objects[0]
        if kind == "yes/no":
            asked, answer = (obj.colour, obj.shape), "yes"
            if self.rng.random() < 0.5:
                answer = "no"
                if self.rng.random() < 0.5:
                    asked = (self.rng.choice([c for c in self.colours if c != obj.colour]), obj.shape)
                else:
                    asked = (obj.colour, self.rng.choice([s for s in self.shapes if s != obj.shape]))
            question = f"Is there {article(asked[0])} {asked[0]} {asked[1]}?"
            return {"scene": scene, "kind": kind, "question": question, "answer": answer}
        if kind not in QUESTIONS:
            raise ValueError(f"unknown VQA kind {kind!r}; expected one of {VQA_KINDS}")
        answer = {"colour": obj.colour, "shape": obj.shape, "position": scene.position}[kind]
        return {"scene": scene, "kind": kind, "question": QUESTIONS[kind], "answer": answer}

    def comparison(self) -> dict:
        """Two one-object images of different shapes."""
        first, second = self.rng.sample(self.shapes, 2)
        scenes = (self.scene(1, shape=first), self.scene(1, shape=second))
        return {"scenes": scenes, "question": "What are the two shapes?",
                "answer": f"The first one is a {first} and the second one is a {second}."}

    def binding_episode(self, shots: int, words: list[str], ways: int = 2) -> dict:
        """
        `ways` shape classes, each bound to a nonce word drawn from `words`; `shots` demonstrations in rounds (each
        round shows every class once, in a shuffled order, so any first `ways` demos show every class), then a query
        of one of them. The binding exists only in this episode.
        """
        classes = self.rng.sample(self.shapes, ways)
        names = dict(zip(classes, self.rng.sample(words, ways)))
        order = []
        while len(order) < shots:
            order += self.rng.sample(classes, ways)
        demos = [{"scene": self.scene(1, shape=shape), "answer": names[shape]} for shape in order[:shots]]
        query_shape = self.rng.choice(classes)
        return {"demos": demos, "query": {"scene": self.scene(1, shape=query_shape), "answer": names[query_shape]},
                "names": names}
