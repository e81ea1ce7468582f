"""``mllm demo``: the whole pipeline on a tiny model and generated data, on a CPU, in minutes.

1. generate coloured-shape images paired with beeps, captions of both, and questions that need
   the sound, the image or both (``mllm.data.synthetic_av``; ``--visual-only``: images alone,
   ``mllm.data.synthetic``);
2. build and save a tiny CLIP tower, a tiny BEATs (official file format), a tokenizer and a tiny
   LLaMA LM, and give the LM some text first;
3. stage 1 (``configs/demo/pretrain.yaml``) and stage 2 (``configs/demo/instruct.yaml``);
4. exact-match evaluation on held-out samples with all media, with the sound removed and with
   the image removed, against the majority-answer baseline; prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time

MARKER = "lm-text-pretrained"


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None,
                        help="where data, tiny models, runs and results go (default: ./mllm-demo, "
                             "./mllm-demo-visual with --visual-only, ./mllm-demo-missing with "
                             "--missing-modality, ./mllm-demo-continual with --continual)")
    parser.add_argument("--configs", default=None,
                        help="folder with pretrain.yaml and instruct.yaml (default: the repo's configs/demo, "
                             "configs/demo/visual with --visual-only)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller, faster run for smoke tests (accuracy is not meaningful)")
    parser.add_argument("--visual-only", action="store_true",
                        help="the visual-text variant: shapes without sounds, no audio encoder")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--missing-modality", action="store_true",
                         help="instead: MoRA vs peft LoRA vs a frozen backbone on a tiny CLIP classification "
                              "task whose classes need image and text, at 0%% and 70%% missing "
                              "(mllm/demo/missing.py)")
    variant.add_argument("--continual", action="store_true",
                         help="instead: DeLo vs sequential LoRA fine-tuning on a tiny continual sequence of "
                              "generated tasks with missing modalities (mllm/demo/continual.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for --missing-modality / --continual (default 1: their tiny "
                             "models run fastest on one thread)")
    parser.add_argument("--llm", default=None, metavar="PATH_OR_ID",
                        help="run the demo with this causal LM (local folder or Hub id, with its own tokenizer and "
                             "chat template) in place of the tiny one: does the pipeline teach YOUR LM to use "
                             "the media? (accuracy above the majority baseline, lower with a medium removed)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply both stages' training epochs (e.g. 0.1 for a tenth, 3 for three times "
                             "the demo's training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="overrides applied to both stage configs, e.g. training.num_train_epochs=1 "
                             "(--missing-modality: to every classify run, e.g. training.epochs=3; --continual: to "
                             "every CMML run, e.g. training.epochs=3)")
    return parser


PLACEHOLDER_PATTERN = re.compile(r"<(image|video|audio|speech)>\n?")


def _default_configs_dir(audio: bool = True) -> str:
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(repo_root, "configs", "demo", *([] if audio else ["visual"]))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"demo configs not found at {path}; pass --configs DIR "
                                f"(install from a clone with `pip install -e .`)")
    return path


def _strip_media(record: dict, fields: tuple[str, ...] = ("image", "video", "audio", "speech")) -> dict:
    """The same question with some media removed: no placeholder, no media field."""
    out = {k: v for k, v in record.items() if k not in fields}
    pattern = re.compile("|".join(rf"<{f}>\n?" for f in fields))
    out["conversations"] = [dict(t, value=pattern.sub("", t["value"])) for t in record["conversations"]]
    return out


def _text_corpus(paths: dict[str, str]) -> list[str]:
    texts = []
    for name in ("pretrain", "instruct"):
        with open(paths[name]) as f:
            for line in f:
                record = json.loads(line)
                texts.append(" ".join(PLACEHOLDER_PATTERN.sub("", t["value"]) for t in record["conversations"]))
    return texts


def _lm_pretraining_texts(tokenizer, paths: dict[str, str]) -> list[str]:
    """Instruct conversations without their images, rendered with the chat template, plus
    captions: the tiny LM learns the language and the template, not the pictures."""
    from mllm.data.templates import resolve_chat_template

    template = resolve_chat_template(tokenizer, "auto")
    texts = []
    with open(paths["instruct"]) as f:
        for line in f:
            record = _strip_media(json.loads(line))
            messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                        for t in record["conversations"]]
            texts.append(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False))
    with open(paths["pretrain"]) as f:
        captions = [json.loads(line)["conversations"][1]["value"] for line in f]
    # Each caption also once repeated: the repeat is predictable only by looking back at the
    # first copy, which teaches the LM in-context copying (as a real LLM has). Without it a
    # frozen LM has no use for earlier content, so stage 1 cannot read the image tokens.
    texts += captions + [f"{c} {c}" for c in captions]
    return texts


def prepare_demo_inputs(output_dir: str, quick: bool = False, seed: int = 0, audio: bool = False,
                        llm: str | None = None) -> dict[str, str]:
    """Generate data and build the tiny models (reused when already there). With ``llm`` (a user's
    LM), that LM is used as it is and the tiny LM gets no text pretraining."""
    from transformers import AutoTokenizer

    from mllm.data.synthetic import write_demo_dataset
    from mllm.data.synthetic_av import write_av_demo_dataset
    from mllm.demo.assets import build_tiny_assets, build_tiny_beats, pretrain_tiny_lm

    data_dir = os.path.join(output_dir, "data")
    sizes = dict(num_pretrain=400, num_instruct=600, num_eval=64) if quick else \
        dict(num_pretrain=2000, num_instruct=4000, num_eval=400)
    paths = (write_av_demo_dataset if audio else write_demo_dataset)(data_dir, seed=seed, **sizes)
    assets = build_tiny_assets(os.path.join(output_dir, "assets"), _text_corpus(paths), seed=seed)
    if audio:
        beats = os.path.join(output_dir, "assets", "tiny-beats.pt")
        assets["beats"] = beats if os.path.isfile(beats) else build_tiny_beats(beats, seed)
    if llm is not None:
        return {**paths, **assets, "llm": llm}
    if not os.path.exists(os.path.join(assets["llm"], MARKER)):
        tokenizer = AutoTokenizer.from_pretrained(assets["llm"])
        pretrain_tiny_lm(assets["llm"], _lm_pretraining_texts(tokenizer, paths),
                         steps=60 if quick else 600, seed=seed)
        open(os.path.join(assets["llm"], MARKER), "w").close()
    return {**paths, **assets}


#: Demo evaluation settings: name -> media removed from every eval record.
VISUAL_SETTINGS = {"with image": (), "image tokens removed": ("image",)}
AV_SETTINGS = {"with image and sound": (), "sound removed": ("audio",), "image removed": ("image",)}


def evaluate_exact_match(checkpoint: str, eval_path: str, media_root: str, batch_size: int = 32,
                         settings: dict[str, tuple[str, ...]] = VISUAL_SETTINGS, output_dir: str | None = None) -> dict:
    """Accuracy overall and per question type (the ``exact_match`` suite), with all media and with
    some removed; the answer logs and results go under ``output_dir`` (default: ``eval/`` beside
    the checkpoint's folder)."""
    from eval_suites.runner import run_suite
    from mllm.model.multimodal_lm import MultimodalLM

    model = MultimodalLM.from_pretrained(checkpoint)
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "eval")
    with open(eval_path) as f:
        records = [json.loads(line) for line in f]
    results = {}
    for name, removed in settings.items():
        path = eval_path
        if removed:
            path = eval_path.replace(".jsonl", f".no-{'-'.join(removed)}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(_strip_media(r, removed)) + "\n" for r in records)
        scored = run_suite("exact_match", model, path, os.path.join(output_dir, re.sub(r"\W+", "-", name)),
                           media_root=media_root, batch_size=batch_size, progress=False, checkpoint=checkpoint,
                           new_log=True)["official"]["metrics"]
        results[name] = {"accuracy": scored["accuracy"], "per_type": scored["per_type"]}
    return results


def format_table(results: dict, baseline: float, counts: dict[str, int]) -> str:
    types = sorted(next(iter(results.values()))["per_type"])
    header = f"| {'setting':<40} | {'accuracy':>8} | " + " | ".join(f"{t:>8}" for t in types) + " |"
    rule = "|" + "-" * 42 + "|" + "-" * 10 + "|" + "|".join("-" * 10 for _ in types) + "|"
    lines = [header, rule, f"| {'majority-answer baseline':<40} | {baseline:>8.3f} | " +
             " | ".join(f"{'':>8}" for _ in types) + " |"]
    for name, res in results.items():
        lines.append(f"| {'stage-2 model, ' + name:<40} | {res['accuracy']:>8.3f} | " +
                     " | ".join(f"{res['per_type'][t]:>8.3f}" for t in types) + " |")
    lines.append(f"(held-out questions: {counts['eval']}; per type: " +
                 ", ".join(f"{t} {counts[t]}" for t in types) + ")")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict:
    if getattr(args, "missing_modality", False):
        from mllm.demo.missing import run_missing_demo

        return run_missing_demo(args)
    if getattr(args, "continual", False):
        from mllm.demo.continual import run_continual_demo

        return run_continual_demo(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mllm.config import load_config
    from mllm.data.synthetic import majority_baseline
    from mllm.train.stages import run_instruct, run_pretrain

    start = time.time()
    audio = not args.visual_only
    out = os.path.abspath(args.output_dir or ("mllm-demo" if audio else "mllm-demo-visual"))
    configs = args.configs or _default_configs_dir(audio)
    print(f"[demo] preparing data and tiny models in {out}", flush=True)
    llm = getattr(args, "llm", None)
    paths = prepare_demo_inputs(out, quick=args.quick, seed=args.seed, audio=audio, llm=llm)
    if llm:
        print(f"[demo] with the LM {llm} and its own chat template", flush=True)
    common = [f"model.llm={paths['llm']}", f"model.encoders.visual.path={paths['clip']}",
              f"data.media_root={paths['media_root']}", f"training.seed={args.seed}",
              "training.overwrite_output_dir=true"]  # running the demo again replaces its runs
    if audio:
        common.append(f"model.encoders.audio.path={paths['beats']}")
    if args.quick:
        common += ["training.num_train_epochs=1", "training.save_steps=1000"]
    stage1_dir = os.path.join(out, "runs", "pretrain")
    stage2_dir = os.path.join(out, "runs", "instruct")
    timings = {}
    for stage, run, extra in (
        ("pretrain", run_pretrain, [f"data.train={paths['pretrain']}", f"training.output_dir={stage1_dir}"]),
        ("instruct", run_instruct, [f"data.train={paths['instruct']}", f"training.output_dir={stage2_dir}",
                                    f"model.pretrained_projectors={stage1_dir}"]),
    ):
        print(f"[demo] {stage} ...", flush=True)
        t0 = time.time()
        cfg = load_config(os.path.join(configs, f"{stage}.yaml"), common + extra + list(args.overrides))
        cfg.training["num_train_epochs"] = cfg.training.get("num_train_epochs", 3) * getattr(args, "scale", 1.0)
        run(cfg)
        timings[stage] = time.time() - t0
    print("[demo] evaluating on held-out images ...", flush=True)
    t0 = time.time()
    results = evaluate_exact_match(stage2_dir, paths["eval"], paths["media_root"],
                                   settings=AV_SETTINGS if audio else VISUAL_SETTINGS)
    timings["evaluate"] = time.time() - t0
    with open(paths["eval"]) as f:
        records = [json.loads(line) for line in f]
    counts = {"eval": len(records)}
    for r in records:
        counts[r["question_type"]] = counts.get(r["question_type"], 0) + 1
    baseline = majority_baseline(records)
    table = format_table(results, baseline, counts)
    total = time.time() - start
    print("\n" + table)
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    summary = {"baseline": baseline, "results": results, "timings": timings, "total_seconds": total}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
