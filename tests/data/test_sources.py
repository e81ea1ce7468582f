"""Native readers on small files in each source's exact released layout, round-tripped through
``mllm data convert``."""

from __future__ import annotations

import csv
import json
import os

import pytest

from mllm.cli import main
from mllm.data.schema import RecordError, read_records
from mllm.data.sources import SOURCE_REGISTRY, get_source


def convert(tmp_path, source_type, src, *extra):
    out = tmp_path / f"{source_type}.jsonl"
    assert main(["data", "convert", "--from", source_type, str(src), str(out), *extra]) == 0
    records, skipped = read_records(str(out))
    assert not skipped
    # The written file is plain LLaVA JSONL: the generic reader gives the same records again.
    again = tmp_path / f"{source_type}.again.jsonl"
    assert main(["data", "convert", "--from", "llava", str(out), str(again)]) == 0
    assert [r.messages for r in read_records(str(again))[0]] == [r.messages for r in records]
    assert [r.media for r in read_records(str(again))[0]] == [r.media for r in records]
    return records


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
    return path


def test_music_avqa_moka_uses_mokas_wording_and_the_eval_protocols_strings(tmp_path):
    from eval_suites import music_avqa
    from mllm.data.sources import moka

    src = write_json(str(tmp_path / "MUSIC_AVQA_data" / "train_samples_with_reasoning_avqa.json"), [
        {"video_id": "00006835", "question_id": 17, "type": ["Audio-Visual", "Temporal"],
         "video_path": "/group/authors/00006835.mp4", "audio_path": "/group/authors/00006835.mp3",
         "question": "Which instrument sounds first?", "answer": "saxophone",
         "label": "The saxophone starts. So the answer is <answer> saxophone </answer>."}])
    records = convert(tmp_path, "music_avqa_moka", src)
    (record,) = records
    assert record.id == "17"
    assert record.media == {"video": ["video_data/00006835.mp4"], "audio": ["audio_data/00006835.mp3"]}
    assert record.messages[0]["content"] == ("<video>\n<audio>\n"
                                             "Please answer this question: Which instrument sounds first?")
    assert record.messages[1]["content"].endswith("<answer> saxophone </answer>.")
    assert record.extra["answer"] == "saxophone" and record.extra["question_type"] == ["Audio-Visual", "Temporal"]
    # Training wording = what `mllm eval --option protocol=moka` asks at test time.
    assert moka.MOKA_AVQA_QUESTION_PREFIX == music_avqa.MOKA_QUESTION_PREFIX
    # The record's own (authors') paths on request.
    (own,) = convert(tmp_path, "music_avqa_moka", src, "--option", "video_path={video_path}",
                     "--option", "audio_path={audio_path}")
    assert own.media["video"] == ["/group/authors/00006835.mp4"]


def test_ave_moka_reads_the_converted_label_files(tmp_path):
    from eval_suites import ave
    from mllm.data.sources import moka

    root = tmp_path / "AVE_data"
    src = write_json(str(root / "train_samples_ave.json"), [
        {"event": "Church bell", "vid": "-leVhma9zaA", "start_time": 7, "end_time": 10},
        {"event": "Male speech, man speaking", "vid": "abc", "start_time": 0, "end_time": 8}])
    os.makedirs(root / "converted_label")
    label = ("The bell rings. So the audible and visible event in the video is <event> Church bell </event>, "
             "and the time range is <range> 7,10 </range>.")
    (root / "converted_label" / "-leVhma9zaA.txt").write_text(label + "\n")
    (root / "converted_label" / "abc.txt").write_text("... <event> Male speech, man speaking </event> ... "
                                                      "<range> 0,8 </range>.")
    records = convert(tmp_path, "ave_moka", src, "--media-root", str(root))
    assert [r.id for r in records] == ["-leVhma9zaA", "abc"]
    assert records[0].messages[1]["content"] == label
    assert records[0].messages[0]["content"] == "<video>\n<audio>\n" + ave.MOKA_INSTRUCTION
    assert moka.MOKA_AVE_INSTRUCTION == ave.MOKA_INSTRUCTION
    assert records[0].media["video"] == [str(root / "AVE" / "-leVhma9zaA.mp4")]
    assert records[0].media["audio"] == [str(root / "audio_data" / "-leVhma9zaA.mp3")]
    assert records[1].extra["start_time"] == 0 and records[1].extra["end_time"] == 8
    # A missing label file names the record and the file.
    os.remove(root / "converted_label" / "abc.txt")
    with pytest.raises(RecordError, match=r"train_samples_ave.json\[1\].*'abc'.*converted_label/abc.txt not found"):
        list(get_source("ave_moka").read(src))


