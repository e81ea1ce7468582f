"""The one definition of modalities and their placeholders (DESIGN contract 1).

Every other module takes modality names, ids and placeholder strings from here.
"""

from __future__ import annotations

import enum


class Modality(enum.IntEnum):
    """Per-token modality ids published to tuner layers (DESIGN contract 2).

    ``PAD`` marks padding positions: tuners must give them no adapter output.
    """

    PAD = -1
    TEXT = 0
    VISUAL = 1
    AUDIO = 2
    SPEECH = 3


#: Placeholder string in conversation text -> (modality, record field holding its media).
#: Images and video frames are both VISUAL and share the visual encoder/projector.
PLACEHOLDERS: dict[str, tuple[Modality, str]] = {
    "<image>": (Modality.VISUAL, "image"),
    "<video>": (Modality.VISUAL, "video"),
    "<audio>": (Modality.AUDIO, "audio"),
    "<speech>": (Modality.SPEECH, "speech"),
}

#: Record field -> placeholder string (e.g. "image" -> "<image>").
MEDIA_FIELDS: dict[str, str] = {field: ph for ph, (_, field) in PLACEHOLDERS.items()}


def modality_from_name(name: str) -> Modality:
    """'visual' / 'VISUAL' / 1 -> Modality.VISUAL, with a clear error otherwise."""
    if isinstance(name, Modality):
        return name
    if isinstance(name, int):
        return Modality(name)
    try:
        return Modality[str(name).upper()]
    except KeyError:
        valid = ", ".join(m.name.lower() for m in Modality if m is not Modality.PAD)
        raise ValueError(f"unknown modality {name!r}; expected one of: {valid}") from None


#: Record field -> name of the batch key (and model keyword) carrying its preprocessed media,
#: e.g. "image" -> "image_inputs" with shape (N, 3, H, W); "video" -> (N, frames, 3, H, W).
MEDIA_INPUT_KEYS: dict[str, str] = {field: f"{field}_inputs" for field in MEDIA_FIELDS}
