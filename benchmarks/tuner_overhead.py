"""MokA and DeLo vs peft LoRA overhead on one LLaMA-architecture model and one set of inputs.

Prints, for a training step (forward + backward), a prompt pass and a KV-cache decode step, the
median time of each and the ratio MokA / LoRA, all measured in one run on copies of the same
randomly initialised model (same seed) with the same inputs. Both adapt the same modules
(q, k, v, o, gate, up, down projections of every decoder layer), with the same alpha / r scaling.

"Same total rank", two readings, both printed:

* ``MokA / LoRA r`` (the headline figure): LoRA has rank r (A: r x in, B: out x r); MokA has rank
  r per modality (one A of r x in for each of text and the ``--modalities``) and one shared B of
  out x r, i.e. both have an r-dimensional rank space and the same B, and every token goes
  through an r-row A. MokA stores r x (number of modalities) A rows in all.
* ``MokA / LoRA r*M``: LoRA with rank r x M, M = number of MokA modalities (text included), so
  that LoRA's A has as many rows as MokA's stacked A (its B is M times wider than MokA's).

DeLo (``--no-delo`` leaves it out): ``--delo-experts`` rank-one factor pairs per modality (visual
and text) in one task, r of them selected per sample and modality, on the same modules with the
same alpha / r scaling. Its training step includes the frozen query pass and the alignment loss,
and is timed twice on the same model: with its query cache off (the query pass on every step) and
on a cache hit (as from a run's second epoch, ``mllm.tuners.delo.query_cache``). Its prompt pass
includes the query pass; its decode steps reuse the prompt's routing.

The modality ids (and question mask) are published afresh before every MokA and DeLo forward (a
new tensor each time, as a ``MultimodalLM`` does), so the per-forward routing is part of what is
timed. Decode steps use a filled KV cache of the prompt and one new text token per sample.

The input layout (per sample): 2 text tokens, ``--media-tokens`` media tokens split evenly over the
``--modalities``, ``--question-tokens`` question-text tokens (the keys of MokA's cross-attention),
then answer text up to ``--seq-len``.

    python benchmarks/tuner_overhead.py --threads 1                       # the small CPU case
    python benchmarks/tuner_overhead.py --device cuda --dtype bf16 --hidden 4096 --ffn 11008 \\
        --heads 32 --kv-heads 32 --layers 32 --batch 1 --seq-len 1024 --media-tokens 640 \\
        --modalities visual --repeats 10                                   # LLaMA-2-7B shapes

Each round runs every model once, in turn, so that drift hits them alike; the times printed are
medians over ``--repeats`` rounds, the ratios the median over rounds of the ratio within a round. The clock
(``--clock``): wall time, with a device synchronisation on GPUs; or the CPU time
of this process, which on a shared machine leaves out the time other jobs hold the cores. The
default, ``auto``, takes CPU time for a single-threaded CPU run and wall time otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import mllm  # noqa: F401  (registers moka and delo with peft)
from mllm.modality import Modality
from mllm.modality_context import set_modality_ids
from mllm.tuners.delo import DeloConfig
from mllm.tuners.moka import MokaConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = 1000


def build_base(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2 * args.seq_len + 16)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])   # initialise in the target dtype, on the device
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(DTYPES[args.dtype]).eval()


def inputs(args):
    """Token ids, modality ids and question mask of the batch (layout in the module docstring)."""
    batch, length = args.batch, args.seq_len
    modalities = [Modality[m.upper()] for m in args.modalities]
    if 2 + args.media_tokens + args.question_tokens > length:
        raise SystemExit(f"2 + {args.media_tokens} media + {args.question_tokens} question tokens "
                         f"exceed --seq-len {length}")
    ids = torch.full((batch, length), int(Modality.TEXT))
    start = 2
    for i, modality in enumerate(modalities):
        count = args.media_tokens // len(modalities) + (i < args.media_tokens % len(modalities))
        ids[:, start : start + count] = int(modality)
        start += count
    question = torch.zeros(batch, length, dtype=torch.bool)
    question[:, start : start + args.question_tokens] = True
    input_ids = torch.randint(3, VOCAB, (batch, length))
    return (t.to(args.device) for t in (input_ids, ids, question))


def paired_ratio(samples: dict[str, list[float]], other: str, model: str = "moka") -> float:
    """``model`` / ``other``: the median over rounds of the ratio of the two times within a round."""
    return statistics.median(m / o for m, o in zip(samples[model], samples[other]))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    model = parser.add_argument_group("model (LLaMA architecture, random weights)")
    model.add_argument("--hidden", type=int, default=256, help="hidden size (default 256; LLaMA-2-7B: 4096)")
    model.add_argument("--ffn", type=int, default=None, help="MLP intermediate size (default 2 x hidden; "
                                                             "LLaMA-2-7B: 11008)")
    model.add_argument("--layers", type=int, default=4, help="decoder layers (default 4; LLaMA-2-7B: 32)")
    model.add_argument("--heads", type=int, default=8, help="attention heads (default 8; LLaMA-2-7B: 32)")
    model.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default heads / 2; "
                                                                  "LLaMA-2-7B: 32)")
    data = parser.add_argument_group("inputs")
    data.add_argument("--batch", type=int, default=4)
    data.add_argument("--seq-len", "--seq", dest="seq_len", type=int, default=96, help="tokens per sample")
    data.add_argument("--media-tokens", type=int, default=None, help="media tokens per sample, split evenly "
                                                                     "over --modalities (default seq-len / 2)")
    data.add_argument("--question-tokens", type=int, default=None, help="question-text tokens per sample "
                                                                        "(default seq-len / 4)")
    data.add_argument("--modalities", type=lambda s: [m for m in s.split(",") if m], default=["visual", "audio"],
                      help="comma-separated non-text modalities of MokA and the media tokens "
                           "(default visual,audio)")
    adapter = parser.add_argument_group("adapters")
    adapter.add_argument("--r", type=int, default=8, help="rank r (MokA: per modality; see 'same total rank')")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base model dtype (default fp32); "
                     "the adapters follow peft's default (fp32 adapters on a half-precision base)")
    run.add_argument("--repeats", type=int, default=15, help="timed runs per measure and model (default 15)")
    run.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    run.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    run.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                     help="wall time, or this process's CPU time (default auto: cpu for --device cpu "
                          "--threads 1, else wall)")
    run.add_argument("--no-wide-lora", action="store_true", help="skip the LoRA r*M reading")
    adapter.add_argument("--delo-experts", type=int, default=16, help="DeLo factor pairs per modality (default 16)")
    run.add_argument("--no-delo", action="store_true", help="leave DeLo out")
    run.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    args.ffn = args.ffn or 2 * args.hidden
    args.kv_heads = args.kv_heads or max(1, args.heads // 2)
    args.media_tokens = args.seq_len // 2 if args.media_tokens is None else args.media_tokens
    args.question_tokens = args.seq_len // 4 if args.question_tokens is None else args.question_tokens
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    now = time.process_time if clock == "cpu" else time.perf_counter

    def timed(fn) -> float:
        sync()
        start = now()
        fn()
        sync()
        return now() - start

    input_ids, modality_ids, question = inputs(args)
    moka_modalities = ["text", *args.modalities]
    wide = args.r * len(moka_modalities)
    configs = {
        "lora": LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS),
        "moka": MokaConfig(r=args.r, alpha=2 * args.r, target_modules=TARGETS, modalities=moka_modalities),
    }
    if not args.no_wide_lora:
        configs["lora_wide"] = LoraConfig(r=wide, lora_alpha=2 * wide, target_modules=TARGETS)
    if not args.no_delo:  # init_weights=False: non-zero B pools
        configs["delo"] = DeloConfig(r=args.r, alpha=2 * args.r, num_experts=args.delo_experts, num_tasks=1,
                                     target_modules=TARGETS, init_weights=False)
    models = {name: get_peft_model(build_base(args), config) for name, config in configs.items()}
    for model in models.values():  # non-zero B so every path does real work
        for name, param in model.named_parameters():
            if "lora_B" in name or "moka_B" in name:
                torch.nn.init.normal_(param, std=0.02)

    def publish(name, ids, mask=None, decode_step=False):
        if name in ("moka", "delo"):  # fresh tensors: the routing is recomputed, as for a new batch
            set_modality_ids(models[name], ids.clone(), None if mask is None else mask.clone(), decode_step)

    def train_step(model, name, query_cache=False):
        def run():
            if name == "delo":
                model.peft_config["default"].query_cache = query_cache
            model.train()
            publish(name, modality_ids, question)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            if name == "delo":
                loss = loss + model.base_model.alignment_loss()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def prompt_pass(model, name):
        def run():
            model.eval()
            publish(name, modality_ids, question)
            with torch.no_grad():
                model(input_ids=input_ids, use_cache=True)
        return run

    caches = {}
    for name, model in models.items():
        publish(name, modality_ids, question)
        with torch.no_grad():
            caches[name] = model(input_ids=input_ids, use_cache=True).cache
    next_token = torch.randint(3, VOCAB, (args.batch, 1), device=device)
    decode_ids = torch.full((args.batch, 1), int(Modality.TEXT), device=device)
    position = torch.full((args.batch, 1), args.seq_len, device=device)

    def decode_step(model, name):
        cache = caches[name]

        def run():
            model.eval()
            publish(name, decode_ids, decode_step=True)
            with torch.no_grad():
                model(input_ids=next_token, cache=cache, use_cache=True, position_ids=position)
            cache.crop(-1)  # drop the new token: the same cache length for every repeat
        return run

    print(f"LLaMA: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), {args.dtype} on {args.device}; batch {args.batch} x {args.seq_len} tokens "
          f"({args.media_tokens} media: {','.join(args.modalities)}; {args.question_tokens} question); "
          f"targets {','.join(TARGETS)}; {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{clock} clock")
    print(f"MokA: r={args.r} per modality ({','.join(moka_modalities)}), one shared B (out x {args.r}); "
          f"LoRA r={args.r}" + ("" if args.no_wide_lora else f"; LoRA r*M={wide}")
          + ("" if args.no_delo else f"; DeLo: r={args.r} of {args.delo_experts} per modality (visual, text)"))
    header = f"{'measure':<14}{'LoRA r ms':>11}{'MokA ms':>10}{'MokA/LoRA r':>13}"
    if not args.no_wide_lora:
        header += f"{'LoRA r*M ms':>13}{'MokA/LoRA r*M':>15}"
    if not args.no_delo:
        header += f"{'DeLo ms':>10}{'DeLo/LoRA r':>13}"
    print(header)
    figures = {}
    for label, make in (("train step", train_step), ("prompt pass", prompt_pass), ("decode step", decode_step)):
        runs = {name: make(model, name) for name, model in models.items()}
        if label == "train step" and "delo" in runs:   # the same DeLo model, on a query cache hit
            runs["delo_cached"] = train_step(models["delo"], "delo", query_cache=True)
        for run in runs.values():
            for _ in range(args.warmup):
                run()
        samples = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleave so drift hits every model alike
            for name, run in runs.items():
                samples[name].append(timed(run))
        ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}

        line = f"{label:<14}{ms['lora']:>11.2f}{ms['moka']:>10.2f}{paired_ratio(samples, 'lora'):>13.3f}"
        if not args.no_wide_lora:
            line += f"{ms['lora_wide']:>13.2f}{paired_ratio(samples, 'lora_wide'):>15.3f}"
        figure = {"lora_ms": ms["lora"], "moka_ms": ms["moka"], "moka_over_lora": paired_ratio(samples, "lora")}
        if not args.no_delo:
            line += f"{ms['delo']:>10.2f}{paired_ratio(samples, 'lora', 'delo'):>13.3f}"
            figure.update(delo_ms=ms["delo"], delo_over_lora=paired_ratio(samples, "lora", "delo"))
        print(line, flush=True)
        if "delo_cached" in samples:
            cached = paired_ratio(samples, "lora", "delo_cached")
            print(f"{'  query cache hit':<14}{'':>11}{'':>10}{'':>13}" + ("" if args.no_wide_lora else " " * 28)
                  + f"{ms['delo_cached']:>10.2f}{cached:>13.3f}", flush=True)
            figure.update(delo_cached_ms=ms["delo_cached"], delo_cached_over_lora=cached)
        figures[label] = figure
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "hidden": args.hidden, "layers": args.layers,
                       "seq_len": args.seq_len, "measures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
