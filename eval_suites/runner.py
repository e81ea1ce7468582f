"""Run a suite: generate answers with a ``MultimodalLM``, log them, score them.

``run_suite`` builds the suite's prompts, generates with ``mllm.inference.generate_answers``
(left-padded batches, greedy unless told otherwise) one batch at a time, and appends each
answer to ``<output>/samples.jsonl`` as soon as its batch is done. Started again on the same
output folder it reads that log and generates only what is missing. It then scores, writes
the files the official scripts read (``<output>/official/``) and ``results_<mode>.json``.

``score_answers`` does the scoring part alone on an existing answers log.
``eval_main`` is the ``mllm eval`` command.

Suite options (``get_suite(name, **options)``; ``--option KEY=VALUE`` on the command line) and,
for MokA checkpoints, partial-modality inference (``partial_modality``; paper section 4.3) are
recorded in the results. The settings that change answers (``max_new_tokens``, prompt suffix,
sampling, partial modality) are kept in ``<output>/generation_settings.json``; resuming a log
with different ones is refused rather than mixing answers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import os
import sys
import time

from eval_suites import MODES, SUITES, get_suite, suite_options
from eval_suites.base import EvalSample, Suite, check_mode
from mllm.modality import MEDIA_FIELDS

logger = logging.getLogger(__name__)

LOG_NAME = "samples.jsonl"
PROMPTS_NAME = "pending_prompts.jsonl"
SETTINGS_NAME = "generation_settings.json"


# --------------------------------------------------------------------------- answer log


def read_answer_log(path: str, repair: bool = False) -> dict[str, str]:
    """``id -> prediction`` from a JSON-lines answers log (``{"id", "prediction", ...}``).

    A last line cut off by an interrupted write is ignored, and with ``repair`` removed from
    the file so that appending can go on; a bad line anywhere else is an error.
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    predictions, offset = {}, 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        is_last = lineno == len(lines)
        if raw.strip():
            try:
                row = json.loads(raw)
                predictions[str(row["id"])] = row["prediction"]
                if is_last and repair:  # complete but its newline was never written
                    with open(path, "ab") as f:
                        f.write(b"\n")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                if not is_last:
                    raise ValueError(f"{path}:{lineno}: not an answer log line ({e})") from None
                logger.warning("%s:%d: ignoring a line cut off by an interrupted run", path, lineno)
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                break
        offset += len(raw) + 1
    return predictions


def _sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- generation


def check_model_inputs(suite: Suite, samples: list[EvalSample], model) -> None:
    """Fail early, and clearly, if the samples carry media the model has no encoder for."""
    supported = {spec.field for spec in model.media_specs().values()}
    needed = {field for s in samples for field in s.media}
    missing = sorted(needed - supported)
    if missing:
        wanted = ", ".join(f"{f} ({MEDIA_FIELDS[f]})" for f in missing)
        raise ValueError(f"suite '{suite.name}' needs {wanted} input, but the model has no encoder for it "
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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(sample.inline_media[name]))
    return path


def moka_tuner(model):
    """The ``MokaModel`` inside ``model``'s LLM; a clear error if the checkpoint's tuner is not MokA."""
    from mllm.tuners.moka.model import MokaModel

    tuner = getattr(getattr(model, "llm", None), "base_model", None)
    if isinstance(tuner, MokaModel):
        return tuner
    kind = getattr(getattr(model, "tuner_config", None), "type", None) or "none"
    raise ValueError(f"partial-modality inference (MokA paper, section 4.3) needs a checkpoint tuned with MokA; "
                     f"this model's tuner is {kind!r}")


def check_partial_modality(model, modality: str) -> str:
    """Validate ``modality`` for ``model`` (a MokA checkpoint whose adapter routes it); its
    canonical name."""
    from mllm.modality import modality_from_name

    tuner = moka_tuner(model)
    name = modality_from_name(modality).name.lower()
    routed = list(tuner.peft_config[model.llm.active_adapter].modalities)
    if name not in routed:
        raise ValueError(f"partial modality {name!r}: the MokA adapter has no A matrix for it "
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
            raise ValueError(f"{os.path.join(output_dir, LOG_NAME)} holds answers generated with other settings "
                             f"({'; '.join(changed)}); use another output folder, or delete the log to start over")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)


