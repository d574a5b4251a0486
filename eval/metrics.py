"""
The official metrics and OpenFlamingo's post-processing: VQA accuracy (VQAEval's normalisation, reimplemented and
proven equal on edge cases), OK-VQA's stemming, exact match (video QA), CIDEr (pycocoevalcap), ROC AUC (scikit-learn).
"""

import re
from collections.abc import Sequence

# -- VQA accuracy: the official VQAEval (VQA API, as vendored in OpenFlamingo's eval/vqa_metric.py) ------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern, typo included: "(?!<=\d)" is a lookahead that never fails before a ".", so this removes every
# period not followed by a digit ("3.5" keeps its period, "yes." loses it).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official code calls PERIOD_STRIP.sub("", text, re.UNICODE): re.UNICODE (32) lands in `count`, so at most 32
# periods are removed. Kept, so that our accuracies are the official ones to the last digit.
PERIOD_STRIP_COUNT = int(re.UNICODE)


def normalize_vqa_answer(answer: str) -> str:
    """VQAEval's answer normalisation: whitespace, punctuation, number words to digits, articles, contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    # punctuation next to a space, or anywhere in an answer holding a digit-comma-digit ("1,000"), is deleted;
    # elsewhere it becomes a space ("black/white" -> "black white")
    delete = COMMA_STRIP.search(answer) is not None
    text = answer
    for mark in PUNCTUATION:
        text = text.replace(mark, "" if delete or mark + " " in answer or " " + mark in answer else " ")
    text = PERIOD_STRIP.sub("", text, count=PERIOD_STRIP_COUNT)
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[dict]) -> float:
    """
    The VQA accuracy of one prediction, in [0, 1]: for each annotator's answer record, min(1, matches / 3) over the
    *other* records, averaged. `answers` are the question's answer records as the annotation file holds them (dicts
    with an "answer", and usually an "answer_id"): as in the official code, "other" means every record that differs
    from the held-out one as a whole record, after normalisation.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer record, got none")
    prediction = normalize_vqa_answer(prediction)
    records = [{**record, "answer": normalize_vqa_answer(record["answer"])} for record in answers]
    per_annotator = []
    for held_out in records:
        matches = sum(1 for other in records if other != held_out and other["answer"] == prediction)
        per_annotator.append(min(1, float(matches) / 3))
    return float(sum(per_annotator)) / len(per_annotator)


def overall_vqa_accuracy(accuracies: Sequence[float]) -> float:
    """VQAEval's overall accuracy: a percentage rounded to 2 decimals, computed as the official code does."""
    if not accuracies:
        raise ValueError("overall_vqa_accuracy needs at least one per-question accuracy")
    return round(100 * float(sum(accuracies)) / len(accuracies), 2)


