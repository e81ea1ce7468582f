"""Run a suite: generate answers with a ``MultimodalLM``, log them, score them.

``run_suite`` builds the suite's prompts, generates with ``mllm.inference.generate_answers``
(left-padded batches, greedy unless told otherwise) one batch at a time, and appends each
answer to ``<output>/samples.jsonl`` as soon as its batch is done. Started again on the same
output folder it reads that log and generates only what is missing. It then scores, writes
the files the official scripts read (``<output>/official/``) and ``results_<mode>.json``.

``score_answers`` does the scoring part alone on existing answers: an answer log, or the
benchmark's own answer format (``eval_suites.answers``).
``eval_main`` is the ``mllm eval`` command.

An answer log belongs to one checkpoint: its first line records the checkpoint's identity
(``checkpoint_identity``: folder and a sha256 over its projector, adapter and config files) and
the prompt format; resuming it with another checkpoint is refused (``new_log=True`` /
``--new-log`` sets the old log aside and starts a new one), and the results say which
checkpoint and settings produced them. A media file that cannot be read stops the run with the
annotation file and line of its sample, or with ``on_bad_media="skip"`` is skipped and counted:
the sample has no answer, which ``strict`` counts as wrong and ``official`` treats as the
official script treats a missing answer.

Suite options (``get_suite(name, **options)``; ``--option KEY=VALUE`` on the command line) and,
for MokA checkpoints, partial-modality inference (``partial_modality``; paper section 4.3) are
recorded in the results. The settings that change answers (``max_new_tokens``, prompt suffix,
sampling, partial modality) are kept in ``<output>/generation_settings.json``; resuming a log
with different ones is refused rather than mixing answers.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import textwrap
import time

from eval_suites import MODES, SUITES, get_suite, suite_options
from eval_suites.answers import HEADER_KEY, answer_log_rows, read_answers
from eval_suites.base import AnnotationError, AnnotationFileNotFoundError, EvalSample, Suite, check_mode
from mllm.checkpoint import ADAPTER_DIR, MLLM_CONFIG, NATIVE_CONNECTOR_FILE, PROJECTOR_CONFIG, PROJECTOR_WEIGHTS
from mllm.errors import UserError
from mllm.modality import MEDIA_FIELDS

logger = logging.getLogger(__name__)

LOG_NAME = "samples.jsonl"
PROMPTS_NAME = "pending_prompts.jsonl"
SETTINGS_NAME = "generation_settings.json"
BAD_MEDIA_POLICIES = ("error", "skip")
#: the files of a checkpoint folder whose bytes make its fingerprint (all of ``adapter/`` too; a native
#: backbone's trained connector where it has one)
FINGERPRINTED_FILES = (MLLM_CONFIG, PROJECTOR_CONFIG, PROJECTOR_WEIGHTS, NATIVE_CONNECTOR_FILE)


# --------------------------------------------------------------------------- answer log


def read_answer_log(path: str, repair: bool = False) -> dict[str, str]:
    """``id -> prediction`` from an answer log (``eval_suites.answers.answer_log_rows``: a cut-off
    last line is ignored, and with ``repair`` removed; a bad line elsewhere is an error)."""
    return {row.id: row.prediction for row in answer_log_rows(path, repair)[1] if row.prediction is not None}


def _sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(model, checkpoint: str | None = None) -> dict:
    """Which checkpoint answers come from: ``{"path", "sha256", "files"}``, the sha256 taken over
    the bytes of the folder's projector, adapter and ``mllm_config.json`` files (the last names
    the LLM and encoders). Without a folder (a model built in this process) the sha256 is taken
    over the projector and adapter weights in memory and ``path`` is None."""
    digest = hashlib.sha256()
    if checkpoint is not None:
        from mllm.hub import resolve_checkpoint

        folder = resolve_checkpoint(checkpoint)
        adapter_dir = os.path.join(folder, ADAPTER_DIR)
        names = list(FINGERPRINTED_FILES)
        if os.path.isdir(adapter_dir):
            names += sorted(f"{ADAPTER_DIR}/{n}" for n in os.listdir(adapter_dir)
                            if os.path.isfile(os.path.join(adapter_dir, n)))
        files = [n for n in names if os.path.isfile(os.path.join(folder, n))]
        for name in files:
            digest.update(f"{name}\0{_sha256(os.path.join(folder, name))}\n".encode())
        path = os.path.abspath(folder) if os.path.isdir(checkpoint) else checkpoint
        return {"path": path, "sha256": digest.hexdigest(), "files": files}
    import torch

    for name, tensor in sorted(_trained_weights(model).items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return {"path": None, "sha256": digest.hexdigest(), "files": "weights in memory",
            "llm": getattr(getattr(model, "config", None), "llm", None)}


def _trained_weights(model) -> dict:
    """The projector and adapter weights (and a native backbone's trained connector): what a
    checkpoint adds to the LLM and encoders it names."""
    weights = {f"projectors.{k}": v for k, v in model.projectors.state_dict().items()}
    if getattr(model, "connector_is_saved", lambda: False)():
        weights.update({f"native_connector.{k}": v for k, v in model.connector().state_dict().items()})
    llm = getattr(model, "llm", None)
    if llm is not None and hasattr(llm, "peft_config"):
        from peft import get_peft_model_state_dict

        weights.update({f"adapter.{k}": v for k, v in get_peft_model_state_dict(llm).items()})
    return weights


def prompt_format(model) -> dict:
    """The template options the runner renders prompts with (``generate_into_log`` passes
    ``template`` and ``system_prompt`` on to the dataset), and a sha256 of the chat template they
    resolve to (the tokenizer's, from the checkpoint). The one place that decides them, so what
    is recorded is what is used."""
    from mllm.data.templates import resolve_chat_template

    record = model.prompt_record   # the checkpoint's own prompt format (mllm.checkpoint)
    options = {"template": record.template, "system_prompt": record.system_prompt,
               "overrides": sorted(record.overrides)}   # fields given explicitly (--template, --system-prompt)
    template = resolve_chat_template(model.tokenizer, options["template"])
    options["chat_template_sha256"] = (hashlib.sha256(template.encode()).hexdigest()
                                       if template is not None else None)
    return options


def _describe(identity: dict | None) -> str:
    if not identity:
        return "an unrecorded checkpoint"
    where = identity.get("path") or "a model built in memory"
    return f"{where} (sha256 {str(identity.get('sha256'))[:12]})"


def refuse_foreign_log(log_path: str, identity: dict) -> None:
    """Stop if the answer log at ``log_path`` holds answers of another checkpoint."""
    header, rows = answer_log_rows(log_path)
    if header is None and not rows:
        return
    recorded = (header or {}).get("checkpoint")
    if recorded is None or recorded.get("sha256") != identity["sha256"]:
        raise UserError(f"{log_path} holds answers of {_describe(recorded)}, not of {_describe(identity)}; "
                        f"pass --new-log (new_log=True) to set that log aside and start a new one, or use "
                        f"another --output-dir")


def _open_log(log_path: str, identity: dict, settings: dict, new_log: bool) -> dict[str, str]:
    """The answers already in the log of this checkpoint; a new log with its header line when
    there is none (or, with ``new_log``, after setting the old one aside)."""
    if new_log and os.path.exists(log_path):
        stem, ext = os.path.splitext(log_path)
        aside = f"{stem}.replaced-{time.strftime('%Y%m%d-%H%M%S')}{ext}"
        os.replace(log_path, aside)
        logger.info("--new-log: the previous answer log is now %s", aside)
    refuse_foreign_log(log_path, identity)
    header, rows = answer_log_rows(log_path, repair=True)
    if header is None and not rows:
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(json.dumps({HEADER_KEY: 1, "checkpoint": identity, "settings": settings},
                               ensure_ascii=False) + "\n")
    return {row.id: row.prediction for row in rows if row.prediction is not None}


# --------------------------------------------------------------------------- generation


def check_model_inputs(suite: Suite, samples: list[EvalSample], model) -> None:
    """Fail early, and clearly, if the samples carry media the model has no encoder for."""
    supported = {spec.field for spec in model.processor.media_specs().values()}
    needed = {field for s in samples for field in s.media}
    missing = sorted(needed - supported)
    if missing:
        wanted = ", ".join(f"{f} ({MEDIA_FIELDS[f]})" for f in missing)
        raise UserError(f"suite '{suite.name}' needs {wanted} input, but the model has no encoder for it "
                         f"(it takes: {', '.join(sorted(supported)) or 'text only'}); add the encoder and "
                         f"projector to the model config and train them first")


def _write_prompt_records(suite: Suite, samples: list[EvalSample], output_dir: str, prompt_suffix) -> str:
    """LLaVA-style records for ``MultimodalDataset``; embedded images are written out first."""
    path = os.path.join(output_dir, PROMPTS_NAME)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            media = {}
            for field, paths in sample.media.items():
                media[field] = [_inline_file(sample, p, output_dir) if p in sample.inline_media else p for p in paths]
            record = {"id": sample.id, **media,
                      "conversations": [{"from": "human", "value": suite.prompt(sample, prompt_suffix)}]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _inline_file(sample: EvalSample, name: str, output_dir: str) -> str:
    path = os.path.abspath(os.path.join(output_dir, "media", name))
    if not os.path.exists(path):
        try:
            data = base64.b64decode(sample.inline_media[name])
        except binascii.Error as e:
            raise AnnotationError(sample.where or name, f"sample {sample.id!r}: its image is not valid base64 "
                                                        f"({e})") from None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return path


def moka_tuner(model):
    """The ``MokaModel`` inside ``model``'s LLM; a clear error if the checkpoint's tuner is not MokA."""
    from mllm.tuners.moka.model import MokaModel

    tuner = getattr(getattr(model, "llm", None), "base_model", None)
    if isinstance(tuner, MokaModel):
        return tuner
    kind = getattr(getattr(model, "tuner_config", None), "type", None) or "none"
    raise UserError(f"partial-modality inference (MokA paper, section 4.3) needs a checkpoint tuned with MokA; "
                     f"this model's tuner is {kind!r}")


def check_partial_modality(model, modality: str) -> str:
    """Validate ``modality`` for ``model`` (a MokA checkpoint whose adapter routes it); its
    canonical name."""
    from mllm.modality import modality_from_name

    tuner = moka_tuner(model)
    try:
        name = modality_from_name(modality).name.lower()
    except ValueError as e:
        raise UserError(f"--partial-modality: {e}") from None
    routed = list(tuner.peft_config[model.llm.active_adapter].modalities)
    if name not in routed:
        raise UserError(f"partial modality {name!r}: the MokA adapter has no A matrix for it "
                         f"(it routes {', '.join(routed)})")
    return name


def partial_modality_context(model, modality: str | None):
    """Around generation: only ``modality``'s prompt tokens take the MokA adapter path
    (``MokaModel.partial_modality``); nothing when ``modality`` is None."""
    if modality is None:
        return contextlib.nullcontext()
    return moka_tuner(model).partial_modality(modality)


def _jsonable(value):
    """``value`` if JSON can hold it; a function's import path; else its type name (stable
    across runs, unlike a repr with an address)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if callable(value) and hasattr(value, "__qualname__"):
            return f"{getattr(value, '__module__', '?')}:{value.__qualname__}"
        return f"<{type(value).__name__}>"


def _check_settings(output_dir: str, settings: dict, resuming: bool) -> None:
    """Refuse to add answers generated with other settings to an existing log."""
    path = os.path.join(output_dir, SETTINGS_NAME)
    settings = json.loads(json.dumps(settings))  # compare as saved (tuples become lists)
    if resuming and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        changed = [f"{k}: {saved.get(k)!r} before, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise UserError(f"{os.path.join(output_dir, LOG_NAME)} holds answers generated with other settings "
                             f"({'; '.join(changed)}); use another output folder, or delete the log to start over")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)


