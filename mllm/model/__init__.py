from mllm.model.modality_context import ModalityContext, attach_modality_context, get_modality_context, set_modality_ids
from mllm.model.multimodal_lm import MultimodalLM, add_placeholder_tokens
from mllm.model.splice import MediaCountError, compute_modality_ids, splice_features

__all__ = [
    "MediaCountError", "ModalityContext", "MultimodalLM", "add_placeholder_tokens", "attach_modality_context",
    "compute_modality_ids", "get_modality_context", "set_modality_ids", "splice_features",
]
