"""Native vision-language backbones (Qwen2.5-VL, Qwen2-VL, LLaVA-1.5) as ``model.llm``, with a
BEATs audio branch spliced beside their own vision: invariance against the released model's own
forward, splicing, Qwen-VL's 3-D rotary positions, KV-cache generation, modality ids for MokA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from mllm.config import TunerConfig, config_from_dict
from mllm.modality import Modality
from mllm.model import MultimodalLM
from mllm.model.native.model import NativeVisionLM
from mllm.model.native.tiny import build_tiny_llava, build_tiny_qwen_vl
from tests.conftest import TINY_PROJECTOR
from tests.encoders.test_beats import random_model, save_official
from tests.encoders.test_whisper import write_checkpoint

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava")
IMAGE_TEXT = {"llava": "<image>\n", "qwen": "<|vision_start|><|image_pad|><|vision_end|>"}


@pytest.fixture(scope="module")
def native_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    save_official(root / "beats.pt", random_model())
    write_checkpoint(root / "whisper.pt", n_mels=80)
    dirs = {"beats": str(root / "beats.pt"), "whisper": str(root / "whisper.pt"),
            "llava": build_tiny_llava(str(root / "llava"))}
    for family in ("qwen2_5_vl", "qwen2_vl"):
        dirs[family] = build_tiny_qwen_vl(str(root / family), family=family)
    return dirs


def build(native_dirs, family: str, tuner: dict | None = None, **model_extra) -> NativeVisionLM:
    torch.manual_seed(0)
    section = {"llm": native_dirs[family],
               "encoders": {"audio": {"type": "beats", "path": native_dirs["beats"],
                                      "num_windows": 2, "window_seconds": 1.0}},
               "projectors": {"audio": dict(TINY_PROJECTOR)}, **model_extra}
    model = MultimodalLM.from_config(config_from_dict({"model": section}).model)
    if tuner is not None:
        model.freeze_llm()
        model.apply_tuner(TunerConfig(**tuner))
    return model.eval()


def image(seed: int, size=(30, 45)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def audio_inputs(model: NativeVisionLM, count: int) -> torch.Tensor:
    waves = [np.sin(np.arange(24000) * (0.01 + 0.02 * k)).astype(np.float32) * 0.3 for k in range(count)]
    return torch.stack([model.processor.preprocess("<audio>", w) for w in waves])


def prompts(model: NativeVisionLM, questions: list[str], images: list, with_audio: bool, videos=None):
    """Left-padded batch from the checkpoint's own processor; each ``<audio>`` is written as
    as many placeholder tokens as the audio projector emits."""
    audio = "<audio>" * model.num_media_tokens("<audio>") if with_audio else ""
    vision = IMAGE_TEXT["llava" if model.family == "llava" else "qwen"]
    if videos is not None:
        vision = "<|vision_start|><|video_pad|><|vision_end|>"
    texts = [f"{vision}{audio}{q}" for q in questions]
    model.processor.hf_processor.tokenizer.padding_side = "left"
    media = {"videos": videos} if videos is not None else {"images": images}
    return dict(model.processor.hf_processor(text=texts, padding=True, return_tensors="pt", **media))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tuner", [None, {"type": "lora"},
                                   {"type": "moka", "options": {"modalities": ["text", "visual", "audio"]}}],
                         ids=["plain", "lora", "moka"])
def test_without_audio_logits_equal_the_native_models_own(native_dirs, family, tuner):
    model = build(native_dirs, family, tuner)
    assert isinstance(model, NativeVisionLM)
    native = AutoModelForImageTextToText.from_pretrained(native_dirs[family]).eval()
    batch = prompts(model, ["What is it?", "What colour is the square here?"], [image(1), image(2, (40, 33))], False)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = native(**batch).logits
    keep = batch["attention_mask"].bool()
    diff = (ours - theirs)[keep].abs().max().item()
    print(f"{family} {tuner and tuner['type']}: max |logit difference| = {diff:.3g}")
    assert diff < 1e-5


def test_video_logits_equal_the_native_models_own(native_dirs):
    model = build(native_dirs, "qwen2_5_vl")
    native = AutoModelForImageTextToText.from_pretrained(native_dirs["qwen2_5_vl"]).eval()
    frames = [np.stack([np.asarray(image(10 * v + f, (32, 32))) for f in range(5)]) for v in range(2)]
    batch = prompts(model, ["What happens?", "And in this one, what moves?"], None, False, videos=frames)
    assert "second_per_grid_ts" in batch and batch["video_grid_thw"].tolist()[0][0] == 3
    with torch.no_grad():
        diff = (model(**batch).logits - native(**batch).logits)[batch["attention_mask"].bool()].abs().max().item()
    print(f"qwen2_5_vl video: max |logit difference| = {diff:.3g}")
    assert diff < 1e-5


def _lm_inputs(model, batch, **extra):
    """What the language model received (inputs_embeds, position_ids) in one forward."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"].detach(), positions=kwargs.get("position_ids"))
    handle = model.base_llm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch, **extra)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_audio_features_land_at_audio_positions_and_image_features_at_the_pads(native_dirs, family):
    model = build(native_dirs, family)
    batch = prompts(model, ["Which instrument?", "Is it loud?"], [image(3), image(4)], True)
    audio = audio_inputs(model, 2)
    seen = _lm_inputs(model, batch, audio_inputs=audio, question_mask=batch["attention_mask"].bool())
    audio_id = model.placeholder_ids["<audio>"]
    image_id = model.native_token_ids["image"]
    with torch.no_grad():
        expected_audio = model.encode_media("<audio>", audio).reshape(-1, seen["embeds"].shape[-1])
        expected_image = model.native_features("image", batch)
    torch.testing.assert_close(seen["embeds"][batch["input_ids"] == audio_id], expected_audio)
    torch.testing.assert_close(seen["embeds"][batch["input_ids"] == image_id], expected_image)
    ids = model.modality_context.modality_ids
    assert (ids[batch["input_ids"] == audio_id] == Modality.AUDIO).all()
    assert (ids[batch["input_ids"] == image_id] == Modality.VISUAL).all()
    text = batch["attention_mask"].bool() & (batch["input_ids"] != audio_id) & (batch["input_ids"] != image_id)
    assert (ids[text] == Modality.TEXT).all() and (ids[~batch["attention_mask"].bool()] == Modality.PAD).all()
    # The question mask keeps only text: media positions inside the user turn are not question.
    assert torch.equal(model.modality_context.question_mask, text)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_positions_count_audio_as_text(native_dirs, family):
    model = build(native_dirs, family)
    batch = prompts(model, ["Which instrument?", "Is it loud at all?"], [image(3), image(4, (40, 60))], True)
    positions = _lm_inputs(model, batch, audio_inputs=audio_inputs(model, 2))["positions"]
    # The same sequence with each audio token replaced by an ordinary text token.
    audio = batch["input_ids"] == model.placeholder_ids["<audio>"]
    as_text = batch["input_ids"].masked_fill(audio, model.tokenizer.convert_tokens_to_ids("A"))
    expected, _ = model.base_llm.model.get_rope_index(
        as_text, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"])
    assert positions.shape == (3, *batch["input_ids"].shape)
    torch.testing.assert_close(positions, expected)
    # Audio follows <|vision_end|> with one position per token, the same on all three axes.
    row = positions[:, 1, audio[1]]
    assert (row[0] == row[1]).all() and (row[0] == row[2]).all()
    assert row[0].tolist() == list(range(row[0, 0].item(), row[0, 0].item() + int(audio[1].sum())))


def _greedy_without_cache(model, batch, branches, steps):
    """Greedy decoding by full forwards (no KV cache); ``branches``: audio_inputs (a tensor) or a
    dict of new-branch inputs."""
    branches = branches if isinstance(branches, dict) else {"audio_inputs": branches}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **branches, **media).logits
            token = logits[:, -1].argmax(-1)
            token = token.masked_fill(finished, model.tokenizer.pad_token_id)
            finished |= token == model.tokenizer.eos_token_id
            out.append(token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_generation_equals_a_cache_free_greedy_loop(native_dirs, family):
    model = build(native_dirs, family, {"type": "moka", "options": {"modalities": ["text", "visual", "audio"],
                                                                    "init_weights": False}})
    batch = prompts(model, ["Which instrument plays?", "Loud?"], [image(5), image(6, (50, 30))], True)
    assert (batch["attention_mask"][1] == 0).any()  # the second prompt is left-padded
    audio = audio_inputs(model, 2)
    steps = 6
    generated = model.generate(**batch, audio_inputs=audio, max_new_tokens=steps, do_sample=False)
    reference = _greedy_without_cache(model, batch, audio, steps)
    assert generated.shape[1] >= 1
    torch.testing.assert_close(generated, reference[:, :generated.shape[1]], rtol=0, atol=0)
    # The cached rope offset is reset: a second batch of another size generates the same answers.
    first = model.generate(**prompts(model, ["Which instrument plays?"], [image(5)], True),
                           audio_inputs=audio[:1], max_new_tokens=steps, do_sample=False)
    torch.testing.assert_close(first, generated[:1, :first.shape[1]], rtol=0, atol=0)


def test_moka_routes_native_image_tokens_as_visual_and_audio_as_audio(native_dirs):
    model = build(native_dirs, "qwen2_5_vl", {"type": "moka", "options": {"modalities": ["text", "visual", "audio"],
                                                                          "init_weights": False}})
    model.train()
    layer = model.base_llm.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    layout = layer.moka_layout["default"]

    def block_grads(batch, **extra):
        model.zero_grad(set_to_none=True)
        media = torch.isin(batch["input_ids"], torch.tensor([model.placeholder_ids["<audio>"],
                                                              model.native_token_ids["image"]]))
        labels = batch["input_ids"].masked_fill((batch["attention_mask"] == 0) | media, -100)
        model(**batch, labels=labels, **extra).loss.backward()
        grad = layer.moka_A["default"].grad
        return {m: grad[layout.block(layout.modalities.index(m))].abs().sum().item() for m in layout.modalities}

    image_only = block_grads(prompts(model, ["What is it?"], [image(7)], False))
    assert image_only["visual"] > 0 and image_only["text"] > 0 and image_only["audio"] == 0
    both = block_grads(prompts(model, ["What plays?"], [image(7)], True), audio_inputs=audio_inputs(model, 1))
    assert both["visual"] > 0 and both["audio"] > 0
    # Tuner layers only in the language model, none in the vision tower or connector.
    adapted = [n for n, m in model.base_llm.named_modules() if hasattr(m, "moka_A")]
    assert adapted and all(".language_model." in n for n in adapted)


NATIVE_RECIPES = ("configs/audio/music_avqa_moka_qwen2_5_vl.yaml", "configs/native/llava_1_5_beats.yaml")


@pytest.mark.parametrize("recipe", NATIVE_RECIPES)
def test_native_recipes_parse_and_run_on_a_tiny_backbone_of_their_family(native_dirs, recipe):
    """The shipped recipes parse; with the backbone and BEATs paths pointed at tiny local copies
    (and small Q-Formers) their model and tuner sections build a NativeVisionLM whose tuner adapts
    only the language model."""
    import os

    from mllm.config import load_config
    from mllm.train.trainer import MllmTrainingArguments
    from mllm.tuners import build_peft_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, recipe))
    build_peft_config(cfg.tuner)
    MllmTrainingArguments(**{**cfg.training, "bf16": False, "use_cpu": True})
    family = "qwen2_5_vl" if "qwen2_5_vl" in recipe else "llava"
    assert ("Qwen2.5-VL" if family == "qwen2_5_vl" else "llava-1.5") in cfg.model.llm
    assert set(cfg.model.encoders) == {"audio"} and not cfg.model.train_native_connector
    model = cfg.model
    model.llm, model.dtype, model.pretrained_projectors = native_dirs[family], "float32", None
    model.encoders["audio"].path, model.encoders["audio"].dtype = native_dirs["beats"], None
    for name, value in TINY_PROJECTOR.items():
        setattr(model.projectors["audio"], name, value)
    built = MultimodalLM.from_config(model)
    assert isinstance(built, NativeVisionLM) and built.family == ("qwen_vl" if family == "qwen2_5_vl" else "llava")
    built.freeze_llm()
    built.apply_tuner(cfg.tuner)
    adapted = [n for n, p in built.base_llm.named_parameters() if p.requires_grad]
    assert adapted and all(".language_model." in n for n in adapted)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_qlora_quantises_only_the_language_model(native_dirs, family):
    model = build(native_dirs, family, {"type": "moka", "options": {"modalities": ["text", "visual", "audio"]}},
                  quantization="nf4")
    kinds = {n: type(m).__name__ for n, m in model.base_llm.named_modules() if isinstance(m, torch.nn.Linear)}
    vision = {n: k for n, k in kinds.items() if not n.startswith("model.language_model.") and n != "lm_head"}
    language = {n: k for n, k in kinds.items() if n.startswith("model.language_model.") and "moka" not in n}
    assert vision and all(k == "Linear" for k in vision.values())
    assert language and all(k == "Linear4bit" for k in language.values())
    model.train()
    batch = prompts(model, ["What plays?"], [image(8)], True)
    media = torch.isin(batch["input_ids"],
                       torch.tensor([model.placeholder_ids["<audio>"], model.native_token_ids["image"]]))
    model(**batch, audio_inputs=audio_inputs(model, 1),
          labels=batch["input_ids"].masked_fill(media, -100)).loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0)
               for n, p in model.named_parameters() if "moka_B" in n)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_every_rank_runs_the_vision_tower_on_a_batch_without_images(native_dirs, family, monkeypatch):
    """ZeRO-3 needs every rank to run the native vision tower (and Qwen's video path) on every
    step: a text + audio batch on several ranks runs it on a blank item, changing nothing."""
    import mllm.model.native.model as native_model

    model = build(native_dirs, family, train_native_connector=True)
    model.freeze_llm()
    model.connector().requires_grad_(True)
    model.processor.hf_processor.tokenizer.padding_side = "left"
    batch = dict(model.processor.hf_processor(text=["<audio>" * model.num_media_tokens("<audio>") + "What plays?"],
                                 return_tensors="pt"))
    audio = audio_inputs(model, 1)
    calls = []
    handle = model.connector().register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        alone = model(**batch, audio_inputs=audio).logits
    assert not calls
    monkeypatch.setattr(native_model, "several_ranks", lambda: True)
    out = model(**batch, audio_inputs=audio)
    handle.remove()
    assert len(calls) == (2 if family == "qwen2_5_vl" else 1)  # image (+ video) once each
    torch.testing.assert_close(out.logits, alone, rtol=0, atol=0)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.connector().parameters())


