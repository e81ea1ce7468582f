"""Data pipeline speed on generated data, measured in one run.

1. Video decoding: frames per second delivered by ``load_video_frames`` (seek to the keyframe
   before each sampled frame, decode forward) against a full decode of the same clips
   (``_sample_frames_fully_decoded``), on generated 60 s clips: MPEG-4 Part 2 (the codec the
   project writes; keyframe every 12 frames, FFmpeg's default) and H.264 with a keyframe every
   2 s (50 frames, common for streamed video) and every 250 frames (x264's default maximum): the
   fewer the keyframes, the more frames each seek must decode to reach its target.
   Rounds are interleaved; speed-ups are medians of per-round ratios (wall-clock quartiles beside
   them), in wall-clock time and in process CPU time (steadier on a shared machine).
2. Data loader: samples per second of ``MultimodalDataset`` + ``MultimodalCollator`` through a
   ``torch.utils.data.DataLoader`` (batch 8) for image, video and audio records, with 0 and 2
   workers, using a tiny CLIP at 224 px (the real processor's resize and normalisation) and a tiny
   BEATs (its fbank; ten 1 s windows per 10 s clip). One full pass per setting, worker start-up
   included.
3. First training batch: seconds from the data pre-flight (every record validated, media files
   looked up) to the first collated batch out of the DataLoader, and peak host memory, for a
   generated 200K-record LLaVA JSONL file (image and text-only, single- and multi-turn), with the
   eager dataset (every record tokenised up front) and the lazy one (``data.lazy``, the default),
   the latter also with ``group_by_modality_length`` (estimated lengths). Each in a fresh process;
   memory is the data step's peak resident size (the peak is reset once the tiny model is built,
   whose loading may peak higher) above what the process held before it, and that peak beside it.

    python benchmarks/data.py            # about two minutes on a 2-core CPU (plus the first-batch table)
    python benchmarks/data.py --quick    # shorter clips and fewer samples, a smoke run
    python benchmarks/data.py --first-batch-only --records 200000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import av
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.timing import ratio_stats  # noqa: E402


def moving_frames(seconds: float, fps: int, width: int, height: int, seed: int):
    """A drifting colour gradient with a moving square: compressible, like real footage."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, 3)
    for i in range(int(seconds * fps)):
        frame = np.broadcast_to(np.roll(base, i, axis=1), (height, width, 3)).astype(np.uint8).copy()
        x, y = (7 * i) % (width - 32), (3 * i) % (height - 32)
        frame[y:y + 32, x:x + 32] = (255 - 2 * i % 255, 40, 200)
        yield frame


