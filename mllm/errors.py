"""The one base class for errors in what a user gave: a config, a data record, a media file, a
checkpoint, an evaluation annotation or answer file, a request.

A command that meets one ends with its message as a single line on stderr and exit status 2
(``mllm.cli``); ``--debug`` or ``MLLM_DEBUG=1`` shows the traceback too. Any other exception is a
bug and keeps its traceback. Torch-free, so every package may import it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix; the message names the file, line, record or field."""


class ConfigError(UserError):
    """A config value that is missing, unknown or of the wrong type or range; the message names the
    field (``section.field``) and, where known, the file."""
