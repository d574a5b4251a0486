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

`ShapesWorld(seed, varied=True)` draws scenes with real variation: shapes anywhere in the image, sizes independent of
the count, shades around each named colour, outlines, rotations, background shades and antialiasing on or off; each
axis (`AXES`, and positions by cell) keeps bands of values for `held_out=True`, which training never draws. It also
makes short video clips (`clip`: a shape moves, changes colour, appears or vanishes; `video_bytes` writes an mp4),
binding episodes of 2-5 ways named by nonce words of every form (`nonce_words(..., form=...)`) or by real words bound
against their meaning, and in-context naming of motions (`motion_naming_episode`). `ShapesWorld(seed)` without
`varied` draws exactly the data the shipped model was trained on.
"""

import colorsys
import io
import math
import random
import zlib
from dataclasses import dataclass, replace

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
# varied scenes name the nine cells of a 3 x 3 grid
REGIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
HUE_SHIFT = 7.0  # degrees of hue one unit of shade turns a colour by (the named colours are >= 25 degrees apart)


@dataclass(frozen=True)
class Axis:
    """
    One axis of variation: values in [low, high] cut into `bands` equal bands, of which every fifth from the third
    (the 3rd and 8th of 10) is held out: training draws from the others, held-out evaluation only from those.
    """

    low: float
    high: float
    bands: int = 10

    def band(self, value: float) -> int:
        return min(self.bands - 1, max(0, int((value - self.low) / (self.high - self.low) * self.bands)))

    def held_out(self, value: float) -> bool:
        return self.band(value) % 5 == 2

    def sample(self, rng: random.Random, held_out: bool = False) -> float:
        band = rng.choice([b for b in range(self.bands) if (b % 5 == 2) == held_out])
        return self.low + (self.high - self.low) / self.bands * (band + rng.random())


SIZE = Axis(0.10, 0.22)  # radius, as a fraction of the image side
SHADE = Axis(-1.0, 1.0)  # hue shift in units of HUE_SHIFT
BACKGROUND_LEVEL = Axis(150.0, 240.0)  # grey level of the background (then tinted a little, mean zero)
ROTATION = Axis(-15.0, 15.0)  # degrees (a square and a diamond stay 15 degrees apart)
OUTLINE = Axis(0.06, 0.16)  # width of the darker outline as a fraction of the radius (half the shapes have one)
AXES = {"size": SIZE, "shade": SHADE, "background": BACKGROUND_LEVEL, "rotation": ROTATION, "outline": OUTLINE}
POSITION_GRID = 8  # positions are held out by cell of an 8 x 8 grid: one cell in five
ANTIALIAS_SHARE = 0.7  # varied scenes are drawn smooth (supersampled) this often, else with hard pixel edges


def position_held_out(x: float, y: float) -> bool:
    """Whether the point (x, y) (fractions of the side) lies in a held-out cell: (col + 3 * row) % 5 == 2."""
    col, row = (min(POSITION_GRID - 1, int(v * POSITION_GRID)) for v in (x, y))
    return (col + 3 * row) % 5 == 2


def region(x: float, y: float) -> str:
    """The cell of the 3 x 3 grid (REGIONS) the point (x, y) is in."""
    col, row = (min(2, int(v * 3)) for v in (x, y))
    return REGIONS[3 * row + col]


def clear_position(x: float, y: float, margin: float = 0.05) -> bool:
    """Whether (x, y) is at least `margin` from every border between the grid's cells (so its region is plain)."""
    return all(abs(v - edge) >= margin for v in (x, y) for edge in (1 / 3, 2 / 3))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    """
    One object: its class, colour, centre and radius as fractions of the image side; its shade (hue shift, in units
    of HUE_SHIFT), rotation (degrees) and outline width (a fraction of the radius, 0 for none).
    """

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    shade: float = 0.0
    rotation: float = 0.0
    outline: float = 0.0

    def describe(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape}"

    def rgb(self) -> tuple[int, int, int]:
        """The fill: the named colour, its hue turned by `shade`."""
        base = COLOURS[self.colour]
        if not self.shade:
            return base
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in base))
        return tuple(round(c * 255) for c in colorsys.hsv_to_rgb((h + self.shade * HUE_SHIFT / 360) % 1, s, v))


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    position: str | None = None  # the named region of a one-object scene
    background: tuple[int, int, int] = BACKGROUND
    antialias: bool = True  # drawn supersampled (smooth edges) or at the image's size (hard edges)


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float = 0.0) -> list[tuple[float, float]]:
    turn = math.radians(rotation)

    def ring(n, radius, start):
        return [(cx + radius * math.cos(start + turn + 2 * math.pi * i / n),
                 cy + radius * math.sin(start + turn + 2 * math.pi * i / n)) for i in range(n)]

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
        cos, sin = math.cos(turn), math.sin(turn)
        return [(cx + dx * cos - dy * sin, cy + dx * sin + dy * cos) for dx, dy in offsets]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def describe(scene: Scene) -> str:
    """A scene in words, objects from left to right: "a red star on the left", "a red star and a blue circle"."""
    objects = sorted(scene.objects, key=lambda obj: (obj.x, obj.y))
    text = " and ".join(obj.describe() for obj in objects)
    if scene.position is not None:
        text += " in the centre" if scene.position == "centre" else f" on the {scene.position}"
    return text


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """
    The scene as an RGB image of `size` x `size`: drawn `supersample` times larger, then downsampled (smooth edges),
    or, for a scene with `antialias=False`, drawn at its size (hard edges).
    """
    scale = supersample if scene.antialias else 1
    big = size * scale
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, obj.radius * big
        fill = obj.rgb()
        edge = dict(outline=tuple(c * 11 // 20 for c in fill), width=max(1, round(obj.outline * r))) \
            if obj.outline else {}
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, **edge)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, obj.rotation), fill=fill, **edge)
    return image if scale == 1 else image.resize((size, size), Image.Resampling.LANCZOS)


