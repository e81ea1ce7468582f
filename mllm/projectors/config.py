"""A projector's settings (torch-free, so the config schema can name it without importing torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ProjectorConfig:
    """One modality's projector. ``encoder_hidden_size`` and ``llm_hidden_size`` are filled
    from the encoder and the LLM when the model is assembled, and saved with the weights so
    projectors load on their own."""

    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    # Std of the Q-Former's weight init (BLIP-2: 0.02). Tiny widths learn faster with more:
    # at 0.02 their cross-attention starts almost uniform and averages the patches away.
    initializer_range: float = 0.02
    # Window-level Q-Former (SALMONN): the queries attend to windows of `window_size` encoder
    # positions every `window_stride` positions, num_queries tokens per window. None = one
    # window over all positions.
    window_size: int | None = None
    window_stride: int | None = None
    encoder_hidden_size: int | None = None
    llm_hidden_size: int | None = None

    def num_windows(self, length: int) -> int:
        """Q-Former windows over ``length`` encoder positions (1 without ``window_size``)."""
        size, stride = self.window_size, self.window_stride or self.window_size
        if size is None:
            return 1
        if length < size:
            raise ValueError(f"window_size {size} is longer than the {length} encoder positions")
        return (length - size) // stride + 1

    def num_output_tokens(self, length: int) -> int:
        """Tokens the projector emits for ``length`` encoder positions (known without its weights)."""
        return self.num_windows(length) * self.num_queries

    def to_dict(self) -> dict:
        return asdict(self)
