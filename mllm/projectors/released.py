"""MokA's / Crab's released stage-1 projectors (``huggingface.co/ahsgdxhs/Crab``:
``visual_pretrain.bin``, ``audio_pretrain.bin``) into this project's ``QFormerProjector``.

Each file is a plain ``{parameter name: tensor}`` dict of Crab's ``UnifiedForCausalLM``: a LAVIS
BERT Q-Former and its neighbours under ``model.vl_projector.`` (visual) or ``model.al_projector.``
(audio), plus the LLM's ``model.embed_tokens.weight`` (another vocabulary). The key map is
explicit and strict: every key is either mapped (shapes checked against the target projector) or
skipped because its name is on the list of parts the projector never uses (BERT word / position
embeddings, the text FFN, the MLM head, the embedding table); any other key, and any projector
parameter that no key fills, stops the import with an error naming them.

SALMONN's speech Q-Former (``salmonn_v1.pth``, ``salmonn_7b_v0.pth``) does not map, and such a file
is refused with a line saying why (:func:`salmonn_mismatch`). Its Q-Former layers carry the same
LAVIS names (the renames below would fit them), but around them: (1) its input is Whisper and
BEATs features concatenated per frame (1280 + 768 = 2048 wide), each normalised by its own
LayerNorm (``ln_speech``, ``ln_audio``) first, where a projector here reads one encoder's
features through one LayerNorm (a LayerNorm over the 2048 concatenated channels is another
function, and this project has no fused Whisper + BEATs input); (2) it projects with one Linear
(``speech_llama_proj``, 768 -> LLM width), where a projector here has Linear-GELU-Linear. Its
window scheme (17 Whisper frames, stride 17, one query per window) would map (``window_size``,
``window_stride``, ``num_queries``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mllm.projectors import compare_state, copy_state
from mllm.projectors.config import ProjectorConfig
from mllm.projectors.qformer import QFormerProjector

# Crab module prefix and attribute stem per modality of this project.
RELEASED_PREFIXES = {"visual": ("model.vl_projector.", "visual"), "audio": ("model.al_projector.", "audio")}
EMBED_TOKENS = "model.embed_tokens.weight"

def released_key_map(modality: str, num_layers: int) -> dict[str, str]:
    """Released key -> ``QFormerProjector`` key, for a Q-Former of ``num_layers`` layers: the renames
    transformers' BLIP-2 converter applies to LAVIS checkpoints, plus MokA's LayerNorm, queries
    and MLP."""
    prefix, stem = RELEASED_PREFIXES[modality]
    p, bert = f"{prefix}{stem}_", f"{prefix}{stem}_Qformer.bert."
    key_map = {f"{p}query_tokens": "query_tokens", f"{p}ln.weight": "encoder_norm.weight",
               f"{p}ln.bias": "encoder_norm.bias"}
    for wb in ("weight", "bias"):
        key_map[f"{bert}embeddings.LayerNorm.{wb}"] = f"qformer.layernorm.{wb}"
        key_map[f"{p}proj.0.{wb}"] = f"mlp.0.{wb}"
        key_map[f"{p}proj.2.{wb}"] = f"mlp.2.{wb}"
        for i in range(num_layers):
            src, dst = f"{bert}encoder.layer.{i}.", f"qformer.encoder.layer.{i}."
            for block in ("attention", "crossattention"):
                for name in ("query", "key", "value"):
                    key_map[f"{src}{block}.self.{name}.{wb}"] = f"{dst}{block}.attention.{name}.{wb}"
                for name in ("dense", "LayerNorm"):
                    key_map[f"{src}{block}.output.{name}.{wb}"] = f"{dst}{block}.output.{name}.{wb}"
            key_map[f"{src}intermediate_query.dense.{wb}"] = f"{dst}intermediate_query.dense.{wb}"
            for name in ("dense", "LayerNorm"):
                key_map[f"{src}output_query.{name}.{wb}"] = f"{dst}output_query.{name}.{wb}"
    return key_map


def released_unused_keys(modality: str, num_layers: int) -> set[str]:
    """Keys the released files hold that the forward pass never uses (queries only, no text input):
    skipped by name, and only these."""
    prefix, stem = RELEASED_PREFIXES[modality]
    q = f"{prefix}{stem}_Qformer."
    unused = {f"{q}bert.embeddings.word_embeddings.weight", f"{q}bert.embeddings.position_embeddings.weight",
              f"{q}bert.embeddings.position_ids", f"{q}cls.predictions.bias", f"{q}cls.predictions.decoder.weight",
              f"{q}cls.predictions.decoder.bias"}
    for wb in ("weight", "bias"):
        unused |= {f"{q}cls.predictions.transform.dense.{wb}", f"{q}cls.predictions.transform.LayerNorm.{wb}"}
        for i in range(num_layers):  # the text FFN
            layer = f"{q}bert.encoder.layer.{i}."
            unused |= {f"{layer}intermediate.dense.{wb}", f"{layer}output.dense.{wb}", f"{layer}output.LayerNorm.{wb}"}
    return unused


def _user_error(message: str) -> Exception:
    from mllm.projectors import ProjectorCheckpointError

    return ProjectorCheckpointError(message)


def read_released_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of one released ``.bin`` (``torch.load`` with ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise _user_error(f"{path}: released projector file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused by weights_only, truncated file, not a torch file
        raise _user_error(f"{path}: not a loadable weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # checkpoints that wrap the weights in {"model": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _user_error(f"{path}: expected a dict of parameter name -> tensor")
    return state


SALMONN_PREFIX = "speech_Qformer."


def salmonn_mismatch(state: dict[str, torch.Tensor]) -> str:
    """Why a SALMONN state dict cannot become a ``QFormerProjector``, from the tensors it holds."""
    reasons = []
    if "ln_speech.weight" in state and "ln_audio.weight" in state:
        speech, audio = state["ln_speech.weight"].shape[0], state["ln_audio.weight"].shape[0]
        reasons.append(f"its Q-Former reads Whisper and BEATs features concatenated per frame ({speech} + {audio} = "
                       f"{speech + audio} wide), each through its own LayerNorm (ln_speech, ln_audio), where a "
                       f"projector here reads one encoder through one LayerNorm")
    if "speech_llama_proj.weight" in state:
        shape = tuple(state["speech_llama_proj.weight"].shape)
        reasons.append(f"it projects with one Linear (speech_llama_proj {shape}) where a projector here has "
                       f"Linear-GELU-Linear")
    return "; ".join(reasons) or "its keys around the Q-Former are not MokA / Crab's"


def map_released_state(state: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{modality: {QFormerProjector key: tensor}}: every key of ``state`` mapped or skipped by name,
    every mapped key present; otherwise an error naming the keys left over or missing."""
    if any(key.startswith(SALMONN_PREFIX) for key in state):
        raise _user_error(f"{where}: a SALMONN checkpoint (speech_Qformer.*) does not map onto this project's "
                          f"projector: {salmonn_mismatch(state)}")
    mapped: dict[str, dict[str, torch.Tensor]] = {}
    used = {EMBED_TOKENS}  # the LLM's input table (another vocabulary): never a projector's
    missing = []
    for modality, (prefix, stem) in RELEASED_PREFIXES.items():
        layer_keys = [k for k in state if k.startswith(f"{prefix}{stem}_Qformer.bert.encoder.layer.")]
        if not any(k.startswith(prefix) for k in state):
            continue
        num_layers = len({k.split(".encoder.layer.")[1].split(".")[0] for k in layer_keys})
        key_map = released_key_map(modality, num_layers)
        missing += [k for k in key_map if k not in state]
        mapped[modality] = {dst: state[src] for src, dst in key_map.items() if src in state}
        used |= set(key_map) | released_unused_keys(modality, num_layers)
    leftover = sorted(set(state) - used)
    if leftover or missing:
        raise _user_error(f"{where}: not a MokA / Crab released projector as expected: keys left over "
                          f"{leftover[:6]}{' ...' if len(leftover) > 6 else ''}, missing "
                          f"{sorted(missing)[:6]}{' ...' if len(missing) > 6 else ''}")
    if not mapped:
        raise _user_error(f"{where}: no model.vl_projector. / model.al_projector. keys")
    return mapped


