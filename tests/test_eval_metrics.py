"""The metrics equal the official implementations (OpenFlamingo 2.0.1's vendored VQAEval, pycocoevalcap's COCOEvalCap,
scikit-learn) on fixtures of edge cases; post-processing and prompts equal OpenFlamingo's."""

import json

import pytest

from otter.eval import TASKS, Example, build_prompt
from otter.eval.imagenet_classnames import IMAGENET_CLASSNAMES
from otter.eval.metrics import (
    cider,
    normalize_vqa_answer,
    overall_vqa_accuracy,
    postprocess_caption,
    postprocess_ok_vqa,
    postprocess_vqa,
    vqa_accuracy,
)
from otter.eval.tasks import score_roc_auc


def records(words, with_ids=True):
    return [{"answer": w, "answer_confidence": "yes", **({"answer_id": i + 1} if with_ids else {})}
            for i, w in enumerate(words)]


# (prediction, the ten annotators' answers): VQAEval's normalisation edge cases
VQA_CASES = [
    ("Two", ["2"] * 4 + ["two"] * 3 + ["pair"] * 3),  # number words -> digits, case
    ("two.", ["2"] * 2 + ["3"] * 8),  # trailing period
    ("a pair", ["pair"] * 5 + ["the pair"] * 5),  # articles
    ("1,000", ["1000"] * 4 + ["1,000"] * 2 + ["thousand"] * 4),  # digit-comma-digit deletes all punctuation
    ("3.5", ["3.5"] * 3 + ["35"] * 3 + ["3 5"] * 4),  # a period before a digit stays
    ("black/white", ["black white"] * 3 + ["black and white"] * 7),  # "/" becomes a space
    ("x - ray", ["x ray"] * 2 + ["xray"] * 8),  # punctuation beside a space is deleted
    ("dont know", ["don't know"] * 6 + ["dont know"] * 4),  # contractions
    ("Im here", ["i'm here"] * 5 + ["im here"] * 5),  # capitalised table keys never match after lowercasing
    ("yes\n", ["yes"] * 9 + ["no"]),  # whitespace
    ("  none\t", ["0"] * 4 + ["none"] * 6),  # "none" is a number word
    ("the the red!", ["red"] * 10),
    ("u.s.a.", ["usa"] * 5 + ["u.s.a."] * 5),
    ("red , blue", ["red blue"] * 10),
    ("#1 (one)", ["#1 1"] * 3 + ["1"] * 7),
    ("e.g. " + "." * 40 + " x", ["eg x"] * 10),  # more than 32 periods: the official code removes 32 only
    ("", ["yes"] * 10),
    ("eleven", ["11"] * 5 + ["eleven"] * 5),
    ("it's 5:30", ["it's 5:30"] * 3 + ["530"] * 7),
    ("Yes", ["yes"] * 1 + ["no"] * 9),
]


