"""`lmforge serve --kb KB` / `--kb NAME=KB`: retrieval-augmented chat completions behind the same OpenAI API.

Owns the hook routes.py calls for a chat request: the knowledge base of the requested model (one for every served
name, or one per name: the base, the run, each LoRA adapter; settings.kbs_for), then the passages for its last user
message put into the system message by kb/context.py (so the tokenizer's chat template renders them like any
message); the reply gets a "Sources: [1] file:lines; …" line (citation markers clients show as text, all that
LangChain's ChatOpenAI keeps) and the response a `sources` field (the openai client keeps unknown fields:
`response.model_extra["sources"]`), each source saying whether the reply cites it. A request with `"kb": false`
(openai: extra_body={"kb": False}) or to a model without a knowledge base is answered without retrieval. Also: every
knowledge base checked before the model loads. Must not touch the engine or the guard.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import UserError
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
    """The knowledge base of each served model that has one; a KB named for several models is opened once."""

    def __init__(self, kbs: dict[str, str], k: int):
        self.k = k
        opened = {directory: _Searcher(Retriever.open(directory)) for directory in sorted(set(kbs.values()))}
        self.by_model = {name: opened[directory] for name, directory in kbs.items()}
        self._system_role: dict[int, bool] = {}

    @classmethod
    def for_models(cls, settings, served: list[str]) -> Retrieval:
        return cls(settings.kbs_for(served), settings.kb_k)

    def augment(self, body, served):
        """(the request with the passages in its messages, Retrieved) — or (body, None) when the request opts out,
        its model has no knowledge base or it has no user text to search for."""
        searcher = self.by_model.get(served.name)
        if body.kb is False or searcher is None:
            return body, None
        messages = body.conversation()
        query = query_of(messages)
        if not query.strip():
            return body, None
        hits = searcher.search(query, self.k)
        key = id(served.tokenizer)
        if key not in self._system_role:
            self._system_role[key] = template_has_system_role(served.tokenizer)
        augmented = with_context(messages, hits, self._system_role[key])
        body = body.model_copy(update={"messages": [ChatMessage.model_validate(m) for m in augmented]})
        return body, Retrieved(hits)


class _Searcher:
    def __init__(self, retriever: Retriever):
        self.retriever = retriever
        self._lock = threading.Lock()  # requests are prepared on several threads; the BM25 / FAISS calls are not

    def search(self, query: str, k: int) -> list[Hit]:
        with self._lock:
            return self.retriever.search(query, k)


def check_kbs(settings) -> None:
    """Every knowledge base the settings name, opened (not searched) before minutes of model loading: a missing or
    damaged one is said with the option that names it."""
    from ..kb.store import KnowledgeBase

    named = [("the knowledge base for every served model (--kb KB)", settings.kb)] if settings.kb else []
    named += [(f"the knowledge base of model {name!r} (--kb {name}=KB)", directory)
              for name, directory in settings.kb_per_model.items() if directory]
    for what, directory in named:
        try:
            KnowledgeBase.open(directory)
        except UserError as error:
            raise UserError(f"{what}: {error}") from None


def describe(kbs: dict[str, str], k: int) -> str:
    """One line for the server log: which served model answers from which knowledge base."""
    if not kbs:
        return "kb: no served model has a knowledge base"
    return f"kb ({k} passages per chat request): " + "; ".join(f"{name} ← {d}" for name, d in kbs.items())
