"""Videos: decoding and sampling, the processor's `videos=`, frame masking in the model, chunked encoding, and the
commands (issue 20)."""

import io
import sys

import numpy as np
import pytest
import torch

from otter.cli import main
from otter.processing_otter import DEFAULT_VIDEO_FRAMES
from otter.tiny import build_tiny_otter
from otter.video import UnreadableVideoError, rate_indices, read_video, uniform_indices

from .conftest import set_gates
from .video_fixtures import FORMATS, colour_frames, frame_indices, write_video

FRAMES = 12  # written at 10 fps


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {suffix: write_video(folder / f"clip.{suffix}", colour_frames(FRAMES)) for suffix in FORMATS}


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_otter("mpt", cross_attn_every_n_layers=2, max_num_frames=8)
    set_gates(model)
    return model.eval(), processor


def test_sampling_is_uniform_with_both_ends_or_by_rate():
    assert uniform_indices(12, 4) == [0, 3, 7, 11]  # Otter's resample_frames: linspace(0, n - 1, k, dtype=int)
    assert uniform_indices(3, 8) == [0, 1, 2]  # a short video keeps its frames, none repeated
    assert rate_indices(12, video_fps=10, fps=2.5) == [0, 4, 8]
    assert rate_indices(12, video_fps=10, fps=10, num_frames=3) == [0, 5, 11]


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_container_decodes_to_the_frames_written(videos, suffix):
    assert frame_indices(read_video(videos[suffix]), FRAMES) == list(range(FRAMES))
    assert frame_indices(read_video(videos[suffix], num_frames=4), FRAMES) == [0, 3, 7, 11]
    assert frame_indices(read_video(videos[suffix], fps=2.5), FRAMES) == [0, 4, 8]


def test_videos_given_as_frames_arrays_and_tensors(videos):
    frames = colour_frames(FRAMES)
    array = np.stack([np.asarray(frame) for frame in frames])  # (T, H, W, C)
    for given in (frames, array, torch.from_numpy(array).permute(0, 3, 1, 2)):
        assert frame_indices(read_video(given, num_frames=4), FRAMES) == [0, 3, 7, 11]
    with pytest.raises(ValueError, match="frames given as a list or array have none"):
        read_video(frames, fps=2)


def test_unreadable_videos_are_named(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(UnreadableVideoError, match="broken.mp4 could not be decoded"):
        read_video(broken)
    with pytest.raises(UnreadableVideoError, match="missing.mp4 does not exist"):
        read_video(tmp_path / "missing.mp4")


def test_the_processor_takes_videos_in_every_form_and_marks_them_with_image(tiny, videos):
    _, processor = tiny
    lossless = processor(text="<video>What happens?", videos=[videos["avi"]], num_frames=4)
    frames = colour_frames(FRAMES)
    for given in (frames, np.stack([np.asarray(frame) for frame in frames]), videos["mkv"]):
        batch = processor(text="<video>What happens?", videos=given, num_frames=4)
        assert torch.allclose(batch["pixel_values"], lossless["pixel_values"], atol=1e-6)
    assert lossless["pixel_values"].shape == (1, 1, 4, 3, 32, 32) and "frame_mask" not in lossless
    # the model reads a video's marker as <image>, as Otter's checkpoints were trained
    assert torch.equal(lossless["input_ids"], processor(text="<image>What happens?", images=[frames[0]])["input_ids"])
    # one frame each, processed like an image
    image = processor(text="<image>", images=[frames[3]])["pixel_values"][0]
    assert torch.allclose(lossless["pixel_values"][0, 0, 1], image, atol=1e-6)
    # the default frame count is the processor's num_frames (the model's max_num_frames when built with one)
    assert processor.num_frames == 8
    assert processor(text="<video>", videos=[videos["avi"]])["pixel_values"].shape[2] == 8
    processor.num_frames = None
    try:
        assert processor(text="<video>", videos=[videos["avi"]])["pixel_values"].shape[2] == min(FRAMES,
                                                                                                 DEFAULT_VIDEO_FRAMES)
    finally:
        processor.num_frames = 8
    with pytest.raises(ValueError, match=r"1 <video> markers \(\[1\] per sample\) but 2 videos"):
        processor(text="<video>", videos=[videos["avi"], videos["mkv"]])


def test_images_and_videos_mixed_in_a_batch_give_what_each_gives_alone(tiny, videos):
    model, processor = tiny
    frames = colour_frames(FRAMES)
    texts = ["<video>What happens?", "<image>A picture, then<video>a clip. What changed?", "Just text."]
    images = [[], [frames[5]], []]
    clips = [[videos["avi"]], [frames[:3]], []]
    batch = processor(text=texts, images=images, videos=clips, num_frames=6)
    assert batch["pixel_values"].shape == (3, 2, 6, 3, 32, 32)
    assert batch["frame_mask"].tolist() == [[[1] * 6, [0] * 6], [[1] + [0] * 5, [1] * 3 + [0] * 3], [[0] * 6] * 2]
    with torch.no_grad():
        together = model(**batch).logits
        for row in range(3):
            alone = processor(text=texts[row], images=[images[row]], videos=[clips[row]], num_frames=6)
            logits = model(**alone).logits[0]
            assert (together[row, -logits.shape[0]:] - logits).abs().max() <= 1e-5
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, batch["input_ids"].shape[1] + 3)


