"""ShapesWorld is deterministic by seed, and its answers are true of the images it renders."""

import numpy as np
import pytest

from otter.shapesworld import (
    AXES,
    CLIP_KINDS,
    COLOURS,
    DIRECTIONS,
    FRAMES,
    MOTION_INSTRUCTION,
    NUMBERS,
    REGIONS,
    RESERVED,
    SHAPES,
    VQA_KINDS,
    WORD_FORMS,
    Scene,
    Shape,
    ShapesWorld,
    nonce_words,
    position_held_out,
    region,
    render,
    video_bytes,
    word_form,
)
from otter.video import read_video


def pixels_of(image, colour):
    """How many pixels are (nearly) exactly `colour`."""
    distance = np.abs(np.asarray(image).astype(int) - np.array(COLOURS[colour])).sum(-1)
    return int((distance < 30).sum())


def test_same_seed_same_data_and_images():
    first, second = ShapesWorld(seed=7), ShapesWorld(seed=7)
    for _ in range(20):
        a, b = first.vqa(), second.vqa()
        assert a == b
        assert np.array_equal(np.asarray(render(a["scene"])), np.asarray(render(b["scene"])))
    other, again = ShapesWorld(seed=8), ShapesWorld(seed=7)
    assert [other.vqa() for _ in range(5)] != [again.vqa() for _ in range(5)]


def test_every_shape_renders_differently():
    masks = [np.asarray(render(Scene((Shape(shape, "red", 0.5, 0.5, 0.2),), "centre")))[..., 1] < 100
             for shape in SHAPES]
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            assert (masks[i] != masks[j]).sum() > 40, (SHAPES[i], SHAPES[j])


@pytest.mark.parametrize("kind", VQA_KINDS)
def test_vqa_answers_are_true_of_the_image(kind):
    world = ShapesWorld(seed=1)
    for _ in range(25):
        record = world.vqa(kind)
        image, objects = render(record["scene"]), record["scene"].objects
        if kind == "colour":
            assert pixels_of(image, record["answer"]) > 100
        elif kind == "count":
            assert record["answer"] == NUMBERS[len(objects)]
            assert sum(pixels_of(image, obj.colour) > 20 for obj in objects) >= 1
        elif kind == "position":
            obj = objects[0]
            assert record["answer"] == record["scene"].position
            mask = np.asarray(image).astype(int).std(-1) > 25
            ys, xs = np.nonzero(mask)
            expected = {"left": xs.mean() < 26, "right": xs.mean() > 38, "top": ys.mean() < 26,
                        "bottom": ys.mean() > 38, "centre": abs(xs.mean() - 32) < 6 and abs(ys.mean() - 32) < 6}
            assert expected[record["answer"]], (record["answer"], xs.mean(), ys.mean(), obj)
        elif kind == "yes/no":
            article, colour, shape = record["question"][len("Is there "):-1].split(" ")
            assert article == ("an" if colour == "orange" else "a")
            truth = (colour, shape) == (objects[0].colour, objects[0].shape)
            assert record["answer"] == ("yes" if truth else "no")
        else:
            assert record["answer"] == objects[0].shape


def test_yes_no_is_balanced_and_comparisons_name_both_shapes():
    world = ShapesWorld(seed=2)
    answers = [world.vqa("yes/no")["answer"] for _ in range(400)]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    record = world.comparison()
    first, second = (scene.objects[0].shape for scene in record["scenes"])
    assert first != second
    assert record["answer"] == f"The first one is a {first} and the second one is a {second}."


def test_binding_episodes_bind_only_inside_the_episode():
    words = nonce_words(40, seed=3)
    assert len(set(words)) == 40 and not set(words) & set(SHAPES)
    world = ShapesWorld(seed=4)
    queries = []
    for _ in range(50):
        episode = world.binding_episode(shots=4, words=words)
        names = episode["names"]
        assert len(names) == 2 and set(names.values()) <= set(words)
        for demo in episode["demos"]:
            assert demo["answer"] == names[demo["scene"].objects[0].shape]
        assert sorted(d["answer"] for d in episode["demos"]) == sorted(list(names.values()) * 2)
        assert set(d["answer"] for d in episode["demos"][:2]) == set(names.values())  # rounds: every class early
        query = episode["query"]
        assert query["answer"] == names[query["scene"].objects[0].shape]
        queries.append(query["answer"])
    assert len(set(queries)) > 10  # the words change from episode to episode


