"""Batched generation throughput over batch-size-1 throughput, on the same model and prompts.

The MokA reference evaluates one sample at a time; the eval runner generates left-padded
batches through ``mllm.inference.generate_answers``. This prints prompts/second for both and
their ratio. Every prompt is made to generate exactly ``--new-tokens`` tokens
(``min_new_tokens``), so both runs do the same work.

    python benchmarks/batched_generation.py                      # tiny random model, CPU or GPU
    python benchmarks/batched_generation.py --checkpoint runs/instruct --data eval.jsonl --media-root data/
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def tiny_model_and_prompts(work_dir: str, num_prompts: int):
    """The demo's generated images and a tiny CLIP + LLaMA model (random weights)."""
    from mllm.config import config_from_dict
    from mllm.data.synthetic import write_demo_dataset
    from mllm.demo.assets import build_tiny_assets
    from mllm.model.multimodal_lm import MultimodalLM

    paths = write_demo_dataset(os.path.join(work_dir, "data"), seed=0, num_pretrain=8, num_instruct=8,
                               num_eval=num_prompts)
    with open(paths["instruct"]) as f:
        corpus = [line for line in f]
    assets = build_tiny_assets(os.path.join(work_dir, "assets"), corpus)
    projector = {"num_queries": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
    cfg = config_from_dict({"model": {"llm": assets["llm"], "encoders": {"visual": {"type": "clip",
                                                                                     "path": assets["clip"]}},
                                      "projectors": {"visual": projector}}})
    torch.manual_seed(0)
    return MultimodalLM.from_config(cfg.model), paths["eval"], paths["media_root"]


def prompts_per_second(model, dataset, batch_size: int, new_tokens: int) -> float:
    from mllm.inference import generate_answers

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate_answers(model, dataset, batch_size=batch_size, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(dataset) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="an mllm checkpoint (default: a tiny random model)")
    parser.add_argument("--data", help="LLaVA-style prompt JSONL (default: generated demo questions)")
    parser.add_argument("--media-root")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)

    from torch.utils.data import Subset

    from mllm.data.dataset import MultimodalDataset
    from mllm.model.multimodal_lm import MultimodalLM

    with tempfile.TemporaryDirectory() as work_dir:
        if args.checkpoint:
            model, data, media_root = MultimodalLM.from_pretrained(args.checkpoint), args.data, args.media_root
        else:
            model, data, media_root = tiny_model_and_prompts(work_dir, args.num_prompts)
            data, media_root = args.data or data, args.media_root or media_root
        model = model.to(args.device).eval()
        dataset = MultimodalDataset(data, model.tokenizer, model.media_specs(), media_root=media_root,
                                    for_generation=True, progress=False)
        dataset = Subset(dataset, range(min(args.num_prompts, len(dataset))))
        prompts_per_second(model, Subset(dataset, range(min(4, len(dataset)))), 2, 2)  # warm-up
        single = prompts_per_second(model, dataset, 1, args.new_tokens)
        batched = prompts_per_second(model, dataset, args.batch_size, args.new_tokens)
    print(f"device {args.device}, {len(dataset)} prompts, {args.new_tokens} new tokens each")
    print(f"batch size 1:  {single:8.2f} prompts/s")
    print(f"batch size {args.batch_size}: {batched:8.2f} prompts/s")
    print(f"batched / batch-size-1 throughput: {batched / single:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "prompts": len(dataset), "new_tokens": args.new_tokens,
                       "batch_size": args.batch_size, "single_prompts_per_s": single,
                       "batched_prompts_per_s": batched, "ratio": batched / single}, f, indent=1)


if __name__ == "__main__":
    main()
