"""Stage-2 training at LLaMA-2-7B shapes: peak memory with QLoRA, tokens per second with bf16.

Two runs over the same model, each in its own process (so each peak is its own):

* ``qlora``: the LLM loaded as bitsandbytes NF4 (``model.quantization: nf4``), bf16 compute;
* ``bf16``: the LLM in bf16.

Both with gradient checkpointing, the tuner of ``--tuner`` (LoRA r 16 on every linear by default,
or MokA), CLIP ViT-L/14 at 224 px and a Q-Former projector, through the same ``MultimodalLM``
that stage 2 trains (``from_config``, ``apply_tuner``, ``gradient_checkpointing_enable``): each
step is forward + backward + AdamW over the trainable parameters, on ``--batch`` sequences of
``--seq-len`` tokens, ``--media-tokens`` of them image tokens. Printed per run: peak GPU memory
(``torch.cuda.max_memory_allocated``), trainable parameters, seconds per step (median of
``--steps`` after two warm-up steps) and tokens per second; then QLoRA / bf16 for memory and speed.

Weights are random (shapes are what matter). The LLM and CLIP checkpoints are written once to
``--work`` (about 13.5 GB for the 7B LLM in bf16) and loaded through ``from_pretrained`` as a
user's would; ``--llm PATH`` uses an existing checkpoint instead.

    python benchmarks/stage2_memory.py --device cuda                       # 7B, 1024 tokens, batch 1
    python benchmarks/stage2_memory.py --small                             # tiny shapes, CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
CLIP_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=768)
# bitsandbytes quantizes in blocks of 64, so the small LLM stays at least that wide.
LLAMA_SMALL = {**LLAMA_2_7B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 512}
CLIP_SMALL = {**CLIP_L_14, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 28}
PROJECTOR = {"num_queries": 32, "hidden_size": 768, "num_layers": 2, "num_heads": 12, "intermediate_size": 3072,
             "dropout": 0.0}
TUNERS = {"lora": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
          "moka": {"type": "moka", "r": 4, "alpha": 16, "dropout": 0.05,
                   "options": {"modalities": ["text", "visual"]}}}


def build_checkpoints(work: str, small: bool, device: str) -> dict:
    """Random LLaMA and CLIP checkpoints in ``work`` (reused when already there)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mllm.data.tiny_tokenizer import build_tiny_tokenizer

    llm_dir, clip_dir = os.path.join(work, "llm"), os.path.join(work, "clip")
    if not os.path.isfile(os.path.join(llm_dir, "config.json")):
        shape = LLAMA_SMALL if small else LLAMA_2_7B
        torch.manual_seed(0)
        # Built directly in bf16 on the target device: a 7B fp32 build on the CPU takes minutes.
        with torch.device(device):
            llm = LlamaForCausalLM._from_config(LlamaConfig(**shape, tie_word_embeddings=False),
                                                dtype=torch.bfloat16)
        llm.save_pretrained(llm_dir)
        del llm
        # Any tokenizer with ids below the vocabulary will do: the text is random ids anyway.
        build_tiny_tokenizer(["a small corpus for the benchmark tokenizer"] * 4).save_pretrained(llm_dir)
    if not os.path.isfile(os.path.join(clip_dir, "config.json")):
        shape = CLIP_SMALL if small else CLIP_L_14
        CLIPVisionModel(CLIPVisionConfig(**shape)).to(torch.bfloat16).save_pretrained(clip_dir)
        size = shape["image_size"]
        CLIPImageProcessor(size={"shortest_edge": size},
                           crop_size={"height": size, "width": size}).save_pretrained(clip_dir)
    return {"llm": llm_dir, "clip": clip_dir}


