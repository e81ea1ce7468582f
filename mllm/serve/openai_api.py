"""OpenAI chat-completions requests -> messages with placeholders, media items and sampling settings.

Content parts accepted in a user message (any order, any number):

* ``{"type": "text", "text": "..."}``
* ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (``detail`` ignored);
  ``http(s)://`` URLs only when the server allows remote media, ``file://`` URLs and plain paths
  only under ``--media-root``
* ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}`` (wav, flac,
  mp3, ogg); the clip goes to the audio encoder, or to the speech encoder when the model has no
  audio one; ``"modality": "speech"`` in ``input_audio`` picks the speech encoder
* ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`` (vLLM's shape; the
  same URL rules as images); frames are sampled as in training (``model.video_frames``)
* ``{"type": "audio_url", "audio_url": {"url": ...}}`` (vLLM / lmms-eval) like ``input_audio``

Media go where the text has placeholders (``<image>``, ``<video>``, ``<audio>``, ``<speech>``;
their number must match the parts); a message without placeholders gets one placeholder line
per media part before its text, as in the training records (``<image>\\nWhat ...``).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from mllm.data.media import MediaError
from mllm.modality import MEDIA_FIELDS
from mllm.serve.engine import SamplingParams
from mllm.serve.inputs import InputError, placeholder_counts

AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
MEDIA_PARTS = {"image_url": "image", "video_url": "video", "input_audio": "audio", "audio_url": "audio"}
KNOWN_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class MediaRef:
    """One media part: its bytes (sent inline), a file under the media root, or a remote URL
    (fetched when the request is prepared, off the event loop: ``fetch_remote``)."""

    field: str              # image | video | audio | speech
    where: str              # "messages[1].content[2]" for error messages
    data: bytes | None = None
    path: str | None = None
    url: str | None = None


@dataclass
class ParsedRequest:
    messages: list[dict]
    media: list[MediaRef]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


@dataclass
class MediaPolicy:
    media_root: str | None = None
    allow_remote: bool = False
    remote_timeout_s: float = 10.0
    max_remote_bytes: int = 32 << 20
    audio_field: str = "audio"          # where input_audio goes by default ("speech" for speech-only models)
    fields: tuple[str, ...] = field(default_factory=tuple)   # media fields the model takes


def _bad(message: str, param: str | None = None, kind: str = "invalid_request") -> InputError:
    return InputError(message, kind, 400, param)


def parse_chat_request(body, policy: MediaPolicy, default_max_tokens: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    n = body.get("n", 1)
    if n not in (1, None):
        raise _bad(f"n={n!r}: this server returns one choice per request (n=1)", "n")
    out_messages, media = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise _bad(f"messages[{i}].role {role!r} is not supported (use one of {', '.join(KNOWN_ROLES)})",
                       f"messages[{i}].role")
        role = "system" if role == "developer" else role
        text, refs = _content(message.get("content"), f"messages[{i}]", role, policy)
        media += refs
        out_messages.append({"role": role, "content": text})
    return ParsedRequest(out_messages, media, _sampling(body, default_max_tokens), stream=bool(body.get("stream")),
                         include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
                         model=body.get("model"))


def _content(content, where: str, role: str, policy: MediaPolicy) -> tuple[str, list[MediaRef]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts, refs = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{at}.text must be a string", at)
            texts.append(part["text"])
        elif kind in MEDIA_PARTS:
            if role != "user":
                raise _bad(f"{at}: media parts belong in user messages, not {role}", at, "unknown_content_part")
            refs.append(_media_ref(kind, part, at, policy))
        else:
            raise _bad(f"{at}: unknown content part type {kind!r} (this server takes text, image_url, input_audio, "
                       f"audio_url, video_url)", at, "unknown_content_part")
    text = "\n".join(texts)
    if refs and not placeholder_counts(text):
        text = "".join(MEDIA_FIELDS[ref.field] + "\n" for ref in refs) + text
    else:
        _check_placeholders_match(text, refs, where)
    return text, refs


def _check_placeholders_match(text: str, refs: list[MediaRef], where: str) -> None:
    counts = placeholder_counts(text)
    attached: dict[str, int] = {}
    for ref in refs:
        attached[ref.field] = attached.get(ref.field, 0) + 1
    for name in sorted(set(counts) | set(attached)):
        if counts.get(name, 0) != attached.get(name, 0):
            raise _bad(f"{where}: the text has {counts.get(name, 0)} {MEDIA_FIELDS[name]} placeholder(s) but "
                       f"{attached.get(name, 0)} {name} part(s) are attached", where, "placeholder_mismatch")


def _media_ref(kind: str, part: dict, at: str, policy: MediaPolicy) -> MediaRef:
    body = part.get(kind)
    field_name = MEDIA_PARTS[kind]
    if kind == "input_audio":
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            raise _bad(f"{at}.input_audio must be {{'data': '<base64>', 'format': 'wav'}}", at)
        if body.get("format", "wav") not in AUDIO_FORMATS:
            raise _bad(f"{at}.input_audio.format {body.get('format')!r}: use one of {', '.join(AUDIO_FORMATS)}", at)
        field_name = _audio_field(body.get("modality"), at, policy)
        return MediaRef(field_name, at, data=_base64(body["data"], at))
    url = body.get("url") if isinstance(body, dict) else body if isinstance(body, str) else None
    if not isinstance(url, str) or not url:
        raise _bad(f"{at}.{kind} must be {{'url': '...'}}", at)
    if field_name == "audio":
        field_name = _audio_field(body.get("modality") if isinstance(body, dict) else None, at, policy)
    return _resolve_url(url, field_name, at, policy)


def _audio_field(modality, at: str, policy: MediaPolicy) -> str:
    if modality is None:
        return policy.audio_field
    if modality not in ("audio", "speech"):
        raise _bad(f"{at}: modality {modality!r} must be 'audio' or 'speech'", at)
    return modality


def _base64(text: str, at: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{at}: not valid base64 data", "undecodable_media", 400, at) from None


def _resolve_url(url: str, field_name: str, at: str, policy: MediaPolicy) -> MediaRef:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise InputError(f"{at}: a data URL must be base64 (data:<type>;base64,...)", "undecodable_media", 400, at)
        return MediaRef(field_name, at, data=_base64(payload, at))
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise InputError(f"{at}: {scheme} URLs are refused; send the media as a base64 data URL (or start the "
                             f"server with --allow-remote-media)", "remote_media_refused", 400, at)
        return MediaRef(field_name, at, url=url)
    if scheme in ("file", ""):
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
        return MediaRef(field_name, at, path=_local_path(path, at, policy))
    raise _bad(f"{at}: URL scheme {scheme!r} is not supported (data:, http(s):, file:)", at)


def _local_path(path: str, at: str, policy: MediaPolicy) -> str:
    if policy.media_root is None:
        raise InputError(f"{at}: local file paths are refused; start the server with --media-root DIR to allow "
                         f"files under DIR", "local_media_refused", 403, at)
    root = os.path.realpath(policy.media_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise InputError(f"{at}: {path} lies outside the media root", "local_media_refused", 403, at)
    if not os.path.isfile(full):
        raise InputError(f"{at}: {path}: no such file under the media root", "undecodable_media", 400, at)
    return full


def fetch_remote(ref: MediaRef, policy: MediaPolicy) -> bytes:
    """The bytes of a remote media part (``ref.url``, allowed by the policy when parsed)."""
    try:
        with urllib.request.urlopen(ref.url, timeout=policy.remote_timeout_s) as response:
            data = response.read(policy.max_remote_bytes + 1)
    except OSError as e:
        raise InputError(f"{ref.where}: cannot fetch {ref.url}: {e}", "undecodable_media", 400, ref.where) from None
    if len(data) > policy.max_remote_bytes:
        raise InputError(f"{ref.where}: {ref.url} is larger than {policy.max_remote_bytes} bytes", "request_too_large",
                         413, ref.where)
    return data


def _sampling(body: dict, default_max_tokens: int) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise _bad(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise _bad(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a string or a list of at most 4 non-empty strings", "stop")
    min_tokens = body.get("min_tokens", 0) or 0      # vLLM's extra parameter
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_tokens:
        raise _bad(f"min_tokens must be an integer in [0, max_tokens], got {min_tokens!r}", "min_tokens")
    return SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), stop=stop,
                          min_tokens=min_tokens)


__all__ = ["MediaPolicy", "MediaRef", "ParsedRequest", "fetch_remote", "parse_chat_request", "MediaError"]