def find_missing_media(samples: list[EvalSample], media_root: str | None) -> dict[str, str]:
    """``sample id -> reason`` for the samples whose media files are not there (checked before
    any generation, so a missing file does not stop a run hours in)."""
    from mllm.data.media import resolve_media_path

    missing = {}
    for sample in samples:
        for paths in sample.media.values():
            absent = [p for p in paths if p not in sample.inline_media
                      and not os.path.exists(resolve_media_path(p, media_root))]
            if absent:
                missing[sample.id] = f"media file not found: {resolve_media_path(absent[0], media_root)}"
                break
    return missing


def bad_media_error(sample: EvalSample, reason: str, media_root: str | None) -> AnnotationError:
    root = f" (relative paths start from --media-root {media_root})" if media_root else \
        " (relative paths start from the working directory; see --media-root)"
    return AnnotationError(sample.where or "annotation", f"sample {sample.id!r}: {reason}{root}; "
                                                         f"--on-bad-media skip skips and counts such samples")


def _on_annotation_line(error: UserError, prompts_path: str, samples: list[EvalSample]) -> UserError:
    """``error`` about line N of the internal prompts file, restated for sample N's annotation line."""
    found = re.search(re.escape(prompts_path) + r":(\d+)", str(error))
    if not found or not 0 < int(found.group(1)) <= len(samples):
        return error
    sample = samples[int(found.group(1)) - 1]
    message = str(error).replace(found.group(0), "").lstrip(": ")
    return AnnotationError(sample.where or "annotation", f"sample {sample.id!r}: {message}")


