"""
otter.train on videos (issue 20, training): custom JSONL `videos` and `frames`, MIMIC-IT video subsets, collation of
batches mixing images and videos of different frame counts, frame embeddings trained with the perceiver, unreadable
videos skipped and counted, and a fine-tune on videos through `otter train finetune`.
"""

import base64
import io
import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

from otter import OtterForConditionalGeneration, OtterProcessor
from otter.cli import main as otter_main
from otter.prompts import ANSWER_TOKEN, END_OF_CHUNK
from otter.tiny import build_tiny_otter
from otter.train.collate import Collator
from otter.train.data import (
    INSTRUCTION,
    Example,
    JsonlInstructions,
    MimicItInstructions,
    Skipped,
    instruction_source,
)
from otter.train.loaders import InstructionExamples
from otter.train.trainer import (
    TrainingConfig,
    add_answer_token,
    configure_training,
    token_loss_sum,
    train,
    use_answer_chat_template,
)
from otter.video import uniform_indices

from .train_fixtures import (
    COLOURS,
    png_bytes,
    quick_config,
    read_metrics,
    save_tiny_model,
    write_image_parquet,
    write_jsonl,
)
from .video_fixtures import colour, colour_frames, frame_indices, write_video

FRAMES = 12  # frames of each test video; `colour(i)` is frame i's colour
QUESTION = "What happens in the video?"


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Otter with frame embeddings for up to 4 frames (Otter's video models have them)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_num_frames=4)


def tiny_video_otter():
    """A tiny Otter with frame embeddings for 4 frames and its processor, as `otter train finetune` prepares them:
    <answer> added, with its chat template."""
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2, max_num_frames=4)
    add_answer_token(model, processor.tokenizer)
    use_answer_chat_template(processor)
    return model, processor


@pytest.fixture(scope="module")
def processor():
    return tiny_video_otter()[1]


