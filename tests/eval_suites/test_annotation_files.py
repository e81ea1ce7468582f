"""Reading annotation files: JSON lists name a bad record by line and index; suite options."""

from __future__ import annotations

import json

import pytest

from eval_suites import AnnotationError, get_suite
from eval_suites.base import iter_json_items, read_json_list, read_json_object_with_list


def test_json_list_records_carry_their_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"a": 1},\n\n  {"a": [1,\n 2]}, {"a": 3}\n,{"a": "x\\ny"}]\n')
    assert read_json_list(str(path)) == [(2, {"a": 1}), (4, {"a": [1, 2]}), (5, {"a": 3}), (6, {"a": "x\ny"})]
    wheres = [where for where, _ in iter_json_items(str(path))]
    assert wheres[1] == f"{path}:4 (record 1 of the JSON list, 0-based)"
    assert [item for _, item in iter_json_items(str(path))] == json.loads(path.read_text())


def test_json_list_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "list.json"
    for text, line in (('[\n {"a": 1},\n {"a": }\n]', 3), ('[\n {"a": 1}\n {"a": 2}\n]', 3),
                       ('[\n {"a": 1},\n]', 3), ('[\n {"a": 1}\n]\n]', 4), ('[{"a": 1}', 1)):
        path.write_text(text)
        with pytest.raises(AnnotationError, match=rf"list\.json:{line}: invalid JSON"):
            read_json_list(str(path))


def test_json_lines_under_a_json_name_still_read(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_json_items(str(path))) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"a": 2})]


def test_object_with_a_tracked_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"x": {"k": [1]},\n "items": [\n  1,\n  {"b": 2}\n ], "y": null}')
    data, items = read_json_object_with_list(str(path), "items")
    assert data == {"x": {"k": [1]}, "items": [1, {"b": 2}], "y": None}
    assert items == [(3, 1), (4, {"b": 2})]
    path.write_text('{"x": 1,\n "items" [1]}')
    with pytest.raises(AnnotationError, match=r"obj\.json:2: invalid JSON: expected ':'"):
        read_json_object_with_list(str(path), "items")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes("\ufeff[{\"a\": 1}]".encode("utf-8"))
    assert [item for _, item in iter_json_items(str(path))] == [{"a": 1}]


# --------------------------------------------------------------------------- suite options


def _avqa(tmp_path):
    path = tmp_path / "avqa.json"
    path.write_text(json.dumps([{"video_id": "00000086", "question_id": 28,
                                 "type": json.dumps(["Audio-Visual", "Existential"]),
                                 "question_content": "Is the <Object> in the video always playing?",
                                 "templ_values": '["violin"]', "question_deleted": 0, "anser": "no"}]))
    return str(path)


def test_music_avqa_moka_protocol_and_templates(tmp_path):
    default = get_suite("music_avqa")
    [sample] = default.load(_avqa(tmp_path))
    assert default.max_new_tokens == 32 and sample.question == "Is the violin in the video always playing?"
    assert default.prompt(sample).endswith("playing?\nAnswer with a single word, written as <answer>word</answer>.")
    moka = get_suite("music_avqa", protocol="moka", video_path="clips/{video_id}.mp4",
                     audio_path="sound/{video_id}.mp3")
    [sample] = moka.load(_avqa(tmp_path))
    assert moka.max_new_tokens == 500 and moka.prompt_suffix == ""
    assert moka.prompt(sample).endswith("\nPlease answer this question: Is the violin in the video always playing?")
    assert sample.media == {"video": ["clips/00000086.mp4"], "audio": ["sound/00000086.mp3"]}
    assert get_suite("music_avqa").max_new_tokens == 32  # the preset changes that instance only
    with pytest.raises(ValueError, match=r"protocol must be one of default, moka; got 'crab'"):
        get_suite("music_avqa", protocol="crab")
    with pytest.raises(ValueError, match=r"video_path: 'v/\{video_id\}/\{vid\}\.mp4' may use only the field"):
        get_suite("music_avqa", video_path="v/{video_id}/{vid}.mp4")


def test_ave_moka_protocol(tmp_path):
    path = tmp_path / "testSet.txt"
    path.write_text("Church bell&vid1&good&6&8\n")
    moka = get_suite("ave", protocol="moka")
    [sample] = moka.load(str(path))
    assert moka.max_new_tokens == 500
    assert moka.prompt(sample).endswith("\nPlease describe the events and time range that occurred in the video.")
    assert get_suite("ave").max_new_tokens == 48
    with pytest.raises(ValueError, match=r"vocabulary_path must be a file path"):
        get_suite("ave", vocabulary_path=3)