def test_long_videos_encode_in_chunks_to_the_same_features(tiny, videos):
    model, processor = tiny
    batch = processor(text="<video>", videos=[videos["avi"]], num_frames=8)
    calls = []
    hook = model.vision_model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["pixel_values"]
                                                                                              .shape[0]),
                                                        with_kwargs=True)
    try:
        with torch.no_grad():
            whole = model.get_image_features(batch["pixel_values"])
            model.config.vision_chunk_size = 3
            chunked = model.get_image_features(batch["pixel_values"])
    finally:
        model.config.vision_chunk_size = None
        hook.remove()
    assert calls == [8, 3, 3, 2]
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_chat_template_apply_chat_template_and_pipeline_with_a_video(tiny, videos, tmp_path):
    from transformers import pipeline

    model, processor = tiny
    messages = [{"role": "user", "content": [{"type": "video", "path": str(videos["avi"])},
                                             {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    answer_token = "<answer>" if "<answer>" in processor.tokenizer.get_vocab() else ""
    assert text == f"<video>User: What happens? GPT:{answer_token}"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           processor_kwargs={"num_frames": 4})
    expected = processor(text=text, videos=[videos["avi"]], num_frames=4)
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "model"))
    reply = pipe(text=messages, max_new_tokens=3, return_full_text=False)[0]["generated_text"]
    direct = model.generate(**processor(text=text, videos=[videos["avi"]]), max_new_tokens=3, do_sample=False)
    assert reply == processor.post_process_image_text_to_text(direct[:, expected["input_ids"].shape[1]:])[0]


def test_otter_generate_and_chat_take_video_files(tiny, videos, tmp_path, capsys, monkeypatch):
    from otter.chat import answer, chat_prompt, chat_template, read_video as read_clip

    model, processor = tiny  # its tokenizer has no <answer>: OpenFlamingo-style prompts, the chat without <answer>
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    folder = str(tmp_path / "model")
    clip = read_clip(str(videos["avi"]), processor)
    assert clip.frames and len(clip.frames) == 8
    main(["generate", "--model", folder, "--video", str(videos["avi"]), "--prompt", "What happens?",
          "--max-new-tokens", "4"])
    assert capsys.readouterr().out == answer(model, processor, "<video>What happens?", [clip], max_new_tokens=4,
                                             do_sample=False) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {videos['avi']}\nWhat happens?\n/video nowhere.mp4\n"))
    main(["chat", "--model", folder, "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    prompt = chat_prompt([], "What happens?", [clip], chat_template("raw"))
    assert prompt == "<video>User: What happens? GPT:"
    assert captured.out == answer(model, processor, prompt, [clip], max_new_tokens=4, do_sample=False) + "\n"
    assert "nowhere.mp4 does not exist" in captured.err
