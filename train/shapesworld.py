"""
Reproduces the Otter model the package ships, from nothing, with the project's own code, on a CPU:

    otter train shapesworld --out runs/shapesworld

1. `text/`, `data/`: ShapesWorld (`otter.shapesworld`) written as the formats users train on: a text corpus, and
   webdataset shards of MMC4-style interleaved documents and LAION-style pairs and a MIMIC-IT instruction set.
2. `clip/`: a tiny open_clip CLIP trained contrastively on captioned images (open_clip's model and `ClipLoss`), then
   converted with `otter convert open-clip` (`vision/`).
3. `tokenizer/`, `lm/`: a byte-level BPE tokenizer trained with `tokenizers` on the text, and a tiny MPT pretrained
   on the text corpus (scenes described in words, questions, answers, comparisons, nonce-word episodes).
   CLIP and `data/` are made in a second process while this one makes the text and the language model.
4. `pretrain/`: the perceiver and gated cross-attention trained on the web shards with both backbones frozen
   (`otter train pretrain`).
   The varied recipe then runs `comparisons/` and `skills/`: instruction tuning on comparison episodes alone
   (`comparison_steps`), then on position and motion questions alone (`skill_steps`).
5. `finetune/`: instruction tuning of the whole model but CLIP on the MIMIC-IT set (`otter train finetune --full
   --freeze-vision`).
6. `model/`: the result rounded to fp16, in float32 safetensors, with its model card (what the package ships as
   `otter.SHAPESWORLD_MODEL`).
7. `eval_data/`, `eval/`: `otter eval` on held-out ShapesWorld sets (`results.md`).

Each stage writes its folder and leaves `<stage>.done.json`; started again on the same folder, the run skips the
finished stages, so an interrupted run continues. `timings.json` gives each stage's wall time and the run's.
"""

import base64
import functools
import io
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from otter.language_models import max_positions
from otter.model_card import CODE_LICENSE, model_card
from otter.shapesworld import (
    BINDING_INSTRUCTION,
    FRAMES,
    MOTION_INSTRUCTION,
    SHAPES,
    SIZE,
    VQA_KINDS,
    WORD_FORMS,
    ShapesWorld,
    describe,
    describe_clip,
    nonce_words,
    render,
)

logger = logging.getLogger(__name__)

CAPTION_INSTRUCTION = "Describe the image."
CLIP_NAME = "shapesworld-vit"
# The varied world's CLIP learns from one-shape images 85% of the time. On captions of 1-4 shapes, 600 steps left it
# unable to tell shapes apart under variation (an attention probe on its frozen patch tokens: shape 26%, region 24%
# on held-out images; zero-shot shape retrieval 24.5%); with one-shape images 85% of the time: 50%, 81% and 57%.
# Neither batches of captions made distinct (46%, 80%, 43%) nor a quarter of each batch in groups of 4 images that
# differ only in their shape (47%, 86%, 44.5%) did better.
# What it needs is steps: on 24 000 images, zero-shot shape retrieval was 62.5% after 500 steps of a 2000-step run,
# 86% after 1000, 92% after 1500.
CLIP_ONE_SHAPE_SHARE = 0.85


@dataclass
class Recipe:
    """Every size, step count and learning rate of the reproduction; `scale` multiplies the step and data counts."""

    seed: int = 0
    scale: float = 1.0
    # data
    training_words: int = 2000
    clip_images: int = 24_000
    lm_documents: int = 12_000
    web_samples: int = 48_000
    web_shards: int = 4
    instruction_examples: int = 38_400  # one pass of finetuning: no episode is seen twice
    eval_count: int = 200
    # CLIP: ViT 4 x 128 on 64 px, patch 8
    clip_steps: int = 1000
    clip_batch: int = 256
    clip_lr: float = 1e-3
    clip_patch_loss: bool = False  # a second contrastive term on the mean of CLIP's patch tokens (see train_clip)
    # tokenizer and LM: MPT 4 x 192
    vocab_size: int = 512
    lm_width: int = 192
    lm_layers: int = 4
    lm_heads: int = 6
    lm_steps: int = 480
    lm_batch: int = 32
    lm_sequence: int = 256
    lm_lr: float = 2e-3
    # Otter
    cross_attn_every_n_layers: int = 1
    gate_init: float = 1.0  # tanh gates start open (see `assemble`)
    pretrain_steps: int = 3000
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    finetune_steps: int = 2400
    comparison_steps: int = 0  # instruction tuning on comparison episodes alone, before the mixture (`comparisons`)
    skill_steps: int = 0  # then on position and motion questions alone, before the mixture (`skills`)
    finetune_batch: int = 16
    finetune_lr: float = 5e-4
    # the world: `varied` draws ShapesWorld's varied scenes (every axis of variation, held-out bands kept for the
    # evaluation), binding of 2-5 ways named by words of every form, and video episodes; off, the shipped model's
    varied: bool = False
    video_share: float = 0.15  # varied: the share of instruction episodes (and text documents) that show clips
    real_word_share: float = 0.15  # varied: the share of binding episodes whose names are shape names, misapplied
    precision: str = "fp32"  # of pretraining and finetuning ("bf16": autocast, faster on CPUs that have it)

    def scaled(self, name: str) -> int:
        """A step or sample count times `scale`, at least 1."""
        return max(1, round(getattr(self, name) * self.scale))