def generate_into_log(suite: Suite, samples: list[EvalSample], model, output_dir: str, *, media_root=None,
                      batch_size: int = 16, max_new_tokens: int | None = None, prompt_suffix: str | None = None,
                      progress: bool = True, total: int | None = None, on_bad_media: str = "error",
                      bad_media: dict[str, str] | None = None, prompt_options: dict | None = None,
                      **generate_kwargs) -> None:
    """Generate answers for ``samples`` and append them to the log, one batch at a time.

    Each sample's media are read before its batch is generated; one that cannot be read stops
    the run naming the sample's annotation line, or under ``on_bad_media="skip"`` is left out
    and recorded in ``bad_media`` (``id -> reason``)."""
    from tqdm.auto import tqdm

    from mllm.data.dataset import MultimodalDataset
    from mllm.data.media import MediaError
    from mllm.inference import generate_answers

    bad_media = {} if bad_media is None else bad_media
    prompt_options = prompt_format(model) if prompt_options is None else prompt_options
    prompts_path = _write_prompt_records(suite, samples, output_dir, prompt_suffix)
    try:
        dataset = MultimodalDataset(prompts_path, model.tokenizer, model.processor.media_specs(), media_root=media_root,
                                    template=prompt_options["template"],
                                    system_prompt=prompt_options["system_prompt"], for_generation=True,
                                    progress=False)
    except UserError as e:  # it names a line of the prompts file: name the sample's annotation line
        raise _on_annotation_line(e, prompts_path, samples) from None
    total = total or len(samples)
    bar = tqdm(total=total, initial=total - len(samples), desc=suite.name, disable=not progress)
    with open(os.path.join(output_dir, LOG_NAME), "a", encoding="utf-8") as log:
        for start in range(0, len(samples), batch_size):
            batch, items = [], []
            for index in range(start, min(start + batch_size, len(samples))):
                try:
                    items.append(dataset[index])
                except MediaError as e:
                    reason = f"cannot read {e.path}: {e.reason}"
                    if on_bad_media != "skip":
                        raise bad_media_error(samples[index], reason, media_root) from None
                    bad_media[samples[index].id] = reason
                    logger.warning("%s: skipping sample %r: %s", samples[index].where, samples[index].id, reason)
                    continue
                batch.append(samples[index])
            answers = generate_answers(model, items, batch_size=batch_size, progress=False,
                                       max_new_tokens=max_new_tokens or suite.max_new_tokens,
                                       **generate_kwargs) if items else []
            for sample, answer in zip(batch, answers):
                log.write(json.dumps({"id": sample.id, "prediction": answer}, ensure_ascii=False) + "\n")
            log.flush()  # an interrupted run keeps every finished batch
            bar.update(min(batch_size, len(samples) - start))
    bar.close()
    os.remove(prompts_path)


