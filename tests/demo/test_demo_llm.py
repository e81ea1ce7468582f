"""``mllm demo --llm PATH --scale X``: the embedded demo with a user's causal LM (another
architecture, its own ChatML template) in place of the tiny LLaMA, and scaled training."""

from __future__ import annotations

import json
import os

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import mllm.cli
from mllm.data.tiny_tokenizer import build_tiny_tokenizer


def _user_lm(path: str) -> str:
    corpus = ["what colour is the shape", "a red circle on the left", "how many beeps", "yes no two three"] * 8
    tokenizer = build_tiny_tokenizer(corpus, style="qwen2", vocab_size=400)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=True))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_demo_runs_with_a_users_lm_and_scaled_epochs(tmp_path, capsys):
    llm = _user_lm(str(tmp_path / "my-qwen"))
    out = tmp_path / "demo"
    assert mllm.cli.main(["demo", "--visual-only", "--quick", "--llm", llm, "--scale", "0.2",
                          "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"with the LM {llm}" in printed and "majority-answer baseline" in printed
    stage2 = out / "runs" / "instruct"
    saved = json.loads((stage2 / "mllm_config.json").read_text())
    assert json.dumps(saved).count(llm) >= 1                          # the checkpoint names the user's LM
    assert not os.path.exists(out / "assets" / "tiny-llama" / "lm-text-pretrained")   # tiny LM never trained
    # The user's ChatML template renders the prompts, and --scale cut the quick run's one epoch to a fifth.
    tokenizer_config = json.loads((stage2 / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in json.dumps(tokenizer_config)
    state = json.loads((stage2 / "trainer_state.json").read_text())
    assert 0.15 <= state["epoch"] <= 0.25