def write_clip(path: str, seconds: float, fps: int, width: int, height: int, codec: str, gop: int, seed: int) -> str:
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"}
        for frame in moving_frames(seconds, fps, width, height, seed):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def interleaved(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Wall-clock and process CPU seconds per call of each run, rounds in shuffled order. CPU time
    (all decoder threads together) is the steadier figure on a machine shared with other work."""
    for run in runs.values():
        run()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    order = list(runs)
    for _ in range(repeats):
        random.Random(len(wall["seek"])).shuffle(order)
        for name in order:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def video_decoding(work: str, args) -> list[dict]:
    from mllm.data import media

    rows = []
    for codec, gop in (("mpeg4", 12), ("libx264", 50), ("libx264", 250)):
        clips = [write_clip(os.path.join(work, f"{codec}-{i}.mp4"), args.seconds, args.fps, args.width, args.height,
                            codec, gop, seed=i) for i in range(args.clips)]
        for path in clips:  # the two decoders agree before they are timed
            seek = media.load_video_frames(path, args.frames)
            full = media._sample_frames_fully_decoded(path, args.frames)
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seek, full)), path
        runs = {"seek": lambda: [media.load_video_frames(p, args.frames) for p in clips],
                "full": lambda: [media._sample_frames_fully_decoded(p, args.frames) for p in clips]}
        wall, cpu = interleaved(runs, args.repeats)
        frames = args.frames * len(clips)
        median, q1, q3 = ratio_stats(wall, "full", "seek")
        rows.append({"codec": codec, "gop": gop, "seek_fps": frames / np.median(wall["seek"]),
                     "full_fps": frames / np.median(wall["full"]), "speedup": median, "q1": q1, "q3": q3,
                     "cpu_speedup": ratio_stats(cpu, "full", "seek")[0]})
    return rows


def loader_inputs(work: str, args) -> dict:
    from mllm.data.media import write_audio, write_video
    from mllm.demo.assets import TinySizes, build_tiny_assets, build_tiny_beats

    rng = np.random.default_rng(0)
    from PIL import Image

    records = {"image": [], "video": [], "audio": []}
    for i in range(args.loader_samples):
        image = os.path.join(work, "media", f"{i}.png")
        os.makedirs(os.path.dirname(image), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
        records["image"].append({"id": f"i{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "a picture"}]})
        if i < args.loader_videos:
            video = os.path.join(work, "media", f"{i}.mp4")
            write_video(video, list(moving_frames(10, 25, 320, 240, i)), fps=25)
        records["video"].append({"id": f"v{i}", "video": os.path.join(work, "media", f"{i % args.loader_videos}.mp4"),
                                 "conversations": [{"from": "human", "value": "<video>\nDescribe it."},
                                                   {"from": "gpt", "value": "a video"}]})
        audio = os.path.join(work, "media", f"{i}.wav")
        write_audio(audio, 0.1 * rng.standard_normal(16000 * 10).astype(np.float32))
        records["audio"].append({"id": f"a{i}", "audio": audio, "conversations": [
            {"from": "human", "value": "<audio>\nDescribe it."}, {"from": "gpt", "value": "a sound"}]})
    paths = {}
    for kind, rows in records.items():
        paths[kind] = os.path.join(work, f"{kind}.jsonl")
        with open(paths[kind], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    corpus = ["Describe it.", "a picture", "a video", "a sound"]
    assets = build_tiny_assets(os.path.join(work, "assets"), corpus, sizes=TinySizes(image_size=224, patch_size=14))
    assets["beats"] = build_tiny_beats(os.path.join(work, "assets", "beats.pt"))
    return {"paths": paths, "assets": assets}


def loader_throughput(inputs: dict, args) -> list[dict]:
    import torch

    from mllm.config import config_from_dict
    from mllm.data.dataset import MultimodalCollator, MultimodalDataset
    from mllm.model import MultimodalLM

    assets = inputs["assets"]
    projector = {"num_queries": 4, "hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64}
    cfg = config_from_dict({"model": {
        "llm": assets["llm"], "video_frames": args.frames,
        "encoders": {"visual": {"type": "clip", "path": assets["clip"]},
                     "audio": {"type": "beats", "path": assets["beats"], "num_windows": 10, "window_seconds": 1.0,
                               "window_hop_seconds": 1.0}},
        "projectors": {"visual": projector, "audio": projector}}})
    model = MultimodalLM.from_config(cfg.model)
    collator = MultimodalCollator(model.tokenizer.pad_token_id)
    rows = []
    for kind, path in inputs["paths"].items():
        dataset = MultimodalDataset(path, model.tokenizer, model.media_specs(), progress=False)
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=collator)
            start = time.perf_counter()
            seen = sum(batch["input_ids"].shape[0] for batch in loader)
            rows.append({"kind": kind, "workers": workers, "samples_per_s": seen / (time.perf_counter() - start)})
    return rows


WORDS = ("what is shown in the picture describe the colour shape size of each object and where it sits "
         "relative to the others answer in one short sentence a red circle blue square green triangle left right "
         "top bottom middle large small two three none").split()


def first_batch_inputs(work: str, args) -> dict:
    """A generated LLaVA JSONL file of ``args.records`` records and a tiny model's assets."""
    from PIL import Image

    from mllm.demo.assets import TinySizes, build_tiny_assets

    media = os.path.join(work, "fb-media")
    os.makedirs(media, exist_ok=True)
    for k in range(8):
        Image.new("RGB", (32, 32), (30 * k, 100, 200 - 20 * k)).save(os.path.join(media, f"{k}.png"))
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    path = os.path.join(work, "records.jsonl")
    with open(path, "w") as f:
        for i in range(args.records):
            kind = i % 20
            turns = 1 if kind < 15 else rng.randint(2, 4)
            conversations = []
            for t in range(turns):
                conversations += [{"from": "human", "value": text(rng.randint(4, 30))},
                                  {"from": "gpt", "value": text(rng.randint(2, 60))}]
            record = {"id": str(i), "conversations": conversations}
            if kind < 12 or kind >= 18:   # 70 % with an image
                record["image"] = f"{rng.randrange(8)}.png"
                conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
            f.write(json.dumps(record) + "\n")
    assets = build_tiny_assets(os.path.join(work, "fb-assets"), [" ".join(WORDS)] * 4,
                               sizes=TinySizes(max_positions=4096))
    return {"path": path, "media_root": media, "assets": assets}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:"))


def _reset_peak_rss() -> None:
    """Start the peak (VmHWM) over from the current resident size, so that building the model,
    whose loading may peak higher than the data step, is not counted as the data's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def first_batch_worker(mode: str, inputs: dict) -> dict:
    """In a fresh process: build the model, then time the data step up to the first batch."""
    import torch

    from mllm.config import config_from_dict
    from mllm.data.check import check_data
    from mllm.data.dataset import MultimodalCollator, MultimodalDataset
    from mllm.data.lazy import LazyMultimodalDataset
    from mllm.data.sampler import ModalityLengthGroupedSampler
    from mllm.model import MultimodalLM

    projector = {"num_queries": 4, "hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64}
    cfg = config_from_dict({"model": {"llm": inputs["assets"]["llm"], "encoders": {
        "visual": {"type": "clip", "path": inputs["assets"]["clip"]}}, "projectors": {"visual": projector}}})
    model = MultimodalLM.from_config(cfg.model)
    lazy = mode != "eager"
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    report = check_data(inputs["path"], media_root=inputs["media_root"], media_fields={"image", "video"}, index=lazy)
    dataset = (LazyMultimodalDataset if lazy else MultimodalDataset)(
        inputs["path"], model.tokenizer, model.media_specs(), template="plain", max_length=4096,
        media_root=inputs["media_root"], progress=False, report=report)
    if mode == "lazy, grouped":
        sampler = ModalityLengthGroupedSampler(*dataset.lengths_and_mixes(), batch_size=8)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler,
                                         collate_fn=MultimodalCollator(model.tokenizer.pad_token_id))
    batch = next(iter(loader))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = _status_kib("VmHWM")   # the peak since _reset_peak_rss
    return {"mode": mode, "records": len(dataset), "seconds": seconds, "cpu_seconds": cpu_seconds,
            "data_mib": (peak - before) / 1024, "peak_mib": peak / 1024, "batch": list(batch["input_ids"].shape)}


def first_batch(work: str, args) -> list[dict]:
    import subprocess

    inputs = first_batch_inputs(work, args)
    rows = []
    for mode in ("eager", "lazy", "lazy, grouped"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--first-batch-worker", mode,
                              json.dumps(inputs)], check=True, capture_output=True, text=True).stdout
        rows.append(dict(json.loads(out.strip().splitlines()[-1]), file_mib=os.path.getsize(inputs["path"]) / 2**20))
    return rows


def print_first_batch(rows: list[dict], args) -> None:
    print(f"\nfirst training batch: {args.records} generated records (JSONL "
          f"{rows[0]['file_mib']:.0f} MiB; 70 % with an image), batch 8, tiny BPE tokenizer")
    print(f"{'dataset':<14} {'s to first batch':>17} {'(CPU s)':>8} {'data MiB':>9} {'peak MiB':>9}")
    for row in rows:
        print(f"{row['mode']:<14} {row['seconds']:>17.1f} {row['cpu_seconds']:>8.1f} {row['data_mib']:>9.0f} "
              f"{row['peak_mib']:>9.0f}")
    eager, lazy = rows[0], rows[1]
    print(f"lazy vs eager: {eager['seconds'] / lazy['seconds']:.0f}x sooner "
          f"({eager['cpu_seconds'] / lazy['cpu_seconds']:.0f}x less CPU time), "
          f"{eager['data_mib'] / max(lazy['data_mib'], 1):.0f}x less data memory")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="clip length for the decoding benchmark")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per video (MokA stage 1: 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader-samples", type=int, default=48)
    parser.add_argument("--loader-videos", type=int, default=8,
                        help="distinct 10 s videos the video records cycle over")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-loader", action="store_true", help="only the video decoding table")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads in the main process (workers use 1)")
    parser.add_argument("--records", type=int, default=200_000, help="records in the first-batch file")
    parser.add_argument("--first-batch-only", action="store_true", help="only the first-batch table")
    parser.add_argument("--first-batch-worker", nargs=2, metavar=("MODE", "INPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_batch_worker:
        mode, inputs = args.first_batch_worker
        print(json.dumps(first_batch_worker(mode, json.loads(inputs))))
        return 0
    if args.quick:
        args.seconds, args.clips, args.repeats, args.loader_samples, args.loader_videos = 12.0, 1, 2, 16, 2
        args.records = min(args.records, 5000)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as work:
        if args.first_batch_only:
            print_first_batch(first_batch(work, args), args)
            return 0
        print(f"video decoding: {args.clips} generated {args.seconds:.0f} s clips, {args.width}x{args.height} at "
              f"{args.fps} fps, {args.frames} frames sampled per clip")
        print(f"{'codec':<9} {'GOP':>4} {'seek frames/s':>14} {'full frames/s':>14} {'speed-up':>9} "
              f"{'(quartiles)':>13} {'CPU-time speed-up':>18}")
        for row in video_decoding(work, args):
            quartiles = f"({row['q1']:.1f} - {row['q3']:.1f})"
            print(f"{row['codec']:<9} {row['gop']:>4} {row['seek_fps']:>14.1f} {row['full_fps']:>14.1f} "
                  f"{row['speedup']:>8.1f}x {quartiles:>13} {row['cpu_speedup']:>17.1f}x")
        if args.skip_loader:
            return 0
        print(f"\ndata loader: {args.loader_samples} records per kind, batch 8 (image 640x480 PNG; video 10 s "
              f"320x240 mpeg4, {args.frames} frames; audio 10 s WAV, 10 BEATs windows)")
        print(f"{'records':<8} {'workers':>8} {'samples/s':>10}")
        for row in loader_throughput(loader_inputs(work, args), args):
            print(f"{row['kind']:<8} {row['workers']:>8} {row['samples_per_s']:>10.1f}")
        print_first_batch(first_batch(work, args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
