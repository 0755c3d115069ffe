"""`lmforge serve --kb KB`: retrieval-augmented chat completions behind the same OpenAI API.

Owns the hook routes.py calls for a chat request: the passages for its last user message are put into the system
message by kb/context.py (so the tokenizer's chat template renders them like any message); the reply gets a
"Sources: [1] file:lines; …" line (citation markers clients show as text) and the response a `sources` field
(OpenAI clients keep unknown fields: `response.model_extra["sources"]`), each source saying whether the reply cites
it. A request with `"kb": false` (openai: extra_body={"kb": False}) is answered without retrieval. Must not touch
the engine or the guard.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..kb.context import query_of, sources_json, template_has_system_role, with_context
from ..kb.retrieve import Hit, Retriever
from .protocol import ChatMessage


@dataclass(frozen=True)
class Retrieved:
    hits: list[Hit]

    def footer(self) -> str:
        if not self.hits:
            return ""
        return "\n\nSources: " + "; ".join(f"[{n}] {hit.chunk.source()}" for n, hit in enumerate(self.hits, 1))

    def sources(self, reply: str) -> list[dict]:
        return sources_json(self.hits, reply)


class Retrieval:
    def __init__(self, kb_dir: str, k: int):
        self.retriever = Retriever.open(kb_dir)
        self.k = k
        self._system_role: dict[int, bool] = {}
        self._lock = threading.Lock()  # requests are prepared on several threads; the BM25 / FAISS calls are not

    def augment(self, body, served):
        """(the request with the passages in its messages, Retrieved) — or (body, None) when the request opts out
        or has no user text to search for."""
        if body.kb is False:
            return body, None
        messages = body.conversation()
        query = query_of(messages)
        if not query.strip():
            return body, None
        with self._lock:
            hits = self.retriever.search(query, self.k)
        key = id(served.tokenizer)
        if key not in self._system_role:
            self._system_role[key] = template_has_system_role(served.tokenizer)
        augmented = with_context(messages, hits, self._system_role[key])
        body = body.model_copy(update={"messages": [ChatMessage.model_validate(m) for m in augmented]})
        return body, Retrieved(hits)