def is_held_out(word: str) -> bool:
    """One nonce word in eight is held out: never trained on, kept for measuring in-context learning."""
    return zlib.crc32(word.encode()) % 8 == 0


CONSONANTS, VOWELS = "bdfgklmnprstvwz", "aeiou"
# a nonce word's form: whether it starts and ends with a consonant ("C") or a vowel ("V"), as in kuzof, kuzo, uzof, uzo
WORD_FORMS = ("C..C", "C..V", "V..C", "V..V")
DIRECTIONS = ("left", "right", "up", "down")
CLIP_KINDS = ("motion", "colour change", "appear or vanish")
CLIP_QUESTIONS = {"motion": "Which way does the shape move?", "colour change": "What colour does it turn?",
                  "appear or vanish": "Does the shape appear or vanish?"}
MOTION_INSTRUCTION = "What is this motion called?"  # the question of every motion-naming turn
FRAMES = 4  # frames of a clip
# what a nonce word may not be: every word the world's own text uses
RESERVED = frozenset(" ".join([*SHAPES, *COLOURS, *NUMBERS, *REGIONS, *DIRECTIONS, *QUESTIONS.values(),
                               *CLIP_QUESTIONS.values(), MOTION_INSTRUCTION, BINDING_INSTRUCTION,
                               "a an and the on in of is it yes no there first second one are two shapes image "
                               "scene user gpt describe appear vanish appears vanishes called this"]).lower()
                     .replace("?", " ").replace(".", " ").split())


def word_form(word: str) -> str:
    """The form of a word (WORD_FORMS): "C..V" for kuzo."""
    return ("V" if word[0] in VOWELS else "C") + ".." + ("V" if word[-1] in VOWELS else "C")


