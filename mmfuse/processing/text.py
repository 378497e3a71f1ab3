"""Tokenizers, the chat template and the assistant-only label mask."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|im_end|>"
IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
SPECIAL_TOKENS = [PAD, "<|endoftext|>", "<|im_start|>", EOS, IMAGE_TOKEN, AUDIO_TOKEN]
IGNORE_INDEX = -100

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

    Returns:
        (input_ids, labels): labels equal input_ids on assistant tokens (as marked by the
        template's ``generation`` block) and ``IGNORE_INDEX`` elsewhere.
    """
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
