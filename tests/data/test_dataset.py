"""Records -> tokenised samples with media, and every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mllm.data.dataset import MultimodalCollator, MultimodalDataset, SampleTooLongError
from mllm.data.media import MediaError
from mllm.data.schema import RecordError
from mllm.data.templates import IGNORE_INDEX
from mllm.modality import Modality


def _write(path, records, raw_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def _qa(rid, image="images/a.png", question="<image>\nWhat color is it?", answer="red", **extra):
    record = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    record.update(extra)
    return record


def _dataset(model, path, media_root, **kwargs):
    return MultimodalDataset(path, model.tokenizer, model.media_specs(), media_root=media_root,
                             progress=False, **kwargs)


def test_sample_has_expanded_placeholders_labels_and_media(tiny_model, tmp_path, media_root):
    path = _write(tmp_path / "d.jsonl", [_qa("r1")])
    sample = _dataset(tiny_model, path, media_root)[0]
    img = tiny_model.placeholder_ids["<image>"]
    n_tok = tiny_model.num_media_tokens("<image>")
    assert int((sample["input_ids"] == img).sum()) == n_tok
    assert sample["image_inputs"].shape == (1, 3, 32, 32)
    labelled = sample["labels"][sample["labels"] != IGNORE_INDEX]
    assert tiny_model.tokenizer.decode(labelled).strip() == "red </s>"
    assert not sample["question_mask"][sample["input_ids"] == img].any()
    question = tiny_model.tokenizer.decode(sample["input_ids"][sample["question_mask"]])
    assert question.strip() == "What color is it?"


def test_multi_turn_labels_cover_every_answer_only(tiny_model, tmp_path, media_root):
    record = {"id": "mt", "image": "images/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "one"}]}
    sample = _dataset(tiny_model, _write(tmp_path / "d.jsonl", [record]), media_root)[0]
    labels = sample["labels"]
    runs, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tiny_model.tokenizer.decode(current).strip()), current.clear()
    if current:
        runs.append(tiny_model.tokenizer.decode(current).strip())
    assert runs == ["red </s>", "circle </s>", "one </s>"]


def test_video_record_gives_frames_times_queries_tokens(tiny_model, tmp_path, media_root):
    record = _qa("v1", image=None, question="<video>\nWhich way does it move?", answer="left", video="videos/v.mp4")
    sample = _dataset(tiny_model, _write(tmp_path / "d.jsonl", [record]), media_root)[0]
    frames = tiny_model.config.video_frames
    assert sample["video_inputs"].shape == (1, frames, 3, 32, 32)
    video_id = tiny_model.placeholder_ids["<video>"]
    assert int((sample["input_ids"] == video_id).sum()) == frames * tiny_model.num_media_tokens("<image>")
    # The whole forward runs and every video position is VISUAL.
    batch = MultimodalCollator(tiny_model.tokenizer.pad_token_id)([sample])
    assert torch.isfinite(tiny_model(**batch).loss)
    ids = tiny_model.modality_ids(batch["input_ids"], batch["attention_mask"])
    assert int((ids == Modality.VISUAL).sum()) == frames * tiny_model.num_media_tokens("<image>")


def test_collator_pads_right_for_training_and_left_for_generation(tiny_model, tmp_path, media_root):
    records = [_qa("a"), _qa("b", question="<image>\nWhere is the red circle in this picture?")]
    ds = _dataset(tiny_model, _write(tmp_path / "d.jsonl", records), media_root)
    samples = [ds[0], ds[1]]
    pad = tiny_model.tokenizer.pad_token_id
    right = MultimodalCollator(pad, "right")(samples)
    left = MultimodalCollator(pad, "left")(samples)
    short = len(samples[0]["input_ids"])
    assert right["attention_mask"][0, :short].all() and not right["attention_mask"][0, short:].any()
    assert left["attention_mask"][0, -short:].all() and not left["attention_mask"][0, :-short].any()
    assert (right["labels"][0, short:] == IGNORE_INDEX).all()
    assert right["image_inputs"].shape[0] == 2


# ----------------------------------------------------------------------------- bad input
def test_malformed_json_line_names_file_and_line(tiny_model, tmp_path, media_root):
    path = _write(tmp_path / "d.jsonl", [_qa("ok")], raw_lines=['{"id": "broken", "conversations": [}'])
    with pytest.raises(RecordError, match=r"d\.jsonl:2: malformed JSON line"):
        _dataset(tiny_model, path, media_root)


def test_placeholder_count_mismatch_names_the_record(tiny_model, tmp_path, media_root):
    record = _qa("two-tags", question="<image>\n<image>\nWhat color is it?")
    with pytest.raises(RecordError, match=r"d\.jsonl:1: record 'two-tags': 2 <image> placeholder\(s\).*1 'image' file"):
        _dataset(tiny_model, _write(tmp_path / "d.jsonl", [record]), media_root)


def test_sample_longer_than_context_names_the_record(tiny_model, tmp_path, media_root):
    record = _qa("long", question="<image>\n" + "what color is it " * 40)
    with pytest.raises(SampleTooLongError, match=r"record 'long': is \d+ tokens long .* context is 64"):
        _dataset(tiny_model, _write(tmp_path / "d.jsonl", [record]), media_root, max_length=64)


@pytest.mark.parametrize("image,reason", [("images/missing.png", "no such file"),
                                          ("images/broken.png", "")])
def test_missing_or_corrupt_image_names_file_and_record(tiny_model, tmp_path, media_root, image, reason):
    ds = _dataset(tiny_model, _write(tmp_path / "d.jsonl", [_qa("bad-img", image=image)]), media_root)
    with pytest.raises(MediaError) as err:
        ds[0]
    assert "bad-img" in str(err.value) and image.split("/")[-1] in str(err.value)


def test_skip_mode_drops_and_counts_bad_records_and_media(tiny_model, tmp_path, media_root):
    records = [_qa("good"), _qa("two-tags", question="<image> <image> hi"), _qa("bad-img", image="images/broken.png"),
               _qa("long", question="<image>\n" + "what color is it " * 40)]
    path = _write(tmp_path / "d.jsonl", records, raw_lines=["{not json"])
    ds = _dataset(tiny_model, path, media_root, on_bad_sample="skip", max_length=64)
    assert len(ds) == 2  # "good" and "bad-img" (media is only read when the sample is used)
    assert ds.skipped == {"placeholder count mismatch": 1, "malformed JSON": 1, "longer than context": 1}
    sample = ds[1]  # bad-img: replaced by the next readable sample, and counted
    assert sample["image_inputs"].shape[0] == 1
    assert sum(ds.media_skipped.values()) == 1


def test_record_with_a_modality_the_model_lacks(tiny_model, tmp_path, media_root):
    record = _qa("aud", image=None, question="<audio>\nWhat is it?", audio="a.wav")
    with pytest.raises(RecordError, match="record 'aud'.*no encoder"):
        _dataset(tiny_model, _write(tmp_path / "d.jsonl", [record]), media_root)


def test_record_without_an_answer_is_never_trained_with_all_labels_masked(tiny_model, tmp_path, media_root):
    from mllm.data.templates import LabelAlignmentError

    record = {"id": "no-answer", "image": "images/a.png",
              "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}]}
    with pytest.raises(LabelAlignmentError, match=r"record 'no-answer' \(.*d\.jsonl:1\).*all labels masked"):
        _dataset(tiny_model, _write(tmp_path / "d.jsonl", [record]), media_root)


def test_unreadable_media_is_counted_once_and_never_read_again(tiny_model, tmp_path, media_root):
    """Under skip, a record whose image cannot be decoded is counted once, not once per epoch."""
    records = [_qa("good"), _qa("bad-img", image="images/broken.png"), _qa("good2")]
    specs = tiny_model.media_specs()
    spec = specs["<image>"]
    reads = []

    def counting_load(path, record_id, load=spec.load_item):
        reads.append(path.rsplit("/", 1)[-1])
        return load(path, record_id)

    spec.load_item = counting_load
    ds = MultimodalDataset(_write(tmp_path / "d.jsonl", records), tiny_model.tokenizer, specs,
                           media_root=media_root, on_bad_sample="skip", progress=False)
    for _epoch in range(3):
        assert [ds[i]["image_inputs"].shape[0] for i in range(len(ds))] == [1, 1, 1]
    assert reads.count("broken.png") == 1 and ds.num_skipped == 1
    assert dict(ds.media_skipped) == {f"{media_root}/images/broken.png": 1}


def test_a_pre_flight_report_is_used_as_is(tiny_model, tmp_path, media_root):
    from mllm.data.check import check_data

    path = _write(tmp_path / "d.jsonl", [_qa("good"), _qa("gone", image="images/missing.png")])
    report = check_data(path, media_root=media_root, on_bad_sample="skip")
    ds = _dataset(tiny_model, path, media_root, on_bad_sample="skip", report=report)
    assert len(ds) == 1 and ds.skipped == {"missing media file": 1} and ds.num_skipped == 1
