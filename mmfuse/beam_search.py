"""Beam search with the KV cache, following transformers' ``generate(num_beams=k)``.

Conventions (those of transformers 5.x ``GenerationMixin._beam_search``):

- a hypothesis's score is its sum of log-probabilities divided by ``n ** length_penalty``,
  where ``n`` counts its generated tokens, the end-of-turn (eos) token included;
- each step keeps the ``2 * k`` best continuations of a row's ``k`` live beams; those among the
  first ``k`` that end in eos become finished hypotheses (a row keeps its ``k`` best), the
  ``k`` best that do not end stay live; at ``max_new_tokens`` the first ``k`` all finish;
- ``early_stopping=False`` (transformers' default): a row is done once it holds ``k`` finished
  hypotheses and its best live beam, scored at its current length, is no better than the
  worst of them; ``early_stopping=True``: done as soon as it holds ``k``. A done row takes no
  more hypotheses; the search ends when every row is done.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from mmfuse.generation import GenerationConfig, append_position, decoder_step
from mmfuse.model import MMFuseModel
from mmfuse.modules.conditioning import CrossAttentionMemory, conditioned
from mmfuse.types import Batch

NEG_INF = -1.0e9  # transformers' "impossible" score: added, so ties break as they do there


@torch.no_grad()
def beam_search(model: MMFuseModel, batch: Batch, config: GenerationConfig) -> list[list[int]]:
    """Beam search over a (left-padded) batch of prompts.

    Returns:
        Per row, the best hypothesis's generated ids without the end-of-turn token.
    """
    inputs = model.prepare_inputs(batch)
    return beam_search_embeds(
        model.decoder,
        inputs.embeds,
        inputs.attention_mask,
        inputs.position_ids,
        model.tokenizer.eos_token_id,
        config,
        memory=inputs.memory,
    )


@torch.no_grad()
def beam_search_embeds(
    decoder: PreTrainedModel,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    eos: int,
    config: GenerationConfig,
    early_stopping: bool = False,
    memory: CrossAttentionMemory | None = None,
) -> list[list[int]]:
    """Beam search from prompt embeddings (B, L, H), mask (B, L) and positions (B, L).

    Uses ``config.num_beams``, ``config.max_new_tokens`` and ``config.length_penalty``; new
    tokens are embedded with ``decoder.get_input_embeddings()``. A cross-attention ``memory``
    (``DecoderInputs.memory``), projected once, is repeated for the beams and reordered with
    them as the KV cache is.

    Returns:
        Per row, the best hypothesis's generated ids without ``eos``.
    """
    rows, k, penalty = embeds.shape[0], config.num_beams, config.length_penalty
    device = embeds.device
    embed = decoder.get_input_embeddings()
    # every row's prompt is run k times: beam j of row b is flat row b * k + j
    embeds = embeds.repeat_interleave(k, dim=0)  # (B*k, L, H)
    mask = mask.repeat_interleave(k, dim=0)  # (B*k, L)
    positions = positions.repeat_interleave(k, dim=0)  # (B*k, L)
    # only beam 0 is live at first, so the first step does not pick k copies of one token
    scores = torch.zeros(rows, k, device=device)  # (B, k) summed log-probs of live beams
    scores[:, 1:] = NEG_INF
    tokens = torch.zeros(rows, k, 0, dtype=torch.long, device=device)  # (B, k, t)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(rows)]  # (score, ids)
    done = [False] * rows
    row_offset = torch.arange(rows, device=device)[:, None] * k  # (B, 1)
    step_embeds, step_positions, cache = embeds, positions, None
    if memory is not None:
        memory = memory.repeat_interleave(k)  # (B*k, ...) like the prompt
    with conditioned(decoder, memory) as scope:
        for step in range(config.max_new_tokens):
            logits, cache = decoder_step(decoder, step_embeds, mask, step_positions, cache)
            logprobs = logits.log_softmax(dim=-1)  # (B*k, V)
            vocab = logprobs.shape[-1]
            total = logprobs.view(rows, k, vocab) + scores[:, :, None]  # (B, k, V)
            top_scores, top = total.view(rows, k * vocab).topk(2 * k, dim=1)  # (B, 2k), sorted
            source, token = top // vocab, top % vocab  # (B, 2k) beam index and token id
            last = step + 1 == config.max_new_tokens
            ends = (token == eos) | last  # (B, 2k)

            # finished hypotheses: the candidates among the first k that end here
            normalised = (top_scores / (step + 1) ** penalty).tolist()  # (B, 2k)
            ends_, source_, token_ = ends.tolist(), source.tolist(), token.tolist()
            for b in range(rows):
                if done[b]:
                    continue
                for c in range(k):
                    if ends_[b][c]:
                        ids = tokens[b, source_[b][c]].tolist() + [token_[b][c]]
                        finished[b].append((normalised[b][c], ids))
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
            if last:
                break

            # live beams: the k best candidates that do not end
            live_scores = top_scores + ends.float() * NEG_INF  # (B, 2k)
            keep = live_scores.topk(k, dim=1).indices  # (B, k)
            scores = live_scores.gather(1, keep)  # (B, k), sorted
            parent = source.gather(1, keep)  # (B, k)
            new_token = token.gather(1, keep)  # (B, k)
            history = tokens.gather(1, parent[:, :, None].expand_as(tokens))  # (B, k, t)
            tokens = torch.cat([history, new_token[:, :, None]], dim=2)  # (B, k, t+1)

            # a full row is done when its best live beam cannot beat its worst hypothesis
            best_live = (scores[:, 0] / (step + 1) ** penalty).tolist()  # (B,)
            for b in range(rows):
                if len(finished[b]) == k:
                    done[b] = done[b] or early_stopping or best_live[b] <= finished[b][-1][0]
            if all(done):
                break

            # next step: the kept beams' caches (and memory rows, equal within a row: the
            # reorder keeps them aligned), their new tokens, one position and mask column more
            flat_parents = (parent + row_offset).view(-1)  # (B*k,)
            cache.reorder_cache(flat_parents)
            scope.reorder(flat_parents)
            step_embeds = embed(new_token.view(-1))[:, None]  # (B*k, 1, H)
            mask, positions, step_positions = append_position(mask, positions)

    out = []
    for hypotheses in finished:
        ids = hypotheses[0][1] if hypotheses else []
        out.append(ids[:-1] if ids and ids[-1] == eos else ids)
    return out
