"""Padding and training throughput: random batch order, modality-length grouping and packed rows.

    python benchmarks/padding.py [--samples 2000] [--batch-size 8] [--packed-length 1024] [--steps 30]
                                 [--device cpu] [--threads 1]

Generated records of mixed length and modality mix (text-only ~40-200 tokens, image questions
+256 media tokens, image+audio +576), as an instruction-tuning mixture has. For each order it
prints the share of padded tokens over the whole epoch and the real (unpadded) tokens per second
of a small LLaMA's training step on the first ``--steps`` batches, with the ratio to random order
measured in the same run (the orders take turns step by step). Packed batches (``data.packing``,
``mllm.data.packing``) hold rows of up to ``--packed-length`` tokens, as many rows per batch as
carry about ``--batch-size`` samples' worth of tokens; their samples are kept apart as in training
(``mllm.model.packing``: on sdpa, attention runs per sample). "packed+grouped" packs within each
modality mix and groups the rows (both options on).

``--threads``: torch's CPU threads, 1 unless given (0: torch's own choice). On a small machine that
others share, a parallel op waits for all its threads to be scheduled (a (3, 1024, 128) multiply took
3 ms with 2 threads on a loaded 2-core machine, 0.1 ms with one), so the step time counts operations
and the machine's load rather than work (there, with 2 threads, packed rows measured from 0.5x to
2.9x random order in runs a few minutes apart).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from mllm.data.packing import pack_samples
from mllm.data.sampler import ModalityLengthGroupedSampler, padding_fraction
from mllm.model.packing import packed_lm_kwargs

MEDIA_TOKENS = {(): 0, ("image",): 256, ("audio", "image"): 576}


def generated_mixture(n: int, seed: int = 0):
    rng = random.Random(seed)
    mixes = [rng.choices(list(MEDIA_TOKENS), weights=[3, 5, 2])[0] for _ in range(n)]
    lengths = [int(rng.lognormvariate(4.3, 0.5)) + MEDIA_TOKENS[mix] for mix in mixes]
    return lengths, mixes


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[k:k + batch_size] for k in range(0, n, batch_size)]


def train_step(model, optimizer, rows, device: str) -> int:
    """One training step on a batch of rows, each row the lengths of the samples laid end to end
    in it (one sample per row unless packed); returns its real (unpadded) tokens."""
    width = max(sum(row) for row in rows)
    ids = torch.randint(5, model.config.vocab_size, (len(rows), width), device=device)
    segments = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    labels = torch.full_like(ids, -100)
    for r, row in enumerate(rows):
        offset = 0
        for slot, length in enumerate(row):
            segments[r, offset:offset + length] = slot
            labels[r, offset + 1:offset + length] = ids[r, offset + 1:offset + length]
            offset += length
    if any(len(row) > 1 for row in rows):
        kwargs = packed_lm_kwargs(model.config, segments)
    else:
        kwargs = {"attention_mask": (segments >= 0).long()}
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return int((segments >= 0).sum())


def tokens_per_second(model, orders: dict[str, list], steps: int, device: str) -> dict[str, float]:
    """Real tokens per second of each order's first ``steps`` batches (after two warm-up steps each).
    The orders take turns step by step, so a change in the machine's load falls on all of them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    real = dict.fromkeys(orders, 0)
    seconds = dict.fromkeys(orders, 0.0)
    for step in range(steps + 2):
        for name, batches in orders.items():
            start = time.perf_counter()
            tokens = train_step(model, optimizer, batches[step], device)
            if step >= 2:
                real[name] += tokens
                seconds[name] += time.perf_counter() - start
    return {name: real[name] / seconds[name] for name in orders}


def packed_batches(lengths, mixes, capacity: int, batch_size: int, seed: int, grouped: bool):
    """Batches of packed rows (sample indices), with about ``batch_size`` samples' tokens per batch."""
    rows = pack_samples(lengths, mixes, capacity, seed=seed, by_mix=grouped)
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    rows_per_batch = max(1, round(batch_size * sum(lengths) / len(lengths) / capacity))
    if grouped:
        row_mixes = [mixes[row[0]] for row in rows]
        order = ModalityLengthGroupedSampler(row_lengths, row_mixes, rows_per_batch, seed=seed).batches()
    else:
        order = random_batches(len(rows), rows_per_batch, seed)
    return [[rows[r] for r in batch] for batch in order], row_lengths, order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--packed-length", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=2048)).to(args.device)
    lengths, mixes = generated_mixture(args.samples, args.seed)
    orders = {  # name -> (batches of rows of sample lengths, padded fraction)
        name: ([[[lengths[i]] for i in batch] for batch in batches], padding_fraction(batches, lengths))
        for name, batches in (
            ("random", random_batches(len(lengths), args.batch_size, args.seed)),
            ("grouped", ModalityLengthGroupedSampler(lengths, mixes, args.batch_size, seed=args.seed).batches()))}
    for name, grouped in (("packed", False), ("packed+grouped", True)):
        batches, row_lengths, order = packed_batches(lengths, mixes, args.packed_length, args.batch_size,
                                                     args.seed, grouped)
        orders[name] = ([[[lengths[i] for i in row] for row in rows] for rows in batches],
                        padding_fraction(order, row_lengths))
    speeds = tokens_per_second(model, {name: batches for name, (batches, _) in orders.items()}, args.steps,
                               args.device)
    results = {name: (padding, speeds[name]) for name, (_, padding) in orders.items()}
    print(f"{args.samples} samples, batch {args.batch_size} (packed: rows of up to {args.packed_length} tokens), "
          f"{args.steps} timed steps on {args.device} ({torch.get_num_threads()} threads)")
    print(f"{'order':<16}{'padding':>10}{'tokens/s':>12}{'vs random':>11}")
    for name, (padding, speed) in results.items():
        print(f"{name:<16}{padding:>9.1%}{speed:>12.0f}{speed / results['random'][1]:>10.2f}x")


if __name__ == "__main__":
    main()