def config_from_mapped(tensors: dict[str, torch.Tensor], num_heads: int = 12) -> ProjectorConfig:
    """The projector sizes the released tensors imply."""
    def shape(key):
        if key not in tensors:
            raise _user_error(f"released projector lacks '{key}' (in this project's names)")
        return tensors[key].shape

    layers = {k.split(".")[3] for k in tensors if k.startswith("qformer.encoder.layer.")}
    _, num_queries, hidden = shape("query_tokens")
    return ProjectorConfig(
        num_queries=num_queries, hidden_size=hidden, num_layers=len(layers), num_heads=num_heads,
        intermediate_size=shape("qformer.encoder.layer.0.intermediate_query.dense.weight")[0],
        encoder_hidden_size=shape("encoder_norm.weight")[0], llm_hidden_size=shape("mlp.0.weight")[0])


def load_mapped(projector: QFormerProjector, tensors: dict[str, torch.Tensor], modality: str, where: str) -> None:
    """Copy mapped tensors into ``projector``: every parameter filled, every shape equal."""
    missing, extra, misshapen = compare_state(projector, tensors)
    if missing or extra:
        raise _user_error(
            f"{where}: the {modality} projector does not match the released one: its parameters "
            f"{missing[:6]} get no tensor, the released {extra[:6]} have no parameter "
            f"(a different number of Q-Former layers?)")
    if misshapen:
        key, got, want = misshapen[0]
        raise _user_error(
            f"{where}: {modality} '{key}' has shape {got} but the {modality} "
            f"projector expects {want} (another encoder, LLM width or projector size)")
    copy_state(projector, tensors)