def test_llava_pretrain_both_placeholder_positions_and_the_meta_file(tmp_path):
    src = write_json(str(tmp_path / "blip_laion_cc_sbu_558k.json"), [
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
        {"id": "004539376", "image": "00453/004539376.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWrite a terse but informative summary of the picture."},
            {"from": "gpt", "value": "a red barn"}]}])
    records = convert(tmp_path, "llava_pretrain", src)
    assert [r.media["image"] for r in records] == [["00453/004539375.jpg"], ["00453/004539376.jpg"]]
    assert records[0].messages[1]["content"].startswith("select luxury")
    meta = write_json(str(tmp_path / "blip_laion_cc_sbu_558k_meta.json"), [
        {"id": "004539375", "image": "00453/004539375.jpg", "blip_caption": "a red barn", "url": "http://x/1.jpg"}])
    (from_meta,) = convert(tmp_path, "llava_pretrain", meta)
    assert from_meta.messages[1]["content"] == "a red barn" and "<image>" in from_meta.messages[0]["content"]
    bad = write_json(str(tmp_path / "three_turns.json"), [
        {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                        {"from": "gpt", "value": "x"},
                                                        {"from": "human", "value": "y"}]}])
    with pytest.raises(RecordError, match="exactly 2 turns"):
        list(get_source("llava_pretrain").read(bad))


def test_llava_instruct_665k_with_and_without_image_multi_turn(tmp_path):
    src = write_json(str(tmp_path / "llava_v1_5_mix665k.json"), [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "wgByO4Y_0", "model": "", "conversations": [
            {"from": "gpt", "value": "leading assistant turn, dropped as LLaVA does"},
            {"from": "human", "value": "Write a haiku."}, {"from": "gpt", "value": "Leaves fall."}]}])
    records = convert(tmp_path, "llava_instruct", src)
    assert len(records[0].messages) == 4 and records[0].media == {"image": ["coco/train2017/000000033471.jpg"]}
    assert records[1].media == {} and [m["role"] for m in records[1].messages] == ["user", "assistant"]
    assert "model" not in records[1].extra


def test_audiocaps_official_csv_and_mokas_json(tmp_path):
    csv_path = tmp_path / "audiocaps" / "val.csv"
    os.makedirs(csv_path.parent)
    csv_path.write_text("audiocap_id,youtube_id,start_time,caption\n"
                        "97151,--0w1YA1Hm4,30,A vehicle driving as a man and woman are talking and laughing\n"
                        "12347,3zCI4li7fe0,30,\"Woman giving a speech, then applause\"\n")
    records = convert(tmp_path, "audiocaps", csv_path)
    assert [r.id for r in records] == ["97151", "12347"]
    assert records[0].media == {"audio": ["97151.wav"]}
    assert records[1].messages == [{"role": "user", "content": "<audio>\nPlease describe this audio."},
                                   {"role": "assistant", "content": "Woman giving a speech, then applause"}]
    by_youtube = convert(tmp_path, "audiocaps", csv_path, "--option", "audio_path={youtube_id}_{start_time}.wav")
    assert by_youtube[0].media == {"audio": ["--0w1YA1Hm4_30.wav"]}
    moka_json = write_json(str(tmp_path / "AudioCaps" / "train.json"),
                           [{"audiocap_id": 91139, "start_time": 130, "caption": "A muddled noise of broken channel"}])
    (record,) = convert(tmp_path, "audiocaps", moka_json)
    assert record.id == "91139" and record.media == {"audio": ["91139.wav"]}