# -- OpenFlamingo's post-processing of generated text ----------------------------------------------------------------
def postprocess_vqa(text: str) -> str:
    """The answer ends where the model starts a new question, and at the first ", "."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]


def postprocess_caption(text: str) -> str:
    """The caption ends where the model starts a new "Output"; double quotes are removed."""
    return text.split("Output", 1)[0].replace('"', "")


# OK-VQA v1.1's answers are stemmed; predictions are stemmed the same way (OpenFlamingo's eval/ok_vqa_utils.py).
# Words the automatic rules get wrong, found in OK-VQA's raw_answers -> answers:
OK_VQA_MANUAL_STEMS = {
    'police': 'police', 'las': 'las', 'vegas': 'vegas', 'yes': 'yes', 'jeans': 'jean', "hell's": 'hell',
    "domino's": 'domino', 'morning': 'morn', 'clothes': 'cloth', 'are': 'are', 'riding': 'ride', 'leaves': 'leaf',
    'dangerous': 'danger', 'clothing': 'cloth', 'texting': 'text', 'kiting': 'kite', 'firefighters': 'firefight',
    'ties': 'tie', 'married': 'married', 'teething': 'teeth', 'gloves': 'glove', 'tennis': 'tennis',
    'dining': 'dine', 'directions': 'direct', 'waves': 'wave', 'christmas': 'christmas', 'drives': 'drive',
    'pudding': 'pud', 'coding': 'code', 'plating': 'plate', 'quantas': 'quanta', 'hornes': 'horn', 'graves': 'grave',
    'mating': 'mate', 'paned': 'pane', 'alertness': 'alert', 'sunbathing': 'sunbath', 'tenning': 'ten',
    'wetness': 'wet', 'urinating': 'urine', 'sickness': 'sick', 'braves': 'brave', 'firefighting': 'firefight',
    'lenses': 'lens', 'reflections': 'reflect', 'backpackers': 'backpack', 'eatting': 'eat', 'designers': 'design',
    'curiousity': 'curious', 'playfulness': 'play', 'blindness': 'blind', 'hawke': 'hawk', 'tomatoe': 'tomato',
    'rodeoing': 'rodeo', 'brightness': 'bright', 'circuses': 'circus', 'skateboarders': 'skateboard',
    'staring': 'stare', 'electronics': 'electron', 'electicity': 'elect', 'mountainous': 'mountain',
    'socializing': 'social', 'hamburgers': 'hamburg', 'caves': 'cave', 'transitions': 'transit', 'wading': 'wade',
    'creame': 'cream', 'toileting': 'toilet', 'sautee': 'saute', 'buildings': 'build', 'belongings': 'belong',
    'stockings': 'stock', 'walle': 'wall', 'cumulis': 'cumuli', 'travelers': 'travel', 'conducter': 'conduct',
    'browsing': 'brows', 'pooping': 'poop', 'haircutting': 'haircut', 'toppings': 'top', 'hearding': 'heard',
    'sunblocker': 'sunblock', 'bases': 'base', 'markings': 'mark', 'mopeds': 'mope',
    'kindergartener': 'kindergarten', 'pies': 'pie', 'scrapbooking': 'scrapbook', 'couponing': 'coupon',
    'meetings': 'meet', 'elevators': 'elev', 'lowes': 'low', "men's": 'men', 'childrens': 'children',
    'shelves': 'shelve', 'paintings': 'paint', 'raines': 'rain', 'paring': 'pare', 'expressions': 'express',
    'routes': 'rout', 'pease': 'peas', 'vastness': 'vast', 'awning': 'awn', "boy's": 'boy', 'drunkenness': 'drunken',
    'teasing': 'teas', 'conferences': 'confer', 'ripeness': 'ripe', 'suspenders': 'suspend', 'earnings': 'earn',
    'reporters': 'report', "kid's": 'kid', 'containers': 'contain', 'corgie': 'corgi', 'porche': 'porch',
    'microwaves': 'microwave', "batter's": 'batter', 'sadness': 'sad', 'apartments': 'apart', 'oxygenize': 'oxygen',
    'striping': 'stripe', 'purring': 'pure', 'professionals': 'profession', 'piping': 'pipe', "farmer's": 'farmer',
    'potatoe': 'potato', 'emirates': 'emir', 'womens': 'women', "veteran's": 'veteran', 'wilderness': 'wilder',
    'propellers': 'propel', 'alpes': 'alp', 'charioteering': 'chariot', 'swining': 'swine', 'illness': 'ill',
    'crepte': 'crept', 'adhesives': 'adhesive', "regent's": 'regent', 'decorations': 'decor', 'rabbies': 'rabbi',
    'overseas': 'oversea', 'travellers': 'travel', 'casings': 'case', 'smugness': 'smug', 'doves': 'dove',
    'nationals': 'nation', 'mustange': 'mustang', 'ringe': 'ring', 'gondoliere': 'gondolier',
    'vacationing': 'vacate', 'reminders': 'remind', 'baldness': 'bald', 'settings': 'set', 'glaced': 'glace',
    'coniferous': 'conifer', 'revelations': 'revel', 'personals': 'person', "daughter's": 'daughter',
    'badness': 'bad', 'projections': 'project', 'polarizing': 'polar', 'vandalizers': 'vandal', 'minerals': 'miner',
    'protesters': 'protest', 'controllers': 'control', 'weddings': 'wed', 'sometimes': 'sometime', 'earing': 'ear',
}
NLTK_RESOURCES = {
    "tokenizers/punkt_tab": "punkt_tab",
    "taggers/averaged_perceptron_tagger_eng": "averaged_perceptron_tagger_eng",
    "corpora/wordnet": "wordnet",
}
_ok_vqa_lemmatizer = None


def _require_nltk_data() -> None:
    import nltk

    missing = []
    for path, package in NLTK_RESOURCES.items():
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(package)
    if missing:
        raise RuntimeError(
            f"OK-VQA's answer stemming needs the NLTK data packages {missing}, which are not installed; "
            f"run: python -m nltk.downloader {' '.join(missing)}"
        )


def stem_ok_vqa(text: str) -> str:
    """OK-VQA v1.1's stemming: manual table, then -ing verbs lemmatised (WordNet), plural nouns singularised."""
    global _ok_vqa_lemmatizer
    import inflection
    import nltk

    if _ok_vqa_lemmatizer is None:
        _require_nltk_data()
        _ok_vqa_lemmatizer = nltk.stem.WordNetLemmatizer()
    words = []
    for word, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text)):
        if word in OK_VQA_MANUAL_STEMS:
            word = OK_VQA_MANUAL_STEMS[word]
        elif word.endswith("ing"):
            word = _ok_vqa_lemmatizer.lemmatize(word, nltk.corpus.reader.VERB)
        elif tag.startswith("NNS") or tag.startswith("NNPS"):
            word = inflection.singularize(word)
        words.append(word)
    return " ".join(words)


