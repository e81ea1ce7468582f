from mllm.model.multimodal_lm import MultimodalLM, add_placeholder_tokens
from mllm.model.splice import MediaCountError, compute_modality_ids, splice_features

__all__ = ["MediaCountError", "MultimodalLM", "add_placeholder_tokens", "compute_modality_ids", "splice_features"]
