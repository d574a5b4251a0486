"""ShapesWorld is deterministic by seed, and its answers are true of the images it renders."""

import numpy as np
import pytest

from otter.shapesworld import COLOURS, NUMBERS, SHAPES, VQA_KINDS, Scene, Shape, ShapesWorld, nonce_words, render


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
