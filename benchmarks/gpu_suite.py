"""Every GPU figure the project claims, in one command and one table (about 8 minutes on one H100).

    bash benchmarks/gpu_suite.sh                 # = python benchmarks/gpu_suite.py, on cuda
    python benchmarks/gpu_suite.py --small       # tiny shapes on the CPU: checks the plumbing only
    python benchmarks/gpu_suite.py --skip audio,generation --work /scratch/suite

Runs, each in its own process (so each peak memory is its own), the benchmark scripts beside this
file and collects the figures they write with ``--json``:

* ``tuners``     MokA / peft LoRA and DeLo / peft LoRA train step, prompt pass and decode step at
                 LLaMA-2-7B shapes in bf16, DeLo's train step also on a query cache hit
                 (``tuner_overhead.py``; one sequence of 1024 tokens, 640 of them image tokens);
* ``stage2``     stage-2 tokens/s, MFU (6 N tokens/s over the GPU's bf16 peak, N the LLM's
                 parameters) and peak memory for a bf16 LLM and a 4-bit QLoRA LLM at LLaMA-2-7B +
                 CLIP ViT-L/14 shapes with gradient checkpointing (``stage2_memory.py``);
* ``audio``      BEATs (iter3 size, 10 s clips) and Whisper large-v3 (30 s clips) clips/s
                 (``audio_encoders.py``);
* ``generation`` batched over batch-size-1 generation throughput (``batched_generation.py``).

Weights are random, written once under ``--work`` and loaded through ``from_pretrained``. A step
that fails or runs past its time limit is reported as such and the suite goes on. The ratios in
the table are measured within one run on one device; compare absolute figures only across runs on
the same card.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: step -> (script, arguments on a GPU, arguments with --small, time limit in seconds on a GPU)
STEPS = {
    "tuners": ("tuner_overhead.py",
               ["--device", "cuda", "--dtype", "bf16", "--hidden", "4096", "--ffn", "11008", "--heads", "32",
                "--kv-heads", "32", "--layers", "32", "--batch", "1", "--seq-len", "1024", "--media-tokens", "640",
                "--modalities", "visual", "--repeats", "10", "--no-wide-lora"],
               ["--repeats", "2", "--warmup", "1", "--no-wide-lora", "--layers", "2", "--hidden", "64"], 200),
    "stage2": ("stage2_memory.py", ["--device", "cuda", "--steps", "5"],
               ["--small", "--device", "cpu", "--steps", "1", "--runs", "bf16"], 240),
    "audio": ("audio_encoders.py", ["--device", "cuda"], ["--device", "cpu", "--small", "--repeats", "1",
                                                          "--batch", "2"], 120),
    "generation": ("batched_generation.py", ["--device", "cuda", "--num-prompts", "128", "--batch-size", "32"],
                   ["--device", "cpu", "--num-prompts", "8", "--batch-size", "4", "--new-tokens", "4"], 90),
}


def run_step(name: str, small: bool, work: str, scale: float) -> dict:
    script, gpu_args, small_args, limit = STEPS[name]
    out = os.path.join(work, f"{name}.json")
    command = [sys.executable, os.path.join(HERE, script), *(small_args if small else gpu_args), "--json", out]
    if name == "stage2":
        command += ["--work", os.path.join(work, "stage2-checkpoints")]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit * scale)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {limit * scale:.0f} s"}
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not os.path.isfile(out):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": f"failed (exit {done.returncode}): {tail[0][:200]}", "seconds": seconds}
    with open(out) as f:
        return {"status": "ok", "seconds": seconds, "figures": json.load(f)}


def table_rows(results: dict) -> list[tuple[str, str]]:
    """(measure, value) rows from whatever steps succeeded; failures keep their row."""
    rows = []
    for name, result in results.items():
        if result["status"] != "ok":
            rows.append((name, result["status"]))
            continue
        figures = result["figures"]
        if name == "tuners":
            for measure, m in figures["measures"].items():
                rows.append((f"MokA / LoRA {measure}", f"{m['moka_over_lora']:.3f}  ({m['moka_ms']:.1f} vs "
                                                        f"{m['lora_ms']:.1f} ms)"))
            for measure, m in figures["measures"].items():
                if "delo_over_lora" in m:
                    rows.append((f"DeLo / LoRA {measure}", f"{m['delo_over_lora']:.3f}  ({m['delo_ms']:.1f} vs "
                                                            f"{m['lora_ms']:.1f} ms)"))
                if "delo_cached_over_lora" in m:
                    rows.append((f"DeLo / LoRA {measure}, query cache hit",
                                 f"{m['delo_cached_over_lora']:.3f}  ({m['delo_cached_ms']:.1f} vs "
                                 f"{m['lora_ms']:.1f} ms)"))
        elif name == "stage2":
            for run, r in figures["runs"].items():
                peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a"
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
                rows.append((f"stage 2 {run} (grad. ckpt)", f"{r['tokens_per_second']:.0f} tokens/s, MFU {mfu}, "
                                                          f"peak {peak}"))
        elif name == "audio":
            for r in figures["results"]:
                rows.append((f"{r['encoder']} {r['clip_seconds']:.0f} s clips",
                             f"{r['encode_clips_per_s']:.1f} clips/s"))
        elif name == "generation":
            rows.append(("batched generation", f"{figures['batched_prompts_per_s']:.1f} prompts/s at batch "
                                               f"{figures['batch_size']} = {figures['ratio']:.2f}x batch 1"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU (plumbing check)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to leave out, of {', '.join(STEPS)}")
    parser.add_argument("--work", default=None, help="folder for checkpoints and figures (default: a temp folder)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every step's time limit")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STEPS):
        parser.error(f"--skip: unknown step(s) {sorted(skip - set(STEPS))}; steps are {', '.join(STEPS)}")
    work = args.work or tempfile.mkdtemp(prefix="gpu-suite-")
    os.makedirs(work, exist_ok=True)
    scale = args.time_scale * (4 if args.small else 1)   # a shared CPU is slower than a GPU at tiny shapes too
    results = {}
    for name in STEPS:
        if name in skip:
            continue
        print(f"[{name}] running {STEPS[name][0]} ...", flush=True)
        results[name] = run_step(name, args.small, work, scale)
        print(f"[{name}] {results[name]['status']}", flush=True)
    rows = table_rows(results)
    width = max(len(measure) for measure, _ in rows)
    print(f"\n{'measure':<{width}}  value\n{'-' * width}  {'-' * 40}")
    for measure, value in rows:
        print(f"{measure:<{width}}  {value}")
    with open(os.path.join(work, "suite.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n(figures in {os.path.join(work, 'suite.json')}; shapes: {'small, CPU' if args.small else 'GPU'})")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
