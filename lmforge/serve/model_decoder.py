"""The fallback decoder: serves a model through its own transformers forward, for methods the lean Decoder cannot
express — prefix / P-tuning v2 / prompt tuning (virtual tokens, added once per sequence by
virtual_tokens.VirtualTokenModel), bottleneck adapters (extra modules inside the model), adapters on a quantised
base, and architectures it does not run (sliding-window layers are masked by the model itself; the cache keeps
every key, so a slot can still be cut back to a shared prefix). Correctness over speed: one transformers
DynamicCache per slot, and every prefill chunk and every decode step is one forward per listed slot (no cross-slot
batching), the arithmetic of generate.py's decode loop. It offers the
engine-facing interface of decoder.Decoder (slots, max_len, vocab_size, adapter_index, prefill_many, decode,
copy_slot), so the engine runs it unchanged. Must not know about requests, sampling, queues or HTTP.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..errors import ModelError
from ..model.virtual_tokens import VirtualTokenModel


class ModelDecoder:
    """`slots` sequences of up to `max_len` real tokens, each with its own KV cache.

    Positions and lengths are counted in the sequence's own tokens, as the engine counts them; a prefix-tuning or
    prompt-tuning cache also holds the adapter's virtual tokens at its start, so it is `virtual` entries longer.
    """

    def __init__(self, model, slots: int, max_len: int):
        self.model = model  # as generate.load_for_inference returns it (for_decoding applied)
        self.slots, self.max_len = slots, max_len
        self.vocab_size = model.config.vocab_size
        self.virtual = model.virtual if isinstance(model, VirtualTokenModel) else 0
        limit = model.config.max_position_embeddings - self.virtual
        if max_len > limit:
            raise ModelError(f"context length {max_len} is more than this model supports ({limit}"
                             + (f" once its {self.virtual} virtual tokens are counted" if self.virtual else "")
                             + f"); set context_length to at most {limit}")
        self.caches: list[DynamicCache | None] = [None] * slots

    def adapter_index(self, name: str | None) -> int:
        """One model: every served name is index 0."""
        return 0

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], token_lists: list[list[int]], starts: list[int],
                     adapters: list[int]) -> torch.Tensor:
        """Run each prompt (or chunk) at positions start… of its slot; return each one's last logits [len(slots), V]."""
        return torch.stack([self._forward(slot, tokens, start)
                            for slot, tokens, start in zip(slots, token_lists, starts)])

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int], adapters: list[int]) -> torch.Tensor:
        """One token for each listed slot at its position; returns logits [len(slots), V] in the order given."""
        return torch.stack([self._forward(slot, [token], position)
                            for slot, token, position in zip(slots, tokens, positions)])

    @torch.inference_mode()
    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Give `target` the keys/values of `source`'s first `length` tokens (and the virtual tokens before them)."""
        cache = self.caches[source]
        if cache is None or length == 0:
            self.caches[target] = None
            return
        keep = self.virtual + length
        self.caches[target] = DynamicCache([(keys[..., :keep, :], values[..., :keep, :]) for keys, values, _ in cache])

    def _forward(self, slot: int, token_ids: list[int], start: int) -> torch.Tensor:
        """Logits [V] after `token_ids` placed at positions start… of `slot`, whose cache then holds them; whatever
        the cache held past `start` (an earlier sequence in this slot) is dropped first."""
        cache = self.caches[slot]
        if start == 0 or cache is None:  # a fresh sequence: VirtualTokenModel adds the virtual tokens on this call
            if start:
                raise RuntimeError(f"slot {slot} holds no cache to continue at position {start}")
            cache = self.caches[slot] = DynamicCache()
        else:
            held = cache.get_seq_length() - self.virtual
            if held < start:
                raise RuntimeError(f"slot {slot} holds {held} tokens; cannot continue at position {start}")
            cache.crop(start - held)  # a negative count: the tokens to drop (0 keeps all)
        count = len(token_ids)
        output = self.model(input_ids=torch.tensor([token_ids]), attention_mask=torch.ones(1, start + count,
                            dtype=torch.long), position_ids=torch.arange(start, start + count)[None],
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
        return output.logits[0, -1]