def generate_into_log(suite: Suite, samples: list[EvalSample], model, output_dir: str, *, media_root=None,
                      batch_size: int = 16, max_new_tokens: int | None = None, prompt_suffix: str | None = None,
                      progress: bool = True, total: int | None = None, **generate_kwargs) -> None:
    """Generate answers for ``samples`` and append them to the log, one batch at a time."""
    from torch.utils.data import Subset
    from tqdm.auto import tqdm

    from mllm.data.dataset import MultimodalDataset
    from mllm.inference import generate_answers

    prompts_path = _write_prompt_records(suite, samples, output_dir, prompt_suffix)
    record = model.prompt_record   # the checkpoint's own prompt format (mllm.checkpoint)
    dataset = MultimodalDataset(prompts_path, model.tokenizer, model.media_specs(), media_root=media_root,
                                for_generation=True, progress=False, template=record.template,
                                system_prompt=record.system_prompt)
    total = total or len(samples)
    bar = tqdm(total=total, initial=total - len(samples), desc=suite.name, disable=not progress)
    with open(os.path.join(output_dir, LOG_NAME), "a", encoding="utf-8") as log:
        for start in range(0, len(samples), batch_size):
            batch = range(start, min(start + batch_size, len(samples)))
            answers = generate_answers(model, Subset(dataset, batch), batch_size=batch_size, progress=False,
                                       max_new_tokens=max_new_tokens or suite.max_new_tokens, **generate_kwargs)
            for index, answer in zip(batch, answers):
                log.write(json.dumps({"id": samples[index].id, "prediction": answer}, ensure_ascii=False) + "\n")
            log.flush()  # an interrupted run keeps every finished batch
            bar.update(len(answers))
    bar.close()
    os.remove(prompts_path)


# --------------------------------------------------------------------------- scoring


def _load_samples(suite: Suite, data: str, limit: int | None) -> list[EvalSample]:
    samples = suite.load(data)
    if limit is not None:
        samples = samples[:limit]
    seen = set()
    for sample in samples:
        if sample.id in seen:
            raise ValueError(f"{data}: sample id {sample.id!r} occurs twice; ids must be unique")
        seen.add(sample.id)
    return samples


