"""Token ids → the text a client sees, for one choice: incremental decoding and OpenAI `stop` strings.

Text that might be the start of a stop string (or half of a UTF-8 character) is held back until the next token
decides, so streamed pieces concatenate to exactly the non-streamed text. Must not know about HTTP or the engine.
"""

from __future__ import annotations


class TextAssembler:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found; the text ends before it

    def add(self, token: int) -> str:
        """The new text that can be shown after `token` ("" while held back)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        match = self._first_stop()
        if match is not None:
            self.stopped = True
            return self._take(match)
        end = len(self.text) - self._held_back()
        return self._take(end) if end > self.sent else ""

    def flush(self) -> str:
        """The rest, when generation ended for another reason than a stop string."""
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    def _first_stop(self) -> int | None:
        # Text already sent holds no start of a match (it was held back), so a match starts at or after self.sent.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the token that completes it
            return 1
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
