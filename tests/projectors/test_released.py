"""MokA / Crab released stage-1 projectors (LAVIS BERT Q-Former key names) into QFormerProjector:
a strict key map, unused parts skipped by name, and errors naming leftover or missing keys."""

from __future__ import annotations

import os

import pytest
import torch

from mllm.cli import main
from mllm.config import config_from_dict
from mllm.projectors import ProjectorCheckpointError, load_projectors
from mllm.projectors.released import import_released_projectors
from tests.conftest import TINY_PROJECTOR, model_section

H, I, E, LLM, VOCAB = 32, 64, 32, 32, 50   # tiny stand-ins for 768, 3072, 1024 / 768, 4096, 30522


def official_state(prefix="model.vl_projector.", stem="visual", layers=2, seed=0, encoder_width=E):
    """A state dict with the released files' names (datasets.md section 4.2), written out by hand."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    p, q = f"{prefix}{stem}_", f"{prefix}{stem}_Qformer."
    state = {f"{p}ln.weight": r(encoder_width), f"{p}ln.bias": r(encoder_width), f"{p}query_tokens": r(1, 4, H),
             f"{q}bert.embeddings.word_embeddings.weight": r(VOCAB, H),
             f"{q}bert.embeddings.position_embeddings.weight": r(16, H),
             f"{q}bert.embeddings.LayerNorm.weight": r(H), f"{q}bert.embeddings.LayerNorm.bias": r(H),
             f"{q}cls.predictions.bias": r(VOCAB),
             f"{q}cls.predictions.transform.dense.weight": r(H, H), f"{q}cls.predictions.transform.dense.bias": r(H),
             f"{q}cls.predictions.transform.LayerNorm.weight": r(H),
             f"{q}cls.predictions.transform.LayerNorm.bias": r(H),
             f"{p}proj.0.weight": r(LLM, H), f"{p}proj.0.bias": r(LLM),
             f"{p}proj.2.weight": r(LLM, LLM), f"{p}proj.2.bias": r(LLM),
             "model.embed_tokens.weight": r(60, LLM)}
    for i in range(layers):
        L = f"{q}bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[f"{L}attention.self.{name}.weight"], state[f"{L}attention.self.{name}.bias"] = r(H, H), r(H)
            width = H if name == "query" else encoder_width
            (state[f"{L}crossattention.self.{name}.weight"],
             state[f"{L}crossattention.self.{name}.bias"]) = r(H, width), r(H)
        for block in ("attention", "crossattention"):
            state[f"{L}{block}.output.dense.weight"], state[f"{L}{block}.output.dense.bias"] = r(H, H), r(H)
            state[f"{L}{block}.output.LayerNorm.weight"], state[f"{L}{block}.output.LayerNorm.bias"] = r(H), r(H)
        for ffn, out in (("intermediate_query", "output_query"), ("intermediate", "output")):  # query FFN, text FFN
            state[f"{L}{ffn}.dense.weight"], state[f"{L}{ffn}.dense.bias"] = r(I, H), r(I)
            state[f"{L}{out}.dense.weight"], state[f"{L}{out}.dense.bias"] = r(H, I), r(H)
            state[f"{L}{out}.LayerNorm.weight"], state[f"{L}{out}.LayerNorm.bias"] = r(H), r(H)
    return state


def save(state, path):
    torch.save(state, path)
    return str(path)


def test_strict_import_uses_every_key_and_matches_by_name(tmp_path):
    state = official_state()
    projector = import_released_projectors([save(state, tmp_path / "visual_pretrain.bin")], num_heads=4)["visual"]
    cfg = projector.config
    assert (cfg.num_queries, cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.encoder_hidden_size,
            cfg.llm_hidden_size) == (4, H, 2, I, E, LLM)
    ours = projector.state_dict()
    q = "model.vl_projector.visual_Qformer.bert."
    assert torch.equal(ours["query_tokens"], state["model.vl_projector.visual_query_tokens"])
    assert torch.equal(ours["encoder_norm.bias"], state["model.vl_projector.visual_ln.bias"])
    assert torch.equal(ours["qformer.layernorm.weight"], state[q + "embeddings.LayerNorm.weight"])
    assert torch.equal(ours["qformer.encoder.layer.1.attention.attention.key.weight"],
                       state[q + "encoder.layer.1.attention.self.key.weight"])
    assert torch.equal(ours["qformer.encoder.layer.0.crossattention.attention.value.weight"],
                       state[q + "encoder.layer.0.crossattention.self.value.weight"])
    assert torch.equal(ours["qformer.encoder.layer.1.output_query.LayerNorm.bias"],
                       state[q + "encoder.layer.1.output_query.LayerNorm.bias"])
    assert torch.equal(ours["mlp.2.weight"], state["model.vl_projector.visual_proj.2.weight"])
    # Every parameter came from the file: each equals some released tensor.
    released = list(state.values())
    assert all(any(v.shape == r.shape and torch.equal(v, r) for r in released) for v in ours.values())
    # And the forward pass runs on the imported weights.
    assert projector(torch.randn(2, 5, E)).shape == (2, 4, LLM)


def test_a_renamed_key_is_refused_naming_it_and_the_missing_one(tmp_path):
    state = official_state()
    old = "model.vl_projector.visual_Qformer.bert.encoder.layer.1.crossattention.self.query.weight"
    state[old.replace(".self.query.", ".self.q.")] = state.pop(old)
    with pytest.raises(ProjectorCheckpointError, match=r"left over \[.*layer\.1\.crossattention\.self\.q\.weight'\], "
                                                       r"missing \[.*layer\.1\.crossattention\.self\.query\.weight'\]"):
        import_released_projectors([save(state, tmp_path / "renamed.bin")], num_heads=4)


def test_only_the_named_unused_keys_are_skipped(tmp_path):
    state = official_state()
    state["model.vl_projector.visual_Qformer.bert.embeddings.token_type_embeddings.weight"] = torch.zeros(2, H)
    with pytest.raises(ProjectorCheckpointError, match="token_type_embeddings"):
        import_released_projectors([save(state, tmp_path / "extra.bin")], num_heads=4)
    state = official_state()
    del state["model.vl_projector.visual_proj.2.bias"]
    with pytest.raises(ProjectorCheckpointError, match=r"missing \['model.vl_projector.visual_proj.2.bias'\]"):
        import_released_projectors([save(state, tmp_path / "short.bin")], num_heads=4)


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"model.vl_projector.visual_ln.weight": os.getcwd}, path)  # a callable, not a tensor
    with pytest.raises(ProjectorCheckpointError,
                       match="not a loadable weights file.*(weights_only|Unsupported global)"):
        import_released_projectors([str(path)])


def test_cli_import_then_stage2_config_loads_it(tiny_assets, tmp_path, capsys):
    visual = save(official_state(), tmp_path / "visual_pretrain.bin")
    audio = save(official_state("model.al_projector.", "audio", seed=1, encoder_width=24),
                 tmp_path / "audio_pretrain.bin")
    out = tmp_path / "imported"
    assert main(["data", "import-projectors", visual, audio, "--out", str(out), "--num-heads", "4"]) == 0
    assert "audio: 4 queries, 2 layers, encoder width 24" in capsys.readouterr().out
    loaded = load_projectors(str(out))
    assert sorted(loaded) == ["audio", "visual"] and loaded["audio"].config.num_heads == 4

    from mllm.model import MultimodalLM

    # model.pretrained_projectors may name the released file itself (the tiny LLM is 32 wide, CLIP 32).
    section = model_section(tiny_assets, pretrained_projectors=visual)
    model = MultimodalLM.from_config(config_from_dict({"model": section}).model)
    assert torch.equal(model.projectors["visual"].mlp[0].weight,
                       official_state()["model.vl_projector.visual_proj.0.weight"])
    # A file whose sizes do not fit the model's projector is refused, naming the tensor.
    wide = official_state()
    wide["model.vl_projector.visual_proj.0.weight"] = torch.zeros(LLM + 1, H)
    wide["model.vl_projector.visual_proj.0.bias"] = torch.zeros(LLM + 1)
    section["pretrained_projectors"] = save(wide, tmp_path / "wide.bin")
    with pytest.raises(ProjectorCheckpointError, match=r"visual 'mlp.0.weight' has shape \(33, 32\)"):
        MultimodalLM.from_config(config_from_dict({"model": section}).model)
    # A file for a modality the model lacks is refused too.
    section["pretrained_projectors"] = [visual, audio]
    with pytest.raises(ProjectorCheckpointError, match="holds a audio projector but the model has no audio encoder"):
        MultimodalLM.from_config(config_from_dict({"model": section}).model)
    assert TINY_PROJECTOR["hidden_size"] == H


def salmonn_checkpoint(whisper=40, beats=24, layers=2, seed=2):
    """A SALMONN checkpoint as runner.save_checkpoint writes it (datasets.md section 4.4): the trainable
    weights under 'model' with the official names (speech Q-Former without text parts, its
    position_ids buffer, one query, ln_speech / ln_audio, speech_llama_proj, LoRA on q/v) beside
    the run's config and epoch."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    bert, width = "speech_Qformer.bert.", whisper + beats
    state = {f"{bert}embeddings.LayerNorm.weight": r(H), f"{bert}embeddings.LayerNorm.bias": r(H),
             f"{bert}embeddings.position_ids": torch.arange(16).unsqueeze(0),
             "speech_query_tokens": r(1, 1, H), "ln_speech.weight": r(whisper), "ln_speech.bias": r(whisper),
             "ln_audio.weight": r(beats), "ln_audio.bias": r(beats),
             "speech_llama_proj.weight": r(LLM, H), "speech_llama_proj.bias": r(LLM)}
    for i in range(layers):
        L = f"{bert}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[f"{L}attention.self.{name}.weight"], state[f"{L}attention.self.{name}.bias"] = r(H, H), r(H)
            state[f"{L}crossattention.self.{name}.weight"] = r(H, H if name == "query" else width)
            state[f"{L}crossattention.self.{name}.bias"] = r(H)
        for block in ("attention", "crossattention"):
            state[f"{L}{block}.output.dense.weight"], state[f"{L}{block}.output.dense.bias"] = r(H, H), r(H)
            state[f"{L}{block}.output.LayerNorm.weight"], state[f"{L}{block}.output.LayerNorm.bias"] = r(H), r(H)
        state[f"{L}intermediate_query.dense.weight"], state[f"{L}intermediate_query.dense.bias"] = r(I, H), r(I)
        state[f"{L}output_query.dense.weight"], state[f"{L}output_query.dense.bias"] = r(H, I), r(H)
        state[f"{L}output_query.LayerNorm.weight"], state[f"{L}output_query.LayerNorm.bias"] = r(H), r(H)
        lora = f"llama_model.base_model.model.model.layers.{i}.self_attn."
        for proj in ("q_proj", "v_proj"):
            state[f"{lora}{proj}.lora_A.default.weight"] = r(8, LLM)
            state[f"{lora}{proj}.lora_B.default.weight"] = r(LLM, 8)
    return {"model": state, "config": {"model": {"num_speech_query_token": 1, "second_per_window": 0.333333}},
            "epoch": 3}


