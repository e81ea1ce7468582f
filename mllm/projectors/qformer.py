"""Q-Former projector: learnable queries cross-attend to frozen encoder features, then a
2-layer MLP maps them into the LLM's embedding space.

Follows the Video-LLaMA / SALMONN / MokA recipe: LayerNorm on the encoder features, a
query-only BLIP-2 Q-Former with cross-attention in every layer, queries initialised
N(0, 0.02) (BLIP-2's zero init would make every query identical when trained from scratch),
then Linear-GELU-Linear.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mllm.projectors.config import ProjectorConfig


class MLPProjector(nn.Sequential):
    """Linear -> GELU -> Linear (LLaVA's ``mlp2x_gelu``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


class QFormerProjector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        if config.encoder_hidden_size is None or config.llm_hidden_size is None:
            raise ValueError("ProjectorConfig needs encoder_hidden_size and llm_hidden_size before building")
        self.config = config
        self.encoder_norm = nn.LayerNorm(config.encoder_hidden_size)
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_queries, config.hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            initializer_range=config.initializer_range,
            cross_attention_frequency=1,  # cross-attention in every layer
            encoder_hidden_size=config.encoder_hidden_size,
        ))
        self.mlp = MLPProjector(config.hidden_size, config.llm_hidden_size)
        # Off by default: no module, so the state dict (and every saved projector) is as before.
        self.output_norm = build_output_norm(config)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def num_output_tokens(self, length: int) -> int:
        """Tokens emitted for ``length`` encoder positions."""
        return self.config.num_output_tokens(length)

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L, encoder_hidden) -> (N, num_output_tokens(L), llm_hidden).

        With ``window_size``, window w covers positions ``[w * stride, w * stride + size)`` and
        gives output tokens ``[w * num_queries, (w + 1) * num_queries)``, exactly what the
        Q-Former gives for that slice alone; positions after the last whole window are dropped
        (no partial window, as SALMONN: 1500 Whisper positions in windows of 17 -> 88 windows,
        the last 4 positions unused). ``feature_mask`` (N, L) follows the HF convention,
        1 / True = attend, 0 / False = ignore: the inverse of the encoders' padding masks.
        """
        features = self.encoder_norm(features.to(self.encoder_norm.weight.dtype))
        num_items, num_windows = features.shape[0], self.config.num_windows(features.shape[1])
        if self.config.window_size is not None:
            size, stride = self.config.window_size, self.config.window_stride or self.config.window_size
            # (N, L, C) -> (N * windows, size, C): each window is its own Q-Former input.
            features = features.unfold(1, size, stride).permute(0, 1, 3, 2).flatten(0, 1)
            if feature_mask is not None:
                feature_mask = feature_mask.unfold(1, size, stride).flatten(0, 1)
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        hidden = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=features,
            encoder_attention_mask=feature_mask,
        ).last_hidden_state
        projected = self.mlp(hidden.reshape(num_items, num_windows * self.num_queries, -1))
        return projected if self.output_norm is None else self.output_norm(projected)


def build_output_norm(config: ProjectorConfig) -> nn.Module | None:
    """The optional norm on the projector's output tokens (``ProjectorConfig.output_norm``), with
    its gain set so that a normalised token's L2 norm is ``output_target_norm``: a normalised
    token has RMS 1, so norm sqrt(width), and the gain is target / sqrt(width)."""
    if config.output_norm is None:
        return None
    width = config.llm_hidden_size
    norm = nn.RMSNorm(width) if config.output_norm == "rmsnorm" else nn.LayerNorm(width)
    if config.output_target_norm is not None:
        with torch.no_grad():
            norm.weight.fill_(config.output_target_norm / width ** 0.5)
    return norm
