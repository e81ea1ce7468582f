"""mllm: instruction-tune multimodal LLMs with frozen encoders, Q-Former projectors and peft tuners.

Importing the package downloads nothing and imports neither torch nor peft, so the command line
starts fast. DESIGN contract 3 still holds: the project's peft methods are registered the moment
peft is imported (or at once, if it already is), so adapters saved by this project load with
``PeftModel.from_pretrained`` in any process that imports mllm.
"""

import importlib.abc
import importlib.util
import sys

from mllm.log_filters import quiet_unactionable_warnings
from mllm.modality import Modality

quiet_unactionable_warnings()  # before anything imports peft or bitsandbytes

__version__ = "0.1.0"


def _register_peft_methods() -> None:
    import mllm.tuners  # noqa: F401  (each tuner package registers its peft method on import)


class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """A one-shot import hook: lets the usual finders load peft, then registers our methods.

    Registering eagerly would import peft (and torch, transformers, bitsandbytes: seconds) in every
    process that imports mllm, `mllm --help` included."""

    def __init__(self):
        self._searching = False

    def find_spec(self, name, path=None, target=None):
        # Probes such as transformers' `importlib.util.find_spec("peft")` come here too without
        # importing anything, so the hook leaves only once peft is really loaded.
        if name != "peft" or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_peft_methods()

        spec.loader.exec_module = exec_module  # this spec's own loader object: affects this import only
        return spec


if "peft" in sys.modules:
    _register_peft_methods()
elif not any(isinstance(finder, _RegisterWhenPeftLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())


def __getattr__(name):
    # Lazy: the model assembly (encoders, projectors) loads on first use.
    if name == "MultimodalLM":
        from mllm.model import MultimodalLM

        return MultimodalLM
    raise AttributeError(f"module 'mllm' has no attribute {name!r}")


__all__ = ["Modality", "MultimodalLM", "__version__"]