def official_vqa(tmp_path, cases, with_ids=True):
    """OpenFlamingo's vendored VQA API on files written like the real ones: per-question and overall accuracy."""
    vqa_metric = pytest.importorskip("open_flamingo.eval.vqa_metric")
    header = {"info": {}, "license": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014"}
    questions = [{"question_id": i, "image_id": i, "question": "q"} for i in range(len(cases))]
    annotations = [{"question_id": i, "image_id": i, "question_type": "what", "answer_type": "other",
                    "answers": records(answers, with_ids)} for i, (_, answers) in enumerate(cases)]
    results = [{"question_id": i, "answer": prediction} for i, (prediction, _) in enumerate(cases)]
    for name, content in (("q.json", {**header, "questions": questions}), ("a.json", {**header, "annotations": annotations}),
                          ("r.json", results)):
        (tmp_path / name).write_text(json.dumps(content))
    vqa = vqa_metric.VQA(str(tmp_path / "a.json"), str(tmp_path / "q.json"))
    result = vqa.loadRes(str(tmp_path / "r.json"), str(tmp_path / "q.json"))
    evaluation = vqa_metric.VQAEval(vqa, result, n=2)
    evaluation.evaluate()
    return evaluation.evalQA, evaluation.accuracy["overall"]


def test_vqa_accuracy_equals_official_vqaeval(tmp_path):
    per_question, overall = official_vqa(tmp_path, VQA_CASES)
    ours = [vqa_accuracy(prediction, records(answers)) for prediction, answers in VQA_CASES]
    assert [round(100 * accuracy, 2) for accuracy in ours] == [per_question[i] for i in range(len(VQA_CASES))]
    assert overall_vqa_accuracy(ours) == overall
    assert 0 < overall < 100 and len(set(ours)) > 3, "the fixture must exercise hits, partial hits and misses"


def test_vqa_accuracy_compares_whole_answer_records_as_the_official_code(tmp_path):
    # without answer ids, identical records are all "the held-out annotator": the official quirk, kept
    cases = [("yes", ["yes"] * 3 + ["no"] * 7), ("no", ["yes"] * 3 + ["no"] * 7)]
    per_question, overall = official_vqa(tmp_path, cases, with_ids=False)
    ours = [vqa_accuracy(prediction, records(answers, with_ids=False)) for prediction, answers in cases]
    assert [round(100 * accuracy, 2) for accuracy in ours] == [per_question[0], per_question[1]]
    assert overall_vqa_accuracy(ours) == overall
    # a held-out "yes" removes all three: (3 * 0 + 7 * 1) / 10; with answer ids, (3 * 2/3 + 7 * 1) / 10
    assert ours[0] == pytest.approx(0.7)
    assert vqa_accuracy("yes", records(["yes"] * 3 + ["no"] * 7)) == pytest.approx(0.9)


def test_vqa_normalisation_examples():
    assert normalize_vqa_answer("The 1,000 dogs.") == "1000 dogs"
    assert normalize_vqa_answer("black/white") == "black white"
    assert normalize_vqa_answer("Two!") == "2"
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


GENERATIONS = [" yes", "blue Question: what", "a red car, a blue car", "two Short answer: three", "Answer: no",
               " a dog on a \"red\" couch Output: a cat", "plain", "", "one, two, three Question"]


def test_postprocessing_equals_openflamingo():
    vqa_metric = pytest.importorskip("open_flamingo.eval.vqa_metric")
    coco_metric = pytest.importorskip("open_flamingo.eval.coco_metric")
    for text in GENERATIONS:
        assert postprocess_vqa(text) == vqa_metric.postprocess_vqa_generation(text)
        assert postprocess_caption(text) == coco_metric.postprocess_captioning_generation(text).replace('"', "")


def nltk_data_installed() -> bool:
    nltk = pytest.importorskip("nltk")
    for resource in ("tokenizers/punkt_tab", "taggers/averaged_perceptron_tagger_eng", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
        except LookupError:
            return False
    return True


def test_ok_vqa_stemming_equals_openflamingo():
    if not nltk_data_installed():
        pytest.skip("OK-VQA stemming needs NLTK data (punkt_tab, averaged_perceptron_tagger_eng, wordnet)")
    ok_vqa_utils = pytest.importorskip("open_flamingo.eval.ok_vqa_utils")
    for text in GENERATIONS + ["riding horses", "the leaves are falling", "jeans and gloves", "christmas trees"]:
        assert postprocess_ok_vqa(text) == ok_vqa_utils.postprocess_ok_vqa_generation(text)


def test_ok_vqa_stemming_rules_are_openflamingos_with_stand_in_nltk_models(monkeypatch):
    """The rules (manual table, -ing verbs, plural nouns) compared with NLTK's models replaced by simple stand-ins."""
    nltk = pytest.importorskip("nltk")
    ok_vqa_utils = pytest.importorskip("open_flamingo.eval.ok_vqa_utils")
    from otter.eval import metrics

    class StandInLemmatizer:
        def lemmatize(self, word, pos):
            return word[: -len("ing")] if pos == nltk.corpus.reader.VERB else word

    monkeypatch.setattr(nltk.tokenize, "word_tokenize", lambda text: text.replace(",", " ,").split())
    monkeypatch.setattr(nltk, "pos_tag", lambda words: [(w, "NNS" if w.endswith("s") else "NN") for w in words])
    monkeypatch.setattr(ok_vqa_utils.stemmer, "_wordnet_lemmatizer", StandInLemmatizer())
    monkeypatch.setattr(metrics, "_ok_vqa_lemmatizer", StandInLemmatizer())
    texts = GENERATIONS + ["riding horses", "the leaves are falling", "jeans and gloves, christmas trees",
                           "dancing dogs Question: why", "buses and boxes"]
    for text in texts:
        assert postprocess_ok_vqa(text) == ok_vqa_utils.postprocess_ok_vqa_generation(text)
    assert postprocess_ok_vqa("riding horses") == "ride horse"  # manual table, then a plural


def test_ok_vqa_stemming_without_nltk_data_says_what_to_install():
    if nltk_data_installed():
        pytest.skip("NLTK data is installed")
    with pytest.raises(RuntimeError, match="python -m nltk.downloader"):
        postprocess_ok_vqa("riding horses")


PREDICTED_CAPTIONS = {
    1: "a red circle on a white background",
    2: "A GREEN square.",
    3: "two dots",
    4: "a yellow star above the line, and a line",
    5: "\"quoted\" text here!",
    6: "an orange and grey picture",
}
REFERENCE_CAPTIONS = {
    1: ["A red circle on a white background.", "a red round shape", "red circle", "a circle", "the red dot"],
    2: ["a green square", "A green box.", "green square on white", "a square", "the green shape"],
    3: ["Two blue dots, side by side", "two dots", "blue dots", "a pair of dots", "two circles"],
    4: ["a yellow star above the line", "a star", "yellow star", "a star over a line", "the yellow star"],
    5: ["A purple shape.", "purple", "a shape", "a purple square", "the purple thing"],
    6: ["an orange and grey picture", "orange and grey", "a picture", "grey and orange", "two colours"],
}


def test_cider_equals_pycocoevalcap_cocoevalcap(tmp_path, monkeypatch):
    pycocoevalcap_eval = pytest.importorskip("pycocoevalcap.eval")
    coco = pytest.importorskip("pycocotools.coco")

    class Skipped:  # METEOR (a slow JVM start) and SPICE (which downloads CoreNLP) are not what is compared
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "skipped"

    for scorer in ("Meteor", "Spice"):
        monkeypatch.setattr(pycocoevalcap_eval, scorer, lambda *args, **kwargs: Skipped())
    annotations = {"images": [{"id": i} for i in REFERENCE_CAPTIONS], "type": "captions", "info": {}, "licenses": [],
                   "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                                   for i, refs in REFERENCE_CAPTIONS.items() for k, c in enumerate(refs)]}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in PREDICTED_CAPTIONS.items()]))
    ground_truth = coco.COCO(str(tmp_path / "annotations.json"))
    results = ground_truth.loadRes(str(tmp_path / "results.json"))
    official = pycocoevalcap_eval.COCOEvalCap(ground_truth, results)
    official.params["image_id"] = results.getImgIds()  # as OpenFlamingo's compute_cider
    official.evaluate()

    score, per_image = cider(PREDICTED_CAPTIONS, REFERENCE_CAPTIONS)
    assert score == 100 * official.eval["CIDEr"]
    assert per_image == {i: 100 * official.imgToEval[i]["CIDEr"] for i in PREDICTED_CAPTIONS}
    assert 0 < score and len(set(per_image.values())) == len(per_image)
    with pytest.raises(ValueError, match="no reference captions"):
        cider({99: "a caption"}, REFERENCE_CAPTIONS)


def test_hateful_memes_roc_auc_equals_scikit_learn_and_openflamingos_scoring():
    torch = pytest.importorskip("torch")
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    of_utils = pytest.importorskip("open_flamingo.eval.utils")
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5], [-0.7, -0.9], [-2.2, -2.1], [-1.5, -1.2], [-0.2, -3.0]])
    labels = [0, 1, 1, 0, 1, 0]
    # ours: records keep both classes' mean log-probs
    examples = [Example(id=i, image=None, fields={}, target=label) for i, label in enumerate(labels)]
    records = [{"top": [["no", row[0]], ["yes", row[1]]]} for row in logprobs.tolist()]
    ours, per_sample = score_roc_auc(examples, records)
    # OpenFlamingo: P(top-1 class) by softmax, "yes" scores it, "no" scores 1 - it (evaluate_classification)
    names, top = of_utils.get_predicted_classnames(logprobs, 1, {0: "no", 1: "yes"})
    scores = []
    for i, (name,) in enumerate(names):
        p = torch.exp(top[i][0] - torch.logsumexp(logprobs[i], dim=0)).item()
        scores.append(p if name == "yes" else 1 - p)
    assert ours == 100 * sklearn_metrics.roc_auc_score(labels, scores)
    assert [s["probability"] for s in per_sample] == pytest.approx(scores, abs=1e-6)
    assert ours == 100 * sklearn_metrics.roc_auc_score(labels, [s["probability"] for s in per_sample])


