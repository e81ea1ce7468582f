"""``mllm data``: ``convert`` (a native dataset -> LLaVA JSONL), ``check`` (validate a LLaVA-format
file without training) and ``import-projectors`` (MokA / Crab released stage-1 projectors -> a
projector folder that ``model.pretrained_projectors`` loads)."""

from __future__ import annotations

import argparse
import sys

import yaml

from mllm.config import parse_yaml


def _convert_parser() -> argparse.ArgumentParser:
    from mllm.data.sources import source_options, source_summaries

    epilog = "source types (options with defaults):\n" + "".join(
        f"  {name:<16} {summary}\n{'':<19}options: "
        f"{', '.join(f'{k}={v!r}' for k, v in source_options(name).items()) or 'none'}\n"
        for name, summary in source_summaries().items())
    parser = argparse.ArgumentParser(
        prog="mllm data convert", epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read a dataset in its released layout and write the same records as LLaVA-format JSONL "
                    "(what data.train: {type: TYPE, path: SRC} trains on).")
    parser.add_argument("--from", dest="source_type", required=True, help="source type (listed below)")
    parser.add_argument("src", help="the native file or folder")
    parser.add_argument("out", help="output .jsonl")
    parser.add_argument("--media-root", help="folder the source's media paths are relative to; written paths "
                                             "are then absolute (default: left relative)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a source option (value parsed as YAML); repeatable")
    parser.add_argument("--count", type=int, help="draw this many records (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def convert_main(argv: list[str]) -> int:
    from mllm.data.mixture import build_mixture, format_summary, write_records

    args = _convert_parser().parse_args(argv)
    spec = {"type": args.source_type, "path": args.src, "seed": args.seed}
    if args.media_root:
        spec["media_root"] = args.media_root
    if args.count:
        spec["count"] = args.count
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"mllm data convert: --option {item!r} must look like KEY=VALUE")
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError:
            parsed = value
        # A path template such as {video_id}.mp4 reads as a YAML mapping: keep it as text.
        spec[key] = value if isinstance(parsed, dict) else parsed
    records, summary = build_mixture(spec, where="--from " + args.source_type)
    write_records(records, args.out)
    print(format_summary(summary))
    print(f"wrote {args.out}")
    return 0


def import_projectors_main(argv: list[str]) -> int:
    from mllm.projectors.released import import_released_projectors

    parser = argparse.ArgumentParser(
        prog="mllm data import-projectors",
        description="Convert MokA / Crab released stage-1 projectors (audio_pretrain.bin, visual_pretrain.bin: "
                    "LAVIS BERT Q-Former keys under model.vl_projector. / model.al_projector.) into a projector "
                    "folder (projectors.safetensors + projectors.json) for model.pretrained_projectors. Every "
                    "key is mapped or skipped by name; leftover, missing or misshapen keys stop the import.")
    parser.add_argument("files", nargs="+", help="released .bin files (torch.load with weights_only=True)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-heads", type=int, default=12, help="Q-Former attention heads (BERT-base: 12)")
    args = parser.parse_args(argv)
    projectors = import_released_projectors(args.files, num_heads=args.num_heads)
    from mllm.projectors import save_projectors

    save_projectors(projectors, args.out)
    for name, projector in projectors.items():
        cfg = projector.config
        print(f"{name}: {cfg.num_queries} queries, {cfg.num_layers} layers, encoder width {cfg.encoder_hidden_size}, "
              f"LLM width {cfg.llm_hidden_size}")
    print(f"wrote {args.out}")
    return 0


