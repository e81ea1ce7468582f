"""MokA vs peft LoRA overhead on one LLaMA-architecture model and one set of inputs.

Prints, for a training step (forward + backward), a prompt pass and a KV-cache decode step, the
median time of each and the ratio MokA / LoRA. Both adapt the same modules with the same rank r
(MokA: one A per modality of rank r, one shared B of rank r; LoRA: one A and B of rank r).

    python benchmarks/tuner_overhead.py [--hidden 256 --layers 4 --batch 4 --seq 96 --r 8 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import mllm  # noqa: F401  (registers moka with peft)
from mllm.model import set_modality_ids
from mllm.modality import Modality
from mllm.tuners.moka import MokaConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4 * args.seq)
    return LlamaForCausalLM(config).eval()


def inputs(args):
    """A multimodal-looking batch: text, visual tokens, audio tokens, question text, answer text."""
    batch, length = args.batch, args.seq
    ids = torch.full((batch, length), int(Modality.TEXT))
    quarter = length // 4
    ids[:, 2 : 2 + quarter] = int(Modality.VISUAL)
    ids[:, 2 + quarter : 2 + 2 * quarter] = int(Modality.AUDIO)
    question = torch.zeros(batch, length, dtype=torch.bool)
    question[:, 2 + 2 * quarter : 2 + 3 * quarter] = True
    input_ids = torch.randint(3, 1000, (batch, length))
    return input_ids, ids, question


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    input_ids, modality_ids, question = inputs(args)
    models = {
        "lora": get_peft_model(build_base(args), LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)),
        "moka": get_peft_model(build_base(args), MokaConfig(r=args.r, alpha=2 * args.r, target_modules=TARGETS,
                                                            modalities=["text", "visual", "audio"])),
    }
    for model in models.values():  # non-zero B so both paths do real work
        for name, param in model.named_parameters():
            if "lora_B" in name or "moka_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    set_modality_ids(models["moka"], modality_ids, question)

    def train_step(model):
        def run():
            model.train()
            set_modality_ids(model, modality_ids, question) if model is models["moka"] else None
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def prompt_pass(model):
        def run():
            model.eval()
            set_modality_ids(model, modality_ids, question) if model is models["moka"] else None
            with torch.no_grad():
                model(input_ids=input_ids, use_cache=True)
        return run

    caches = {}
    for name, model in models.items():
        if name == "moka":
            set_modality_ids(model, modality_ids, question)
        with torch.no_grad():
            caches[name] = model(input_ids=input_ids, use_cache=True).cache
    next_token = torch.randint(3, 1000, (args.batch, 1))
    decode_ids = torch.full((args.batch, 1), int(Modality.TEXT))

    def decode_step(model, name):
        cache = caches[name]
        length = cache.get_seq_length()

        def run():
            model.eval()
            set_modality_ids(model, decode_ids, decode_step=True) if name == "moka" else None
            with torch.no_grad():
                model(input_ids=next_token, cache=cache, use_cache=True,
                      position_ids=torch.full((args.batch, 1), length))
            cache.crop(-1)  # drop the new token: the same cache length for every repeat
        return run

    print(f"LLaMA: hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq} tokens "
          f"(1/4 visual, 1/4 audio, 1/4 question), r={args.r}, targets {','.join(TARGETS)}, "
          f"{torch.get_num_threads()} threads, {torch.__version__}")
    print(f"{'measure':<14}{'LoRA ms':>10}{'MokA ms':>10}{'ratio':>8}")
    for label, make in (("train step", lambda m, n: train_step(m)), ("prompt pass", lambda m, n: prompt_pass(m)),
                        ("decode step", decode_step)):
        runs = {name: make(model, name) for name, model in models.items()}
        for run in runs.values():
            timed(run, 3)  # warm-up
        samples = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleave so drift hits both alike
            for name, run in runs.items():
                samples[name] += timed(run, 1)
        lora, moka = (statistics.median(samples[n]) * 1e3 for n in ("lora", "moka"))
        print(f"{label:<14}{lora:>10.2f}{moka:>10.2f}{moka / lora:>8.3f}")


if __name__ == "__main__":
    main()
