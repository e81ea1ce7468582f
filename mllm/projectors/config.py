"""A projector's settings (torch-free, so the config schema can name it without importing torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

OUTPUT_NORMS = (None, "rmsnorm", "layernorm")


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
    # A norm on each output token ("rmsnorm" or "layernorm"; None: the MLP's output as it is),
    # its gain initialised so that tokens start at `output_target_norm` (L2). Unset, the target
    # is filled when the model is assembled with the LLM's mean token-embedding norm, so media
    # tokens start at the scale of the text around them (an untrained projector's outputs can be
    # many times larger). None stays None without an LLM: gain 1, a norm of sqrt(llm_hidden_size).
    output_norm: str | None = None
    output_target_norm: float | None = None
    encoder_hidden_size: int | None = None
    llm_hidden_size: int | None = None

    def __post_init__(self):
        if self.output_norm not in OUTPUT_NORMS:
            raise ValueError(f"output_norm must be one of {[n for n in OUTPUT_NORMS if n]} or null, "
                             f"got {self.output_norm!r}")
        if self.output_target_norm is not None and self.output_target_norm <= 0:
            raise ValueError(f"output_target_norm must be positive, got {self.output_target_norm}")

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
