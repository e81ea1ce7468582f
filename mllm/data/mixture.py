"""``data.train`` / ``data.eval`` as native sources and mixtures of them.

The value may be

* a path (a LLaVA-style JSON / JSONL file, read as before);
* one source: ``{type: ave_moka, path: AVE_data/train_samples_ave.json, media_root: AVE_data}``;
* a list of sources (a mixture), each with its own ``media_root`` and optionally ``count`` (records
  drawn) or ``ratio`` (a fraction of the source's records, above 1 with ``replace: true``),
  ``replace`` (draw with replacement; default false) and ``seed`` (default 0). Any other key is an
  option of that source type (``mllm data convert --help`` lists them). A plain path in the list
  is a LLaVA file.

Sources are read, sampled and written once as one LLaVA JSONL file (media paths resolved against
each source's ``media_root``) that the training dataset then reads as usual; each written record
keeps its native location in a ``source`` field. The same config gives the same file, and the
per-source counts are logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from mllm.data.media import resolve_media_path
from mllm.data.schema import RecordError, parse_record
from mllm.errors import UserError
from mllm.modality import MEDIA_FIELDS

logger = logging.getLogger(__name__)

SPEC_FIELDS = ("type", "path", "media_root", "count", "ratio", "replace", "seed")


class MixtureError(UserError):
    pass


@dataclass
class SourceSpec:
    type: str
    path: str
    media_root: str | None = None
    count: int | None = None
    ratio: float | None = None
    replace: bool = False
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.type} {self.path}"


def is_source_value(value: Any) -> bool:
    """True when ``value`` names sources rather than one LLaVA file."""
    return isinstance(value, (dict, list))


def parse_sources(value: Any, where: str = "data.train") -> list[SourceSpec]:
    """Validate a ``data.train`` value that names sources; errors name the field."""
    from mllm.data.sources import get_source

    items = value if isinstance(value, list) else [value]
    if not items:
        raise MixtureError(f"{where}: an empty list names no data")
    specs = []
    for index, item in enumerate(items):
        here = f"{where}[{index}]" if isinstance(value, list) else where
        if isinstance(item, str):
            item = {"type": "llava", "path": item}
        if not isinstance(item, dict):
            raise MixtureError(f"{here}: expected a path or a mapping with type and path, got {type(item).__name__}")
        if not item.get("type") or not item.get("path"):
            raise MixtureError(f"{here}: a source needs 'type' and 'path' (got {sorted(item)})")
        options = {k: v for k, v in item.items() if k not in SPEC_FIELDS}
        spec = SourceSpec(**{k: v for k, v in item.items() if k in SPEC_FIELDS}, options=options)
        try:
            get_source(spec.type, **options)
        except (ValueError, TypeError) as e:
            raise MixtureError(f"{here}: {e}") from None
        if spec.count is not None and spec.ratio is not None:
            raise MixtureError(f"{here}: give count or ratio, not both")
        if spec.count is not None and (isinstance(spec.count, bool) or not isinstance(spec.count, int)
                                       or spec.count < 1):
            raise MixtureError(f"{here}.count must be a positive integer, got {spec.count!r}")
        if spec.ratio is not None and (isinstance(spec.ratio, bool) or not isinstance(spec.ratio, (int, float))
                                       or spec.ratio <= 0):
            raise MixtureError(f"{here}.ratio must be a positive number, got {spec.ratio!r}")
        if spec.ratio is not None and spec.ratio > 1 and not spec.replace:
            raise MixtureError(f"{here}.ratio={spec.ratio} draws more records than the source has; "
                               f"set replace: true to draw with replacement")
        if not isinstance(spec.replace, bool):
            raise MixtureError(f"{here}.replace must be true or false, got {spec.replace!r}")
        if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
            raise MixtureError(f"{here}.seed must be an integer, got {spec.seed!r}")
        specs.append(spec)
    return specs


def fix_source_paths(value: Any, fix: Callable[[Any], Any]) -> Any:
    """Apply the config's relative-path rule to every source's ``path`` and ``media_root``."""
    if isinstance(value, str) or value is None:
        return fix(value)
    items = value if isinstance(value, list) else [value]
    fixed = [fix(item) if isinstance(item, str) else
             {k: fix(v) if k in ("path", "media_root") else v for k, v in item.items()} if isinstance(item, dict)
             else item for item in items]
    return fixed if isinstance(value, list) else fixed[0]


def read_source(spec: SourceSpec, on_bad_sample: str = "error", skipped: Counter | None = None) -> list[dict]:
    """All of a source's records, validated, media paths resolved against its ``media_root``."""
    from mllm.data.sources import get_source

    source = get_source(spec.type, **spec.options)
    root = spec.media_root
    if root is None and getattr(source, "media_root_is_path", False):
        root = spec.path
    root = os.path.abspath(root) if root is not None else None
    records = []
    for where, raw in source.read(spec.path):
        try:
            parse_record(where, raw)  # fields, roles, placeholder counts: errors name the native place
        except RecordError as e:
            if on_bad_sample != "skip":
                raise
            if skipped is not None:
                skipped[e.reason] += 1
            continue
        out = dict(raw)
        for media_field in MEDIA_FIELDS:
            value = out.get(media_field)
            if value is not None:
                paths = [value] if isinstance(value, str) else value
                resolved = [resolve_media_path(p, root) for p in paths]
                out[media_field] = resolved[0] if isinstance(value, str) else resolved
        out["source"] = where
        records.append(out)
    return records


