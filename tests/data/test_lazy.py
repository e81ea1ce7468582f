"""The lazy dataset against the eager one: same tensors, same skip counts, the same named errors."""

from __future__ import annotations

import json

import pytest
import torch

from mllm.data import record_index
from mllm.data.check import check_data
from mllm.data.dataset import MultimodalDataset, SampleTooLongError
from mllm.data.lazy import LazyMultimodalDataset
from mllm.data.record_index import iter_record_spans
from mllm.data.schema import RecordError, iter_raw_records
from mllm.data.templates import LabelAlignmentError


def _turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def _records():
    """Image, video, text-only and multi-turn records, non-ASCII text among them."""
    return [
        {"id": "img", "image": "images/a.png", "conversations": _turns("<image>\nWhat color is it?", "red")},
        {"id": "vid", "video": "videos/v.mp4", "conversations": _turns("<video>\nWhich way does it move?", "left")},
        {"id": "text", "conversations": _turns("Name a colour – in Français, s'il vous plaît.", "rouge"),
         "answer": "rouge", "question_type": "open"},
        {"id": "multi", "image": ["images/a.png", "images/a.png"], "conversations": _turns(
            "<image> and <image>: the same?", "yes", "What shape is it?", "a circle, drawn twice")},
    ]


def _write_jsonl(path, records, raw_lines=()):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                    + "".join(line + "\n" for line in raw_lines), encoding="utf-8")
    return str(path)


def _both(model, path, media_root, **kwargs):
    args = dict(media_root=media_root, progress=False, **kwargs)
    return (MultimodalDataset(path, model.tokenizer, model.media_specs(), **args),
            LazyMultimodalDataset(path, model.tokenizer, model.media_specs(), **args))