def test_speech_beside_image_and_audio_on_qwen2_5_vl(native_dirs):
    """<speech> (Whisper + window-level Q-Former) joins image and audio: SPEECH ids, text
    positions on all three axes, and cached generation equal to the cache-free loop."""
    model = build(native_dirs, "qwen2_5_vl", {"type": "lora", "options": {"init_lora_weights": False}},
                  encoders={"audio": {"type": "beats", "path": native_dirs["beats"], "num_windows": 2,
                                      "window_seconds": 1.0},
                            "speech": {"type": "whisper", "path": native_dirs["whisper"]}},
                  projectors={"audio": dict(TINY_PROJECTOR),
                              "speech": dict(TINY_PROJECTOR, num_queries=1, window_size=100, window_stride=100)})
    speech_text = "<speech>" * model.num_media_tokens("<speech>")
    batch = prompts(model, [speech_text + "Who speaks?", speech_text + "Why?"], [image(11), image(12, (44, 36))], True)
    waves = [np.sin(np.arange(16000 * (2 + k)) * 0.03).astype(np.float32) * 0.2 for k in range(2)]
    speech = torch.stack([model.processor.preprocess("<speech>", w) for w in waves])
    extra = {"audio_inputs": audio_inputs(model, 2), "speech_inputs": speech}
    seen = _lm_inputs(model, batch, **extra)
    is_speech = batch["input_ids"] == model.placeholder_ids["<speech>"]
    assert (model.modality_context.modality_ids[is_speech] == Modality.SPEECH).all()
    with torch.no_grad():
        expected = model.encode_media("<speech>", speech).reshape(-1, seen["embeds"].shape[-1])
    torch.testing.assert_close(seen["embeds"][is_speech], expected)
    rows = seen["positions"][:, 0, is_speech[0]]
    assert (rows[0] == rows[1]).all() and (rows[0] == rows[2]).all()
    assert (rows[0].diff() == 1).all()
    generated = model.generate(**batch, **extra, max_new_tokens=5, do_sample=False)
    reference = _greedy_without_cache(model, batch, extra, 5)
    torch.testing.assert_close(generated, reference[:, :generated.shape[1]], rtol=0, atol=0)


