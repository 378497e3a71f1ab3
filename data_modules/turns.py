"""One training sample per answer: ``data.turns=each``, ``each_alone`` or ``each_both``.

By default (``whole``) a record with several question-answer turns is one sample with every
answer supervised, and the text encoder reads all its questions at once. Split instead:

- ``each``: sample k holds the conversation up to the k-th answer, and only that answer is
  supervised (the earlier turns are context).
- ``each_alone``: sample k holds the record's media, the k-th question and its answer only,
  for data whose turns are independent questions about the same media (the built-in
  world's); a follow-up that refers to an earlier turn loses its context, and a model that
  never sees a conversation may not follow one.
- ``each_both``: both: every answer alone, and every later answer also after its
  conversation.

With ``processor.prompt_turns=last`` the fusion then reads, for every answer, the question
that asked for it, as it does in evaluation and chat.
"""

from __future__ import annotations

from collections.abc import Sequence

TURNS = ("whole", "each", "each_alone", "each_both")


def split_at_answers(records: Sequence[dict], turns: str = "each") -> list[dict]:
    """Records cut at their assistant turns (records with one pass through).

    A cut record is a copy named ``<id>#turn<k>`` (k from 1; ``<id>#turn<k>-context`` for
    the second copy of ``each_both``); its ``task`` is the k-th of the record's
    ``turn_tasks`` when it lists one per answer. In context it holds the messages up to the
    k-th answer; alone, the leading system messages, then the k-th question with the media
    parts of every user turn before it (media first), then the answer. Records whose
    messages are not a list pass through, for the processor to report.
    """
    if turns not in TURNS[1:]:
        raise ValueError(f"turns must be one of {TURNS[1:]}, got {turns!r}")
    expanded = []
    for record in records:
        messages = record.get("messages")
        if not isinstance(messages, list):
            messages = []
        ends = [i for i, m in enumerate(messages) if _role(m) == "assistant"]
        if len(ends) < 2:
            expanded.append(record)
            continue
        turn_tasks = record.get("turn_tasks")
        if not isinstance(turn_tasks, list) or len(turn_tasks) != len(ends):
            turn_tasks = None  # not one per answer: the cuts keep the record's task
        for k, end in enumerate(ends, start=1):
            name = f"{record.get('id', '<no id>')}#turn{k}"
            if turns != "each":
                expanded.append(_cut(record, name, _alone(messages, end), turn_tasks, k, k - 1))
            if turns == "each" or (turns == "each_both" and k > 1):
                name += "-context" if turns == "each_both" else ""
                expanded.append(_cut(record, name, messages[: end + 1], turn_tasks, k, 0))
    return expanded


def _cut(
    record: dict, name: str, messages: list, turn_tasks: list | None, k: int, first: int
) -> dict:
    """A copy of ``record`` with these messages, answering its k-th question; it holds the
    turns ``first`` to ``k - 1`` of ``turn_tasks`` (one task per answer, or None)."""
    cut = {**record, "id": name, "messages": messages}
    if turn_tasks is not None:
        cut["task"], cut["turn_tasks"] = turn_tasks[k - 1], turn_tasks[first:k]
    return cut


def _alone(messages: list, answer: int) -> list[dict]:
    """The system messages, the question before ``messages[answer]`` carrying every earlier
    media part, and the answer."""
    questions = [i for i in range(answer) if _role(messages[i]) == "user"]
    if not questions:  # malformed: left as it is, for the processor to report
        return messages[: answer + 1]
    question = questions[-1]
    media = [
        part
        for message in messages[:question]
        if _role(message) == "user" and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") != "text"
    ]
    content = messages[question].get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    system = [m for m in messages[:question] if _role(m) == "system"]
    return [*system, {**messages[question], "content": media + list(content)}, messages[answer]]


def _role(message: object) -> str | None:
    return message.get("role") if isinstance(message, dict) else None