# the varied world's recipe (`otter train shapesworld --varied`)
# (its LM needs ~1000 steps to learn to copy a word from the context, which binding builds on: train/README)
VARIED_RECIPE = Recipe(varied=True, precision="bf16", clip_images=24_000, clip_steps=1500, clip_batch=128,
                       clip_patch_loss=True, lm_steps=1000, pretrain_steps=1500, instruction_examples=22_400,
                       finetune_steps=1400, skill_steps=300, comparison_steps=600)
COMPARISON_SET = "shapesworld_comparison"  # the MIMIC-IT set of the `comparisons` stage
SKILL_SET = "shapesworld_skills"  # the image set of the `skills` stage (its clips: VIDEO_SET in the same folder)

OTTER_SIZES = dict(perceiver_depth=2, perceiver_heads=4, perceiver_dim_head=32, perceiver_num_latents=16,
                   perceiver_ff_mult=2, cross_attn_heads=4, cross_attn_dim_head=32, cross_attn_ff_mult=2)
VIDEO_SET = "shapesworld_video"  # the MIMIC-IT set of video episodes (each instruction's images: one clip's frames)


# -- text -------------------------------------------------------------------------------------------------------------
# episode kinds (vqa, caption, comparison, binding) and VQA question kinds (VQA_KINDS order) in the training data:
# the kinds that read one image from the text after another (comparisons, binding), and yes/no and shape questions,
# are drawn more often
EPISODE_WEIGHTS = (25, 5, 30, 40)
VQA_KIND_WEIGHTS = (1, 2, 1, 1, 3)
# varied worlds: binding of 2 to 5 ways (2 most often), 1-4 demonstrations per class, at most MAX_DEMOS in all
BINDING_WAYS = (2, 2, 3, 4, 5)
MAX_DEMOS = 12


def _turns(world: ShapesWorld, words: list[str], real_word_share: float = 0.0) -> list[dict]:
    """One random episode of ShapesWorld turns: {"scenes", "instruction", "answer"} dicts, the query last."""
    rng = world.rng
    kind = rng.choices(("vqa", "caption", "comparison", "binding"), weights=EPISODE_WEIGHTS)[0]
    if kind == "binding":
        if world.varied:
            ways = rng.choice(BINDING_WAYS)
            names = SHAPES if rng.random() < real_word_share else words
            episode = world.binding_episode(shots=rng.randint(ways, min(MAX_DEMOS, 4 * ways)), words=names,
                                            ways=ways)
        else:
            ways = rng.choice((2, 2, 3))
            episode = world.binding_episode(shots=rng.randint(ways, 8), words=words, ways=ways)
        return [{"scenes": [turn["scene"]], "instruction": BINDING_INSTRUCTION, "answer": turn["answer"]}
                for turn in [*episode["demos"], episode["query"]]]
    count = 1 + (rng.randint(1, 4) if rng.random() < 0.5 else 0)
    turns = []
    for _ in range(count if kind != "caption" else 1 + (rng.random() < 0.3)):
        if kind == "vqa":
            record = world.vqa(rng.choices(VQA_KINDS, weights=VQA_KIND_WEIGHTS)[0])
            turns.append(_question_turn(record))
        elif kind == "caption":
            scene = world.caption()["scene"]
            turns.append({"scenes": [scene], "instruction": CAPTION_INSTRUCTION, "answer": describe(scene) + "."})
        else:
            turns.append(_comparison_turn(world))
    return turns[:3] if kind == "comparison" else turns


def _question_turn(record: dict) -> dict:
    """A turn asking a `ShapesWorld.vqa` record's question on its scene, or a `clip` record's on its frames."""
    media = {"clips": [record["frames"]]} if "frames" in record else {"scenes": [record["scene"]]}
    return {**media, "instruction": record["question"], "answer": record["answer"]}


def _comparison_turn(world: ShapesWorld) -> dict:
    record = world.comparison()
    return {"scenes": list(record["scenes"]), "instruction": record["question"], "answer": record["answer"]}


def _video_turns(world: ShapesWorld, words: list[str]) -> list[dict]:
    """
    One random video episode: {"clips", "instruction", "answer"} turns, each clip a list of frame scenes; half of
    them 1-4 questions on clips, half in-context naming of 2-4 motions (2-8 demonstrations, the query last).
    """
    rng = world.rng
    if rng.random() < 0.5:
        ways = rng.choice((2, 2, 3, 4))
        episode = world.motion_naming_episode(shots=rng.randint(ways, 8), words=words, ways=ways)
        return [{"clips": [turn["frames"]], "instruction": MOTION_INSTRUCTION, "answer": turn["answer"]}
                for turn in [*episode["demos"], episode["query"]]]
    clips = [world.clip() for _ in range(rng.randint(1, 4))]
    return [_question_turn(clip) for clip in clips]


def _episodes(world: ShapesWorld, words: list[str], count: int, recipe: Recipe) -> list[list[dict]]:
    """`count` episodes: of a varied world, a `video_share` of them video episodes."""
    if not world.varied:
        return [_turns(world, words) for _ in range(count)]
    return [_video_turns(world, words) if world.rng.random() < recipe.video_share
            else _turns(world, words, recipe.real_word_share) for _ in range(count)]


def text_document(turns: list[dict]) -> str:
    """
    The episode in words only, each image replaced by its description (and, in a turn of several images, followed by
    its label as `otter.prompts.with_images` writes it), each clip by what happens in it: what the language model
    learns from.
    """
    lines = []
    for turn in turns:
        scenes = [f"Scene: {describe(scene)}." for scene in turn.get("scenes", [])]
        scenes += [f"Video: {describe_clip(frames)}." for frames in turn.get("clips", [])]
        if len(scenes) > 1:
            scenes = [f"{scene} Image {i}." for i, scene in enumerate(scenes, 1)]
        lines.append(f"{' '.join(scenes)} User: {turn['instruction']} GPT: {turn['answer']}")
    return "\n".join(lines)


