from otter.cli import main


def test_demo_runs_two_shot_prompting_end_to_end(capsys):
    main(["demo", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in out
    assert "<image>Question:what colour is the circle? Short answer:red<|endofchunk|>" in out
    assert "3 images" in out
    assert "answer: '" in out