def nonce_word(rng: random.Random, form: str, syllables: int) -> str:
    """
    A pronounceable nonce word of `form` (WORD_FORMS) and `syllables` vowels: consonant-vowel syllables, without the
    first consonant for a vowel-initial form, with a final consonant for a consonant-final one (a one-syllable V..V
    word gets a second syllable, a lone vowel not being a word).
    """
    if form not in WORD_FORMS:
        raise ValueError(f"unknown word form {form!r}; expected one of {WORD_FORMS}")
    if form == "V..V":
        syllables = max(2, syllables)
    letters = []
    for index in range(syllables):
        if index or form[0] == "C":
            letters.append(rng.choice(CONSONANTS))
        letters.append(rng.choice(VOWELS))
    if form[-1] == "C":
        letters.append(rng.choice(CONSONANTS))
    return "".join(letters)


def nonce_words(count: int, seed: int, held_out: bool = False, form: str | None = None) -> list[str]:
    """
    `count` distinct pronounceable nonce words from the training split or, with `held_out=True`, from the held-out
    split (see `is_held_out`): the two never share a word. `form=None` draws the shipped model's words (consonant-
    vowel-consonant, some with a second syllable); a form of WORD_FORMS draws words of that form with 1-4 syllables,
    and "any" words of every form.
    """
    rng = random.Random(seed)
    words = set()
    while len(words) < count:
        if form is None:
            word = rng.choice(CONSONANTS) + rng.choice(VOWELS) + rng.choice(CONSONANTS)
            if rng.random() < 0.5:
                word += rng.choice(VOWELS) + rng.choice(CONSONANTS)
            allowed = word not in SHAPES and word not in COLOURS
        else:
            word = nonce_word(rng, rng.choice(WORD_FORMS) if form == "any" else form, rng.randint(1, 4))
            allowed = word not in RESERVED
        if allowed and is_held_out(word) == held_out:
            words.add(word)
    return sorted(words)


def describe_clip(frames: list[Scene]) -> str:
    """
    A clip in words, from its first and last frames: "a red star moving left", "a red star turning blue",
    "a red star appearing", "a red star vanishing" (a clip of `ShapesWorld.clip`: one shape, one change).
    """
    first, last = frames[0].objects, frames[-1].objects
    if len(first) != len(last):
        return (last or first)[0].describe() + (" appearing" if last else " vanishing")
    a, b = first[0], last[0]
    if a.colour != b.colour:
        return f"{a.describe()} turning {b.colour}"
    dx, dy = b.x - a.x, b.y - a.y
    direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return f"{a.describe()} moving {direction}"


