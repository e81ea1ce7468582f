"""DeLo's cost over peft LoRA's on the backbone the CMML stage uses (a transformers ``ViltModel``,
tiny random config built locally): a training step and an inference pass, in one run.

Both models are the CMML stage's classifiers (``mllm.continual``): per-task linear heads over the
pooled output, class-incremental logits; the adapters sit on the same projections (every layer's
attention query / key / value).

* DeLo: ``--num-tasks`` tasks, pools of ``--experts`` rank-one factor pairs per task and modality,
  ``--r`` selected per sample and modality; a training step (of the last task) includes the frozen
  query pass, the routing and the alignment loss; inference routes each sample with the Task-Key
  Memory (keys filled beforehand with one training pass per task; the timed batch mixes samples of
  every task, so every task's experts run).
* DeLo with its query cache (``mllm.tuners.delo.query_cache``): the same model and batch, the
  frozen query pass's features taken from the cache, as on every step from a run's second epoch
  (the first epoch runs the query pass and fills the cache).
* peft LoRA: rank ``--r``, the sequential fine-tuning baseline (``SequentialLoraClassifier``).

Timing as ``benchmarks/mora_overhead.py``: warm-up, then ``--repeats`` rounds in which each model
runs ``--block`` calls, the models in a shuffled order; median per call and the median of the
per-round ratios with its interquartile range.

    python benchmarks/delo_overhead.py [--threads 1 --repeats 30 --batch 8 --hidden 192 --layers 4 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from timing import ratio_stats, timed_rounds

import mllm  # noqa: F401  (registers delo with peft)
from mllm.continual.cmml import DeloClassifier, SequentialLoraClassifier
from mllm.continual.tiny import TinyViltSizes, tiny_vilt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds")
    parser.add_argument("--block", type=int, default=2, help="calls per model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16, help="DeLo pool size E per task and modality")
    parser.add_argument("--num-tasks", type=int, default=2)
    parser.add_argument("--labels-per-task", type=int, default=10)
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="wall time, or this process's CPU time, which on a shared machine leaves out the "
                             "time other jobs hold the cores (auto: cpu with --threads 1, else wall)")
    return parser.parse_args(argv)


VOCAB = 200


def task_batch(args, task: int, batch: int, seed: int) -> dict:
    """Inputs whose images and tokens differ per task (so the Task-Key Memory tells tasks apart)."""
    g = torch.Generator().manual_seed(seed)
    width = (VOCAB - 1) // args.num_tasks
    ids = torch.randint(1 + task * width, 1 + (task + 1) * width, (batch, args.text_len), generator=g)
    size = args.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, size, size, generator=g) + 2.0 * task,
            "pixel_mask": torch.ones(batch, size, size, dtype=torch.long)}


def mixed_batch(args, seed: int) -> dict:
    parts = [task_batch(args, t, -(-args.batch // args.num_tasks), seed + t) for t in range(args.num_tasks)]
    return {k: torch.cat([p[k] for p in parts])[: args.batch] for k in parts[0]}


def build(args):
    from peft import LoraConfig, get_peft_model

    from mllm.tuners.delo import DeloConfig

    sizes = TinyViltSizes(hidden=args.hidden, layers=args.layers, heads=4, image_size=args.image_size,
                          patch_size=args.patch_size, max_positions=max(40, args.text_len))
    targets = ["query", "key", "value"]
    torch.manual_seed(1)
    delo = DeloClassifier(get_peft_model(tiny_vilt(VOCAB, sizes), DeloConfig(
        r=args.r, num_experts=args.experts, alpha=2.0, num_tasks=args.num_tasks, target_modules=targets,
        init_weights=False)), args.num_tasks, args.labels_per_task)
    torch.manual_seed(1)
    lora = SequentialLoraClassifier(get_peft_model(tiny_vilt(VOCAB, sizes), LoraConfig(
        r=args.r, lora_alpha=2.0, target_modules=targets)), args.num_tasks, args.labels_per_task)
    return delo, lora




def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    delo, lora = build(args)
    last = args.num_tasks - 1

    # Task-Key Memory: one training pass per task fills its keys (no optimiser step: timing only).
    for task in range(args.num_tasks):
        delo.set_task(task)
        delo.train()
        delo(task_batch(args, task, args.batch, seed=10 + task))
    for model in (delo, lora):
        model.set_task(last)
    train_inputs = task_batch(args, last, args.batch, seed=100)
    labels = torch.randint(last * args.labels_per_task, (last + 1) * args.labels_per_task, (args.batch,))
    test_inputs = mixed_batch(args, seed=200)

    def train_step(model, query_cache=None):
        def run():
            if query_cache is not None:
                delo.tuner.peft_config["default"].query_cache = query_cache
            model.train()
            model.loss(model(train_inputs), labels).backward()
            model.zero_grad(set_to_none=True)
        return run

    def infer(model):
        def run():
            model.eval()
            with torch.no_grad():
                model(test_inputs)
        return run

    infer(delo)()
    routed = sorted(set(delo.tuner.state.task_ids.tolist()))
    counts = {name: sum(p.numel() for p in m.backbone.parameters() if p.requires_grad)
              for name, m in (("DeLo", delo), ("LoRA", lora))}
    tokens = args.text_len + (args.image_size // args.patch_size) ** 2 + 1
    print(f"ViLT (random, local): hidden {args.hidden} x {args.layers} layers, {tokens} tokens, batch "
          f"{args.batch}; adapters on query,key,value of every layer; LoRA r={args.r}; DeLo {args.num_tasks} "
          f"tasks x E={args.experts}, r={args.r} per modality; trainable in the current task: DeLo "
          f"{counts['DeLo']:,} / LoRA {counts['LoRA']:,}")
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and args.threads == 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {'cpu' if cpu_clock else 'wall'} clock; "
          f"{args.repeats} rounds x {args.block} "
          f"calls, median; ratio = median of per-round ratios [interquartile range]; inference batch routed by the "
          f"Task-Key Memory to tasks {routed}")
    # The same DeLo model with its query cache off (the query pass on every step) and on; the
    # batch repeats, so after the warm-up every cached step is a hit, as from a run's second epoch.
    clock = time.process_time if cpu_clock else time.perf_counter
    training = timed_rounds({"peft LoRA": train_step(lora), "DeLo": train_step(delo, query_cache=False),
                             "DeLo cached": train_step(delo, query_cache=True)}, args.repeats, args.block, args.warmup,
                            clock)
    cache = delo.tuner.query_cache
    inference = timed_rounds({"peft LoRA": infer(lora), "DeLo": infer(delo)}, args.repeats, args.block, args.warmup,
                             clock)
    print(f"\n{'measure':<36}{'LoRA ms':>9}{'DeLo ms':>9}   DeLo / LoRA")
    results = {}
    for label, samples, delo_name in (("train step, query cache off", training, "DeLo"),
                                      ("train step, query cache hit", training, "DeLo cached"),
                                      ("inference", inference, "DeLo")):
        r, lo, hi = ratio_stats(samples, delo_name, "peft LoRA")
        results[label] = r
        print(f"{label:<36}{1e3 * statistics.median(samples['peft LoRA']):>9.2f}"
              f"{1e3 * statistics.median(samples[delo_name]):>9.2f}   {r:.3f} [{lo:.3f}, {hi:.3f}]")
    print(f"\nquery cache: {cache.hits} hits, {cache.misses} misses over the cached train steps")
    print(f"DeLo train step / peft LoRA train step = {results['train step, query cache off']:.3f} uncached, "
          f"{results['train step, query cache hit']:.3f} with the query cache (from the second epoch)")
    print(f"DeLo inference  / peft LoRA inference  = {results['inference']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
