"""An OpenAI chat-completions request body -> conversation messages and decoding settings."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from mmfuse.generation import GenerationConfig
from mmfuse.serve.errors import APIError
from mmfuse.serve.media import MediaLimits, audio_from_input, image_from_url

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class RequestLimits:
    """Per-request bounds (from the server config)."""

    max_tokens: int = 512
    max_n: int = 8
    max_messages: int = 64
    max_media_parts: int = 2
    max_stop: int = 4


@dataclass
class ChatRequest:
    """What the server needs from one request.

    Attributes:
        model: the model name asked for.
        messages: conversation-schema messages; media parts carry ``data`` bytes.
        choices: one decoding config per choice (``n`` of them; seeds ``seed + i``).
        stop: strings that end a choice (not included in its text).
        stream: answer as server-sent events.
        include_usage: add a usage chunk at the end of a stream.
    """

    model: str
    messages: list[dict]
    choices: list[GenerationConfig]
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_request(
    body: Any, media: MediaLimits, limits: RequestLimits, default_max_tokens: int
) -> ChatRequest:
    """Validates ``body`` (parsed JSON); every problem is an ``APIError`` naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", "model")
    messages = _messages(body.get("messages"), media, limits)
    n = _integer(body, "n", 1, 1, limits.max_n)
    # the current OpenAI name wins over the older one
    new_name = body.get("max_completion_tokens") is not None
    name = "max_completion_tokens" if new_name else "max_tokens"
    default_tokens = min(default_max_tokens, limits.max_tokens)
    max_tokens = _integer(body, name, default_tokens, 1, limits.max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, 0, 1_000_000)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise APIError(400, "'seed' must be a non-negative integer", "seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    base = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return ChatRequest(
        model=model,
        messages=messages,
        choices=[replace(base, seed=seed + i) for i in range(n)],
        stop=_stop(body.get("stop"), limits),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _messages(raw: Any, media: MediaLimits, limits: RequestLimits) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    if len(raw) > limits.max_messages:
        raise APIError(400, f"more than {limits.max_messages} messages", "messages")
    out, media_parts = [], 0
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise APIError(400, f"{where}: role must be one of {sorted(_ROLES)}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                parts.append(_part(part, f"{where}.content[{j}]", media))
        else:
            raise APIError(400, f"{where}: content must be a string or a list", f"{where}.content")
        media_parts += sum(p["type"] != "text" for p in parts)
        if media_parts > limits.max_media_parts:
            raise APIError(400, f"more than {limits.max_media_parts} media parts", where)
        out.append({"role": _ROLES[message["role"]], "content": parts})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", "messages")
    return out


def _part(part: Any, where: str, media: MediaLimits) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise APIError(400, f"{where}: image_url.url must be a string", where)
        return {"type": "image", "data": image_from_url(url, where, media)}
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise APIError(400, f"{where}: input_audio needs 'data' (base64) and 'format'", where)
        return {
            "type": "audio",
            "data": audio_from_input(spec["data"], spec.get("format"), where, media),
        }
    raise APIError(400, f"{where}: unsupported content part {kind!r}", where)


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(
            400, f"'{name}' must be an integer from {low} to {high}, got {value!r}", name
        )
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(400, f"'{name}' must be a number from {low} to {high}, got {value!r}", name)
    return float(value)


def _stop(raw: Any, limits: RequestLimits) -> list[str]:
    stops = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a string or a list of non-empty strings", "stop")
    if len(stops) > limits.max_stop:
        raise APIError(400, f"'stop' holds more than {limits.max_stop} strings", "stop")
    return stops