def write_frames(folder, frames: list[Image.Image]) -> list[str]:
    """`frames` as PNG files `folder/000.png`, ...; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, frame in enumerate(frames):
        frame.save(folder / f"{index:03d}.png")
        names.append(f"{folder.name}/{index:03d}.png")
    return names


def write_video_jsonl(folder, records: list[dict]):
    path = folder / "videos.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def reversed_frames(count: int = FRAMES) -> list[Image.Image]:
    return colour_frames(count)[::-1]


# -- custom JSONL -------------------------------------------------------------------------------------------------
def test_jsonl_videos_and_frame_lists_are_sampled_frame_exactly_and_rendered_by_the_chat_template(tmp_path, processor):
    write_video(tmp_path / "clip.mp4", colour_frames(FRAMES))
    frames = write_frames(tmp_path / "frames", colour_frames(10))
    (tmp_path / frames[1]).write_bytes(b"not read: frame 1 is not among the 4 sampled")
    (tmp_path / "red.png").write_bytes(png_bytes("red"))
    record = {"images": ["red.png"], "videos": ["clip.mp4"], "frames": [frames], "instruction": QUESTION,
              "answer": "The colours change.",
              "context": [{"videos": ["clip.mp4"], "instruction": QUESTION, "answer": "It flickers."}]}
    source = instruction_source(write_video_jsonl(tmp_path, [record]), resample_frames=4)
    assert isinstance(source, JsonlInstructions) and source.has_videos and not source.malformed
    example = source.example(0)
    assert isinstance(example, Example), example
    # what apply_chat_template (and so `otter chat`) sends for the same conversation: a turn shows its images, then
    # its videos, then its frame lists
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It flickers."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "video"},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The colours change."}]},
    ]
    assert example.text == processor.apply_chat_template(messages)
    assert example.text == (f"<video>User: {QUESTION} GPT:{ANSWER_TOKEN} It flickers.{END_OF_CHUNK}\n"
                            f"<image>Image 1. <video>Video 2. <video>Video 3. User: {QUESTION} GPT:{ANSWER_TOKEN} "
                            f"The colours change.{END_OF_CHUNK}")
    assert [image.getpixel((0, 0)) for image in example.images] == [COLOURS["red"]]
    assert [len(video) for video in example.videos] == [4, 4, 4]
    assert frame_indices(example.videos[0], FRAMES) == uniform_indices(FRAMES, 4) == [0, 3, 7, 11]
    assert frame_indices(example.videos[1], FRAMES) == uniform_indices(FRAMES, 4)
    assert frame_indices(example.videos[2], 10) == uniform_indices(10, 4) == [0, 3, 6, 9]
    # a short video keeps all its frames, none repeated (so frame 1 is read now)
    colour_frames(10)[1].save(tmp_path / frames[1])
    short = instruction_source(write_video_jsonl(tmp_path, [record]), resample_frames=16).example(0)
    assert [len(video) for video in short.videos] == [FRAMES, FRAMES, 10]


def test_jsonl_video_fields_are_checked_when_the_file_is_read(tmp_path):
    good = {"instruction": "q", "answer": "a"}
    lines = [
        {**good, "videos": ["a.mp4"]},
        {**good, "frames": [["a.png", "b.png"]]},
        {**good, "videos": "a.mp4"},                      # not a list
        {**good, "frames": ["a.png", "b.png"]},          # frames of one video must be a list
        {**good, "frames": [[]]},                        # a video without frames
        {**good, "context": [{**good, "videos": [3]}]},  # in-context turns are checked too
        {**good, "instruction": "What is in <video>?"},  # a literal marker in the text
    ]
    source = JsonlInstructions(write_video_jsonl(tmp_path, lines))
    assert len(source) == 2
    assert [skipped.reason for skipped in source.malformed] == ["malformed record"] * 5
    assert "'videos' must be a list of video files' paths" in source.malformed[0].detail
    assert "'frames' must be a list of videos" in source.malformed[1].detail
    assert "special token '<video>'" in source.malformed[4].detail


def test_unreadable_videos_are_skipped_naming_the_file(tmp_path):
    clip = write_video(tmp_path / "ok.mp4", colour_frames(FRAMES))
    (tmp_path / "cut.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    (tmp_path / "text.mp4").write_text("not a video at all")
    frames = write_frames(tmp_path / "frames", colour_frames(3))
    (tmp_path / frames[2]).write_bytes(png_bytes("red")[:30])
    records = [{"videos": [name], "instruction": "q", "answer": "a"} for name in
               ("ok.mp4", "missing.mp4", "cut.mp4", "text.mp4")]
    records.append({"frames": [frames], "instruction": "q", "answer": "a"})
    source = JsonlInstructions(write_video_jsonl(tmp_path, records))
    assert isinstance(source.example(0), Example)
    for index, name in ((1, "missing.mp4"), (2, "cut.mp4"), (3, "text.mp4")):
        skipped = source.example(index)
        assert isinstance(skipped, Skipped) and skipped.reason == "unreadable video"
        assert f"videos.jsonl:{index + 1}" in skipped.detail and str(tmp_path / name) in skipped.detail
    broken_frame = source.example(4)
    assert broken_frame.reason == "unreadable image" and str(tmp_path / frames[2]) in broken_frame.detail


def test_a_run_counts_unreadable_videos_in_its_summary(model_dir, tmp_path):
    write_video(tmp_path / "ok.mp4", colour_frames(FRAMES))
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short")
    records = [{"videos": ["ok.mp4"], "instruction": "q", "answer": "Colours."},
               {"videos": ["broken.mp4"], "instruction": "q", "answer": "Colours."}]
    out = train(quick_config(model_dir, [write_video_jsonl(tmp_path, records)], tmp_path / "out", batch_size=1,
                             max_steps=None, epochs=2, resample_frames=4))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["skipped"] == {"unreadable video": 2}, "the broken video comes up once in each epoch"
    assert [m["examples"] for m in read_metrics(out)].count(0) == 2


# -- MIMIC-IT video subsets ---------------------------------------------------------------------------------------
def write_mimicit_videos(folder, name: str = "DC", images: str = "json"):
    """
    A MIMIC-IT video subset: two videos of 10 and 7 frames (frame i coloured `colour(i)`, as base64 PNG), three
    instructions on the first (the train config puts two before the third, as MIMIC-IT's video conversations) and one
    on the second, whose train config puts an instruction about the first video before it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    frame_ids = {"V1": [f"{name}_V1_F{i:02d}" for i in range(10)], "V2": [f"{name}_V2_F{i:02d}" for i in range(7)]}
    encoded = {}
    for video, ids in frame_ids.items():
        for index, image_id in enumerate(ids):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 30), colour(index)).save(buffer, format="PNG")
            encoded[image_id] = base64.urlsafe_b64encode(buffer.getvalue()).decode()
    data = {
        f"{name}_INS_1": {"instruction": "What is first?", "answer": "A dark frame.", "image_ids": frame_ids["V1"]},
        f"{name}_INS_2": {"instruction": "What is next?", "answer": "Brighter ones.", "image_ids": frame_ids["V1"]},
        f"{name}_INS_3": {"instruction": "How does it end?", "answer": "Bright.", "image_ids": frame_ids["V1"]},
        f"{name}_INS_4": {"instruction": "And this one?", "answer": "Shorter.", "image_ids": frame_ids["V2"]},
    }
    for record in data.values():
        record["rel_ins_ids"] = []
    (folder / f"{name}_instructions.json").write_text(json.dumps({"meta": {"version": "test"}, "data": data}))
    if images == "json":
        (folder / f"{name}.json").write_text(json.dumps(encoded))
    else:
        write_image_parquet(folder / f"{name}.parquet", encoded)
    (folder / f"{name}_train.json").write_text(json.dumps({
        f"{name}_INS_3": [f"{name}_INS_1", f"{name}_INS_2"], f"{name}_INS_4": [f"{name}_INS_1"]}))
    return folder / f"{name}_instructions.json"