def postprocess_ok_vqa(text: str) -> str:
    return stem_ok_vqa(postprocess_vqa(text))


# -- exact match: MSVD-QA, MSRVTT-QA (and ShapesWorld) ------------------------------------------------------------
def normalise_exact(text: str) -> str:
    """What exact-match accuracy compares: the text without surrounding whitespace, lower-cased."""
    return text.strip().lower()


def exact_match(prediction: str, answer: str) -> bool:
    """
    Whether a prediction is right by exact match: equal to the ground-truth answer once both are lower-cased and
    stripped (`normalise_exact`), nothing more. MSVD-QA's and MSRVTT-QA's accuracy (Xu et al., 2017, and the
    evaluations that report them since) is the percentage of questions answered so: their answers are single words,
    and a plural, an article or a trailing period is wrong.
    """
    return normalise_exact(prediction) == normalise_exact(answer)


# -- captioning, classification ----------------------------------------------------------------------------------------
def cider(predictions: dict, references: dict) -> tuple[float, dict]:
    """
    CIDEr-D as pycocoevalcap's COCOEvalCap computes it (PTB tokenisation, then `Cider`), x100 as papers report it.
    `predictions` {image_id: caption}, `references` {image_id: [captions]} for at least those ids. The document
    frequencies come from the evaluated images' references, so the score depends on which images are evaluated.
    Returns the corpus score and {image_id: per-image score}. Needs Java (the PTB tokenizer is Stanford CoreNLP's).
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not predictions:
        raise ValueError("cider needs at least one prediction")
    missing = [image_id for image_id in predictions if not references.get(image_id)]
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:5]}")
    tokenizer = PTBTokenizer()
    ground_truth = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    results = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    score, per_image = Cider().compute_score(ground_truth, results)
    return 100 * float(score), {i: 100 * float(s) for i, s in zip(ground_truth, per_image)}


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """scikit-learn's ROC AUC, x100; `labels` in {0, 1}, `scores` the probability of 1."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels)) != 2:
        raise ValueError(f"ROC AUC needs both labels 0 and 1 among the evaluated samples, got {sorted(set(labels))}")
    return 100 * float(roc_auc_score(labels, scores))


__all__ = [
    "normalize_vqa_answer", "vqa_accuracy", "overall_vqa_accuracy", "postprocess_vqa", "postprocess_caption",
    "postprocess_ok_vqa", "stem_ok_vqa", "normalise_exact", "exact_match", "cider", "roc_auc",
]