def _assert_same_sample(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("layout", ["jsonl", "json list"])
def test_lazy_gives_the_eager_tensors_at_every_index(tiny_model, tmp_path, media_root, layout):
    records = _records() * 3
    if layout == "jsonl":
        path = _write_jsonl(tmp_path / "d.jsonl", records)
    else:
        path = str(tmp_path / "d.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
    eager, lazy = _both(tiny_model, path, media_root)
    assert len(lazy) == len(eager) == len(records)
    for i in range(len(eager)):
        _assert_same_sample(eager[i], lazy[i])
        assert lazy.record(i) == eager.record(i)   # id, where, answer, extra: what scoring reads
    assert lazy.index.where(3) == (f"{path}:4" if layout == "jsonl" else f"{path}[3]")
    assert lazy.lengths_and_mixes()[1] == eager.lengths_and_mixes()[1]
    assert not lazy.num_skipped


def test_lazy_keeps_no_tokenised_rows(tiny_model, tmp_path, media_root, monkeypatch):
    """Nothing is tokenised while the dataset is built beyond the length-estimate sample, and that
    only when the sampler asks for lengths."""
    import mllm.data.lazy as lazy_module

    calls = []
    real = LazyMultimodalDataset._tokenise
    monkeypatch.setattr(LazyMultimodalDataset, "_tokenise", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(lazy_module, "CALIBRATION_RECORDS", 4)
    path = _write_jsonl(tmp_path / "d.jsonl", _records() * 5)
    ds = LazyMultimodalDataset(path, tiny_model.tokenizer, tiny_model.media_specs(), media_root=media_root)
    assert calls == [] and not hasattr(ds, "data")
    ds[7]
    assert len(calls) == 1
    ds.lengths_and_mixes()
    assert len(calls) == 1 + 4


def test_estimated_lengths_order_samples_like_the_exact_ones(tiny_model, tmp_path, media_root):
    records = [{"id": f"r{i}", "image": "images/a.png",
                "conversations": _turns("<image>\n" + "what color is it " * (1 + i % 7), "red " * (1 + i % 5))}
               for i in range(40)] + _records()
    eager, lazy = _both(tiny_model, _write_jsonl(tmp_path / "d.jsonl", records), media_root)
    exact, _ = eager.lengths_and_mixes()
    estimated, _ = lazy.lengths_and_mixes()
    assert estimated == LazyMultimodalDataset(lazy.path, tiny_model.tokenizer, tiny_model.media_specs(),
                                              media_root=media_root).lengths_and_mixes()[0]  # deterministic
    # Within 10 % on plain English; the tiny tokenizer splits the accented text into many more tokens.
    assert max(abs(e - x) / x for e, x in zip(estimated[:40], exact[:40])) < 0.1
    assert torch.corrcoef(torch.tensor([estimated, exact], dtype=torch.float64))[0, 1] > 0.9


def _bad_file(tmp_path):
    records = [_records()[0],
               dict(_records()[0], id="two-tags", conversations=_turns("<image> <image> hi", "x")),
               dict(_records()[0], id="bad-img", image="images/broken.png"),
               dict(_records()[0], id="long", conversations=_turns("<image>\n" + "what color is it " * 40, "red")),
               _records()[2],
               {"id": "no-answer", "conversations": [{"from": "human", "value": "Hello?"}]}]
    return _write_jsonl(tmp_path / "d.jsonl", records, raw_lines=["{not json"])


def test_skip_counts_agree_with_the_eager_dataset(tiny_model, tmp_path, media_root):
    eager, lazy = _both(tiny_model, _bad_file(tmp_path), media_root, on_bad_sample="skip", max_length=64)
    # Eager knows the tokenising problems up front; lazy once every record has been drawn.
    assert lazy.skipped == {"placeholder count mismatch": 1, "malformed JSON": 1}
    eager_samples = [eager[i] for i in range(len(eager))]
    lazy_samples = [lazy[i] for i in range(len(lazy))]
    assert lazy.skipped == eager.skipped == {"placeholder count mismatch": 1, "malformed JSON": 1,
                                             "longer than context": 1, "LabelAlignmentError": 1}
    assert lazy.num_skipped == eager.num_skipped == 5   # with the unreadable image
    assert dict(lazy.media_skipped) == dict(eager.media_skipped)
    # A bad record's place is taken by the next good one; only good samples come out.
    distinct = {tuple(s["input_ids"].tolist()) for s in lazy_samples}
    assert distinct == {tuple(s["input_ids"].tolist()) for s in eager_samples}


def test_bad_records_found_in_workers_are_counted_in_the_main_process(tiny_model, tmp_path, media_root):
    from mllm.data.dataset import MultimodalCollator

    _, lazy = _both(tiny_model, _bad_file(tmp_path), media_root, on_bad_sample="skip", max_length=64)
    loader = torch.utils.data.DataLoader(lazy, batch_size=2, num_workers=2,
                                         collate_fn=MultimodalCollator(tiny_model.tokenizer.pad_token_id))
    for _epoch in range(2):
        assert sum(batch["input_ids"].shape[0] for batch in loader) == len(lazy)
    assert lazy.num_skipped == 5
    assert lazy.skipped["longer than context"] == 1 and lazy.skipped["LabelAlignmentError"] == 1


@pytest.mark.parametrize("position,error,message", [
    (2, SampleTooLongError, r"d\.jsonl:4: record 'long': is \d+ tokens long .* context is 64"),
    (4, LabelAlignmentError, r"record 'no-answer' \(.*d\.jsonl:6\).*all labels masked"),
])
def test_error_mode_names_file_and_record_when_drawn(tiny_model, tmp_path, media_root, position, error, message):
    path = _bad_file(tmp_path)
    # The pre-flight pass skipped what it can see; the rest is found when drawn, and raises.
    report = check_data(path, media_root=media_root, on_bad_sample="skip", index=True)
    assert report.num_records == 5
    lazy = LazyMultimodalDataset(path, tiny_model.tokenizer, tiny_model.media_specs(), media_root=media_root,
                                 max_length=64, report=report)
    with pytest.raises(error, match=message):
        lazy[position]


def test_error_mode_stops_at_the_first_malformed_record_up_front(tiny_model, tmp_path, media_root):
    with pytest.raises(RecordError, match=r"d\.jsonl:2: record 'two-tags': 2 <image> placeholder"):
        LazyMultimodalDataset(_bad_file(tmp_path), tiny_model.tokenizer, tiny_model.media_specs(),
                              media_root=media_root)


# ----------------------------------------------------------------------------- the record index
def test_json_list_is_indexed_in_chunks_with_exact_byte_spans(tmp_path, monkeypatch):
    monkeypatch.setattr(record_index, "CHUNK_BYTES", 7)   # every element straddles several reads
    records = [{"id": i, "text": "é – 中文 " * i, "n": [1.5, -2e3, None, True]} for i in range(30)]
    path = tmp_path / "d.json"
    path.write_text(" \n[\n" + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n",
                    encoding="utf-8")
    spans = list(iter_record_spans(str(path)))
    data = path.read_bytes()
    assert [s.raw for s in spans] == records == [raw for _, raw in iter_raw_records(str(path))]
    assert [json.loads(data[s.offset:s.offset + s.size]) for s in spans] == records
    assert [s.where for s in spans] == [f"{path}[{i}]" for i in range(30)]
    path.write_text("[1, 2]", encoding="utf-8")   # bare numbers cut at a chunk boundary stay whole
    monkeypatch.setattr(record_index, "CHUNK_BYTES", 2)
    assert [s.raw for s in iter_record_spans(str(path))] == [1, 2]


@pytest.mark.parametrize("text,line,column", [('[{"id": 1},\n {"id": 2]', 2, 10), ('[{"id": 1}\n {"id": 2}]', 2, 2),
                                              ("[1, 2] 3", 1, 8)])
def test_invalid_json_list_names_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(RecordError, match=rf"d\.json: invalid JSON at line {line} column {column}"):
        list(iter_record_spans(str(path)))
    with pytest.raises(RecordError, match=rf"d\.json: invalid JSON at line {line} column {column}"):
        list(iter_raw_records(str(path)))


def test_a_source_mixture_is_read_lazily_with_the_eager_tensors(tiny_model, tmp_path, media_root):
    """Mixtures are written once as LLaVA JSONL (media paths made absolute per source); the lazy
    dataset reads that file like any other, records drawn with replacement included."""
    from mllm.data.mixture import data_file

    a = _write_jsonl(tmp_path / "a.jsonl", _records()[:2])
    b = _write_jsonl(tmp_path / "b.jsonl", _records()[2:])
    value = [{"type": "llava", "path": a, "media_root": media_root, "count": 5, "replace": True, "seed": 3},
             {"type": "llava", "path": b, "media_root": media_root}]
    path = data_file(value, str(tmp_path / "run"), "train")
    report = check_data(path, index=True)
    eager = MultimodalDataset(path, tiny_model.tokenizer, tiny_model.media_specs(), progress=False)
    lazy = LazyMultimodalDataset(path, tiny_model.tokenizer, tiny_model.media_specs(), report=report)
    assert len(lazy) == len(eager) == 7 and report.per_modality == eager_modalities(eager)
    for i in range(len(eager)):
        _assert_same_sample(eager[i], lazy[i])
        assert lazy.record(i)["extra"]["source"] == eager.record(i)["extra"]["source"]


def eager_modalities(eager):
    from collections import Counter

    return Counter(m for mix in eager.lengths_and_mixes()[1] for m in (mix or ("text-only",)))