@pytest.mark.parametrize("images", ["json", "parquet"])
def test_mimicit_video_subset_gives_one_video_per_conversation_sampled_as_otter(tmp_path, images, processor):
    source = instruction_source(write_mimicit_videos(tmp_path, images=images), resample_frames=4)
    assert isinstance(source, MimicItInstructions) and source.video and len(source) == 2 and not source.malformed
    conversation, two_videos = source.example(0), source.example(1)
    # turns about the same video show it once, before the first (as Otter's video conversations)
    assert conversation.text == (
        f"<video>User: What is first? GPT:{ANSWER_TOKEN} A dark frame.{END_OF_CHUNK}\n"
        f"User: What is next? GPT:{ANSWER_TOKEN} Brighter ones.{END_OF_CHUNK}\n"
        f"User: How does it end? GPT:{ANSWER_TOKEN} Bright.{END_OF_CHUNK}")
    assert conversation.images == [] and len(conversation.videos) == 1
    assert frame_indices(conversation.videos[0], 10) == uniform_indices(10, 4) == [0, 3, 6, 9]
    assert two_videos.text == (f"<video>User: What is first? GPT:{ANSWER_TOKEN} A dark frame.{END_OF_CHUNK}\n"
                               f"<video>User: And this one? GPT:{ANSWER_TOKEN} Shorter.{END_OF_CHUNK}")
    assert [frame_indices(video, 10) for video in two_videos.videos] == [uniform_indices(10, 4),
                                                                         uniform_indices(7, 4)]
    assert uniform_indices(7, 4) == [0, 2, 4, 6]
    # the model reads it as the processor makes it of these frames
    encoded = Collator(processor).encode(conversation)
    expected = processor(text=conversation.text, videos=[conversation.videos[0]], num_frames=4)
    assert encoded["input_ids"].tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(encoded["pixel_values"], expected["pixel_values"][0])


def test_which_mimicit_subsets_are_videos_is_explicit(tmp_path):
    dc = write_mimicit_videos(tmp_path / "dc", name="DC")
    xy = write_mimicit_videos(tmp_path / "xy", name="XY")
    assert instruction_source(dc).video, "DC is one of the subsets Otter reads as videos"
    assert not instruction_source(xy).video
    as_images = instruction_source(xy).example(0)
    assert as_images.text.count("<image>") == 30 and len(as_images.images) == 30 and not as_images.videos
    assert instruction_source(xy, video_sets=["xy"]).video, "names compare case-insensitively"
    assert not instruction_source(dc, video_sets=[]).video
    collator = Collator(build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)[1])
    with pytest.raises(ValueError, match=r"video_sets names \['TVC'\], which are not among the MIMIC-IT subsets"):
        InstructionExamples([str(dc), str(xy)], collator, video_sets=["XY", "TVC"])


def test_a_video_subset_instruction_without_frames_is_malformed(tmp_path):
    path = write_mimicit_videos(tmp_path)
    document = json.loads(path.read_text())
    document["data"]["DC_INS_4"]["image_ids"] = []
    path.write_text(json.dumps(document))
    source = instruction_source(path)
    assert len(source) == 1 and "has no frames" in source.malformed[0].detail