def score_and_write(suite: Suite, samples: list[EvalSample], predictions: dict[str, str], data: str,
                    output_dir: str | None, modes=("official",), extra: dict | None = None) -> dict[str, dict]:
    """Score in each mode; with ``output_dir`` write the official files and ``results_<mode>.json``."""
    official_files = []
    if output_dir is not None:
        official_files = suite.write_official_files(samples, predictions, os.path.join(output_dir, "official"))
    all_results = {}
    for mode in modes:
        results = suite.score(samples, predictions, mode)
        results.update(data=os.path.abspath(data), data_sha256=_sha256(data), official_files=official_files,
                       suite_options={k: _jsonable(v) for k, v in getattr(suite, "options", {}).items()}, **(extra or {}))
        if output_dir is not None:
            with open(os.path.join(output_dir, f"results_{mode}.json"), "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2, ensure_ascii=False)
        all_results[mode] = results
    return all_results


def score_answers(suite: Suite | str, data: str, answers_path: str, mode: str = "official",
                  output_dir: str | None = None, limit: int | None = None, options: dict | None = None) -> dict:
    """Score an existing answers log (``{"id", "prediction"}`` lines) without a model.
    ``options`` go to the suite's constructor when ``suite`` is a name."""
    suite = get_suite(suite, **(options or {})) if isinstance(suite, str) else suite
    check_mode(mode)
    samples = _load_samples(suite, data, limit)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
    return score_and_write(suite, samples, read_answer_log(answers_path), data, output_dir, (mode,))[mode]


def run_suite(suite: Suite | str, model, data: str, output_dir: str, *, media_root: str | None = None,
              modes=("official",), batch_size: int = 16, max_new_tokens: int | None = None,
              prompt_suffix: str | None = None, limit: int | None = None, progress: bool = True,
              options: dict | None = None, partial_modality: str | None = None,
              **generate_kwargs) -> dict[str, dict]:
    """Generate (resuming from ``output_dir/samples.jsonl``), score and write results; returns
    ``{mode: results}``.

    ``options`` go to the suite's constructor when ``suite`` is a name. ``partial_modality``
    (e.g. "visual"; MokA checkpoints only) runs generation inside
    ``MokaModel.partial_modality``: on the prompt pass only that modality's tokens take the
    adapter path, as in the MokA paper's section 4.3."""
    suite = get_suite(suite, **(options or {})) if isinstance(suite, str) else suite
    for mode in modes:
        check_mode(mode)
    if partial_modality is not None:
        partial_modality = check_partial_modality(model, partial_modality)
    samples = _load_samples(suite, data, limit)
    check_model_inputs(suite, samples, model)
    os.makedirs(output_dir, exist_ok=True)
    log_path = os.path.join(output_dir, LOG_NAME)
    done = read_answer_log(log_path, repair=True)
    pending = [s for s in samples if s.id not in done]
    settings = {"max_new_tokens": max_new_tokens or suite.max_new_tokens,
                "prompt_suffix": suite.prompt_suffix if prompt_suffix is None else prompt_suffix,
                "do_sample": generate_kwargs.get("do_sample", False), "partial_modality": partial_modality,
                **{k: _jsonable(v) for k, v in generate_kwargs.items() if k != "do_sample"}}
    _check_settings(output_dir, settings, resuming=bool(done))
    if done:
        logger.info("%s: %d of %d answers already in %s; generating the other %d", suite.name,
                    len(samples) - len(pending), len(samples), log_path, len(pending))
    started = time.time()
    if pending:
        with partial_modality_context(model, partial_modality):
            generate_into_log(suite, pending, model, output_dir, media_root=media_root, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, prompt_suffix=prompt_suffix, progress=progress,
                              total=len(samples), **generate_kwargs)
    generation = {"batch_size": batch_size, **settings, "generated_now": len(pending),
                  "generation_seconds": round(time.time() - started, 3)}
    return score_and_write(suite, samples, read_answer_log(log_path), data, output_dir, modes,
                           {"generation": generation})


# --------------------------------------------------------------------------- command line


def _options_help() -> str:
    listed = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in suite_options(name).items())
                       for name in sorted(SUITES) if suite_options(name))
    text = ("set an option of the suite (repeatable). VALUE is read as YAML: true, 42, [a, b], or text; quote text "
            "that starts with '{' or holds ': ', e.g. --option 'video_path=\"{video_id}.mp4\"'. Options and "
            f"defaults -- {listed}. subset: speech, sound, music or all (mmau), speech or all (air_bench); mmbench judge: a function 'package.module:function' called as "
            "judge(question, options, output) for answers the rules cannot match; protocol=moka: MokA's prompts "
            "and 500 new tokens (default: this project's format-stating prompts)")
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


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm eval", description="Generate answers for a benchmark with a trained checkpoint and score them "
                                      "as the official scripts do (or score an existing answers log).")
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--data", required=True, help="the benchmark's annotation file or folder")
    parser.add_argument("--checkpoint", help="stage-1/2 output folder (projectors, optional adapter/)")
    parser.add_argument("--answers", help="score this answers log instead of generating (no checkpoint needed)")
    parser.add_argument("--media-root", help="folder that relative media paths start from")
    parser.add_argument("--output-dir", help="where the log, official files and results go (default: eval-SUITE)")
    parser.add_argument("--mode", default="official", choices=(*MODES, "both"),
                        help="official: reproduce the official number, quirks included; strict: count every "
                             "question and parse robustly; both: write both results files")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", dest="options", help=_options_help())
    parser.add_argument("--partial-modality", metavar="MODALITY",
                        help="MokA checkpoints only: partial-modality inference (MokA paper, section 4.3) -- on "
                             "the prompt pass only MODALITY's tokens (text, visual, audio or speech) take the "
                             "adapter path, cross-modal attention off; recorded in the results")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, help="default: the suite's protocol value")
    parser.add_argument("--prompt-suffix", help="replace the suite's prompt suffix (use \\n for new lines)")
    parser.add_argument("--limit", type=int, help="only the first N samples (smoke tests)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _error(message: str) -> int:
    print(f"mllm eval: {message}", file=sys.stderr)
    return 2


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modes = MODES if args.mode == "both" else (args.mode,)
    output_dir = args.output_dir or f"eval-{args.suite}"
    try:
        suite = get_suite(args.suite, **parse_option_values(args.options))
    except ValueError as e:
        return _error(str(e))
    if args.answers:
        if args.partial_modality:
            return _error("--partial-modality applies to generation; it has no effect with --answers")
        os.makedirs(output_dir, exist_ok=True)
        samples = _load_samples(suite, args.data, args.limit)
        results = score_and_write(suite, samples, read_answer_log(args.answers), args.data, output_dir, modes)
    else:
        if not args.checkpoint:
            return _error("give --checkpoint DIR to generate, or --answers FILE to score a log")
        import torch

        from mllm.model.multimodal_lm import MultimodalLM

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = MultimodalLM.from_pretrained(args.checkpoint).to(device)
        if args.partial_modality:
            try:
                check_partial_modality(model, args.partial_modality)
            except ValueError as e:
                return _error(str(e))
        suffix = None if args.prompt_suffix is None else args.prompt_suffix.replace("\\n", "\n")
        results = run_suite(suite, model, args.data, output_dir, media_root=args.media_root, modes=modes,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prompt_suffix=suffix,
                            limit=args.limit, progress=not args.no_progress, partial_modality=args.partial_modality)
    for mode, result in results.items():
        print(f"{args.suite} [{mode}] score {result['score']} over {result['num_scored']} of {result['num_samples']} "
              f"samples ({result['parse_failures']} unparsed) -> {os.path.join(output_dir, f'results_{mode}.json')}")
    return 0