# -- writers ----------------------------------------------------------------------------------------------------------
def png_bytes(scene) -> bytes:
    buffer = io.BytesIO()
    render(scene).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_base64(scene) -> str:
    return base64.b64encode(png_bytes(scene)).decode()


def png_base64_all(scenes: list) -> list[str]:
    """The scenes rendered as base64 PNGs, in order, on every CPU core (rendering is most of the data stage)."""
    if len(scenes) < 2048:
        return [_png_base64(scene) for scene in scenes]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(_png_base64, scenes, chunksize=512))


def write_text_corpus(path: Path, recipe: Recipe, words: list[str]) -> None:
    world = ShapesWorld(recipe.seed + 1, varied=recipe.varied)
    documents = [text_document(turns) for turns in _episodes(world, words, recipe.scaled("lm_documents"), recipe)]
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")


def write_web_shards(folder: Path, recipe: Recipe) -> list[str]:
    """
    Webdataset shards: LAION-style pairs (png + txt caption, 85% of them one-object scenes) and MMC4-style documents
    of 2-5 captioned scenes, each image before its sentence.

    Nonce-word documents ("This is a dax." after each image) are left to instruction tuning on purpose: here they
    kept the perceiver from learning shapes (1500 training steps from the assembled model: one-object captions
    named the right shape 9/40 times with 15% of the samples such documents, 27/40 with caption documents instead).
    """
    world, rng = ShapesWorld(recipe.seed + 2, varied=recipe.varied), random.Random(recipe.seed + 2)
    folder.mkdir(parents=True, exist_ok=True)
    samples = recipe.scaled("web_samples")
    paths = [folder / f"shapesworld-{i:03d}.tar" for i in range(recipe.web_shards)]
    shards = [tarfile.open(path, "w") for path in paths]
    try:
        for index in range(samples):
            shard, key = shards[index % len(shards)], f"{index:08d}"
            if rng.random() < 0.7:
                scene = world.caption()["scene"] if rng.random() < 0.15 else world.scene(1)
                members = {"png": png_bytes(scene), "txt": (describe(scene) + ".").encode()}
            else:
                scenes = [world.caption()["scene"] for _ in range(rng.randint(2, 5))]
                document = {
                    "text_list": [describe(scene).capitalize() + "." for scene in scenes],
                    "image_info": [{"image_base64": base64.b64encode(png_bytes(scene)).decode()} for scene in scenes],
                    "similarity_matrix": [[float(i == j) for j in range(len(scenes))] for i in range(len(scenes))],
                }
                members = {"json": json.dumps(document).encode()}
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                shard.addfile(info, io.BytesIO(data))
    finally:
        for shard in shards:
            shard.close()
    return [str(path) for path in paths]


def write_mimicit(folder: Path, recipe: Recipe, words: list[str], name: str = "shapesworld") -> list[Path]:
    """
    The instruction set in MIMIC-IT's layout: instructions, parquet images, and the in-context train config; for a
    varied world also the video set `VIDEO_SET`, whose instructions' images are the frames of one clip each. Returns
    the instruction files.
    """
    world = ShapesWorld(recipe.seed + 3, varied=recipe.varied)
    folder.mkdir(parents=True, exist_ok=True)
    episodes = _episodes(world, words, recipe.scaled("instruction_examples"), recipe)
    videos = [turns for turns in episodes if "clips" in turns[0]]
    images = [turns for turns in episodes if "clips" not in turns[0]]
    paths = [_write_mimicit_set(folder, name, images, recipe.seed)]
    if videos:
        paths.append(_write_mimicit_set(folder, VIDEO_SET, videos, recipe.seed))
    return paths