# -- collation ----------------------------------------------------------------------------------------------------
def test_collated_batches_of_images_and_videos_equal_the_processors_output(processor):
    frames = colour_frames(FRAMES)
    image = Image.new("RGB", (36, 40), COLOURS["blue"])
    answer = f" GPT:{ANSWER_TOKEN} Yes.{END_OF_CHUNK}"
    samples = [  # text, images, videos (already sampled)
        (f"<video>User: a{answer}", [], [frames[:4]]),
        (f"<image>Image 1. <video>Video 2. <video>Video 3. User: b{answer}", [image], [frames[4:6], frames[6:9]]),
        (f"User: only text{answer}", [], []),
        (f"<image>User: c{answer}", [frames[9]], []),
    ]
    collator = Collator(processor)
    examples = [Example(text, images, INSTRUCTION, str(index), videos)
                for index, (text, images, videos) in enumerate(samples)]
    batch = collator([collator.encode(example) for example in examples])
    expected = processor(text=[text for text, _, _ in samples], images=[images for _, images, _ in samples],
                         videos=[videos for _, _, videos in samples], num_frames=4, padding_side="right")
    assert batch["pixel_values"].shape == (4, 3, 4, 3, 32, 32)
    for name in ("input_ids", "attention_mask", "pixel_values", "frame_mask"):
        assert torch.equal(batch[name], expected[name]), name
    assert batch["frame_mask"][1].sum(-1).tolist() == [1, 2, 3]
    # videos of one frame count: no frame_mask, as the processor
    same = [Example(f"<video>User: {i}{answer}", [], INSTRUCTION, str(i), [frames[i:i + 3]]) for i in range(2)]
    batch = collator([collator.encode(example) for example in same])
    expected = processor(text=[e.text for e in same], videos=[e.videos for e in same], padding_side="right")
    assert "frame_mask" not in batch and "frame_mask" not in expected
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    # images only: the layout of image batches, one frame per medium
    images_only = collator([collator.encode(examples[3]), collator.encode(examples[2])])
    assert images_only["pixel_values"].shape == (2, 1, 1, 3, 32, 32) and "frame_mask" not in images_only


def test_the_loss_reads_the_frame_mask_so_a_batch_equals_its_examples_alone():
    model, processor = tiny_video_otter()
    for block in model.cross_attention_blocks():  # open gates: the media reach the loss
        block.attn_gate.data.fill_(1.0)
        block.ff_gate.data.fill_(1.0)
    frames = colour_frames(FRAMES)
    answer = f" GPT:{ANSWER_TOKEN} It changes colour.{END_OF_CHUNK}"
    collator = Collator(processor)
    encoded = [collator.encode(Example(f"<video>User: {QUESTION}{answer}", [], INSTRUCTION, "a", [frames[:4]])),
               collator.encode(Example(f"<video>User: {QUESTION}{answer}", [], INSTRUCTION, "b", [frames[5:7]]))]
    model.eval()
    with torch.no_grad():
        together = token_loss_sum(model, collator(encoded))
        alone = sum(token_loss_sum(model, collator([item])) for item in encoded)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_frame_embeddings_receive_gradients_with_the_perceiver():
    model, processor = tiny_video_otter()
    configure_training(model, TrainingConfig(model="m", data=["d.jsonl"], out="o"), [])
    assert model.perceiver.frame_embs.requires_grad
    for block in model.cross_attention_blocks():
        block.attn_gate.data.fill_(1.0)
    collator = Collator(processor)
    frames = colour_frames(FRAMES)
    batch = collator([collator.encode(Example(f"<video>User: {QUESTION} GPT:{ANSWER_TOKEN} Colours.{END_OF_CHUNK}",
                                              [], INSTRUCTION, "k", [frames[:3]]))])
    token_loss_sum(model, batch).backward()
    gradient = model.perceiver.frame_embs.grad
    assert gradient[:3].abs().sum(-1).gt(0).all(), "each of the video's 3 frames' embeddings gets a gradient"
    assert not gradient[3:].any(), "the embedding of a frame the video does not have gets none"