def draw(spec: SourceSpec, num_records: int) -> list[int]:
    """Indices of the records a source contributes: all in file order, or ``count`` / ``ratio``
    of them drawn with ``random.Random(seed)`` (with or without replacement)."""
    if spec.count is None and spec.ratio is None:
        return list(range(num_records))
    wanted = spec.count if spec.count is not None else max(1, round(spec.ratio * num_records))
    rng = random.Random(spec.seed)
    if spec.replace:
        return rng.choices(range(num_records), k=wanted)
    if wanted > num_records:
        raise MixtureError(f"{spec.describe()}: count {wanted} is more than its {num_records} records; "
                           f"set replace: true to draw with replacement")
    return rng.sample(range(num_records), wanted)


def build_mixture(value: Any, on_bad_sample: str = "error", where: str = "data.train") -> tuple[list[dict], list[dict]]:
    """(records, per-source summary rows) for a source or list of sources."""
    records, summary = [], []
    for spec in parse_sources(value, where):
        skipped: Counter = Counter()
        available = read_source(spec, on_bad_sample, skipped)
        if not available:
            raise MixtureError(f"{where}: {spec.describe()} has no usable records")
        indices = draw(spec, len(available))
        records += [available[i] for i in indices]
        summary.append({"type": spec.type, "path": spec.path, "records": len(available), "drawn": len(indices),
                        "unique": len(set(indices)), "replace": spec.replace, "seed": spec.seed,
                        "skipped": dict(skipped)})
    return records, summary


def format_summary(summary: list[dict]) -> str:
    lines = []
    for row in summary:
        how = "all, in file order" if row["drawn"] == row["records"] and row["unique"] == row["records"] else (
            f"{'with' if row['replace'] else 'without'} replacement, seed {row['seed']}")
        skipped = f", skipped {row['skipped']}" if row["skipped"] else ""
        lines.append(f"  {row['type']:<16} {row['drawn']:>8} of {row['records']:>8} records "
                     f"({row['unique']} unique; {how}{skipped}) from {row['path']}")
    total = sum(row["drawn"] for row in summary)
    return f"{total} records from {len(summary)} source(s):\n" + "\n".join(lines)


def write_records(records: list[dict], out_path: str) -> None:
    """LLaVA JSONL, written atomically (ranks writing the same file never see a partial one)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)


def materialise(value: Any, out_path: str, on_bad_sample: str = "error", where: str = "data.train") -> str:
    """Write the sources ``value`` names as one LLaVA JSONL file; log and save the per-source counts
    (``<out_path>.sources.json``). Returns ``out_path``."""
    records, summary = build_mixture(value, on_bad_sample, where)
    write_records(records, out_path)
    tmp = f"{out_path}.sources.json.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, f"{out_path}.sources.json")
    logger.info("%s: %s (written to %s)", where, format_summary(summary), out_path)
    return out_path


def data_paths(value: Any) -> list[str]:
    """The files a ``data.train`` / ``data.eval`` value reads (its sources' paths)."""
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    items = value if isinstance(value, list) else [value]
    return [item if isinstance(item, str) else str(item.get("path")) for item in items]


#: The folder of a run's output where its sources are written as LLaVA JSONL.
SOURCES_DIR = "data"


def data_file(value: Any, output_dir: str, name: str, on_bad_sample: str = "error") -> str:
    """The LLaVA file for ``data.<name>``: the path itself, or the sources written to
    ``<output_dir>/data/<name>.jsonl``."""
    if not is_source_value(value):
        return value
    return materialise(value, os.path.join(output_dir, SOURCES_DIR, f"{name}.jsonl"), on_bad_sample,
                       f"data.{name}")