def test_held_out_nonce_words_are_never_training_words():
    train, held_out = nonce_words(2000, seed=0), nonce_words(200, seed=0, held_out=True)
    assert not set(train) & set(held_out)
    assert set(nonce_words(300, seed=9)).isdisjoint(held_out)


# -- varied scenes ---------------------------------------------------------------------------------------------------
def object_mask(image, scene):
    """The pixels far from the scene's background colour."""
    return np.abs(np.asarray(image).astype(int) - np.array(scene.background)).sum(-1) > 60


def test_varied_scenes_vary_on_every_axis_and_keep_their_split():
    values = {split: {name: [] for name in [*AXES, "position"]} for split in (False, True)}
    for held_out in (False, True):
        world = ShapesWorld(seed=11, varied=True, held_out=held_out)
        smooth = []
        for _ in range(150):
            scene = world.scene(world.rng.randint(1, 4))
            smooth.append(scene.antialias)
            level = sum(scene.background) / 3
            values[held_out]["background"].append(level)
            for obj in scene.objects:
                values[held_out]["size"].append(obj.radius)
                values[held_out]["shade"].append(obj.shade)
                values[held_out]["rotation"].append(obj.rotation)
                if obj.outline:
                    values[held_out]["outline"].append(obj.outline)
                values[held_out]["position"].append((obj.x, obj.y))
                assert obj.radius < min(obj.x, obj.y) and max(obj.x, obj.y) < 1 - obj.radius  # inside the image
            for i, a in enumerate(scene.objects):  # apart
                assert all(np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius for b in scene.objects[i + 1:])
        assert 0.5 < np.mean(smooth) < 0.9
        for name, axis in AXES.items():
            if name != "background":  # tinted: its level is kept within the tint of its band
                assert all(axis.held_out(v) == held_out for v in values[held_out][name]), name
        assert all(position_held_out(x, y) == held_out for x, y in values[held_out]["position"])
    train = values[False]
    assert np.ptp(train["size"]) > 0.09 and np.ptp(train["rotation"]) > 20 and np.ptp(train["shade"]) > 1.5
    assert np.ptp(train["background"]) > 70 and len(train["outline"]) > 50
    xs, ys = zip(*train["position"])
    assert min(xs) < 0.2 and max(xs) > 0.8 and min(ys) < 0.2 and max(ys) > 0.8  # anywhere, not at a few anchors
    # the same seed gives the same scenes, and images
    a, b = ShapesWorld(3, varied=True), ShapesWorld(3, varied=True)
    for _ in range(10):
        first, second = a.vqa(), b.vqa()
        assert first == second and render(first["scene"]).tobytes() == render(second["scene"]).tobytes()
    with pytest.raises(ValueError, match="varied=True"):
        ShapesWorld(0, held_out=True)


@pytest.mark.parametrize("held_out", [False, True])
def test_varied_vqa_answers_are_true_of_the_image(held_out):
    world = ShapesWorld(seed=12, varied=True, held_out=held_out)
    for _ in range(40):
        record = world.vqa("position")
        scene = record["scene"]
        assert record["answer"] in REGIONS and record["answer"] == scene.position
        ys, xs = np.nonzero(object_mask(render(scene), scene))
        assert region((xs.mean() + 0.5) / 64, (ys.mean() + 0.5) / 64) == record["answer"]
    for objects in (1, 2, 3, 4):
        for _ in range(10):
            record = world.vqa("count", objects=objects, radius=0.1 if objects == 1 else None)
            assert record["answer"] == NUMBERS[objects] and len(record["scene"].objects) == objects
    for _ in range(40):  # the fill is nearer its named colour than any other
        record = world.vqa("colour")
        obj = record["scene"].objects[0]
        fill = np.array(obj.rgb())
        nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - fill).sum())
        assert nearest == record["answer"] == obj.colour
        image = np.asarray(render(record["scene"])).astype(int)
        assert (np.abs(image - fill).sum(-1) < 12).sum() > 8  # drawn in its fill


def test_rotation_and_outline_change_the_image_but_keep_shapes_apart():
    base = Shape("square", "red", 0.5, 0.5, 0.2)
    images = [np.asarray(render(Scene((shape,)))) for shape in
              (base, Shape("square", "red", 0.5, 0.5, 0.2, rotation=15),
               Shape("square", "red", 0.5, 0.5, 0.2, outline=0.1), Shape("diamond", "red", 0.5, 0.5, 0.2, rotation=-15))]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert (images[i] != images[j]).any(axis=-1).sum() > 40, (i, j)
    hard = render(Scene((base,), antialias=False))
    assert len({tuple(p) for p in np.asarray(hard).reshape(-1, 3)}) == 2  # hard edges: fill and background only