def test_a_salmonn_checkpoint_is_refused_saying_what_differs(tiny_assets, tmp_path, capsys):
    """SALMONN's speech Q-Former does not map (README, released projectors): the file is refused in
    one line naming the two differences, by the import command and by model.pretrained_projectors."""
    path = save(salmonn_checkpoint(), tmp_path / "salmonn_7b_v0.pth")
    expected = (f"{path}: a SALMONN checkpoint (speech_Qformer.*) does not map onto this project's projector: "
                f"its Q-Former reads Whisper and BEATs features concatenated per frame (40 + 24 = 64 wide), each "
                f"through its own LayerNorm (ln_speech, ln_audio), where a projector here reads one encoder "
                f"through one LayerNorm; it projects with one Linear (speech_llama_proj (32, 32)) where a "
                f"projector here has Linear-GELU-Linear")
    with pytest.raises(ProjectorCheckpointError) as err:
        import_released_projectors([path], num_heads=4)
    assert str(err.value) == expected
    assert main(["data", "import-projectors", path, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"mllm data: error: {expected}"]
    assert not (tmp_path / "out").exists()
    from mllm.model import MultimodalLM

    section = model_section(tiny_assets, pretrained_projectors=path)
    with pytest.raises(ProjectorCheckpointError, match="SALMONN checkpoint .* does not map"):
        MultimodalLM.from_config(config_from_dict({"model": section}).model)