def test_imagenet_class_names_are_openflamingos():
    classification_utils = pytest.importorskip("open_flamingo.eval.classification_utils")
    assert list(IMAGENET_CLASSNAMES) == classification_utils.IMAGENET_CLASSNAMES


def example(**fields):
    return Example(id=0, image=f"{fields}.jpg", fields=fields, target=None)


def test_prompts_are_openflamingos():
    """The strings OpenFlamingo 2.0.1's evaluate.py builds, with its EvalModel prompt functions."""
    vqa_demos = [example(question="q1", answer="a1"), example(question="q2", answer="a2")]
    text, images = build_prompt(TASKS["vqav2"], example(question="q3", answer="a3"), vqa_demos, shots=2)
    assert text == ("<image>Question:q1 Short answer:a1<|endofchunk|>\n<image>Question:q2 Short answer:a2<|endofchunk|>\n"
                    "<image>Question:q3 Short answer:")
    assert len(images) == 3 and images[-1] == example(question="q3", answer="a3").image
    text, images = build_prompt(TASKS["vqav2"], example(question="q3", answer="a3"), vqa_demos, shots=0)
    assert text == "Question:q1 Short answer:a1<|endofchunk|>\nQuestion:q2 Short answer:a2<|endofchunk|>\n<image>Question:q3 Short answer:"
    assert len(images) == 1  # zero-shot: text-only demos, the query's image only
    text, _ = build_prompt(TASKS["coco"], example(caption="c3"), [example(caption="c1")], shots=1)
    assert text == "<image>Output:c1<|endofchunk|>\n<image>Output:"
    text, _ = build_prompt(TASKS["imagenet"], example(label="cat"), [example(label="tench"), example(label="dog")], shots=2)
    assert text == "<image>Output:tench<|endofchunk|><image>Output:dog<|endofchunk|><image>Output:"
    text, _ = build_prompt(TASKS["hateful_memes"], example(ocr="hi", answer="no"), [example(ocr="yo", answer="yes")], shots=1)
    assert text == ("<image>is an image with: 'yo' written on it. Is it hateful? Answer:yes<|endofchunk|>"
                    "<image>is an image with: 'hi' written on it. Is it hateful? Answer:")