def released_files(value) -> list[str] | None:
    """The released files ``model.pretrained_projectors`` names (a file or a list of files), or
    None when it names a projector folder of this project."""
    if isinstance(value, (list, tuple)):
        return [os.fspath(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        return [os.fspath(value)]
    return None


def _mapped_by_modality(paths: list[str]) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    found: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for path in paths:
        for modality, tensors in map_released_state(read_released_file(path), path).items():
            if modality in found:
                raise _user_error(f"{path}: a {modality} projector was already read from {found[modality][0]}")
            found[modality] = (path, tensors)
    return found


def load_released_projectors(projectors: nn.ModuleDict, paths: list[str]) -> None:
    """Fill the model's projectors from released files; each of the model's modalities must come
    from exactly one file, and every file's projector must belong to one of them."""
    found = _mapped_by_modality(paths)
    unknown = sorted(set(found) - set(projectors))
    if unknown:
        raise _user_error(f"{found[unknown[0]][0]}: holds a {unknown[0]} projector but the model has no "
                          f"{unknown[0]} encoder (it has: {sorted(projectors)})")
    missing = sorted(set(projectors) - set(found))
    if missing:
        raise _user_error(f"model.pretrained_projectors {paths}: no released projector for {missing}")
    for modality, (path, tensors) in found.items():
        load_mapped(projectors[modality], tensors, modality, path)


def import_released_projectors(paths: list[str], num_heads: int = 12) -> nn.ModuleDict:
    """New projectors built from the released files' shapes and filled from them."""
    projectors = nn.ModuleDict()
    for modality, (path, tensors) in _mapped_by_modality(paths).items():
        projectors[modality] = QFormerProjector(config_from_mapped(tensors, num_heads))
        load_mapped(projectors[modality], tensors, modality, path)
    return projectors
