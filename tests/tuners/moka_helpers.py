"""Tiny models and a loop-based MokA oracle written straight from the paper's equations."""

from __future__ import annotations

import math

import torch
from torch import nn

from mllm.modality import Modality

T, V, A, S, P = (int(Modality.TEXT), int(Modality.VISUAL), int(Modality.AUDIO), int(Modality.SPEECH),
                 int(Modality.PAD))


class OneLinear(nn.Module):
    """A plain model with one adaptable Linear (DESIGN contract 2: caller-supplied ids)."""

    def __init__(self, d_in=12, d_out=10):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def tiny_llama(seed=0, dtype=torch.float32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def sample_ids():
    """Two samples: visual + audio tokens, question text, answer text, one left-padded."""
    ids = torch.tensor([[T, V, V, V, A, A, T, T, T, T],
                        [P, P, T, V, V, A, T, T, T, T]])
    question = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    return ids, question


def moka_oracle(x, ids, question, A_by_modality, B, scaling, strengths, r, mode="task_centric", projections=None):
    """y_t = s * B (A_{m(t)} x_t + delta_t), one token at a time (eqs 4-13).

    ``projections`` (appendix B, eqs 16-17): {"query": {modality: W_q}, "key": W_k, "value": W_v};
    the query is W_q[m(t)] a_t, the keys W_k a_j and the values W_v a_j of the question tokens."""
    batch, length, _ = x.shape
    out = torch.zeros(batch, length, B.shape[0], dtype=x.dtype)
    names = {T: "text", V: "visual", A: "audio", S: "speech"}
    for b in range(batch):
        codes = {}
        for t in range(length):
            if ids[b, t] == P:
                continue
            weight = A_by_modality[names[int(ids[b, t])]]
            code = torch.zeros(r, dtype=x.dtype)
            code[: weight.shape[0]] = weight @ x[b, t]
            codes[t] = code
        keys = [t for t in range(length) if question[b, t] and ids[b, t] == T]
        for t, code in codes.items():
            modality = names[int(ids[b, t])]
            if mode == "task_centric" and modality != "text" and keys:
                keys_ = values = torch.stack([codes[j] for j in keys])
                query = code
                if projections is not None:
                    query = projections["query"][modality] @ code
                    keys_, values = keys_ @ projections["key"].T, keys_ @ projections["value"].T
                attn = torch.softmax(keys_ @ query / math.sqrt(r), dim=0) @ values
                code = code + strengths[modality] * attn
            out[b, t] = scaling * (B @ code)
    return out
