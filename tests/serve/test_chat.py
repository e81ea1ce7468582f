"""`mllm chat` driven through its stdin in a real process: two turns with images, bad input that does not end it."""

from __future__ import annotations

import os
import subprocess
import sys

from mllm.serve.inputs import Limits, build_prompt, decode_media_file, generate_text
from tests.serve.conftest import png_bytes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_turns_with_images_and_errors_that_do_not_end_the_session(av_checkpoint, served_model, tmp_path):
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(png_bytes("red", shape="circle"))
    second.write_bytes(png_bytes("blue", shape="square"))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF but not a wave file")
    script = "\n".join([
        f"/image {first}",
        "What color is the shape?",
        f"/image {tmp_path / 'missing.png'}",      # error: no such file
        f"/audio {broken}",                         # error: not decodable
        "/zoom 2",                                  # error: unknown command
        f"/image {second}",
        "And this one?",
        "/quit",
    ]) + "\n"
    result = subprocess.run([sys.executable, "-m", "mllm.cli", "chat", av_checkpoint, "--max-new-tokens", "8",
                             "--device", "cpu"], input=script, capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    answers = [line.split("Assistant: ", 1)[1] for line in out.splitlines() if "Assistant: " in line]
    errors = [line for line in out.splitlines() if "error: " in line]
    assert len(answers) == 2, out
    assert "missing.png: file not found" in errors[0]
    assert "broken.wav: not a decodable audio file" in errors[1]
    assert "unknown command /zoom" in errors[2]

    # The same conversation through MultimodalLM.generate: turn 2 sees turn 1 and both images.
    limits = Limits()
    images = [decode_media_file(served_model.processor, "image", str(p), limits) for p in (first, second)]
    turn1 = [{"role": "user", "content": "<image>\nWhat color is the shape?"}]
    want1 = generate_text(served_model, build_prompt(served_model, turn1, {"image": images[:1]}), max_new_tokens=8)
    turn2 = [*turn1, {"role": "assistant", "content": want1}, {"role": "user", "content": "<image>\nAnd this one?"}]
    want2 = generate_text(served_model, build_prompt(served_model, turn2, {"image": images}), max_new_tokens=8)
    assert answers == [want1, want2]


def test_a_turn_too_long_for_the_context_is_refused_and_the_session_goes_on(served_model):
    from mllm.chat import ChatSession
    from mllm.serve.engine import create_engine
    from mllm.serve.inputs import InputError

    engine = create_engine(served_model, max_batch_size=1, batch_window_s=0)
    try:
        session = ChatSession(served_model, engine, {"max_tokens": 4}, Limits(max_prompt_tokens=80))
        session.ask("Hello")
        kept = list(session.messages)
        try:
            session.ask("shape " * 100)
        except InputError as e:
            assert "this server takes at most 80" in str(e)
        else:
            raise AssertionError("a too-long turn was accepted")
        assert session.messages == kept           # the failed turn left the history as it was
        session.reset()
        assert session.ask("Hi again") is not None and len(session.messages) == 2
    finally:
        engine.close()
