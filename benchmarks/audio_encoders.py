"""Throughput of the frozen audio encoders: clips per second, random weights.

* BEATs at the released iter3 / iter3+ size (12 post-LN DeepNorm layers, width 768, 12 heads,
  FFN 3072, 512-wide 16x16 patch embedding, gated relative position bias: about 90 M
  parameters) on a batch of 10 s clips -> (batch, 496, 768).
* Whisper encoder at large-v3 dims (128 mel bins, width 1280, 32 layers, 20 heads: about
  635 M parameters) on a batch of 30 s clips -> (batch, 1500, 1280).

For each: the data pipeline's preprocessing on the CPU (BEATs' Kaldi fbank, Whisper's per-clip
log-mel; clips per second over the batch) and the encoder's forward on ``--device`` in
``--dtype`` under ``torch.inference_mode`` (one warm-up batch, then the median of ``--repeats``
timed batches; clips per second = batch / median seconds per batch).

``--small`` (the default on CPU) keeps the input lengths but shrinks the models (BEATs 2 x 192,
Whisper 4 x 384, Whisper-tiny's width) for a quick check that everything runs; its figures say
nothing about the full-size models.

    python benchmarks/audio_encoders.py                                 # CPU, --small
    python benchmarks/audio_encoders.py --device cuda --dtype bfloat16 --batch 16 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SAMPLE_RATE = 16000

# Released iter3 / iter3+ architecture (the checkpoints' `cfg`, not the original class defaults).
BEATS_ITER3 = dict(input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
                   encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu",
                   layer_norm_first=False, deep_norm=True, conv_pos=128, conv_pos_groups=16,
                   relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
                   finetuned_model=False)
BEATS_SMALL = {**BEATS_ITER3, "embed_dim": 128, "encoder_layers": 2, "encoder_embed_dim": 192,
               "encoder_ffn_embed_dim": 768, "encoder_attention_heads": 4}
# whisper.model.AudioEncoder(n_mels, n_ctx, n_state, n_head, n_layer)
WHISPER_LARGE_V3 = dict(n_mels=128, n_ctx=1500, n_state=1280, n_head=20, n_layer=32)
WHISPER_SMALL = {**WHISPER_LARGE_V3, "n_state": 384, "n_head": 6, "n_layer": 4}


def build_beats(small: bool):
    from mllm.encoders.beats import BEATsAudioEncoder, BEATsConfig, BEATsModel

    config = BEATS_SMALL if small else BEATS_ITER3
    encoder = BEATsAudioEncoder(BEATsModel(BEATsConfig.from_dict(config))).freeze()
    dims = f"{config['encoder_layers']} x {config['encoder_embed_dim']}, {config['encoder_attention_heads']} heads"
    return encoder, dims


def build_whisper(small: bool):
    from whisper.model import AudioEncoder

    from mllm.encoders.whisper import WhisperSpeechEncoder

    d = WHISPER_SMALL if small else WHISPER_LARGE_V3
    audio_encoder = AudioEncoder(d["n_mels"], d["n_ctx"], d["n_state"], d["n_head"], d["n_layer"])
    encoder = WhisperSpeechEncoder(audio_encoder, n_mels=d["n_mels"]).freeze()
    return encoder, f"{d['n_layer']} x {d['n_state']}, {d['n_head']} heads, {d['n_mels']} mels"


def clips(batch: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32) for _ in range(batch)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, build, seconds: float, args, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    encoder, dims = build(args.small)
    params = sum(p.numel() for p in encoder.parameters())
    waveforms = clips(args.batch, seconds)

    start = time.perf_counter()
    inputs = encoder.preprocess(waveforms)
    preprocess_s = time.perf_counter() - start

    encoder.to(device=device, dtype=dtype)
    inputs = inputs.to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for i in range(args.repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            features = encoder(inputs)
            synchronize(device)
            if i:  # the first batch is the warm-up
                times.append(time.perf_counter() - start)
    per_batch = statistics.median(times)
    result = {"encoder": name, "dims": dims, "params_m": round(params / 1e6, 2), "clip_seconds": seconds,
              "batch": args.batch, "input": list(inputs.shape), "output": list(features.shape),
              "preprocess_clips_per_s": round(args.batch / preprocess_s, 2),
              "encode_s_per_batch": round(per_batch, 4), "encode_clips_per_s": round(args.batch / per_batch, 2)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    del encoder, inputs, features
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch", type=int, default=8, help="clips per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed batches after one warm-up "
                                                                  "(default 10 on cuda, 3 on cpu)")
    parser.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                        help="reduced model dims for a quick check (default: on for cpu, off for cuda)")
    parser.add_argument("--only", choices=("beats", "whisper"), default=None, help="run one encoder")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    args.small = (args.device == "cpu") if args.small is None else args.small
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"audio encoders, random weights | {where} | {args.dtype} | batch {args.batch} | "
          f"median of {args.repeats} | torch {torch.__version__}"
          + (" | --small: reduced dims, NOT the released sizes" if args.small else ""))
    runs = [("BEATs", build_beats, 10.0), ("Whisper", build_whisper, 30.0)]
    results = [measure(name, build, seconds, args, device, dtype) for name, build, seconds in runs
               if args.only in (None, name.lower())]
    header = (f"{'encoder':8} {'dims':34} {'params':>8} {'clip':>5} {'output':>16} {'prep clips/s':>13} "
              f"{'s/batch':>8} {'clips/s':>8}")
    print(header)
    for r in results:
        print(f"{r['encoder']:8} {r['dims']:34} {r['params_m']:>7.1f}M {r['clip_seconds']:>4.0f}s "
              f"{tuple(r['output'])!s:>16} {r['preprocess_clips_per_s']:>13.1f} {r['encode_s_per_batch']:>8.3f} "
              f"{r['encode_clips_per_s']:>8.1f}"
              + (f"  peak {r['peak_memory_gib']} GiB" if "peak_memory_gib" in r else ""))
    summary = {"device": where, "dtype": args.dtype, "small": args.small, "results": results}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return results


if __name__ == "__main__":
    main()
