"""The ``mllm`` command: ``mllm demo``, ``mllm pretrain``, ``mllm instruct``, ``mllm eval``.

``stages/pretrain.py`` and ``stages/instruct.py`` call the same entry points, so
``accelerate launch stages/instruct.py --config ...`` and ``mllm instruct --config ...`` are
the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from mllm.errors import UserError

STAGE_HELP = {
    "pretrain": "Stage 1: train the projectors on captioning data; the LLM and encoders stay frozen. "
                "Saves a projector-only checkpoint (projectors.safetensors + config + tokenizer).",
    "instruct": "Stage 2: load the stage-1 projectors (model.pretrained_projectors), add a peft tuner "
                "to the LLM and instruction-tune both (projectors at training.projector_lr). Saves "
                "projectors + adapter/.",
}


def _field_lines(cls, skip=()) -> str:
    """One line per field: ``name: type = default``."""
    import typing

    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = getattr(hints[f.name], "__name__", None) if isinstance(hints[f.name], type) else None
        kind = kind or str(hints[f.name]).replace("typing.", "").replace("NoneType", "None")
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        lines.append(f"      {f.name}: {kind} = {default}\n")
    return "".join(lines)


def _schema_help() -> str:
    from mllm.config import PATH_RESOLUTION_HELP, DataConfig, EncoderConfig, ModelConfig, TunerConfig
    from mllm.projectors.config import ProjectorConfig
    from mllm.tuners import tuner_summaries

    return (
        "config schema (YAML; override any field as section.field=value, values parsed as YAML);\n"
        "each field as name: type = default:\n"
        f"  model:\n{_field_lines(ModelConfig, ('encoders', 'projectors'))}"
        f"  model.encoders.<visual|audio|speech>:\n{_field_lines(EncoderConfig)}"
        f"  model.projectors.<visual|audio|speech>:\n{_field_lines(ProjectorConfig)}"
        f"  tuner:\n{_field_lines(TunerConfig)}"
        f"  data:\n{_field_lines(DataConfig)}"
        "  training:  any transformers.TrainingArguments field (types and defaults as documented there; "
        "strategies take 'no' / 'steps' / 'epoch'), plus\n"
        "      projector_lr: float | None = None (default: learning_rate)\n"
        "      overwrite_output_dir: bool = False (let a new run replace the run in output_dir)\n"
        f"{PATH_RESOLUTION_HELP}\n"
        "An output folder belongs to one run: a new run into a used folder refuses (resume it with "
        "training.resume_from_checkpoint=true, or replace it with training.overwrite_output_dir=true).\n"
        "Errors in what you gave (config, data, media) end the command with one line and exit status 2; "
        "--debug or MLLM_DEBUG=1 shows the traceback. Under accelerate, add --quiet (accelerate launch -q ...) "
        "so the launcher does not add its own traceback.\n"
        "tuners (tuner.type; a method's own fields go in tuner.options):\n"
        + "".join(f"  {name:6s} {summary}\n" for name, summary in tuner_summaries().items())
        + "examples:\n"
        "  accelerate launch -q stages/pretrain.py --config configs/demo/pretrain.yaml\n"
        "  mllm instruct --config configs/demo/instruct.yaml training.learning_rate=1e-4 tuner.r=16\n"
        "  accelerate launch --config_file acc.yaml stages/instruct.py --config my.yaml "
        "training.deepspeed=deepspeed_configs/zero3.json"
    )


def stage_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"mllm {stage}", description=STAGE_HELP[stage], epilog=_schema_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="override config fields, e.g. training.num_train_epochs=3")
    return parser


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    args = stage_parser(stage).parse_args(argv)
    from mllm.config import load_config
    from mllm.train.stages import STAGES

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    STAGES[stage](cfg)
    from mllm.distributed import end_process_group

    end_process_group()
    return 0


#: The stages that train outside the MLLM: command -> (help, "module:config loader", "module:runner", result keys).
SECTIONED_STAGES = {
    "classify": ("Missing-modality classification with a CLIP dual encoder (MoRA's setting: MM-IMDb, "
                 "UPMC-Food101, Hateful Memes; tuners MoRA and the baselines MoRA compares).",
                 "mllm.classify.train:ClassifyConfig", "mllm.classify.train:run_classify",
                 ("dataset", "tuner", "test")),
    "cmml": ("Continual missing-modality learning on ViLT (DeLo's setting: tasks in sequence; result matrix, "
             "average, forgetting, last).",
             "mllm.continual.stage:CmmlConfig", "mllm.continual.stage:run_cmml",
             ("benchmark", "metric", "average", "forgetting", "last")),
}
#: The backbone kind (``mllm.tuners``) each of them adapts: its --help lists the registry's tuners for it.
SECTIONED_STAGE_BACKBONES = {"classify": "clip", "cmml": "vilt"}


def _load(target: str):
    module, name = target.split(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _sections_help(schema) -> str:
    lines = ["config sections (YAML; override any field as section.field=value, values parsed as YAML):"]
    for section in dataclasses.fields(schema):
        default = section.default_factory()
        if dataclasses.is_dataclass(default):
            fields = ", ".join(f"{f.name}={getattr(default, f.name)!r}" for f in dataclasses.fields(default))
        else:
            fields = f"a mapping, default {default!r}"
        lines.append(f"  {section.name}: {fields}")
    return "\n".join(lines)


def sectioned_stage_main(stage: str, argv: list[str] | None = None) -> int:
    text, schema_target, runner_target, keys = SECTIONED_STAGES[stage]
    parser = argparse.ArgumentParser(prog=f"mllm {stage}", description=text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="override config fields, e.g. training.epochs=3")
    if any(a in ("-h", "--help") for a in (argv or [])):
        from mllm.tuners import tuner_names

        parser.epilog = (_sections_help(_load(schema_target)) + "\ntuners (tuner.type): "
                         + ", ".join(tuner_names(SECTIONED_STAGE_BACKBONES[stage])))
    args = parser.parse_args(argv)
    from mllm.config import load_sectioned_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = _load(runner_target)(load_sectioned_config(_load(schema_target), args.config, args.overrides))
    print(json.dumps({key: results[key] for key in keys}))
    return 0


def demo_main(argv: list[str] | None = None) -> int:
    from mllm.demo.run import demo_parser, run_demo

    args = demo_parser().parse_args(argv)
    run_demo(args)
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    try:
        from eval_suites.runner import eval_command
    except ImportError as e:
        print(f"mllm eval: cannot import the evaluation suites ({e}); install from a clone of the repository "
              f"with `pip install -e .`", file=sys.stderr)
        return 2
    return eval_command(argv)  # its user errors reach run_reporting_user_errors: one line, or --debug


def _suite_names() -> str:
    try:
        from eval_suites import SUITES
    except ImportError:   # installed without the repository's eval_suites
        return "see mllm eval --help"
    return ", ".join(SUITES)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": ("Run the whole pipeline (stage 1, stage 2, evaluation) on a tiny model and generated "
                 "data, on a CPU, in minutes.", demo_main),
        "pretrain": (STAGE_HELP["pretrain"], lambda a: stage_main("pretrain", a)),
        "instruct": (STAGE_HELP["instruct"], lambda a: stage_main("instruct", a)),
        **{name: (text, lambda a, name=name: sectioned_stage_main(name, a))
           for name, (text, *_) in SECTIONED_STAGES.items()},
        "eval": ("Generate a benchmark's answers with a checkpoint and score them as the official scripts do, "
                 "or score existing answers (--answers: an answer log or the benchmark's own answer file) "
                 "(suites: {suites}).", eval_main),
        "data": ("Native datasets: convert one to LLaVA JSONL, import MokA's released stage-1 projectors.",
                 lambda a: __import__("mllm.data.command", fromlist=["data_main"]).data_main(a)),
        "push": ("Publish a trained model (adapter, projectors, configs, model card) to the Hugging Face Hub.",
                 lambda a: __import__("mllm.hub", fromlist=["push_main"]).push_main(a)),
        "chat": ("Chat with a checkpoint in the terminal: multi-turn, /image /video /audio /speech PATH, "
                 "streamed answers.",
                 lambda a: __import__("mllm.chat", fromlist=["chat_main"]).chat_main(a)),
        "export": ("Write a self-contained folder of a checkpoint (LLM, encoders, projectors, tokenizer, "
                   "prompt record, card); --merge folds LoRA / DoRA / MoRA into the weights.",
                   lambda a: __import__("mllm.export", fromlist=["export_main"]).export_main(a)),
        "serve": ("Serve a checkpoint over the OpenAI chat-completions API (batched, streamed) with a chat page at /.",
                  lambda a: _extra_command("mllm.serve.app", "serve_main", a)),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mllm <command> [options]\n\ncommands:")
        for name, (text, _) in commands.items():
            # The suite list only when it is shown: finding it imports every suite module.
            print(f"  {name:<10} {text.replace('{suites}', _suite_names())}")
        print("\nRun 'mllm <command> --help' for a command's options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmllm: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    return run_reporting_user_errors(f"mllm {name}", commands[name][1], rest)


def _extra_command(module: str, function: str, argv: list[str]) -> int:
    """A command whose module needs an optional extra (``pip install 'mllm[serve]'``)."""
    import importlib

    try:
        entry = getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise UserError(f"{e}; this command needs the serve extra: pip install 'mllm[serve]'") from None
    return entry(argv)


def run_reporting_user_errors(prog: str, command, argv: list[str]) -> int:
    """Run ``command(argv)``; a :class:`~mllm.errors.UserError` ends it with one line on stderr and
    exit status 2. ``--debug`` (anywhere in argv) or ``MLLM_DEBUG=1`` re-raises it with its traceback.

    Under a launcher (``accelerate launch``, torchrun) every process meets the same error; only
    the first (RANK 0) prints it, so it shows once. ``accelerate launch --quiet`` then passes the
    line through without adding the launcher's own traceback."""
    debug = "--debug" in argv or os.environ.get("MLLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return command(argv)
    except UserError as e:
        if debug:
            raise
        message = " ".join(str(e).split())  # one line, whatever the message held
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
