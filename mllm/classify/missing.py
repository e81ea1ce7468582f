"""Missing-modality tables, generated as MMP / DCP do, but seeded and saved with their settings.

Codes (MMP's): 0 complete, 1 text missing, 2 image missing. For ``missing_type``:

* ``text``  - ``int(N * ratio)`` entries, drawn at random, lose their text;
* ``image`` - the same number lose their image;
* ``both``  - ``int(N * ratio)`` entries are picked; ``int(picked * both_ratio)`` of them (drawn
  at random) lose their image, the rest their text. No entry loses both (paper section 4.1: at
  ratio eta, eta/2 image-only and eta/2 text-only, 1 - eta complete).

MMP draws with Python's unseeded ``random``; we draw from ``numpy.random.default_rng(seed)``, so a
table is reproducible from its seed, and save it next to the run (JSON with its settings) so a
run can be repeated exactly even if the generator changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2
MISSING_TYPES = ("text", "image", "both", "none")


@dataclass(frozen=True)
class MissingSpec:
    ratio: float = 0.7
    type: str = "both"          # text | image | both | none
    both_ratio: float = 0.5     # share of the missing entries that lose the image when type == both
    seed: int = 0

    def __post_init__(self):
        if self.type not in MISSING_TYPES:
            raise ValueError(f"missing type must be one of {MISSING_TYPES}, got {self.type!r}")
        if not 0.0 <= self.ratio <= 1.0 or not 0.0 <= self.both_ratio <= 1.0:
            raise ValueError(f"missing ratio and both_ratio must be in [0, 1], got {self.ratio}, {self.both_ratio}")

    def file_name(self, dataset: str, split: str) -> str:
        ratio = f"{self.ratio:g}".replace(".", "")
        return f"{dataset}_{split}_missing_{self.type}_{ratio}_seed{self.seed}.json"


def make_missing_table(n: int, spec: MissingSpec) -> np.ndarray:
    table = np.zeros(n, dtype=np.int64)
    if spec.type == "none" or spec.ratio == 0:
        return table
    rng = np.random.default_rng(spec.seed)
    picked = rng.choice(n, size=int(n * spec.ratio), replace=False)
    if spec.type == "text":
        table[picked] = TEXT_MISSING
    elif spec.type == "image":
        table[picked] = IMAGE_MISSING
    else:
        table[picked] = TEXT_MISSING
        table[rng.choice(picked, size=int(len(picked) * spec.both_ratio), replace=False)] = IMAGE_MISSING
    return table


def load_or_make_missing_table(path: str, n: int, spec: MissingSpec) -> np.ndarray:
    """Reuse the table saved at ``path`` (its settings must match), else generate and save it."""
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("spec") != asdict(spec) or saved.get("n") != n:
            raise ValueError(f"{path}: saved missing table was made with {saved.get('spec')} for n={saved.get('n')}, "
                             f"this run asks for {asdict(spec)} with n={n}; delete it or change the table folder")
        return np.asarray(saved["table"], dtype=np.int64)
    table = make_missing_table(n, spec)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"spec": asdict(spec), "n": n, "codes": {"complete": COMPLETE, "text_missing": TEXT_MISSING,
                   "image_missing": IMAGE_MISSING}, "table": table.tolist()}, f)
    return table
