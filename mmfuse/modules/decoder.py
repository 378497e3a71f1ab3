"""The autoregressive decoder: any transformers causal LM."""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def build_decoder(
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainedConfig | None = None,
    pretrained: str | None = None,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """Builds a causal LM from ``config`` (random init) or loads it from a local directory.

    Args:
        tokenizer: its vocabulary size and special ids are written into a fresh config.
        config: e.g. ``transformers.LlamaConfig``; ignored when ``pretrained`` is set.
        pretrained: local directory of a saved causal LM.
        vocab_size: embedding rows when they differ from ``len(tokenizer)`` (a reloaded
            pretrained LM with a padded table).
    """
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(str(pretrained), attn_implementation="sdpa")
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    if config is None:
        raise ValueError("build_decoder needs a config or a pretrained directory")
    config.vocab_size = vocab_size or len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
