"""mllm: instruction-tune multimodal LLMs with frozen encoders, Q-Former projectors and peft tuners.

Importing the package is cheap and downloads nothing; heavy modules load on first use.
"""

from mllm.modality import Modality

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import mllm` must not pull in transformers for the CLI's --help.
    if name == "MultimodalLM":
        from mllm.model import MultimodalLM

        return MultimodalLM
    raise AttributeError(f"module 'mllm' has no attribute {name!r}")


__all__ = ["Modality", "MultimodalLM", "__version__"]
