"""Missing-modality classification: config, batches with simulated missing modalities, training
with early stopping on the validation metric, and test scoring (``stages/classify.py``).

Missing modalities follow MMP / DCP in training and testing alike: each split has its own saved,
seeded table (``missing.py``); a missing image becomes the configured fill -- ``white`` (a white
image before preprocessing; MoRA / RebQ) or ``ones`` (an all-ones tensor after normalisation; MMP,
and the paper's "all-1 matrix") -- and a missing text the empty string.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mllm.checkpoint import ADAPTER_DIR, MISSING_TABLES_DIR, RESULTS_FILE, TRAINABLE_WEIGHTS
from mllm.classify.datasets import NUM_CLASSES, Sample, read_split
from mllm.classify.missing import IMAGE_MISSING, TEXT_MISSING, MissingSpec, load_or_make_missing_table
from mllm.classify.model import MissingModalityClassifier, prepare_clip_for_tuner
from mllm.config import load_sectioned_config
from mllm.metrics.classification import DATASET_METRICS, score

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ModelSection:
    backbone: str = "openai/clip-vit-base-patch16"    # HF id or local path (model + tokenizer)
    tokenizer: str | None = None                      # default: the backbone


@dataclass
class TunerSection:
    type: str = "mora"                                # a tuner registered for CLIP (mllm.tuners.tuner_names)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MissingSection:
    ratio: float = 0.7
    type: str = "both"
    both_ratio: float = 0.5


@dataclass
class DataSection:
    dataset: str = "food101"                          # mmimdb | food101 | hateful_memes
    root: str = ""
    num_classes: int | None = None                    # default: the dataset's (23 / 101 / 2); generated data
    max_text_len: int = 77
    image_fill: str = "white"                         # white | ones
    cache_images: bool = False                        # keep preprocessed images in memory (small data only)
    table_dir: str | None = None                      # default: <output_dir>/missing_tables
    seed: int = 0                                     # missing tables' seed (split index is added)
    train_missing: MissingSection = field(default_factory=MissingSection)
    val_missing: MissingSection = field(default_factory=MissingSection)
    test_missing: MissingSection = field(default_factory=MissingSection)


@dataclass
class TrainingSection:
    output_dir: str = "runs/classify"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 2e-2
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_ratio: float = 0.1
    patience: int = 20
    seed: int = 0
    device: str = "auto"


@dataclass
class ClassifyConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tuner: TunerSection = field(default_factory=TunerSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)


def load_classify_config(path: str | None, overrides: list[str] = ()) -> ClassifyConfig:
    """YAML file plus ``section.field=value`` overrides, read by the project's one config loader."""
    return load_sectioned_config(ClassifyConfig, path, list(overrides))