# --------------------------------------------------------------------------- scoring


def _load_samples(suite: Suite, data: str, limit: int | None) -> list[EvalSample]:
    try:
        samples = suite.load(data)
    except UnicodeDecodeError as e:
        raise AnnotationError(data, f"not a text file ({e.reason} at byte {e.start})") from None
    except IsADirectoryError:
        raise AnnotationError(data, f"is a folder; suite '{suite.name}' reads a file here") from None
    if limit is not None:
        samples = samples[:limit]
    seen = {}
    for sample in samples:
        if sample.id in seen:
            first = seen[sample.id] or "an earlier record"
            raise AnnotationError(sample.where or data, f"sample id {sample.id!r} occurs twice (first at {first}); "
                                                        f"ids must be unique")
        seen[sample.id] = sample.where
    return samples


def score_and_write(suite: Suite, samples: list[EvalSample], predictions: dict[str, str], data: str | None,
                    output_dir: str | None, modes=("official",), extra: dict | None = None) -> dict[str, dict]:
    """Score in each mode; with ``output_dir`` write the official files and ``results_<mode>.json``.
    A mode that scores no sample at all is an error, not a result."""
    all_results = {}
    for mode in modes:
        results = suite.score(samples, predictions, mode)
        if not results["num_answered"] or not results["num_scored"]:
            raise UserError(f"{suite.name} [{mode}]: nothing to score -- {results['num_samples']} samples, "
                            f"{results['num_answered']} with an answer, {results['num_scored']} scored "
                            f"({results['parse_failures']} answers unparsed"
                            + (", left out as the official script does; see --mode strict)" if mode == "official"
                               else ")"))
        results.update(data=os.path.abspath(data) if data else None, data_sha256=_sha256(data) if data else None,
                       suite_options={k: _jsonable(v) for k, v in getattr(suite, "options", {}).items()},
                       **(extra or {}))
        all_results[mode] = results
    if output_dir is not None:
        official_files = suite.write_official_files(samples, predictions, os.path.join(output_dir, "official"))
        for mode, results in all_results.items():
            results["official_files"] = official_files
            with open(os.path.join(output_dir, f"results_{mode}.json"), "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2, ensure_ascii=False)
    return all_results


def samples_and_answers(suite: Suite, data: str | None, answers_path: str, limit: int | None = None):
    """``(samples, Answers)`` for scoring ``answers_path``; without ``data`` the samples come from
    the answers themselves where they hold the ground truth (MME's results folder)."""
    if not os.path.exists(answers_path):
        raise AnnotationFileNotFoundError(answers_path, "answers file not found")
    if data is None:
        samples = suite.samples_from_answers(answers_path)
        if samples is None:
            raise UserError(f"give --data (the {suite.name} annotation file or folder) to score {answers_path}"
                            + ("; only an MME results folder is scored without it" if suite.name == "mme" else ""))
        samples = samples[:limit] if limit is not None else samples
    else:
        samples = _load_samples(suite, data, limit)
    return samples, read_answers(suite, samples, answers_path)


def score_answers(suite: Suite | str, data: str | None, answers_path: str, mode: str = "official",
                  output_dir: str | None = None, limit: int | None = None, options: dict | None = None) -> dict:
    """Score existing answers without a model: an answer log (``{"id", "prediction"}`` lines) or
    the benchmark's own answer format. ``options`` go to the suite's constructor when ``suite``
    is a name. The results' ``answers`` entry counts matched, unmatched and repeated answers and
    unanswered samples."""
    return score_answer_file(suite, data, answers_path, (mode,), output_dir, limit, options)[mode]


def score_answer_file(suite: Suite | str, data: str | None, answers_path: str, modes=("official",),
                      output_dir: str | None = None, limit: int | None = None,
                      options: dict | None = None) -> dict[str, dict]:
    suite = get_suite(suite, **(options or {})) if isinstance(suite, str) else suite
    for mode in modes:
        check_mode(mode)
    samples, answers = samples_and_answers(suite, data, answers_path, limit)
    logger.info("%s", answers.summary())
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
    header = answers.header or {}
    extra = {"answers": answers.report(), "checkpoint": header.get("checkpoint"),
             "generation": header.get("settings")}
    return score_and_write(suite, samples, answers.predictions, data, output_dir, modes, extra)


def run_suite(suite: Suite | str, model, data: str, output_dir: str, *, media_root: str | None = None,
              modes=("official",), batch_size: int = 16, max_new_tokens: int | None = None,
              prompt_suffix: str | None = None, limit: int | None = None, progress: bool = True,
              options: dict | None = None, partial_modality: str | None = None, checkpoint: str | None = None,
              new_log: bool = False, on_bad_media: str = "error", **generate_kwargs) -> dict[str, dict]:
    """Generate (resuming from ``output_dir/samples.jsonl``), score and write results; returns
    ``{mode: results}``.

    ``options`` go to the suite's constructor when ``suite`` is a name. ``partial_modality``
    (e.g. "visual"; MokA checkpoints only) runs generation inside
    ``MokaModel.partial_modality``: on the prompt pass only that modality's tokens take the
    adapter path, as in the MokA paper's section 4.3. ``checkpoint`` (the folder ``model`` was
    loaded from) identifies the model in the log and results (``checkpoint_identity``); a log of
    another checkpoint is refused unless ``new_log``. ``on_bad_media``: "error" (stop, naming the
    sample's annotation line) or "skip" (leave the sample unanswered and count it)."""
    suite = get_suite(suite, **(options or {})) if isinstance(suite, str) else suite
    for mode in modes:
        check_mode(mode)
    if on_bad_media not in BAD_MEDIA_POLICIES:
        raise UserError(f"on_bad_media must be one of {', '.join(BAD_MEDIA_POLICIES)}, got {on_bad_media!r}")
    if partial_modality is not None:
        partial_modality = check_partial_modality(model, partial_modality)
    samples = _load_samples(suite, data, limit)
    check_model_inputs(suite, samples, model)
    os.makedirs(output_dir, exist_ok=True)
    log_path = os.path.join(output_dir, LOG_NAME)
    identity = checkpoint_identity(model, checkpoint)
    settings = {"max_new_tokens": max_new_tokens or suite.max_new_tokens,
                "prompt_suffix": suite.prompt_suffix if prompt_suffix is None else prompt_suffix,
                "prompt_format": prompt_format(model),
                "do_sample": generate_kwargs.get("do_sample", False), "partial_modality": partial_modality,
                **{k: _jsonable(v) for k, v in generate_kwargs.items() if k != "do_sample"}}
    done = _open_log(log_path, identity, settings, new_log)
    _check_settings(output_dir, settings, resuming=bool(done))
    pending = [s for s in samples if s.id not in done]
    if done:
        logger.info("%s: %d of %d answers of %s already in %s; generating the other %d", suite.name,
                    len(samples) - len(pending), len(samples), _describe(identity), log_path, len(pending))
    bad_media = find_missing_media(pending, media_root)
    if bad_media and on_bad_media != "skip":
        first = next(s for s in pending if s.id in bad_media)
        more = f" ({len(bad_media) - 1} more samples lack media too)" if len(bad_media) > 1 else ""
        raise bad_media_error(first, bad_media[first.id] + more, media_root)
    pending = [s for s in pending if s.id not in bad_media]
    started = time.time()
    if pending:
        with partial_modality_context(model, partial_modality):
            generate_into_log(suite, pending, model, output_dir, media_root=media_root, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, prompt_suffix=prompt_suffix, progress=progress,
                              total=len(samples), on_bad_media=on_bad_media, bad_media=bad_media,
                              prompt_options=settings["prompt_format"], **generate_kwargs)
    if bad_media:
        logger.warning("%s: %d samples skipped for bad media (unanswered; see bad_media in the results)",
                       suite.name, len(bad_media))
    generation = {"batch_size": batch_size, **settings,
                  "generated_now": sum(1 for sample in pending if sample.id not in bad_media),
                  "generation_seconds": round(time.time() - started, 3)}
    where = {s.id: s.where for s in samples}
    bad = {"policy": on_bad_media, "count": len(bad_media),
           "samples": [f"{where[i]}: {i}: {reason}" for i, reason in bad_media.items()]}
    return score_and_write(suite, samples, read_answer_log(log_path), data, output_dir, modes,
                           {"checkpoint": identity, "generation": generation, "bad_media": bad})


# --------------------------------------------------------------------------- command line


def _options_help() -> str:
    listed = "; ".join(
        f"{name}: " + ", ".join(f"{key}={default}" + (f" ({SUITES[name].option_help[key]})"
                                                      if key in SUITES[name].option_help else "")
                                for key, default in suite_options(name).items())
        for name in sorted(SUITES) if suite_options(name))
    text = ("set an option of the suite (repeatable). VALUE is read as YAML: true, 42, [a, b], or text; quote text "
            "that starts with '{' or holds ': ', e.g. --option 'video_path=\"{video_id}.mp4\"'. Options and "
            f"defaults -- {listed}")
    return text.replace("%", "%%")


def parse_option_values(items: list[str] | None) -> dict:
    """``["KEY=VALUE", ...]`` -> ``{KEY: YAML value}``."""
    import yaml

    from mllm.config import parse_yaml

    options = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        if key in options:
            raise ValueError(f"--option {key} is given twice")
        try:
            options[key] = parse_yaml(text)
        except yaml.YAMLError as e:  # say which option, and how to quote
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"--option {key}: {text!r} is not a valid YAML value ({first}); quote text values, "
                             f"e.g. --option '{key}=\"{text}\"'") from None
    return options


