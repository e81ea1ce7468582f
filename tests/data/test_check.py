"""The data pre-flight check: every record validated against the run before any model loads."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mllm.data.check import check_data, media_fields_for
from mllm.data.schema import RecordError


def _qa(rid, question="<image>\nWhat color is it?", **media):
    return {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}],
            **media}


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "a.png")
    return str(root)


def _write(tmp_path, records, raw_lines=()):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in raw_lines))
    return str(path)


@pytest.mark.parametrize("key,value,suggestion", [("images", "a.png", "image"), ("depth", "d.png", None),
                                                   ("audios", ["x.wav"], "audio"), ("vidoe", "v.mp4", "video")])
def test_an_unknown_media_field_is_an_error_naming_record_and_field(tmp_path, media_root, key, value, suggestion):
    """Today a typo'd field trains the record as text-only."""
    path = _write(tmp_path, [_qa("ok", image="a.png"), _qa("typo", question="Describe it.", **{key: value})])
    with pytest.raises(RecordError) as err:
        check_data(path, media_root=media_root)
    message = str(err.value)
    assert message.startswith(f"{path}:2: record 'typo': unknown media field '{key}'")
    assert ("did you mean" in message) == (suggestion is not None)
    if suggestion:
        assert f"did you mean '{suggestion}'" in message


def test_other_extra_fields_are_kept(tmp_path, media_root):
    path = _write(tmp_path, [_qa("ok", image="a.png", image_id="123", answer="red", question_type="color")])
    report = check_data(path, media_root=media_root)
    assert report.records[0].extra == {"image_id": "123", "answer": "red", "question_type": "color"}


def test_a_missing_media_file_is_caught_up_front(tmp_path, media_root):
    path = _write(tmp_path, [_qa("ok", image="a.png"), _qa("gone", image="missing.png")])
    with pytest.raises(RecordError, match=rf"{path}:2: record 'gone': 'image' file not found: .*media/missing\.png"):
        check_data(path, media_root=media_root)


def test_a_modality_without_an_encoder_is_caught(tmp_path, media_root):
    (tmp_path / "media" / "s.wav").write_bytes(b"")
    path = _write(tmp_path, [_qa("aud", question="<audio>\nWhat is it?", audio="s.wav")])
    with pytest.raises(RecordError, match="record 'aud'.*'audio' media but the model has no encoder"):
        check_data(path, media_root=media_root, media_fields=media_fields_for(["visual"]))
    assert media_fields_for(["visual"]) == {"image", "video"}


def test_skip_counts_each_bad_record_once_and_summarises_in_one_line(tmp_path, media_root):
    records = [_qa("good1", image="a.png"), _qa("good2", question="Just text?"),
               _qa("two-tags", question="<image> <image> hi", image="a.png"),       # placeholder count
               _qa("typo", question="Describe it.", images="a.png"),               # unknown media field
               _qa("gone", image="missing.png"), _qa("gone2", image=["a.png", "b.png"],
                                                     question="<image><image>")]   # missing media (one of two)
    path = _write(tmp_path, records, raw_lines=["{not json"])
    report = check_data(path, media_root=media_root, on_bad_sample="skip")
    assert [r.id for r in report.records] == ["good1", "good2"]
    assert report.skipped == {"missing media file": 2, "placeholder count mismatch": 1, "unknown media field": 1,
                              "malformed JSON": 1}
    assert report.summary() == (f"{path}: 2 records loaded (image 1, text-only 1); skipped 5 bad record(s): "
                                f"2 missing media file, 1 placeholder count mismatch, 1 unknown media field, "
                                f"1 malformed JSON")
    assert "missing.png" in report.examples["missing media file"]


def test_mllm_data_check_counts_one_problem_of_each_kind(tmp_path, capsys):
    """The command on a file with one problem of each kind: each counted once, with an example."""
    from PIL import Image

    from mllm.cli import main

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not an image")
    turn = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "good", "image": "ok.png", "conversations": turn},
        {"id": "typo", "images": "ok.png", "conversations": turn},                  # unknown media field
        {"id": "gone", "image": "missing.png", "conversations": turn},              # missing file
        {"id": "bad", "image": "corrupt.png", "conversations": turn},               # unreadable file
        {"id": "count", "image": ["ok.png", "ok.png"], "conversations": turn},      # 2 images, 1 placeholder
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    assert main(["data", "check", str(path), "--media-root", str(tmp_path), "--decode"]) == 1
    out = capsys.readouterr().out
    assert "1 records loaded (image 1)" in out and "skipped 5 bad record(s)" in out
    for reason in ("unknown media field", "missing media file", "unreadable media file"):
        assert f"     1  {reason}: e.g. " in out, out
    assert "train.jsonl:6" in out          # the malformed JSON line, named
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(records[0]) + "\n")
    assert main(["data", "check", str(clean), "--media-root", str(tmp_path)]) == 0


# ----------------------------------------------------------------------------- length against the context
def test_length_check_counts_as_training_does(tiny_model, tmp_path, media_root):
    from mllm.data.check import LengthLimit
    from mllm.data.dataset import MultimodalDataset

    records = [_qa("short", image="a.png"), _qa("text", question="Name a shape."),
               _qa("multi", question="<image> <image> twice?", image=["a.png", "a.png"])]
    path = _write(tmp_path, records)
    dataset = MultimodalDataset(path, tiny_model.tokenizer, tiny_model.media_specs(), media_root=media_root,
                                progress=False)
    limit = LengthLimit(10_000, tiny_model.tokenizer,
                        {spec.field: spec.num_tokens for spec in tiny_model.media_specs().values()})
    report = check_data(path, media_root=media_root, length_limit=limit)
    assert [limit.length(r) for r in report.records] == [len(dataset[i]["input_ids"]) for i in range(3)]


def test_mllm_data_check_flags_records_longer_than_the_context(tiny_assets, tmp_path, media_root, capsys):
    import yaml

    from mllm.cli import main
    from tests.conftest import model_section

    records = [_qa("short", image="a.png"), _qa("long", question="<image>\n" + "what color is it " * 40,
                                                 image="a.png"), _qa("text", question="Name a shape.")]
    path = _write(tmp_path, records)
    # Exactly as the config's training run counts: its model, data.max_length.
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": model_section(tiny_assets), "data": {"max_length": 64}}))
    assert main(["data", "check", path, "--media-root", media_root, "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "2 records loaded (image 1, text-only 1); skipped 1 bad record(s): 1 longer than context" in out
    assert f"     1  longer than context: e.g. {path}:2: record 'long': is " in out
    assert "tokens long (media expanded) but the context is 64" in out
    # Without a model: a tokenizer, the limit and the tokens per media item; --max-length overrides.
    args = ["data", "check", path, "--media-root", media_root, "--tokenizer", tiny_assets["llm"],
            "--media-tokens", "image=4"]
    assert main([*args, "--max-length", "64"]) == 1
    assert "1 longer than context" in capsys.readouterr().out
    assert main([*args, "--max-length", "1000"]) == 0
    assert "3 records loaded" in capsys.readouterr().out
    # A field without a token count is a problem of its own, not a guess.
    assert main(["data", "check", path, "--media-root", media_root, "--tokenizer", tiny_assets["llm"],
                 "--max-length", "1000"]) == 1
    assert "2  unsupported modality: e.g." in capsys.readouterr().out