# -- data ---------------------------------------------------------------------------------------------
def preprocess_image(image, size: int) -> torch.Tensor:
    """CLIP preprocessing: bicubic resize of the short side, centre crop, normalise."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class MissingModalityDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], table: np.ndarray, image_size: int, image_fill: str,
                 cache_images: bool = False):
        if image_fill not in ("white", "ones"):
            raise ValueError(f"image_fill must be 'white' or 'ones', got {image_fill!r}")
        self.samples, self.table, self.image_size, self.image_fill = samples, table, image_size, image_fill
        # index -> preprocessed pixels; None: decode every time (the default, for real datasets).
        self.cache: dict[int, torch.Tensor] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        sample = self.samples[index]
        code = int(self.table[sample.group])
        if code == IMAGE_MISSING:
            if self.image_fill == "ones":
                pixels = torch.ones(3, self.image_size, self.image_size)
            else:
                pixels = preprocess_image(Image.new("RGB", (self.image_size, self.image_size), "white"),
                                          self.image_size)
        elif self.cache is not None and index in self.cache:
            pixels = self.cache[index]
        else:
            with Image.open(sample.image) as image:
                pixels = preprocess_image(image, self.image_size)
            if self.cache is not None:
                self.cache[index] = pixels
        text = "" if code == TEXT_MISSING else sample.text
        return {"pixel_values": pixels, "text": text, "label": sample.label, "missing": code}


def collate(tokenizer, max_len: int, multilabel: bool):
    def fn(items: list[dict]) -> dict:
        tokens = tokenizer([it["text"] for it in items], padding="max_length", truncation=True,
                           max_length=max_len, return_tensors="pt")
        labels = torch.tensor([it["label"] for it in items], dtype=torch.float32 if multilabel else torch.long)
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"], "labels": labels,
                "missing": torch.tensor([it["missing"] for it in items])}
    return fn


def load_split(cfg: ClassifyConfig, split: str, image_size: int) -> MissingModalityDataset:
    data = cfg.data
    samples = read_split(data.dataset, data.root, split)
    section = getattr(data, f"{split}_missing")
    offset = {"train": 0, "val": 1, "test": 2}[split]
    spec = MissingSpec(ratio=section.ratio, type=section.type, both_ratio=section.both_ratio, seed=data.seed + offset)
    table_dir = data.table_dir or os.path.join(cfg.training.output_dir, MISSING_TABLES_DIR)
    groups = max((s.group for s in samples), default=-1) + 1
    table = load_or_make_missing_table(os.path.join(table_dir, spec.file_name(data.dataset, split)), groups, spec)
    return MissingModalityDataset(samples, table, image_size, data.image_fill, data.cache_images)


# -- training -------------------------------------------------------------------------------------------
def build_classifier(cfg: ClassifyConfig) -> MissingModalityClassifier:
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(cfg.model.backbone)
    for param in clip.parameters():
        param.requires_grad_(False)
    clip = prepare_clip_for_tuner(clip, cfg.tuner.type, cfg.tuner.options)
    return MissingModalityClassifier(clip, cfg.data.num_classes or NUM_CLASSES[cfg.data.dataset])


def evaluate(model: nn.Module, loader, dataset: str, device) -> dict:
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                batch["pixel_values"].to(device)).float().cpu())
            labels.append(batch["labels"])
    return score(dataset, torch.cat(logits).numpy(), torch.cat(labels).numpy())


def run_classify(cfg: ClassifyConfig) -> dict:
    """Train on ``train``, keep the best epoch on ``val``, score it on ``test``; returns the results."""
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.training.seed)
    dataset = cfg.data.dataset
    multilabel = DATASET_METRICS[dataset][1] == "multilabel"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.training.device == "auto"
                          else cfg.training.device)
    model = build_classifier(cfg).to(device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.backbone)
    image_size = model.backbone.config.vision_config.image_size
    make = lambda split, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        load_split(cfg, split, image_size), batch_size=cfg.training.batch_size, shuffle=shuffle,
        collate_fn=collate(tokenizer, cfg.data.max_text_len, multilabel),
        generator=torch.Generator().manual_seed(cfg.training.seed))
    train, val, test = make("train", True), make("val", False), make("test", False)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay,
                                  betas=tuple(cfg.training.betas), eps=1e-8)
    total = max(1, cfg.training.epochs * len(train))
    warmup = int(cfg.training.warmup_ratio * total)
    # Linear warmup then cosine annealing (paper A.3).
    schedule = lambda step: (step + 1) / max(1, warmup) if step < warmup else \
        0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()

    os.makedirs(cfg.training.output_dir, exist_ok=True)
    best, best_state, stale, history = -math.inf, None, 0, []
    for epoch in range(cfg.training.epochs):
        model.train()
        for batch in train:
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                           batch["pixel_values"].to(device))
            loss = loss_fn(logits, batch["labels"].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        result = evaluate(model, val, dataset, device)
        history.append({"epoch": epoch, "loss": loss.item(), "val": result})
        logger.info("epoch %d loss %.4f val %s %.4f", epoch, loss.item(), result["metric"], result["value"])
        if result["value"] > best:
            best, stale = result["value"], 0
            best_state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            stale += 1
            if stale >= cfg.training.patience:
                break
    if best_state is not None:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in best_state.items():
                named[name].copy_(value)
    results = {"dataset": dataset, "tuner": cfg.tuner.type, "val_best": best,
               "trainable_params": sum(p.numel() for p in params),
               "test": evaluate(model, test, dataset, device), "history": history, "config": asdict(cfg)}
    _save(model, cfg, results)
    return results


def _save(model: MissingModalityClassifier, cfg: ClassifyConfig, results: dict) -> None:
    from safetensors.torch import save_file

    out = cfg.training.output_dir
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if hasattr(model.clip, "save_pretrained") and hasattr(model.clip, "peft_config"):
        model.clip.save_pretrained(os.path.join(out, ADAPTER_DIR))   # peft adapter (shared factors once)
        trainable = {n: v for n, v in trainable.items() if n.startswith("head.")}
    save_file(trainable, os.path.join(out, TRAINABLE_WEIGHTS))
    with open(os.path.join(out, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2, default=str)