def video_bytes(frames: list[Image.Image], fps: int = 4) -> bytes:
    """Frames as an H.264 mp4 (PyAV; near-lossless, crf 12), what a video file of a clip holds."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


class ShapesWorld:
    """
    Samples scenes and tasks from one seeded random stream; the same seed gives the same data. `varied` draws scenes
    with every axis of variation (see the module's docstring), from the held-out bands and cells with `held_out`.
    """

    def __init__(self, seed: int = 0, shapes=SHAPES, colours=tuple(COLOURS), varied: bool = False,
                 held_out: bool = False):
        if held_out and not varied:
            raise ValueError("held_out splits exist only for varied scenes: pass varied=True")
        self.rng = random.Random(seed)
        self.shapes, self.colours = tuple(shapes), tuple(colours)
        self.varied, self.held_out = varied, held_out

    def shape(self, shape=None, colour=None, x=0.5, y=0.5, radius=None) -> Shape:
        obj = Shape(shape or self.rng.choice(self.shapes), colour or self.rng.choice(self.colours), x, y,
                    radius if radius is not None else self.rng.uniform(0.17, 0.23))
        if not self.varied:
            return obj
        rng, split = self.rng, self.held_out
        outline = OUTLINE.sample(rng, split) if rng.random() < 0.5 else 0.0
        return replace(obj, shade=SHADE.sample(rng, split), rotation=ROTATION.sample(rng, split), outline=outline)

    def _place(self, radius: float, others=()) -> tuple[float, float] | None:
        """A centre for a shape of `radius` inside the image, in a cell of this split, clear of `others`."""
        cells = [(col, row) for row in range(POSITION_GRID) for col in range(POSITION_GRID)
                 if position_held_out((col + 0.5) / POSITION_GRID, (row + 0.5) / POSITION_GRID) == self.held_out]
        for _ in range(200):
            col, row = self.rng.choice(cells)
            x, y = (col + self.rng.random()) / POSITION_GRID, (row + self.rng.random()) / POSITION_GRID
            inside = radius + 0.02 <= min(x, y) and max(x, y) <= 1 - radius - 0.02
            if inside and all(math.dist((x, y), (o.x, o.y)) > radius + o.radius + 0.03 for o in others):
                return x, y
        return None

    def _varied_scene(self, objects: int, shape, colour, radius, clear: bool) -> Scene:
        for _ in range(100):
            placed = []
            for _ in range(objects):
                size = radius if radius is not None else SIZE.sample(self.rng, self.held_out)
                centre = self._place(size, placed)
                if centre is None:
                    break
                placed.append(self.shape(shape, colour, *centre, size))
            if len(placed) < objects or (clear and not clear_position(placed[0].x, placed[0].y)):
                continue
            position = region(placed[0].x, placed[0].y) if objects == 1 and clear_position(placed[0].x, placed[0].y) \
                else None
            level = BACKGROUND_LEVEL.sample(self.rng, self.held_out)
            background = tuple(max(0, min(255, round(level + self.rng.uniform(-8, 8)))) for _ in range(3))
            return Scene(tuple(placed), position, background, self.rng.random() < ANTIALIAS_SHARE)
        raise RuntimeError(f"could not place {objects} shapes of radius {radius} in 100 tries")

    def scene(self, objects: int = 1, shape=None, colour=None, radius=None, clear: bool = False) -> Scene:
        """
        One object in a named region (left, right, top, bottom, centre), or 2-4 objects in distinct quadrants. A
        varied world places them anywhere, apart, with sizes drawn whatever their number (or `radius`); a one-object
        scene names its region (REGIONS) when the shape is clearly in one, always with `clear=True`.
        """
        if not 1 <= objects <= 4:
            raise ValueError(f"a scene holds 1 to 4 objects, got {objects}")
        if self.varied:
            return self._varied_scene(objects, shape, colour, radius, clear)
        jitter = lambda: self.rng.uniform(-0.04, 0.04)  # noqa: E731
        if objects == 1:
            position = self.rng.choice(tuple(POSITIONS))
            x, y = POSITIONS[position]
            return Scene((self.shape(shape, colour, x + jitter(), y + jitter(), radius),), position)
        cells = self.rng.sample([(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)], objects)
        return Scene(tuple(self.shape(None, None, x + jitter(), y + jitter(), self.rng.uniform(0.12, 0.16))
                           for x, y in cells))

    def caption(self) -> dict:
        scene = self.scene(self.rng.choice((1, 1, 2, 3, 4)))
        return {"scene": scene, "caption": describe(scene) + "."}

    def vqa(self, kind: str | None = None, objects: int | None = None, radius: float | None = None) -> dict:
        """
        A question about one scene: `kind` is one of VQA_KINDS (random when None). Count questions show `objects`
        shapes (1-4 at random when None), every question shapes of `radius` when given.
        """
        kind = kind or self.rng.choice(VQA_KINDS)
        if kind == "count":
            scene = self.scene(objects or self.rng.randint(1, 4), radius=radius)
            return {"scene": scene, "kind": kind, "question": QUESTIONS[kind], "answer": NUMBERS[len(scene.objects)]}
        scene = self.scene(1, radius=radius, clear=kind == "position")
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

    def _bind(self, classes: list, words) -> dict:
        """Each class named by a distinct word of `words`, never by its own name (real words bound against meaning)."""
        words = list(words)
        if len(set(words)) < len(classes) or (len(classes) == 1 and set(words) <= set(classes)):
            raise ValueError(f"cannot name {len(classes)} classes by distinct words of {words}, none its own name")
        while True:
            names = dict(zip(classes, self.rng.sample(words, len(classes))))
            if all(name != cls for cls, name in names.items()):
                return names

    def _rounds(self, classes: list, shots: int) -> list:
        order = []
        while len(order) < shots:
            order += self.rng.sample(classes, len(classes))
        return order[:shots]

    def binding_episode(self, shots: int, words: list[str], ways: int = 2) -> dict:
        """
        `ways` shape classes, each bound to a word drawn from `words` (nonce words, or real words such as SHAPES: a
        class is never called by its own name); `shots` demonstrations in rounds (each round shows every class once,
        in a shuffled order, so any first `ways` demos show every class), then a query of one of them. The binding
        exists only in this episode.
        """
        if not 1 <= ways <= len(self.shapes):
            raise ValueError(f"ways must be 1 to {len(self.shapes)}, got {ways}")
        classes = self.rng.sample(self.shapes, ways)
        names = self._bind(classes, words)
        demos = [{"scene": self.scene(1, shape=shape), "answer": names[shape]}
                 for shape in self._rounds(classes, shots)]
        query_shape = self.rng.choice(classes)
        return {"demos": demos, "query": {"scene": self.scene(1, shape=query_shape), "answer": names[query_shape]},
                "names": names}

    # -- video ---------------------------------------------------------------------------------------------------------
    def clip(self, kind: str | None = None, direction: str | None = None) -> dict:
        """
        A clip of FRAMES scenes of one shape and a question on it (`kind` one of CLIP_KINDS, random when None): the
        shape moves `direction` (DIRECTIONS, random when None) by a quarter of the image, turns another colour from a
        random frame on, or appears (vanishes) from a random frame on. Returns {"frames", "kind", "question",
        "answer"} (the answer a direction, a colour, or "appear" / "vanish").
        """
        kind = kind or self.rng.choice(CLIP_KINDS)
        if kind not in CLIP_QUESTIONS:
            raise ValueError(f"unknown clip kind {kind!r}; expected one of {CLIP_KINDS}")
        start = self.scene(1)
        obj = start.objects[0]
        change = self.rng.randint(1, FRAMES - 1)  # the first frame that differs
        if kind == "motion":
            direction = direction or self.rng.choice(DIRECTIONS)
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
            step = 0.25 / (FRAMES - 1)
            low, high = obj.radius + 0.02, 1 - obj.radius - 0.02 - 0.25
            x = self.rng.uniform(low, high) if dx else obj.x
            y = self.rng.uniform(low, high) if dy else obj.y
            x, y = (1 - x if dx < 0 else x), (1 - y if dy < 0 else y)
            objects = [replace(obj, x=x + dx * step * i, y=y + dy * step * i) for i in range(FRAMES)]
            frames, answer = [replace(start, objects=(o,), position=None) for o in objects], direction
        elif kind == "colour change":
            answer = self.rng.choice([c for c in self.colours if c != obj.colour])
            frames = [start if i < change else replace(start, objects=(replace(obj, colour=answer),))
                      for i in range(FRAMES)]
        else:
            answer = self.rng.choice(("appear", "vanish"))
            empty = replace(start, objects=(), position=None)
            frames = [(empty if answer == "appear" else start) if i < change else
                      (start if answer == "appear" else empty) for i in range(FRAMES)]
        return {"frames": frames, "kind": kind, "question": CLIP_QUESTIONS[kind], "answer": answer}

    def motion_naming_episode(self, shots: int, words: list[str], ways: int = 2) -> dict:
        """
        In-context naming of motions: `ways` directions, each bound to a word of `words`, `shots` demonstration clips
        in rounds (as `binding_episode`), then a query clip; every turn asks MOTION_INSTRUCTION.
        """
        if not 1 <= ways <= len(DIRECTIONS):
            raise ValueError(f"ways must be 1 to {len(DIRECTIONS)}, got {ways}")
        directions = self.rng.sample(DIRECTIONS, ways)
        names = self._bind(directions, words)
        demos = [{"frames": self.clip("motion", d)["frames"], "answer": names[d]}
                 for d in self._rounds(directions, shots)]
        query = self.rng.choice(directions)
        return {"demos": demos, "query": {"frames": self.clip("motion", query)["frames"], "answer": names[query]},
                "names": names}