class _Parser(argparse.ArgumentParser):
    """Usage errors end the command with one line (``mllm.cli`` prints it), like every user error."""

    def error(self, message: str):
        raise UserError(f"{message} (see mllm eval --help)")


def _answers_help() -> str:
    indent = " " * 14

    def wrapped(first: str, text: str) -> str:
        return textwrap.fill(text, width=100, initial_indent=first, subsequent_indent=indent + "  ") + "\n"

    schemes = "".join(wrapped(f"  {name:<11} ", f"id: {SUITES[name].id_scheme}")
                      + wrapped(indent, f"own format: {SUITES[name].answer_format}") for name in sorted(SUITES))
    return ("answers (--answers FILE):\n"
            "  The answer log mllm eval writes (OUTPUT/samples.jsonl) is JSON lines: a first line\n"
            '  {"log_header": 1, "checkpoint": {...}, "settings": {...}} naming the checkpoint and prompt\n'
            '  format, then one {"id": SAMPLE_ID, "prediction": "model output"} line per sample. Any file of\n'
            "  such lines can be scored (the header is optional there). --answers also reads each benchmark's\n"
            "  own answer format, listed below. Answers whose id matches no sample, repeated ids and samples\n"
            "  without an answer are counted in the results ('answers'); a file none of whose answers\n"
            "  matches is an error showing an expected id next to one the file holds.\n"
            "sample ids and answer formats, per suite:\n" + schemes.replace("%", "%%") +
            "checkpoints: the log records the checkpoint (folder + sha256 of its projector, adapter and config\n"
            "  files); resuming it with another checkpoint is refused, --new-log sets it aside and starts anew.\n"
            "bad media: a missing or unreadable media file stops the run naming the annotation file and line;\n"
            "  --on-bad-media skip leaves such samples unanswered and counts them (strict: wrong; official:\n"
            "  as the official script treats a missing answer).\n"
            "errors in what you give (annotations, answers, options) end with one line; --debug or\n"
            "  MLLM_DEBUG=1 shows the traceback.")


