"""LLaVA-format files as sources: any LLaVA-style JSON / JSONL (image and video caption sets
included), LLaVA-Pretrain-558K and LLaVA-1.5's mix665k.

LLaVA-Pretrain (``blip_laion_cc_sbu_558k.json``): ``{id, image: "00453/004539375.jpg",
conversations: [human with <image> before or after the instruction, gpt caption]}``, exactly two
turns; its ``_meta.json`` (``id, image, blip_caption, url``) becomes caption records too.
mix665k (``llava_v1_5_mix665k.json``): multi-turn, ``image`` with its folder
(``coco/train2017/...``), text-only ShareGPT records without ``image`` (and with ``"model": ""``).
As LLaVA's preprocessing does, a leading turn that is not the human's is dropped.
"""

from __future__ import annotations

from typing import Iterator

from mllm.data.schema import RecordError
from mllm.data.sources import register_source
from mllm.data.sources.base import Located, Source, conversation, json_list, require_fields

PRETRAIN_META_PROMPT = "<image>\nRender a clear and concise summary of the photo."


def _drop_leading_non_human(where: str, item: dict) -> dict:
    turns = item.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get("from") != "human":
        item = {**item, "conversations": turns[1:]}
        if not item["conversations"]:
            raise RecordError(where, "no turns left after dropping the leading non-human turn")
    return item


@register_source
class Llava(Source):
    name = "llava"
    summary = "LLaVA-style JSON list or JSONL (the project's own format; image / video caption sets)"

    def read(self, path: str) -> Iterator[Located]:
        for where, item in json_list(path):
            require_fields(where, item, ("conversations",))
            yield where, _drop_leading_non_human(where, item)


@register_source
class LlavaPretrain(Source):
    name = "llava_pretrain"
    summary = ("LLaVA-Pretrain-558K: blip_laion_cc_sbu_558k.json (two turns, <image> + BLIP caption) or its "
               "_meta.json (id, image, blip_caption, url)")

    def read(self, path: str) -> Iterator[Located]:
        for where, item in json_list(path):
            require_fields(where, item, ("id", "image"))
            if "conversations" not in item and "blip_caption" in item:
                yield where, {"id": str(item["id"]), "image": item["image"],
                              "conversations": conversation(PRETRAIN_META_PROMPT, item["blip_caption"])}
                continue
            require_fields(where, item, ("id", "image", "conversations"))
            turns = item["conversations"]
            if not (isinstance(turns, list) and len(turns) == 2):
                raise RecordError(where, f"record '{item['id']}': LLaVA-Pretrain records have exactly 2 turns, "
                                         f"found {len(turns) if isinstance(turns, list) else turns!r}")
            yield where, item


@register_source
class LlavaInstruct(Source):
    name = "llava_instruct"
    summary = ("LLaVA-Instruct-150K / llava_v1_5_mix665k.json: multi-turn, with or without an image "
               "(text-only ShareGPT records)")

    def read(self, path: str) -> Iterator[Located]:
        for where, item in json_list(path):
            require_fields(where, item, ("id", "conversations"))
            item = _drop_leading_non_human(where, item)
            # Text-only records carry "model": "" (a ShareGPT field), meaningless here.
            if item.get("model") == "":
                item = {k: v for k, v in item.items() if k != "model"}
            yield where, item
