"""Tokenizers, the chat template and the assistant-only label mask."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|im_end|>"
IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
SPECIAL_TOKENS = [PAD, "<|endoftext|>", "<|im_start|>", EOS, IMAGE_TOKEN, AUDIO_TOKEN]
IGNORE_INDEX = -100
_PLACEHOLDERS = {"image": IMAGE_TOKEN, "audio": AUDIO_TOKEN}

# ChatML-style template. Media parts become placeholder tokens; the `generation` block marks
# the tokens the loss covers (assistant content and its end-of-turn token).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role + '\\n' }}"
    "{%- if message.content is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message.content}] -%}"
    "{%- else -%}{%- set parts = message.content -%}{%- endif -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for part in parts -%}{{ part.text }}{%- endfor -%}<|im_end|>"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part.type == 'image' -%}<|image|>"
    "{%- elif part.type == 'audio' -%}<|audio|>"
    "{%- else -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}<|im_end|>"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>{{ 'assistant\\n' }}{%- endif -%}"
)

_ROLE_WORDS = ["system\n", "user\n", "assistant\n", "You are a helpful assistant."]


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer locally (no download) with the mmfuse chat template.

    Byte-level BPE encodes any text; the corpus only decides which words get single tokens.

    Args:
        corpus: training texts (e.g. ``data_modules.world.vocabulary_corpus()``).
        vocab_size: target vocabulary size including the 256 byte symbols and specials.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = sorted(set(corpus)) + _ROLE_WORDS
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[1:3] + SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Loads a tokenizer from a local directory; it must carry a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer in {path} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Renders messages through the chat template.

    A template with ``{% generation %}`` blocks (mmfuse's own) marks the assistant tokens
    itself. For one without (those of real Qwen2, Llama-3, ... tokenizers), the content of
    every message is first turned into text (media parts become the placeholder tokens), and
    each assistant turn ``i`` is found as the text that rendering ``messages[:i + 1]`` adds to
    rendering ``messages[:i]`` with the assistant header (:func:`assistant_spans`).

    Returns:
        (input_ids, labels): labels equal input_ids on assistant tokens (their content and
        end-of-turn token) and ``IGNORE_INDEX`` elsewhere.

    Raises:
        ValueError: the template renders the start of a conversation differently from the
            whole of it, so the assistant turns cannot be found.
    """
    if not uses_generation_blocks(tokenizer.chat_template):
        return _encode_by_prefixes(tokenizer, messages, add_generation_prompt)
    encoded = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=not add_generation_prompt,
    )
    input_ids = list(encoded["input_ids"])
    if add_generation_prompt:
        return input_ids, [IGNORE_INDEX] * len(input_ids)
    mask = encoded["assistant_masks"]
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(input_ids, mask, strict=False)]
    return input_ids, labels


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def uses_generation_blocks(template: str | dict | None) -> bool:
    """Whether a chat template marks assistant tokens with ``{% generation %}`` blocks."""
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return bool(template) and _GENERATION_BLOCK.search(str(template)) is not None


def as_text_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages whose content is one string: text parts joined, media parts as placeholder
    tokens (for templates that only render string content)."""
    out = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            pieces = []
            for part in content or []:
                kind = part.get("type")
                if kind in _PLACEHOLDERS:
                    pieces.append(_PLACEHOLDERS[kind])
                else:
                    pieces.append(str(part.get("text") or ""))
            content = "".join(pieces)
        out.append({**message, "content": content})
    return out


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    The span of assistant message ``i`` is what rendering ``messages[:i + 1]`` adds to
    rendering ``messages[:i]`` with the generation prompt (the assistant header), less
    trailing whitespace (the newline some templates put after the end-of-turn token).
    """

    def render(part: Sequence[dict], header: bool) -> str:
        return tokenizer.apply_chat_template(
            list(part), tokenize=False, add_generation_prompt=header
        )

    full = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:index], True) if index else ""
        upto = render(messages[: index + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                "the chat template renders the start of the conversation differently from "
                f"the whole (assistant turn {index}): the supervised tokens cannot be found; "
                "use a template with {% generation %} blocks"
            )
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def _encode_by_prefixes(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    messages = as_text_messages(messages)
    if add_generation_prompt:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return input_ids, [IGNORE_INDEX] * len(input_ids)
    full, spans = assistant_spans(tokenizer, messages)
    if tokenizer.is_fast:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        supervised = [  # tokens overlapping an assistant span
            b > a and any(a < stop and b > start for start, stop in spans)
            for a, b in encoded["offset_mapping"]
        ]
    else:  # no offsets: count the tokens of each rendered prefix
        input_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        supervised = [False] * len(input_ids)
        for start, stop in spans:
            first = len(tokenizer(full[:start], add_special_tokens=False)["input_ids"])
            last = len(tokenizer(full[:stop], add_special_tokens=False)["input_ids"])
            supervised[first:last] = [True] * (last - first)
    labels = [
        tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, supervised, strict=True)
    ]
    return input_ids, labels


def last_supervised_run(labels: Sequence[int]) -> list[int]:
    """``labels`` with every supervised token before the last run of them ignored: of a
    conversation's assistant turns (each one run: its content and end-of-turn token), only
    the last stays supervised."""
    kept = [IGNORE_INDEX] * len(labels)
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    kept[start:end] = labels[start:end]
    return kept


def user_text(messages: Sequence[dict]) -> str:
    """Joins the text parts of the user turns: what the optional text encoder reads."""
    texts = []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        texts.extend(p.get("text", "") for p in content or [] if p.get("type") == "text")
    return "\n".join(texts)


def message_text(message: dict) -> str:
    """The concatenated text parts of one message."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if p.get("type") == "text")