def count_parameters(checkpoint: str) -> int:
    """Parameters stored in a checkpoint folder's safetensors files, read from their headers."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(checkpoint):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(checkpoint, name), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    total += int(torch.tensor(shape).prod()) if shape else 1
    return total


#: Dense bf16 tensor-core peaks (FLOP/s) of the GPUs the suite is run on (vendor data sheets, SXM).
BF16_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_bf16_flops(device: str, tflops: float | None) -> float | None:
    if tflops:
        return tflops * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in BF16_PEAKS.items() if key in name), None)


def measure(run: str, args) -> dict:
    """One run in this process: build, then time ``args.steps`` training steps."""
    from mllm.config import TunerConfig, config_from_dict
    from mllm.model import MultimodalLM

    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # CPU check: fp32 compute
    model_cfg = config_from_dict({"model": {
        "llm": args.llm, "dtype": dtype, "quantization": "nf4" if run == "qlora" else None,
        "encoders": {"visual": {"type": "clip", "path": args.clip, "dtype": dtype}},
        "projectors": {"visual": dict(PROJECTOR, num_queries=args.media_tokens)}}}).model
    torch.manual_seed(0)
    model = MultimodalLM.from_config(model_cfg)
    model.freeze_llm()
    model.apply_tuner(TunerConfig(**TUNERS[args.tuner]))
    model.to(device)   # projectors stay float32 and compute under autocast, as the Trainer's --bf16 does
    model.gradient_checkpointing_enable()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    vocab = model.base_llm.config.vocab_size
    image = model.placeholder_ids["<image>"]
    generator = torch.Generator().manual_seed(0)
    text_ids = min(vocab, *model.placeholder_ids.values())   # placeholders are the tokenizer's last ids
    text = torch.randint(10, text_ids, (args.batch, args.seq_len - args.media_tokens),
                         generator=generator)
    input_ids = torch.cat([torch.full((args.batch, args.media_tokens), image), text], dim=1).to(device)
    labels = input_ids.masked_fill(input_ids == image, -100)
    size = model.encoders["visual"].vision_model.config.image_size
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "image_inputs": torch.randn(args.batch, 3, size, size, generator=generator).to(device)}

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        step()
        if i >= 2:   # two warm-up steps (allocator, kernels, optimizer state)
            seconds.append(time.perf_counter() - start)
    per_step = statistics.median(seconds)
    return {"run": run, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "trainable_m": sum(p.numel() for p in trainable) / 1e6, "seconds_per_step": per_step,
            "tokens_per_second": args.batch * args.seq_len / per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a quick check that everything runs)")
    parser.add_argument("--tuner", choices=sorted(TUNERS), default="lora")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--media-tokens", type=int, default=32, help="image tokens per sequence (Q-Former queries)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work", default=None, help="folder for the random checkpoints (default: a temp folder)")
    parser.add_argument("--llm", default=None, help="an existing causal-LM checkpoint instead of the random 7B")
    parser.add_argument("--clip", default=None, help="an existing CLIP vision checkpoint")
    parser.add_argument("--runs", default="qlora,bf16")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: known from the device name)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small and args.seq_len == 1024:
        args.seq_len = 128
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args)), flush=True)
        return

    work = args.work or tempfile.mkdtemp(prefix="stage2-memory-")
    if not (args.llm and args.clip):
        built = build_checkpoints(work, args.small, args.device)
        args.llm, args.clip = args.llm or built["llm"], args.clip or built["clip"]
    llm_parameters = count_parameters(args.llm)
    peak_flops = peak_bf16_flops(args.device, args.peak_tflops)
    results = {}
    for run in args.runs.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--child", run, "--llm", args.llm, "--clip", args.clip,
                   "--device", args.device, "--tuner", args.tuner, "--seq-len", str(args.seq_len),
                   "--media-tokens", str(args.media_tokens), "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{run} failed:\n{out.stderr[-3000:]}")
        results[run] = r = json.loads(out.stdout.split("RESULT ", 1)[1])
        # MFU as the issue tracker defines it: 6 N tokens/s over the GPU's bf16 peak, N the LLM's parameters.
        r["mfu"] = 6 * llm_parameters * r["tokens_per_second"] / peak_flops if peak_flops else None
        peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
        mfu = f" | MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        print(f"{run:6s} peak memory {peak:>12s} | trainable {r['trainable_m']:.1f} M | "
              f"{r['seconds_per_step']:.3f} s/step | {r['tokens_per_second']:.0f} tokens/s{mfu}", flush=True)
    if {"qlora", "bf16"} <= set(results):
        q, b = results["qlora"], results["bf16"]
        if q["peak_gib"] is not None:
            print(f"QLoRA / bf16 peak memory: {q['peak_gib'] / b['peak_gib']:.3f}")
        print(f"QLoRA / bf16 tokens per second: {q['tokens_per_second'] / b['tokens_per_second']:.3f}")
    compute = "bf16 compute" if args.device.startswith("cuda") else "CPU check: float32 compute, no peak memory"
    print(f"(shapes: {'small' if args.small else 'LLaMA-2-7B + CLIP ViT-L/14'}, tuner {args.tuner}, batch "
          f"{args.batch} x {args.seq_len} tokens incl. {args.media_tokens} image tokens, gradient checkpointing, "
          f"{compute})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "small": args.small, "tuner": args.tuner, "seq_len": args.seq_len,
                       "batch": args.batch, "llm_parameters": llm_parameters, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