# -- training runs ------------------------------------------------------------------------------------------------
def write_finetune_set(folder):
    """Four examples: two mp4 videos and two frame lists (12, 2 and 6 frames), with images and in-context videos."""
    folder.mkdir(parents=True, exist_ok=True)
    write_video(folder / "up.mp4", colour_frames(FRAMES))
    write_video(folder / "down.mp4", reversed_frames())
    short = write_frames(folder / "short", colour_frames(2))
    backwards = write_frames(folder / "backwards", reversed_frames(6))
    (folder / "red.png").write_bytes(png_bytes("red"))
    records = [
        {"videos": ["up.mp4"], "instruction": QUESTION, "answer": "It gets brighter."},
        {"videos": ["down.mp4"], "instruction": QUESTION, "answer": "It gets darker."},
        {"frames": [short], "instruction": QUESTION, "answer": "Two colours."},
        {"images": ["red.png"], "frames": [backwards], "instruction": "And now?", "answer": "Red, then it fades.",
         "context": [{"videos": ["up.mp4"], "instruction": QUESTION, "answer": "It gets brighter."}]},
    ]
    return write_video_jsonl(folder, records)


def test_otter_train_finetune_on_videos_overfits_and_the_folder_answers(model_dir, tmp_path):
    data = write_finetune_set(tmp_path / "data")
    out = tmp_path / "out"
    otter_main(["train", "finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                "--resample-frames", "3", "--max-steps", "20", "--batch-size", "4", "--lr", "3e-3",
                "--schedule", "constant", "--num-workers", "0", "--full", "--freeze-vision"])
    losses = [record["loss"] for record in read_metrics(out)]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["skipped"] == {} and summary["config"]["resample_frames"] == 3
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(before["perceiver.frame_embs"], after["perceiver.frame_embs"])

    # the folder loads and answers about a video file, prompted as the chat template writes it
    processor = OtterProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)
    assert prompt == f"<video>User: {QUESTION} GPT:{ANSWER_TOKEN}", "the text the model was trained on"
    video = str(tmp_path / "data" / "up.mp4")
    trained, start = (OtterForConditionalGeneration.from_pretrained(folder).eval() for folder in (out, model_dir))
    assert processor.num_frames == 3, "the folder's processor samples videos as the run did"
    inputs = processor(text=prompt, videos=[video])
    assert inputs["pixel_values"].shape[2] == 3
    generated = trained.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert processor.decode_answers(generated, inputs["input_ids"].shape[1])[0].strip()
    # and it has learnt the answer: its loss on it is far below the starting model's
    answered = processor(text=f"{prompt} It gets brighter.{END_OF_CHUNK}", videos=[video])
    collator = Collator(processor)
    labels = torch.tensor([collator.labels(answered["input_ids"][0].tolist(), INSTRUCTION)])
    batch = {**answered, "labels": labels}
    with torch.no_grad():
        start.resize_token_embeddings(len(processor.tokenizer))  # <answer>: the row the run added
        losses_after, losses_before = token_loss_sum(trained, batch), token_loss_sum(start, batch)
    assert losses_after < 0.5 * losses_before, (losses_after, losses_before)


def test_frame_embeddings_train_with_the_perceiver_in_a_default_run(model_dir, tmp_path):
    data = write_finetune_set(tmp_path / "data")
    out = train(quick_config(model_dir, [data], tmp_path / "out", resample_frames=4, max_steps=3, batch_size=4,
                             lr=1e-2))
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if before[name].shape == after[name].shape  # the embeddings grew <answer>
               and not torch.equal(before[name], after[name])}
    assert "perceiver.frame_embs" in changed
    assert all(name.startswith("perceiver.") or ".gated_cross_attn_layer." in name for name in changed)


def test_more_frames_than_the_model_takes_are_refused_before_training(model_dir, tmp_path):
    data = write_finetune_set(tmp_path / "data")
    with pytest.raises(ValueError, match=r"resample_frames is 16, but .* takes at most 4 frames per video .*"
                                         r"--resample-frames 4"):
        train(quick_config(model_dir, [data], tmp_path / "out"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="resample_frames must be >= 1"):
        TrainingConfig(model="m", data=["d.jsonl"], out="o", resample_frames=0)


def test_checkpoints_of_runs_before_video_options_resume(model_dir, tmp_path):
    """A checkpoint whose config has no resample_frames / video_sets (saved before they existed) ran with defaults."""
    config = quick_config(model_dir, [write_jsonl(tmp_path / "data")], tmp_path / "out", max_steps=1, save_every=1)
    train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    state_path = tmp_path / "out" / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["resample_frames"], state["config"]["video_sets"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="resample_frames: 16 -> 8"):
        train(TrainingConfig(**{**config.__dict__, "resume": True, "max_steps": 2, "resample_frames": 8}))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train(TrainingConfig(**{**config.__dict__, "resume": True, "max_steps": 2}))
    assert [record["step"] for record in read_metrics(config.out)] == [1, 2]
