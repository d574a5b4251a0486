import pytest

from otter.prompts import (
    CAPTION, CLASSIFICATION, HATEFUL_MEMES, OTTER_CHAT, VQA, PromptTemplate, few_shot_prompt, with_images,
)


def test_openflamingo_templates():
    assert VQA.demo(question="What?", answer="cat") == "<image>Question:What? Short answer:cat<|endofchunk|>"
    assert VQA.query(question="What?") == "<image>Question:What? Short answer:"
    assert CAPTION.demo(caption="A dog.") == "<image>Output:A dog.<|endofchunk|>"
    assert CAPTION.query() == "<image>Output:"
    assert CLASSIFICATION.demo(label="goldfish") == "<image>Output:goldfish<|endofchunk|>"
    assert HATEFUL_MEMES.demo(ocr="hi", answer="no") == (
        "<image>is an image with: 'hi' written on it. Is it hateful? Answer:no<|endofchunk|>")


def test_otter_chat_template():
    assert OTTER_CHAT.demo(instruction="What is this?", answer="A cat.") == (
        "<image>User: What is this? GPT:<answer> A cat.<|endofchunk|>")
    assert OTTER_CHAT.query(instruction="What is this?") == "<image>User: What is this? GPT:<answer>"
    assert OTTER_CHAT.answer_lead == " " and VQA.answer_lead == CLASSIFICATION.answer_lead == ""


def test_few_shot_prompt():
    demos = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    assert few_shot_prompt(VQA, demos, {"question": "q3"}) == (
        "<image>Question:q1 Short answer:a1<|endofchunk|>\n"
        "<image>Question:q2 Short answer:a2<|endofchunk|>\n"
        "<image>Question:q3 Short answer:")
    # OpenFlamingo's zero-shot protocol: text-only demos, only the query keeps its image
    assert few_shot_prompt(VQA, demos, {"question": "q3"}, text_only_demos=True) == (
        "Question:q1 Short answer:a1<|endofchunk|>\nQuestion:q2 Short answer:a2<|endofchunk|>\n"
        "<image>Question:q3 Short answer:")
    memes = few_shot_prompt(HATEFUL_MEMES, [{"ocr": "x", "answer": "yes"}], {"ocr": "y"})
    assert memes == ("<image>is an image with: 'x' written on it. Is it hateful? Answer:yes<|endofchunk|>"
                     "<image>is an image with: 'y' written on it. Is it hateful? Answer:")


def test_template_without_its_answer_field():
    with pytest.raises(ValueError, match="has no {answer} field"):
        PromptTemplate("<image>Output:{caption}", "answer").query(caption="x")


def test_with_images_labels_each_image_of_a_turn():
    query = OTTER_CHAT.query(instruction="What are the two shapes?")
    assert with_images(query, 1) == query
    assert with_images(query, 0) == "User: What are the two shapes? GPT:<answer>"
    assert with_images(query, 3) == (
        "<image>Image 1. <image>Image 2. <image>Image 3. User: What are the two shapes? GPT:<answer>")
    with pytest.raises(ValueError, match="must start with <image>"):
        with_images("User: hi", 2)
    with pytest.raises(ValueError, match="0 or more images, got -1"):
        with_images(query, -1)