def check_main(argv: list[str]) -> int:
    from mllm.data.check import check_data

    parser = argparse.ArgumentParser(
        prog="mllm data check",
        description="Check a LLaVA-format JSON / JSONL file as a training run's pre-flight does, without training: "
                    "JSON, turns, placeholder counts against the media, unknown media fields (images, depth, ...), "
                    "media files that exist (and, with --decode, open), and with --config or --max-length the "
                    "tokenised length (text + media tokens) against the context. Prints the records per modality "
                    "and the bad records counted per problem with the first example of each; exit status 1 if any.")
    parser.add_argument("file", help="the data file")
    parser.add_argument("--media-root", help="folder relative media paths start from (as data.media_root)")
    parser.add_argument("--decode", action="store_true", help="also open every media file (slower)")
    parser.add_argument("--checkpoint", help="a trained model's folder: check against its media processor (built "
                                             "from the folder's configs; no model is loaded): media it has no "
                                             "encoder for are bad records, --decode also preprocesses each file as "
                                             "training does, and the tokens per media item are printed")
    length = parser.add_argument_group(
        "length against the context",
        "--config (or --checkpoint) counts as its training run would, through its media processor (no model is "
        "loaded: tokenizer, template, media tokens per item; the limit is data.max_length, else the LLM's "
        "max_position_embeddings; a native backbone's images and videos, whose token counts vary per item, count as "
        "one token). Without either give --max-length, --tokenizer and --media-tokens for each media field used.")
    length.add_argument("--config", help="an experiment YAML (as mllm pretrain / instruct take)")
    length.add_argument("--max-length", type=int, help="the context limit in tokens (overrides the config's)")
    length.add_argument("--tokenizer", help="tokenizer folder or hub name (default: the config's model.llm)")
    length.add_argument("--media-tokens", action="append", default=[], metavar="FIELD=N",
                        help="sequence positions one item of FIELD (image, video, audio, speech) becomes; repeatable")
    length.add_argument("--template", help="prompt template (default: the config's data.template, else auto; a "
                                           "stage-1 run renders auto as plain)")
    args = parser.parse_args(argv)
    media_fields = loaders = processor = cfg = None
    if args.config:
        from mllm.config import load_config

        cfg = load_config(args.config)
    if args.checkpoint or cfg is not None:
        from mllm.data.processor import MediaProcessor

        processor = (MediaProcessor.from_pretrained(args.checkpoint) if args.checkpoint
                     else MediaProcessor.from_config(cfg.model))
    if processor is not None:
        specs = processor.media_specs()
        media_fields = {spec.field for spec in specs.values()}
        loaders = {spec.field: spec.load_item for spec in specs.values()}
    wants_length = args.config or args.max_length or args.tokenizer or args.media_tokens
    limit = _length_limit(args, parser, processor, cfg) if wants_length else None
    report = check_data(args.file, media_root=args.media_root, on_bad_sample="skip", decode=args.decode,
                        media_fields=media_fields, loaders=loaders, length_limit=limit)
    print(report.summary())
    if args.checkpoint:
        counts = ", ".join(f"{ph} {spec.num_tokens if spec.item_tokens is None else 'per item'}"
                           for ph, spec in specs.items())
        print(f"{args.checkpoint}: tokens per media item: {counts or 'none (text only)'}")
    for reason, count in report.skipped.most_common():
        print(f"  {count:>6}  {reason}: e.g. {report.examples[reason]}")
    return 1 if report.skipped else 0


def _length_limit(args, parser: argparse.ArgumentParser, processor=None, cfg=None):
    """The LengthLimit ``mllm data check`` measures against, from the config's or checkpoint's media
    processor and / or the explicit options."""
    from mllm.data.check import LengthLimit

    tokenizer = media_tokens = max_length = None
    template, system_prompt = args.template, None
    if processor is not None:
        from transformers import AutoConfig

        tokenizer = processor.tokenizer
        media_tokens = {spec.field: spec.num_tokens if spec.item_tokens is None else 1
                        for spec in processor.media_specs().values()}
        model_cfg = processor.config
        try:
            llm_config = AutoConfig.from_pretrained(model_cfg.llm, trust_remote_code=model_cfg.trust_remote_code)
            max_length = getattr(llm_config.get_text_config(), "max_position_embeddings", None)
        except (OSError, ValueError):
            max_length = None   # the LLM's config is not at hand: --max-length is then needed
    if cfg is not None:
        max_length = cfg.data.max_length or max_length
        template = template or cfg.data.template   # stage 1 renders 'auto' as plain: pass --template plain
        system_prompt = cfg.data.system_prompt
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    for item in args.media_tokens:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            parser.error(f"--media-tokens {item!r} must look like FIELD=N (e.g. image=32)")
        media_tokens = {**(media_tokens or {}), name: int(count)}
    max_length = args.max_length or max_length
    if tokenizer is None or max_length is None:
        parser.error("the length check needs --config, or --max-length with --tokenizer (or --checkpoint)")
    return LengthLimit(max_length=max_length, tokenizer=tokenizer, media_tokens=media_tokens or {},
                       template=template or "auto", system_prompt=system_prompt)


COMMANDS = {
    "convert": ("Write a native dataset (MokA's MUSIC-AVQA / AVE, LLaVA-Pretrain, mix665k, AudioCaps, Clotho, "
                "WavCaps, LibriSpeech) as LLaVA-format JSONL.", convert_main),
    "check": ("Check a LLaVA-format file (fields, placeholders, media present and readable, lengths against the "
              "context) and count problems.",
              check_main),
    "import-projectors": ("Convert MokA / Crab released stage-1 projectors into a projector folder.",
                          import_projectors_main),
}


def data_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: mllm data <command> [options]\n\ncommands:")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<18} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmllm data: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]][1](argv[1:])
