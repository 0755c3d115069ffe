"""Retrieved passages → the context message a model reads, and the citations read back from its reply.

Owns the retrieval-augmented prompt: the passages numbered [1] … [k] with their sources, after an instruction to
cite them, put in the system message (added to the conversation's own system message, or — for a chat template
without a system role — in front of the last user message), so the tokenizer's chat template renders it like any
other message. Also: which passage holds a reference answer, and whether a reply cites it (compare's "cites"
column). Must not rank, generate or know about HTTP.
"""

from __future__ import annotations

import re

from .retrieve import Hit, words

INSTRUCTION = ("Answer the user's question from the numbered passages below. Cite the passage you use with its "
               "number in square brackets, like [1]. If the passages do not hold the answer, say so.")
CITATION = re.compile(r"[\[【](\d{1,3})[\]】]")
HOLDS_SHARE = 0.5  # a passage holds a reference when it contains at least half of the reference's words


def context_text(hits: list[Hit]) -> str:
    blocks = [f"[{number}] ({hit.chunk.source()})\n{hit.chunk.text}" for number, hit in enumerate(hits, start=1)]
    return INSTRUCTION + "\n\n" + "\n\n".join(blocks)


def query_of(messages: list[dict]) -> str:
    """What to search for: the last user message's text."""
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def with_context(messages: list[dict], hits: list[Hit], system_role: bool = True) -> list[dict]:
    """The conversation with the passages inserted; unchanged when nothing was retrieved."""
    if not hits:
        return list(messages)
    context = context_text(hits)
    messages = [dict(m) for m in messages]
    if system_role:
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{context}"
            return messages
        return [{"role": "system", "content": context}, *messages]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = f"{context}\n\n{message['content']}"
            break
    return messages


def template_has_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message (some, like Gemma's, refuse or drop it)."""
    probe = [{"role": "system", "content": "SYSTEM-PROBE-7731"}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return "SYSTEM-PROBE-7731" in text


def citations(text: str, count: int) -> list[int]:
    """The passage numbers a reply cites ([n] or 【n】), in order of first mention, within 1..count."""
    seen = []
    for match in CITATION.finditer(text or ""):
        number = int(match.group(1))
        if 1 <= number <= count and number not in seen:
            seen.append(number)
    return seen


def sources_json(hits: list[Hit], reply: str | None = None) -> list[dict]:
    cited = set(citations(reply or "", len(hits)))
    return [{"index": number, "source": hit.chunk.source(), "file": hit.chunk.file, "page": hit.chunk.page,
             "lines": [hit.chunk.line_start, hit.chunk.line_end], "score": round(hit.score, 6),
             "cited": number in cited, "text": hit.chunk.text}
            for number, hit in enumerate(hits, start=1)]


def holder(hits: list[Hit], reference: str) -> int | None:
    """The number of the retrieved passage holding the reference (the largest share of its words, at least half),
    or None when none does."""
    wanted = set(words(reference))
    if not wanted:
        return None
    best, best_share = None, HOLDS_SHARE
    for number, hit in enumerate(hits, start=1):
        share = len(wanted & set(words(hit.chunk.text))) / len(wanted)
        if share >= best_share and (best is None or share > best_share):
            best, best_share = number, share
    return best