def _write_mimicit_set(folder: Path, name: str, episodes: list[list[dict]], seed: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    instructions, train_config, image_ids, scenes = {}, {}, [], []
    prefix = {VIDEO_SET: "SWV", COMPARISON_SET: "SWC", SKILL_SET: "SWS"}.get(name, "SW")
    for index, turns in enumerate(episodes):
        turn_ids = []
        for position, turn in enumerate(turns):
            ids = []
            for scene in turn.get("scenes", []) + [frame for frames in turn.get("clips", []) for frame in frames]:
                ids.append(f"{prefix}_IMG_{len(image_ids):07d}")
                image_ids.append(ids[-1])
                scenes.append(scene)
            turn_ids.append(f"{prefix}_INS_{index:06d}_{position}")
            instructions[turn_ids[-1]] = {"instruction": turn["instruction"], "answer": turn["answer"],
                                          "image_ids": ids, "rel_ins_ids": []}
        train_config[turn_ids[-1]] = turn_ids[:-1]
    meta = {"version": "1.0", "author": "otter.train.shapesworld", "seed": seed}
    path = folder / f"{name}_instructions.json"
    path.write_text(json.dumps({"meta": meta, "data": instructions}), encoding="utf-8")
    (folder / f"{name}_train.json").write_text(json.dumps(train_config), encoding="utf-8")
    pq.write_table(pa.table({"id": image_ids, "base64": png_base64_all(scenes)}), folder / f"{name}.parquet",
                   row_group_size=128)
    return path


def write_comparison_set(folder: Path, recipe: Recipe) -> Path:
    """
    The `comparisons` stage's MIMIC-IT set: episodes of 1-3 comparisons only, one per example the stage trains on.
    In the mixture the first image of a comparison was never read (its shape right 15% of the time in 2800 steps);
    alone, 300 steps taught it (87%), and 400 steps of the mixture after them kept it (83%). It forms suddenly (the
    loss falls from ~0.16 to ~0.06) somewhere between steps 150 and 400, and in one run of 300 steps not at all: the
    recipe runs 600 (train/README).
    """
    world = ShapesWorld(recipe.seed + 5, varied=recipe.varied)
    episodes = [[_comparison_turn(world) for _ in range(world.rng.randint(1, 3))]
                for _ in range(recipe.scaled("comparison_steps") * recipe.finetune_batch)]
    folder.mkdir(parents=True, exist_ok=True)
    return _write_mimicit_set(folder, COMPARISON_SET, episodes, recipe.seed)


def write_skill_set(folder: Path, recipe: Recipe) -> list[Path]:
    """
    The `skills` stage's MIMIC-IT sets, one example per example the stage trains on: episodes of 1-3 position
    questions (`SKILL_SET`) and, as many, of 1-3 direction questions on clips (`VIDEO_SET`). The perceiver's latents
    hold both (a linear probe names the region 87% of the time, a clip's direction 68%), yet the mixture, where each
    is a few percent of the turns, left position at 50% and direction at chance; 300 steps of them alone, from the
    pretrained model, reached 85% and 52%. After the mixture position stays (80%), direction does not (train/README).
    """
    world = ShapesWorld(recipe.seed + 6, varied=recipe.varied)
    positions, motions = [], []
    for index in range(recipe.scaled("skill_steps") * recipe.finetune_batch):
        turns = world.rng.randint(1, 3)
        if index % 2 == 0:
            positions.append([_question_turn(world.vqa("position")) for _ in range(turns)])
        else:
            motions.append([_question_turn(world.clip("motion")) for _ in range(turns)])
    folder.mkdir(parents=True, exist_ok=True)
    return [_write_mimicit_set(folder, SKILL_SET, positions, recipe.seed),
            _write_mimicit_set(folder, VIDEO_SET, motions, recipe.seed)]


# -- CLIP -------------------------------------------------------------------------------------------------------------
CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


def train_clip(folder: Path, recipe: Recipe) -> tuple[Path, Path]:
    """A tiny open_clip CLIP trained with open_clip's contrastive loss; returns (model-config JSON, weights)."""
    import numpy as np
    import open_clip
    from open_clip.loss import ClipLoss

    from otter.factory import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{CLIP_NAME}.json"
    config_path.write_text(json.dumps(CLIP_CONFIG, indent=1))
    world = ShapesWorld(recipe.seed + 4, varied=recipe.varied)
    count = recipe.scaled("clip_images")
    if recipe.varied:  # mostly one shape per image: see CLIP_ONE_SHAPE_SHARE
        scenes = [world.scene(1) if world.rng.random() < CLIP_ONE_SHAPE_SHARE else world.caption()["scene"]
                  for _ in range(count)]
    else:
        scenes = [world.caption()["scene"] for _ in range(count)]
    pixels = torch.from_numpy(np.stack([np.asarray(render(scene)) for scene in scenes]))  # (N, 64, 64, 3) uint8
    texts = open_clip.tokenize([describe(scene) + "." for scene in scenes], context_length=32)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)

    torch.manual_seed(recipe.seed)
    model = open_clip.model.CLIP(**CLIP_CONFIG)
    # CLIP's loss reads the class token only: the last layer's patch tokens, which Otter's perceiver reads, get no
    # gradient of their own. `clip_patch_loss` adds the same loss on their mean, projected as the class token is.
    model.visual.output_tokens = recipe.clip_patch_loss
    loss_fn = ClipLoss()
    steps = recipe.scaled("clip_steps")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.clip_lr, weight_decay=0.1)
    scheduler = _warmup_cosine(optimizer, warmup=min(50, steps // 10), steps=steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for step in range(steps):
        batch = torch.randint(count, (recipe.clip_batch,), generator=generator)
        images = (pixels[batch].permute(0, 3, 1, 2).float() / 255 - mean) / std
        with _autocast(recipe):
            if recipe.clip_patch_loss:
                pooled, tokens = model.visual(images)
                features = [pooled, tokens.mean(1) @ model.visual.proj]
                text_features, logit_scale = model.encode_text(texts[batch], normalize=True), model.logit_scale.exp()
            else:
                image_features, text_features, logit_scale = model(images, texts[batch])
                features = [image_features]
        loss = sum(loss_fn(torch.nn.functional.normalize(f.float(), dim=-1), text_features.float(), logit_scale)
                   for f in features) / len(features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            logger.info("clip step %d/%d: loss %.4f", step + 1, steps, loss.item())
    weights = folder / f"{CLIP_NAME}.pt"
    torch.save(model.state_dict(), weights)
    return config_path, weights


def _autocast(recipe: Recipe):
    """bf16 autocast on the CPU when the recipe's precision says so, else nothing."""
    import contextlib

    if recipe.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _warmup_cosine(optimizer, warmup: int, steps: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- tokenizer and language model -------------------------------------------------------------------------------------
def training_words(recipe: Recipe) -> list[str]:
    """The nonce words training binds: of every form (WORD_FORMS) in a varied world, else the shipped model's."""
    return nonce_words(recipe.training_words, recipe.seed, form="any" if recipe.varied else None)


def train_tokenizer(folder: Path, corpus: Path, recipe: Recipe):
    """
    Byte-level BPE trained on the corpus without its nonce words, so that training and held-out nonce words are
    split into pieces the same way (a word seen in training would otherwise become one token, a held-out one not).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus.read_text(encoding="utf-8")
    words = set(training_words(recipe))
    lines = [" ".join(word for word in line.split(" ") if word not in words) for line in text.splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>")
    wrapped.save_pretrained(folder)
    return wrapped


def train_language_model(folder: Path, corpus: Path, tokenizer, recipe: Recipe) -> None:
    """A tiny MPT trained on the corpus, documents packed into sequences of `lm_sequence` tokens."""
    from transformers import MptConfig, MptForCausalLM

    documents = corpus.read_text(encoding="utf-8").split("\n\n")
    ids = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += encoded + [tokenizer.eos_token_id]
    length = recipe.lm_sequence
    data = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    logger.info("language model corpus: %d tokens, %d sequences of %d", len(ids), len(data), length)

    torch.manual_seed(recipe.seed)
    config = MptConfig(d_model=recipe.lm_width, n_heads=recipe.lm_heads, n_layers=recipe.lm_layers,
                       expansion_ratio=4, max_seq_len=512, vocab_size=len(tokenizer), no_bias=True,
                       use_cache=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = MptForCausalLM(config)
    steps = recipe.scaled("lm_steps")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lm_lr, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = _warmup_cosine(optimizer, warmup=min(50, steps // 10), steps=steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(len(data), (recipe.lm_batch,), generator=generator)]
        with _autocast(recipe):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info("language model step %d/%d: loss %.4f", step + 1, steps, loss.item())
    model.save_pretrained(folder)
    tokenizer.model_max_length = max_positions(config)  # the tokenizer alone cannot know the model's limit
    tokenizer.save_pretrained(folder)


# -- the pipeline -----------------------------------------------------------------------------------------------------
def _data_stage(folder: Path, recipe: Recipe) -> None:
    """The `data` stage: every set of images (the text corpus is the `text` stage's)."""
    folder.mkdir()
    write_web_shards(folder / "web", recipe)
    write_mimicit(folder / "instructions", recipe, training_words(recipe))
    if recipe.skill_steps:
        write_skill_set(folder / "skills", recipe)
    if recipe.comparison_steps:
        write_comparison_set(folder / "comparisons", recipe)


def _clip_stage(folder: Path, recipe: Recipe) -> None:
    """The `clip` stage: CLIP trained, then converted with `otter convert open-clip`'s code."""
    from otter.conversion.open_clip import convert_open_clip

    config_path, weights = train_clip(folder / "open_clip", recipe)
    convert_open_clip(str(config_path), str(weights), folder / "vision")


class Stages:
    """
    Runs the stages in order. A finished stage leaves `out/<name>.done.json` (its wall time) beside its folder and
    is skipped when the run is started again; an interrupted one starts over.
    """

    def __init__(self, out: Path):
        self.out, self.timings, self.overlaps = out, {}, []

    def done(self, name: str) -> Path:
        """The file a finished stage leaves: its wall time."""
        return self.out / f"{name}.done.json"

    def recorded_seconds(self, name: str) -> float:
        return json.loads(self.done(name).read_text())["seconds"]

    def run(self, name: str, work) -> Path:
        folder, done = self.out / name, self.done(name)
        if done.exists():
            logger.info("stage %s: already done (%s)", name, done)
            self.timings[name] = self.recorded_seconds(name)
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        start = time.perf_counter()
        logger.info("stage %s ...", name)
        work(folder)
        seconds = time.perf_counter() - start
        done.write_text(json.dumps({"seconds": seconds}))
        self.timings[name] = seconds
        logger.info("stage %s: %.0f s", name, seconds)
        return folder

    def run_side_by_side(self, background: list[str], recipe: Recipe, foreground: list[tuple[str, object]]) -> None:
        """
        Runs the `background` stages (names of SIDE_STAGES) of `recipe` in a second Python process while this one
        runs `foreground`, each with half the CPU's threads: tiny models train faster side by side than one after
        the other on every thread (on 2 cores a CLIP step took 0.57 s on 2 threads, 0.93 s on 1 beside the language
        model's; the language model's 0.88 s and 1.48 s). A failed background stage raises here, after the
        foreground's.
        """
        names = [*background, *(name for name, _ in foreground)]
        pending = [name for name in background if not self.done(name).exists()]
        if not pending or all(self.done(name).exists() for name, _ in foreground):
            for name in background:
                self.run(name, functools.partial(SIDE_STAGES[name], recipe=recipe))
            for name, work in foreground:
                self.run(name, work)
        else:
            threads = torch.get_num_threads()
            command = [sys.executable, "-m", __spec__.name, str(self.out), json.dumps(asdict(recipe)), *pending,
                       "--threads", str(max(1, threads // 2)), "--log-level", str(logging.getLogger().level)]
            process = subprocess.Popen(command)
            torch.set_num_threads(max(1, threads - threads // 2))
            try:
                for name, work in foreground:
                    self.run(name, work)
            except BaseException:
                process.terminate()
                raise
            finally:
                process.wait()
                torch.set_num_threads(threads)
            if process.returncode != 0:
                raise RuntimeError(f"the stages {pending} failed in their own process (exit code "
                                   f"{process.returncode}): its error is in the log above; rerun to continue the run")
            for name in pending:
                self.timings[name] = self.recorded_seconds(name)
        self.timings = {**{k: v for k, v in self.timings.items() if k not in names},
                        **{name: self.timings[name] for name in names}}
        self.overlaps.append(min(sum(self.timings[name] for name in background),
                                 sum(self.timings[name] for name, _ in foreground)))

    @property
    def wall_seconds(self) -> float:
        """The run's wall time: every stage's, less the time stages ran side by side."""
        return sum(self.timings.values()) - sum(self.overlaps)


# the stages `Stages.run_side_by_side` can run in a second process
SIDE_STAGES = {"clip": _clip_stage, "data": _data_stage}


def reproduce(out, recipe: Recipe | None = None) -> Path:
    """
    Runs every stage into `out` (see the module's docstring); returns the final model folder, `out/model`, whose
    held-out results are in `out/eval/results.md`. A rerun with another recipe than the folder's is refused.
    """
    from otter.eval.shapesworld import write_eval_sets
    from otter.factory import from_parts
    from otter.train.data import WebDataOptions
    from otter.train.trainer import TrainingConfig, train

    recipe = recipe or Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.json"
    if recipe_file.exists() and json.loads(recipe_file.read_text()) != asdict(recipe):
        raise ValueError(f"{out} holds a run of another recipe ({recipe_file}); give a new --out, or the same recipe "
                         "to continue that run")
    recipe_file.write_text(json.dumps(asdict(recipe), indent=1))
    stages = Stages(out)
    words = training_words(recipe)

    def text(folder):
        folder.mkdir()
        write_text_corpus(folder / "text.txt", recipe, words)

    def language_model(folder):
        folder.mkdir()
        tokenizer = train_tokenizer(folder / "tokenizer", out / "text" / "text.txt", recipe)
        train_language_model(folder / "lm", out / "text" / "text.txt", tokenizer, recipe)

    # CLIP and the images in a second process, the text and the language model in this one
    stages.run_side_by_side(["clip", "data"], recipe, [("text", text), ("language_model", language_model)])
    data_dir, clip_dir, lm_dir = out / "data", out / "clip", out / "language_model"

    def assemble(folder):
        torch.manual_seed(recipe.seed)
        sizes = {**OTTER_SIZES, "max_num_frames": FRAMES} if recipe.varied else OTTER_SIZES
        model, processor = from_parts(clip_dir / "vision", lm_dir / "lm", lm_dir / "tokenizer",
                                      recipe.cross_attn_every_n_layers, **sizes)
        # Flamingo's gates start at 0 so that a large pretrained LM is untouched at step 0; but a gate at 0 also
        # blocks every gradient to its block, and at this scale the gates then stay shut (measured: after 600
        # pretraining steps every |gate| < 0.04 and the captions ignore the image). Opened, they learn at once.
        with torch.no_grad():
            for block in model.cross_attention_blocks():
                block.attn_gate.fill_(recipe.gate_init)
                block.ff_gate.fill_(recipe.gate_init)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    initial = stages.run("assemble", assemble)
    web = sorted(str(path) for path in (data_dir / "web").glob("*.tar"))
    pretrained = stages.run("pretrain", lambda folder: train(TrainingConfig(
        model=str(initial), data=web, out=str(folder), objective="pretraining",
        max_steps=recipe.scaled("pretrain_steps"), batch_size=recipe.pretrain_batch, lr=recipe.pretrain_lr,
        warmup_steps=50, seed=recipe.seed, num_workers=1, save_every=10**9, precision=recipe.precision,
        augment=False,  # OpenFlamingo's random flips would swap the captions' left and right and object order
        web=WebDataOptions(min_image_bytes=0, single_image_keep_prob=1.0, shuffle_buffer=500),
    )))

    def instruction_tuning(model, data: list[str], steps: str, warmup: int, **options):
        """A stage of instruction tuning of everything but CLIP, `steps` naming the recipe's step count."""
        return lambda folder: train(TrainingConfig(
            model=str(model), data=data, out=str(folder), objective="instruction", max_steps=recipe.scaled(steps),
            batch_size=recipe.finetune_batch, lr=recipe.finetune_lr, warmup_steps=warmup, full=True,
            freeze_vision=True, seed=recipe.seed, num_workers=1, save_every=10**9, precision=recipe.precision,
            **options))

    tuned = pretrained
    clips = {"video_sets": [VIDEO_SET], "resample_frames": FRAMES}
    if recipe.comparison_steps:
        comparisons = [str(data_dir / "comparisons" / f"{COMPARISON_SET}_instructions.json")]
        tuned = stages.run("comparisons", instruction_tuning(tuned, comparisons, "comparison_steps", 30))
    if recipe.skill_steps:
        skills = sorted(str(path) for path in (data_dir / "skills").glob("*_instructions.json"))
        tuned = stages.run("skills", instruction_tuning(tuned, skills, "skill_steps", 30, **clips))
    instructions = sorted(str(path) for path in (data_dir / "instructions").glob("*_instructions.json"))
    videos = clips if recipe.varied else {}  # only a varied world's instruction set has a video set
    finetuned = stages.run("finetune", instruction_tuning(tuned, instructions, "finetune_steps", 50, **videos))
    model_dir = stages.run("model", lambda folder: export_model(finetuned, folder))
    if recipe.varied:
        rows = eval_rows()
        eval_data = stages.run("eval_data", lambda folder: write_varied_eval_sets(folder, rows,
                                                                                  recipe.scaled("eval_count")))
        stages.run("eval", lambda folder: evaluate_varied(model_dir, eval_data, folder, rows))
    else:
        eval_data = stages.run("eval_data", lambda folder: write_eval_sets(
            folder, seed=EVAL_SEED, count=recipe.scaled("eval_count"),
            shots=max(max(s) for s in EVAL_SHOTS.values())))
        stages.run("eval", lambda folder: evaluate_model(model_dir, eval_data, folder))
    (out / "timings.json").write_text(json.dumps({"stages": stages.timings, "wall_seconds": stages.wall_seconds},
                                                 indent=1))
    results = (out / "eval" / "results.md").read_text(encoding="utf-8")
    shipped_model_card(model_dir, recipe, results, stages.wall_seconds / 60).save(model_dir / "README.md")
    logger.info("done in %.1f min: %s; results in %s", stages.wall_seconds / 60, model_dir,
                out / "eval" / "results.md")
    return model_dir


# -- export and evaluation --------------------------------------------------------------------------------------------
EVAL_SEED = 1234  # the held-out sets' seed: no training stage draws from it
EVAL_SHOTS = {"shapesworld_vqa": [0, 4], "shapesworld_binding": [0, 4, 8], "shapesworld_comparison": [0, 2]}


def export_model(source: Path, folder: Path) -> None:
    """
    The trained model as the package ships it, with its processor: its weights rounded to fp16 (the shipped model's
    values, which its results were measured on) and saved in float32, the dtype `from_pretrained` then loads it in
    without being told, what runs well on a CPU.
    """
    from otter import OtterForConditionalGeneration, OtterProcessor

    model = OtterForConditionalGeneration.from_pretrained(source, dtype=torch.float16).to(torch.float32)
    model.save_pretrained(folder)
    OtterProcessor.from_pretrained(source).save_pretrained(folder)


def _load_for_eval(model_dir: Path):
    from otter import OtterForConditionalGeneration, OtterProcessor

    model = OtterForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, OtterProcessor.from_pretrained(model_dir)


def evaluate_model(model_dir: Path, data_dir: Path, folder: Path) -> None:
    """`otter eval` of the exported model, in float32 as on a CPU, on every ShapesWorld task; `results.md` sums up."""
    from otter.eval.evaluator import evaluate

    model, processor = _load_for_eval(model_dir)
    rows = ["| task | shots | metric | score |", "|---|---:|---|---:|"]
    for task, shots in EVAL_SHOTS.items():
        report = evaluate(model, processor, task, data_dir, folder / f"{task}.json", shots=shots, batch_size=16)
        rows += [f"| {task} | {result['shots']} | {report['metric']} | {result['mean']:.1f} |"
                 for result in report["results"]]
    (folder / "results.md").write_text("\n".join(rows) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class EvalRow:
    """One held-out set of a varied run: its folder `name`, `kind` and `write_set` options, and what it is scored by."""

    name: str
    kind: str
    tasks: tuple  # ((task, shots), ...)
    split: str  # what the set holds, in words, for results.md
    options: tuple = ()  # write_set options as (name, value) pairs

    @property
    def shots(self) -> int:
        return max(max(shots) for _, shots in self.tasks)


HELD_OUT = "held-out positions, sizes, shades, backgrounds, rotations, outlines"


def eval_rows(seed: int = EVAL_SEED) -> list[EvalRow]:
    """The sets a varied run is measured on, all drawn from held-out bands and cells with `seed`."""
    def words(form):
        return tuple(nonce_words(200, seed, held_out=True, form=form))

    binding = (("shapesworld_binding_generation", (4,)), ("shapesworld_binding", (0,)))
    rows = [
        EvalRow("vqa", "vqa", (("shapesworld_vqa", (0, 4)),), HELD_OUT),
        EvalRow("count_small", "vqa", (("shapesworld_vqa", (0,)),), "one shape of the smallest size, counted",
                (("vqa_kinds", ("count",)), ("objects", 1), ("radius", SIZE.low))),
    ]
    rows += [EvalRow(f"binding_{form.replace('..', '')}", "binding", binding,
                     f"2-way, held-out {form} words of 1-4 syllables", (("words", words(form)),))
             for form in WORD_FORMS]
    rows += [
        EvalRow("binding_real_words", "binding", binding, "2-way, named by shape names against their meaning",
                (("words", SHAPES),)),
        EvalRow("binding_5way", "binding", (("shapesworld_binding_generation", (10,)), ("shapesworld_binding", (0,))),
                "5-way, 2 demonstrations per class, held-out words of every form",
                (("ways", 5), ("words", words("any")))),
        EvalRow("comparison", "comparison", (("shapesworld_comparison", (0, 2)),), HELD_OUT),
        EvalRow("video", "video", (("shapesworld_video", (0,)),), "clips: motion, colour change, appear or vanish"),
        EvalRow("naming", "naming", (("shapesworld_naming_generation", (4,)), ("shapesworld_naming", (0,))),
                "2-way motions named by held-out words", (("words", words("any")),)),
    ]
    return rows


def write_varied_eval_sets(folder: Path, rows: list[EvalRow], count: int) -> Path:
    """Each row's set in `folder/<row>`, and the shipped model's sets (`write_eval_sets`) in `folder/v1`."""
    from otter.eval.shapesworld import write_eval_sets, write_set

    for row in rows:
        write_set(folder / row.name, row.kind, seed=EVAL_SEED, count=count, shots=row.shots, **dict(row.options))
    write_eval_sets(folder / "v1", seed=EVAL_SEED, count=count, shots=max(max(s) for s in EVAL_SHOTS.values()))
    return folder


def evaluate_varied(model_dir: Path, data_dir: Path, folder: Path, rows: list[EvalRow]) -> None:
    """
    `otter eval` on every row's set and on the shipped model's sets; `results.md`: one line per set, task and shot
    count, and one per question kind of the VQA and video sets.
    """
    from otter.eval.evaluator import evaluate

    model, processor = _load_for_eval(model_dir)
    lines = ["| set | held out | task | shots | metric | score |", "|---|---|---|---:|---|---:|"]
    todo = [(row.name, row.split, task, shots) for row in rows for task, shots in row.tasks]
    todo += [("v1", "the shipped model's sets", task, shots) for task, shots in EVAL_SHOTS.items()]
    for name, split, task, shots in todo:
        report = evaluate(model, processor, task, data_dir / name, folder / name / f"{task}.json", shots=list(shots),
                          batch_size=16)
        for result in report["results"]:
            lines.append(f"| {name} | {split} | {task} | {result['shots']} | {report['metric']} | "
                         f"{result['mean']:.1f} |")
            for group, score in result.get("groups", {}).items():
                lines.append(f"| {name}: {group} | {split} | {task} | {result['shots']} | {report['metric']} | "
                             f"{score:.1f} |")
    (folder / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


SHIPPED_USAGE = """import otter  # registers Otter with transformers' Auto classes (pip install otter-flamingo)
from otter.shapesworld import ShapesWorld, render
from transformers import AutoModelForImageTextToText, AutoProcessor

# the folder the package installs; float32 is what runs well on a CPU
model = AutoModelForImageTextToText.from_pretrained(otter.SHAPESWORLD_MODEL, dtype="float32")
processor = AutoProcessor.from_pretrained(otter.SHAPESWORLD_MODEL)

record = ShapesWorld(seed=0).vqa("colour")  # a freshly drawn scene and a question about it
prompt = f"<image>User: {record['question']} GPT:<answer>"
inputs = processor(images=[render(record["scene"])], text=prompt, return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=8)
print(record["question"], processor.decode_answers(generated, inputs["input_ids"].shape[1])[0])
"""


def shipped_model_card(model_dir: Path, recipe: Recipe, results: str, minutes: float | None = None):
    """
    The card of the model `reproduce` makes in `model_dir` (`otter/models/shapesworld/README.md`): what it is, how it
    was trained, its held-out results (`results`: results.md's table) and its license (the project's: it was trained
    here from nothing, on data generated here).
    """
    from safetensors import safe_open

    from otter import OtterConfig
    from otter.model_card import describe

    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    took = f" (it took {minutes:.0f} min on 2 CPU cores)" if minutes else ""
    training = (
        f"Every part was trained from nothing by this project's own code, with one command{took}:\n\n```bash\notter train shapesworld --out runs/shapesworld\n```\n\n"
        f"1. A CLIP ViT ({recipe.clip_steps} contrastive steps on {recipe.clip_images:,} captioned images).\n"
        f"2. A byte-level BPE tokenizer ({recipe.vocab_size} tokens) and an MPT ({recipe.lm_layers} x "
        f"{recipe.lm_width}) pretrained on ShapesWorld text ({recipe.lm_steps} steps).\n"
        f"3. The perceiver and gated cross-attention, pretrained on {recipe.web_samples:,} interleaved documents and "
        f"image-text pairs with both backbones frozen ({recipe.pretrain_steps} steps; `otter train pretrain`).\n"
        f"4. Instruction tuning of everything but CLIP on {recipe.instruction_examples:,} MIMIC-IT-format episodes "
        f"({recipe.finetune_steps} steps; `otter train finetune --full --freeze-vision`), then fp16 export.\n\n"
        "Stages, data and recipe: the package's `otter/train/README.md`."
    )
    evaluation = (
        f"`otter eval` on {recipe.eval_count} held-out samples per task (a seed no training stage draws from; "
        "binding uses nonce words never seen in training):\n\n" + results.strip() + "\n\n"
        "Fast binding is the test of in-context learning: two nonce words are bound to two shapes inside the prompt "
        "only, so the answer cannot be known without the demonstrations (chance with none)."
    )
    return model_card(
        "ShapesWorld Otter: the model the otter-flamingo package ships",
        f"A {parameters / 1e6:.1f}M-parameter Otter model trained on ShapesWorld (`otter.shapesworld`), a procedural "
        f"world of coloured shapes. {describe(OtterConfig.from_pretrained(model_dir))} It captions scenes, answers questions on colour, shape, count and position, compares two images, and names "
        "shapes by nonce words it learns from the prompt. It is the package's demonstration and test model "
        "(`otter demo`), not a general-purpose one.",
        SHIPPED_USAGE,
        license=CODE_LICENSE,
        license_note=f"`{CODE_LICENSE}`, as Otter's code: the weights were trained by this project, from nothing, on "
                     "data it generates.",
        sections={"Training": training, "Results": evaluation},
        tags=["shapesworld"],
    )


if __name__ == "__main__":  # the second process of `Stages.run_side_by_side`
    import argparse

    parser = argparse.ArgumentParser(description="runs stages of a ShapesWorld run (otter train shapesworld)")
    parser.add_argument("out", type=Path)
    parser.add_argument("recipe", type=json.loads, help="the Recipe's fields, as JSON")
    parser.add_argument("stages", nargs="+", choices=sorted(SIDE_STAGES))
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args()
    logger = logging.getLogger("otter.train.shapesworld")  # not __main__'s
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    runner, stage_recipe = Stages(args.out), Recipe(**args.recipe)
    for stage in args.stages:
        runner.run(stage, functools.partial(SIDE_STAGES[stage], recipe=stage_recipe))