def eval_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mllm eval", description="Generate answers for a benchmark with a trained checkpoint and score them "
                                      "as the official scripts do (or score existing answers).",
        epilog=_answers_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--data", help="the benchmark's annotation file or folder (required, except to score an "
                                       "MME results folder, which holds the answers)")
    parser.add_argument("--checkpoint", help="stage-1/2 output folder (projectors, optional adapter/)")
    parser.add_argument("--answers", help="score this answer log or official-format answer file instead of "
                                          "generating (no checkpoint needed; see below)")
    parser.add_argument("--media-root", help="folder that relative media paths start from (default: the working "
                                             "directory)")
    parser.add_argument("--output-dir", help="where the log, official files and results go (default: eval-SUITE)")
    parser.add_argument("--mode", default="official", choices=(*MODES, "both"),
                        help="official: reproduce the official number, quirks included; strict: count every "
                             "question and parse robustly; both: write both results files")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", dest="options", help=_options_help())
    parser.add_argument("--partial-modality", metavar="MODALITY",
                        help="MokA checkpoints only: partial-modality inference (MokA paper, section 4.3) -- on "
                             "the prompt pass only MODALITY's tokens (text, visual, audio or speech) take the "
                             "adapter path, cross-modal attention off; recorded in the results")
    parser.add_argument("--new-log", action="store_true",
                        help="set an existing answer log aside (renamed samples.replaced-TIME.jsonl) and start a "
                             "new one, e.g. for another checkpoint")
    parser.add_argument("--on-bad-media", choices=BAD_MEDIA_POLICIES, default="error",
                        help="a missing or unreadable media file: error (default) stops, naming the annotation "
                             "file and line; skip leaves the sample unanswered and counts it")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, help="default: the suite's protocol value")
    parser.add_argument("--template", help="render prompts with this template (plain, llama-2, jinja text) instead "
                                           "of the checkpoint's recorded one (prompt_format.json); recorded")
    parser.add_argument("--system-prompt", help="instead of the checkpoint's recorded system prompt; recorded")
    parser.add_argument("--prompt-suffix", help="replace the suite's prompt suffix (use \\n for new lines)")
    parser.add_argument("--limit", type=int, help="only the first N samples (smoke tests)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def eval_command(argv: list[str] | None = None) -> int:
    """``mllm eval``; a user error raises ``UserError`` (``mllm.cli`` prints it as one line), and so
    does a file that cannot be opened (permissions, a folder where a file belongs)."""
    try:
        return _eval_command(argv)
    except UserError:
        raise
    except OSError as e:
        if not e.filename:
            raise
        raise UserError(f"{e.filename}: {e.strerror or e}") from None


def _eval_command(argv: list[str] | None) -> int:
    args = eval_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modes = MODES if args.mode == "both" else (args.mode,)
    output_dir = args.output_dir or f"eval-{args.suite}"
    try:
        suite = get_suite(args.suite, **parse_option_values(args.options))
    except UserError:
        raise
    except ValueError as e:  # a suite option's value
        raise UserError(str(e)) from None
    if args.answers:
        if args.partial_modality:
            raise UserError("--partial-modality applies to generation; it has no effect with --answers")
        if args.data is not None and not os.path.exists(args.data):
            raise AnnotationFileNotFoundError(args.data)
        results = score_answer_file(suite, args.data, args.answers, modes, output_dir, args.limit)
        answers = next(iter(results.values()))["answers"]
        print(f"{args.answers}: {answers['matched']} answers matched ({answers['format']}); {answers['unmatched']} "
              f"match no sample, {answers['duplicates']} repeat an id, {answers['unanswered']} samples unanswered")
    else:
        if not args.checkpoint:
            raise UserError("give --checkpoint DIR to generate, or --answers FILE to score existing answers")
        if args.data is None:
            raise UserError("give --data, the benchmark's annotation file or folder")
        if not os.path.exists(args.data):
            raise AnnotationFileNotFoundError(args.data)
        import torch

        from mllm.model.multimodal_lm import MultimodalLM

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            if not args.new_log:  # before the model loads: a log of another checkpoint is refused at once
                refuse_foreign_log(os.path.join(output_dir, LOG_NAME), checkpoint_identity(None, args.checkpoint))
            model = MultimodalLM.from_pretrained(args.checkpoint).to(device)
        except FileNotFoundError as e:
            raise UserError(f"--checkpoint: {e}") from None
        model.prompt_record = model.prompt_record.overridden(template=args.template,
                                                             system_prompt=args.system_prompt)
        if args.partial_modality:
            check_partial_modality(model, args.partial_modality)
        suffix = None if args.prompt_suffix is None else args.prompt_suffix.replace("\\n", "\n")
        results = run_suite(suite, model, args.data, output_dir, media_root=args.media_root, modes=modes,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt_suffix=suffix,
                            limit=args.limit, progress=not args.no_progress, partial_modality=args.partial_modality,
                            checkpoint=args.checkpoint, new_log=args.new_log, on_bad_media=args.on_bad_media)
    for mode, result in results.items():
        print(f"{args.suite} [{mode}] score {result['score']} over {result['num_scored']} of {result['num_samples']} "
              f"samples ({result['parse_failures']} unparsed) -> {os.path.join(output_dir, f'results_{mode}.json')}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``eval_command`` with user errors as one line on stderr and exit status 2 (``--debug`` or
    ``MLLM_DEBUG=1``: the traceback)."""
    from mllm.cli import run_reporting_user_errors

    return run_reporting_user_errors("mllm eval", eval_command, list(sys.argv[1:] if argv is None else argv))
