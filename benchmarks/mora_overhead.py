"""MoRA's cost on one tiny CLIP dual encoder (built locally from a config; vision width != text width,
as CLIP ViT-B/16's 768 / 512): merged-MoRA inference over the base model's, and an unmerged-MoRA
training step over a peft LoRA training step with the same targets and the same rank.

* inference: a no-grad ``CLIPModel`` forward (both towers, projections, similarity logits);
  "merged MoRA" is what ``merge_and_unload`` returns (a plain ``CLIPModel``; checked, and checked to
  give the unmerged adapter's outputs), so its ratio to the base model should be 1 up to noise
  (target <= 1.01);
* training step: forward with CLIP's contrastive loss + backward, only the adapter trainable
  (MoRA: A, B, magnitudes, shared S^v / S^t / a^s; LoRA: A, B), both in the last ``--pairs``
  layers of each tower on ``--targets``, rank ``--r`` (MoRA's shared rank too), dropout 0.1.

Timing: ``--warmup`` untimed calls, then ``--repeats`` rounds; in each round every model runs
``--block`` calls back to back, timed together, the models in a shuffled order, so machine drift
hits all models alike. Printed: the median per call, and the median over rounds of the per-round ratio (paired),
with its interquartile range.

    python benchmarks/mora_overhead.py [--threads 1 --repeats 40 --batch 16 --vision-width 192 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from timing import ratio_stats, timed_rounds

import mllm  # noqa: F401  (registers mora with peft)
from mllm.classify.model import prepare_clip_for_tuner
from mllm.classify.tiny import TinyClipSizes, tiny_clip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds")
    parser.add_argument("--block", type=int, default=2, help="calls per model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--vision-width", type=int, default=192)
    parser.add_argument("--text-width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2, help="paired (adapted) layers at the end of each tower")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--r", type=int, default=4)
    return parser.parse_args(argv)


def build(args, vocab=1000):
    sizes = TinyClipSizes(vision_width=args.vision_width, text_width=args.text_width,
                          vision_layers=args.vision_layers, text_layers=args.text_layers, heads=4,
                          image_size=args.image_size, patch_size=args.patch_size, projection_dim=128,
                          max_positions=max(77, args.text_len))
    return lambda: tiny_clip(vocab, eos_token_id=vocab - 1, pad_token_id=0, sizes=sizes, seed=0)


def inputs(args, vocab=1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab - 1, (args.batch, args.text_len), generator=g)
    ids[:, -1] = vocab - 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)}


def trainable(model):
    for name, param in model.named_parameters():
        param.requires_grad_("mora_" in name or "lora_" in name)
    return model




def print_rows(measure: str, samples: dict[str, list[float]], baseline: str) -> None:
    """One line per run: median ms per call, and its ratio to ``baseline`` [interquartile range]."""
    for name in samples:
        line = f"{measure + ', ' + name:<34}{1e3 * statistics.median(samples[name]):>9.2f}"
        if name != baseline:
            r, lo, hi = ratio_stats(samples, name, baseline)
            line += f"   {r:.3f} [{lo:.3f}, {hi:.3f}] vs {baseline}"
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    make = build(args)
    batch = inputs(args)
    targets = [t for t in args.targets.split(",") if t]
    common = {"num_paired_layers": args.pairs, "target_modules": targets, "dropout": 0.1}
    mora_options = {"r": args.r, "shared_r": args.r, "alpha": 1.0, "init_weights": False, **common}

    base = make().eval()
    unmerged = prepare_clip_for_tuner(make(), "mora", mora_options).eval()   # random non-identity adapter
    with torch.no_grad():
        expected = unmerged(**batch)
    merged = prepare_clip_for_tuner(make(), "mora", mora_options)
    merged.load_state_dict(unmerged.state_dict())
    merged = merged.merge_and_unload().eval()
    plain = type(merged) is type(base) and not any("mora" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        got = merged(**batch)
    diff = max((got.image_embeds - expected.image_embeds).abs().max().item(),
               (got.text_embeds - expected.text_embeds).abs().max().item())
    lora = prepare_clip_for_tuner(make(), "lora", {"r": args.r, "lora_alpha": 2 * args.r, **common})

    def infer(model):
        def run():
            with torch.no_grad():
                model(**batch)
        return run

    mora_train, lora_train = trainable(prepare_clip_for_tuner(make(), "mora", mora_options)), trainable(lora)

    def train_step(model):
        def run():
            model.train()
            model(**batch, return_loss=True).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
              for name, m in (("MoRA", mora_train), ("LoRA", lora_train))}
    print(f"CLIP (random, local): vision width {args.vision_width} x {args.vision_layers} layers "
          f"({(args.image_size // args.patch_size) ** 2 + 1} tokens), text width {args.text_width} x "
          f"{args.text_layers} layers ({args.text_len} tokens), batch {args.batch}; adapters in the last "
          f"{args.pairs} layers of each tower on {','.join(targets)}, r={args.r}; trainable MoRA "
          f"{counts['MoRA']:,} / LoRA {counts['LoRA']:,}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.repeats} rounds x "
          f"{args.block} calls, median; ratio = median of per-round ratios [interquartile range]")
    print(f"merge_and_unload -> plain {type(merged).__name__}: {plain}; max |merged - unmerged| = {diff:.2e}")

    inference = timed_rounds({"base": infer(base), "merged MoRA": infer(merged), "unmerged MoRA": infer(unmerged),
                              "peft LoRA (unmerged)": infer(lora.eval())}, args.repeats, args.block, args.warmup)
    training = timed_rounds({"peft LoRA": train_step(lora_train), "unmerged MoRA": train_step(mora_train)},
                            args.repeats, args.block, args.warmup)

    print(f"\n{'measure':<34}{'ms/call':>9}   ratio")
    print_rows("inference", inference, "base")
    print_rows("train step", training, "peft LoRA")
    merged_ratio = ratio_stats(inference, "merged MoRA", "base")[0]
    train_ratio = ratio_stats(training, "unmerged MoRA", "peft LoRA")[0]
    print(f"\nmerged-MoRA inference / base inference       = {merged_ratio:.3f}  (target <= 1.01: "
          f"{'met' if merged_ratio <= 1.01 else 'NOT met'})")
    print(f"unmerged-MoRA train step / peft LoRA train step = {train_ratio:.3f}")
    return 0 if plain and diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
