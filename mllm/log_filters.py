"""Quiet the warnings a user cannot act on, at every command (``mllm.cli.main`` installs them).

Each filter drops one known message by its text, on the logger that emits it, so every other
warning of the same library still shows:

* bitsandbytes on CPU: it tries to fetch an optional kernel from the Hub and says it could not
  ("Failed to load CPU gemm_4bit_forward from kernels-community ..."), and the ``kernels``
  package says it skipped a trust check while offline; the built-in CPU path runs anyway.
* transformers without torchvision: ``CLIPImageProcessor`` falls back to its PIL twin, which
  is what mllm uses either way.
* DeepSpeed on a machine without GPUs: "Setting accelerator to CPU".
* ``FutureWarning``s attributed to mllm's own calls (the fix is ours to make, not the user's),
  and transformers' ``is_gradient_checkpointing`` deprecation, which peft's ``get_peft_model``
  (called by mllm) triggers.
"""

from __future__ import annotations

import logging
import warnings

UNACTIONABLE_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_unactionable_warnings() -> None:
    """Install the filters (idempotent; call before the libraries are imported or after)."""
    for logger_name, fragments in UNACTIONABLE_MESSAGES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mllm|eval_suites|stages)(\.|$)")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
