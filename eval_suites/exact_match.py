"""Exact match on held-out LLaVA-format records: the embedded demo's score, and a quick check of
any held-out split of a user's own instruction data.

Annotation: a JSON list or JSON lines of LLaVA-format records -- ``id``, media fields (``image``,
``video``, ``audio``, ``speech``: a path or a list), ``conversations`` whose first human turn is
the question -- with the reference in ``answer`` (else the last assistant turn) and, optionally, a
``question_type`` for per-type accuracy. The placeholders of the question are dropped and put back
one line per media item, so a record with some media removed is asked the same question.

There is no official script: both modes count an answer right when it equals the reference after
lower-casing and dropping everything but letters, digits and spaces (``normalize_answer``). An
unanswered sample counts as wrong.
"""

from __future__ import annotations

import re

from eval_suites.base import (
    AnnotationError,
    EvalSample,
    Suite,
    check_mode,
    iter_json_items,
    mean_of,
    require_fields,
    results_header,
)
from mllm.modality import MEDIA_FIELDS

_PLACEHOLDER = re.compile(r"<(image|video|audio|speech)>\n?")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and surrounding space."""
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


class ExactMatch(Suite):
    name = "exact_match"
    media_fields = tuple(MEDIA_FIELDS)
    max_new_tokens = 8
    id_scheme = "ID, the record's id"
    answer_format = "the answer log only (there is no official answer file)"

    def load(self, path: str) -> list[EvalSample]:
        samples = []
        for where, record in iter_json_items(path):
            require_fields(where, record, ("id", "conversations"))
            turns = record["conversations"]
            human = [t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") in ("human", "user")]
            assistant = [t.get("value", "") for t in turns
                         if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")]
            if not human:
                raise AnnotationError(where, "no human turn to ask")
            target = record.get("answer", assistant[-1] if assistant else None)
            if not isinstance(target, str):
                raise AnnotationError(where, "no reference: give an 'answer' field or end with an assistant turn")
            media = {f: [record[f]] if isinstance(record[f], str) else list(record[f])
                     for f in MEDIA_FIELDS if record.get(f)}
            samples.append(EvalSample(id=str(record["id"]), question=_PLACEHOLDER.sub("", human[0]).strip(),
                                      media=media, target=target, where=where,
                                      meta={"question_type": record.get("question_type", "all")}))
        return samples

    def score(self, samples, predictions, mode="official"):
        check_mode(mode)
        by_type: dict[str, list[bool]] = {}
        for sample in samples:
            answer = predictions.get(sample.id)
            right = answer is not None and normalize_answer(answer) == normalize_answer(sample.target)
            by_type.setdefault(sample.meta["question_type"], []).append(right)
        hits = [h for v in by_type.values() for h in v]
        out = results_header(self, mode, samples, predictions, 0, len(samples))
        out["metrics"] = {"accuracy": mean_of(hits),
                          "per_type": {t: mean_of(v) for t, v in sorted(by_type.items())},
                          "type_sizes": {t: len(v) for t, v in sorted(by_type.items())}}
        out["score"] = out["metrics"]["accuracy"]
        return out