def test_clotho_gives_five_records_per_clip(tmp_path):
    path = tmp_path / "clotho_captions_development.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", *(f"caption_{k}" for k in range(1, 6))])
        writer.writerow(["Radio Garble.wav", *(f"static hisses, take {k}" for k in range(1, 6))])
        writer.writerow(["Water, flowing.wav", "water flows", "a stream runs", "water trickles, over rocks",
                         "a brook babbles", "liquid pours"])
    records = convert(tmp_path, "clotho", path, "--option", "audio_dir=development")
    assert len(records) == 10
    assert [r.id for r in records[:5]] == [f"Radio Garble.wav#{k}" for k in range(1, 6)]
    assert records[7].media == {"audio": ["development/Water, flowing.wav"]}
    assert records[7].messages[1]["content"] == "water trickles, over rocks"


def test_wavcaps_json_flac_names_and_blacklist(tmp_path):
    src = write_json(str(tmp_path / "as_final.json"), {"num_captions_per_audio": 1, "data": [
        {"id": "YvfY_TJq7n_U.wav", "caption": "A man speaks.", "duration": 10.0, "audio": "wav_path"},
        {"id": "Y0a1b2c3d4e5.wav", "caption": "Rain falls.", "duration": 10.0, "audio": "wav_path"}]})
    sb = write_json(str(tmp_path / "sb_final.json"), {"num_captions_per_audio": 1, "data": [
        {"id": "2095", "caption": "Bells chime.", "duration": 4.2, "audio": "wav_path", "title": "Bells",
         "description": "", "author": "x", "href": "y", "download_link": "z"}]})
    records = convert(tmp_path, "wavcaps", src)
    assert [r.media["audio"] for r in records] == [["YvfY_TJq7n_U.flac"], ["Y0a1b2c3d4e5.flac"]]
    assert convert(tmp_path, "wavcaps", sb)[0].media == {"audio": ["2095.flac"]}
    blacklist = write_json(str(tmp_path / "blacklist_exclude_test_ac.json"), {"AudioSet": ["YvfY_TJq7n_U.wav"]})
    kept = convert(tmp_path, "wavcaps", src, "--option", f"blacklist={blacklist}")
    assert [r.id for r in kept] == ["Y0a1b2c3d4e5.wav"]


def test_librispeech_nested_folders_as_asr_records(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    for speaker, chapter, lines in (("1272", "128104", ["MISTER QUILTER IS THE APOSTLE",
                                                        "NOR IS MISTER QUILTER'S MANNER"]),
                                    ("84", "121123", ["GO DO YOU HEAR"])):
        folder = root / speaker / chapter
        os.makedirs(folder)
        with open(folder / f"{speaker}-{chapter}.trans.txt", "w") as f:
            for k, text in enumerate(lines):
                f.write(f"{speaker}-{chapter}-{k:04d} {text}\n")
                (folder / f"{speaker}-{chapter}-{k:04d}.flac").write_bytes(b"")
    (tmp_path / "LibriSpeech" / "SPEAKERS.TXT").write_text("; comment\n84 | F | dev-clean | 8.02 | Christie\n")
    records = convert(tmp_path, "librispeech", tmp_path / "LibriSpeech", "--option", "case=sentence")
    assert [r.id for r in records] == ["1272-128104-0000", "1272-128104-0001", "84-121123-0000"]
    assert records[1].messages == [{"role": "user", "content": "<speech>\nTranscribe the speech."},
                                   {"role": "assistant", "content": "Nor is mister quilter's manner"}]
    # Media paths resolve under the folder read, wherever it sits.
    assert records[2].media["speech"] == [str(root / "84" / "121123" / "84-121123-0000.flac")]
    assert os.path.exists(records[2].media["speech"][0])


def test_unknown_source_and_option_are_named(tmp_path, capsys):
    assert main(["data", "convert", "--from", "nope", "x.json", str(tmp_path / "o.jsonl")]) == 2
    assert "unknown data source type 'nope'" in capsys.readouterr().err
    assert main(["data", "convert", "--from", "clotho", "x.csv", str(tmp_path / "o.jsonl"),
                 "--option", "colour=1"]) == 2
    assert "has no option 'colour'" in capsys.readouterr().err
    assert {"music_avqa_moka", "ave_moka", "llava_pretrain", "llava_instruct", "audiocaps", "clotho", "wavcaps",
            "librispeech", "llava"} <= set(SOURCE_REGISTRY)