def test_train_native_connector_on_a_causal_lm_is_a_config_error(tiny_assets):
    from mllm.config import ConfigError
    from tests.conftest import model_section

    cfg = config_from_dict({"model": model_section(tiny_assets, train_native_connector=True)})
    with pytest.raises(ConfigError, match="train_native_connector"):
        MultimodalLM.from_config(cfg.model)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_serving_batches_a_native_backbone_through_generate(native_dirs, family):
    """``mllm serve`` / ``mllm chat`` decode a native backbone with ``generate`` batches (Qwen-VL's
    3-D positions and rope offset are ``generate``'s), and batched rows equal each prompt alone."""
    import asyncio

    from mllm.serve.engine import GenerateBatchEngine, SamplingParams, create_engine
    from mllm.serve.inputs import Limits, build_prompt, collate_prompts, decode_media
    from tests.serve.conftest import run_requests, wav_bytes

    model = build(native_dirs, family)
    assert not model.supports_continuous_batching()
    audio = {freq: decode_media(model.processor, "audio", wav_bytes(1.0, freq), "audio", Limits())
             for freq in (440, 880)}
    prompts = [build_prompt(model, [{"role": "user", "content": f"<audio>\n{question}"}], {"audio": [audio[freq]]})
               for question, freq in (("What do you hear?", 440), ("Which tone is it, high or low?", 880))]
    engine = create_engine(model, max_batch_size=4, batch_window_s=0.05)
    params = SamplingParams(max_tokens=6, min_tokens=6)

    try:
        requests, _ = asyncio.run(run_requests(engine, [(0, prompt, params) for prompt in prompts]))
    finally:
        engine.close()
    assert isinstance(engine, GenerateBatchEngine) and engine.batch_sizes == [2]
    for request, prompt in zip(requests, prompts):
        alone = model.generate(**collate_prompts(model, [prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert request.finish_reason == "length" and request.tokens == alone[0].tolist()
