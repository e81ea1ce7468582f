"""mllm: instruction-tune multimodal LLMs with frozen encoders, Q-Former projectors and peft tuners.

Importing the package downloads nothing; it registers the project's peft methods (which imports
peft), other heavy modules load on first use.
"""

from mllm.log_filters import quiet_unactionable_warnings
from mllm.modality import Modality

quiet_unactionable_warnings()  # before peft / bitsandbytes are imported below

__version__ = "0.1.0"


def _register_peft_methods() -> None:
    # DESIGN contract 3: `import mllm` makes the project's tuners known to peft, so adapters saved
    # by this project load with `PeftModel.from_pretrained` in any process that imports mllm.
    # This imports peft (and with it transformers); nothing is downloaded.
    from mllm.tuners.registration import register_peft_methods

    register_peft_methods()


_register_peft_methods()


def __getattr__(name):
    # Lazy: the model assembly (encoders, projectors) loads on first use.
    if name == "MultimodalLM":
        from mllm.model import MultimodalLM

        return MultimodalLM
    raise AttributeError(f"module 'mllm' has no attribute {name!r}")


__all__ = ["Modality", "MultimodalLM", "__version__"]