def test_nonce_words_of_every_form():
    for form in WORD_FORMS:
        words = nonce_words(100, seed=5, form=form)
        held = nonce_words(50, seed=5, form=form, held_out=True)
        assert not set(words) & set(held) and all(word_form(word) == form for word in words + held)
        syllables = {sum(letter in "aeiou" for letter in word) for word in words}
        assert syllables == ({2, 3, 4} if form == "V..V" else {1, 2, 3, 4})
        assert not set(words) & RESERVED
    mixed = nonce_words(400, seed=6, form="any")
    assert {word_form(word) for word in mixed} == set(WORD_FORMS)
    assert nonce_words(400, seed=6, form="any") == mixed


@pytest.mark.parametrize("ways", [2, 5])
def test_binding_of_many_ways_and_of_real_words(ways):
    world = ShapesWorld(seed=7, varied=True)
    for _ in range(30):
        episode = world.binding_episode(shots=2 * ways, words=list(SHAPES), ways=ways)
        names = episode["names"]
        assert len(names) == ways == len(set(names.values())) and set(names.values()) <= set(SHAPES)
        assert all(name != shape for shape, name in names.items())  # real words bound against their meaning
        assert {demo["answer"] for demo in episode["demos"][:ways]} == set(names.values())
        for demo in [*episode["demos"], episode["query"]]:
            assert demo["answer"] == names[demo["scene"].objects[0].shape]
    with pytest.raises(ValueError, match="none its own name"):
        ShapesWorld(seed=7, shapes=("circle",)).binding_episode(shots=2, words=["circle"], ways=1)


def centroid(image, scene):
    ys, xs = np.nonzero(object_mask(image, scene))
    return xs.mean(), ys.mean()


@pytest.mark.parametrize("kind", CLIP_KINDS)
def test_clips_show_what_their_answers_say(kind):
    world = ShapesWorld(seed=8, varied=True)
    answers = set()
    for _ in range(20):
        clip = world.clip(kind)
        frames = clip["frames"]
        assert len(frames) == FRAMES and clip["kind"] == kind
        images = [render(scene) for scene in frames]
        answers.add(clip["answer"])
        if kind == "motion":
            (x0, y0), (x1, y1) = centroid(images[0], frames[0]), centroid(images[-1], frames[0])
            dx, dy = x1 - x0, y1 - y0
            moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert moved == clip["answer"] and max(abs(dx), abs(dy)) > 12
        elif kind == "colour change":
            first, last = frames[0].objects[0], frames[-1].objects[0]
            assert last.colour == clip["answer"] != first.colour and (last.x, last.y) == (first.x, first.y)
        else:
            shown = [object_mask(image, frames[0]).sum() > 20 for image in images]
            assert shown[0] != shown[-1] and clip["answer"] == ("appear" if shown[-1] else "vanish")
    assert answers == set({"motion": DIRECTIONS, "appear or vanish": ("appear", "vanish")}.get(kind, answers))


def test_video_bytes_decode_to_the_clips_frames(tmp_path):
    clip = ShapesWorld(seed=9, varied=True).clip("colour change")
    images = [render(scene) for scene in clip["frames"]]
    path = tmp_path / "clip.mp4"
    path.write_bytes(video_bytes(images))
    decoded = read_video(path, num_frames=None)
    assert len(decoded) == FRAMES
    for frame, image in zip(decoded, images):
        assert np.abs(np.asarray(frame).astype(int) - np.asarray(image).astype(int)).mean() < 4


def test_motion_naming_binds_directions_inside_the_episode():
    world = ShapesWorld(seed=10, varied=True)
    words = nonce_words(50, seed=10, form="any")
    for _ in range(10):
        episode = world.motion_naming_episode(shots=4, words=words, ways=2)
        names = episode["names"]
        assert set(names) <= set(DIRECTIONS) and set(names.values()) <= set(words)
        for demo in [*episode["demos"], episode["query"]]:
            frames = demo["frames"]
            (x0, y0), (x1, y1) = (centroid(render(frames[i]), frames[0]) for i in (0, -1))
            moved = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
            assert demo["answer"] == names[moved]
    assert MOTION_INSTRUCTION.endswith("?")
