"""The lean decoder that serve's engine, eval, compare, the checkpoint sweep and chat run: Llama-family and Gemma 3
weights, a preallocated KV cache, LoRA rows by adapter.

A transformers forward spends most of a decode step in per-module Python; this one does the same arithmetic in a
few fused ops per layer (q/k/v as one matmul, gate/up as one) over a cache preallocated per slot, so a step costs
about what reading the weights costs. Several LoRA adapters stay loaded beside one base; each batch row names its
adapter. Must not know about requests, sampling, queues or HTTP (serve/engine.py and generate.py drive it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .methods import QUANTIZATION_FILE

# Families whose decoder layer is: RMSNorm → attention (RoPE, GQA) → residual → RMSNorm → gated MLP → residual.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Gemma 3 adds: norms that scale by (1 + weight), a norm after attention and after the MLP, a scaled embedding, its
# own attention scale, and sliding-window layers with their own RoPE (config.layer_types).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED_WEIGHTS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
FLOAT16_KERNELS = "fbgemm" in torch.backends.quantized.supported_engines  # x86-64 builds of torch
FLOAT16_LINEAR = torch.ops.quantized.linear_dynamic_fp16.default if FLOAT16_KERNELS else None  # no per-call lookup
WEIGHT_FORMATS = ("float32", "float16", "bfloat16")
# a reduced-format decode step attends over a key length rounded up to this (fixed by the row's own position)
ATTENTION_BUCKET = 64
# oneDNN's bf16 GEMM reduces over more than ~1,152 inputs in a way that depends on the row count (at 129-200+ rows
# an output row's last bits change): a bf16 projection that deep is split into products this deep, summed in float32
BFLOAT16_DEPTH = 1024
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


class Linear:
    """One (possibly fused) projection: weight [out, in], optional bias, and per adapter a LoRA pair whose product
    is the adapter's delta. B is [out, rank] with the scaling folded in and zeros where a fused part has no LoRA.

    The weight is kept pre-packed in oneDNN's blocked layout when torch has oneDNN: decode steps multiply a few rows
    by every weight, a memory-bound product where MKL's small-batch path was 2x slower at 2-8 rows
    (benchmarks/RESULTS.md). The packed copy replaces the plain one, so memory does not double.

    `float16`: the weight is packed for FBGEMM's float16 GEMM (torch's dynamic-quantisation kernel): float16
    weights, float32 activations and sums. Half the bytes to read per decode step and half the memory; activations
    keep float32's range and precision; and each output row depends only on its input row (the kernel blocks the
    same way at any batch width), so a reply does not depend on what else is in the batch.
    `bfloat16`: bf16 weights packed for oneDNN (AMX / AVX512_BF16 where the CPU has them), activations rounded to
    bf16 for the product, sums and the result in float32; deeper than BFLOAT16_DEPTH inputs, the product is split
    in depth so that, as in float16, an output row depends only on its input row.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, weights: str = "float32"):
        self.out_features = weight.shape[0]
        self.bias = bias
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.format = weights
        self.packed = PACKED_WEIGHTS and weight.dtype == torch.float32 and weights == "float32"
        if weights == "float16":
            _check_float16_range(weight)
            self.weight = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)
        elif weights == "bfloat16":
            _check_bfloat16_kernels()
            self.depth = -(-weight.shape[1] // -(-weight.shape[1] // BFLOAT16_DEPTH))  # equal parts ≤ BFLOAT16_DEPTH
            self.weight = [torch.ops.mkldnn._reorder_linear_weight(part.to(torch.bfloat16).contiguous(), 1)
                           for part in weight.split(self.depth, dim=1)]
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight

    def __call__(self, x: torch.Tensor, groups: list[tuple[int, torch.Tensor | None]], as_rounded: bool = False
                 ) -> torch.Tensor:
        """x [rows, in] float32 → [rows, out] float32. `as_rounded`: a bf16 product with nothing to add to it (one
        piece, no bias, no LoRA rows) comes back in bf16 for the caller to widen as it reads it (the same values,
        one copy fewer)."""
        if self.format == "float16":
            out = FLOAT16_LINEAR(x, self.weight)  # bias included
        elif self.format == "bfloat16":
            rounded = x.to(torch.bfloat16)
            pieces = [rounded] if len(self.weight) == 1 else [p.contiguous() for p in rounded.split(self.depth, 1)]
            out = torch.ops.mkldnn._linear_pointwise(pieces[0], self.weight[0], None, "none", [], "")
            if as_rounded and len(pieces) == 1 and self.bias is None and not any(a in self.lora for a, _ in groups):
                return out
            out = out.float()
            for piece, weight in zip(pieces[1:], self.weight[1:]):
                out += torch.ops.mkldnn._linear_pointwise(piece, weight, None, "none", [], "")
            if self.bias is not None:
                out += self.bias
        elif self.packed:
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            out = F.linear(x, self.weight, self.bias)
        for adapter, rows in groups:
            pair = self.lora.get(adapter)
            if pair is None:
                continue
            product = _lora_rowwise if self.format != "float32" else _lora_batched
            if rows is None:  # every row uses this adapter
                out += product(x, *pair)
            else:
                out.index_add_(0, rows, product(x.index_select(0, rows), *pair))
        return out


def _lora_batched(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """B(A x) as two GEMMs over all rows: float32 decoding keeps the arithmetic of the model's own forward (peft's)."""
    return F.linear(F.linear(x, lora_a), lora_b)


def _lora_rowwise(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """B(A x) one row at a time (a batched product of 1-row matrices), so a row's bits do not depend on the other
    rows: a float32 GEMM picks its kernel by the row count (1 row vs 4 differ in the last bits), which made a
    per-request LoRA's reply depend on what else ran — slightly in float16, by a token in bf16, where the difference
    flips a rounding (tests/test_serve_engine.py)."""
    rows = x.shape[0]
    hidden = torch.bmm(x[:, None], lora_a.t().expand(rows, -1, -1))
    return torch.bmm(hidden, lora_b.t().expand(rows, -1, -1))[:, 0]


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor  # before the MLP
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    q_norm: torch.Tensor | None = None  # qwen3 and gemma3 normalise each head's q and k before RoPE
    k_norm: torch.Tensor | None = None
    attention_out_norm: torch.Tensor | None = None  # gemma3: on the attention's output, before the residual add
    mlp_out_norm: torch.Tensor | None = None  # gemma3: on the MLP's output, before the residual add
    window: int | None = None  # a sliding-window layer sees its last `window` keys
    rope: str | None = None  # which RoPE table (gemma3: one per layer type)


@dataclass
class Bucket:
    """Rows of one decode step that attend over the same number of keys (_attention_buckets)."""

    rows: list[int]  # their slots
    pick: slice | torch.Tensor  # those slots in the cache: a slice when consecutive (views, no gather)
    length: int  # keys attended: the rows' positions + 1 rounded up to ATTENTION_BUCKET
    seen: torch.Tensor  # [rows, 1, 1, length]: True up to each row's own position


def _attention_buckets(slots: list[int], positions: list[int], max_len: int) -> list[Bucket]:
    """Group a decode step's rows by key length, once per step (every layer attends the same way)."""
    members: dict[int, list[int]] = {}  # key length → indices into slots / positions
    for n, position in enumerate(positions):
        length = min(-(-(position + 1) // ATTENTION_BUCKET) * ATTENTION_BUCKET, max_len)
        members.setdefault(length, []).append(n)
    plan = []
    for length, indices in members.items():
        rows = [slots[n] for n in indices]
        consecutive = rows == list(range(rows[0], rows[-1] + 1))
        seen = torch.tensor([positions[n] for n in indices])[:, None] >= torch.arange(length)[None]
        plan.append(Bucket(rows, slice(rows[0], rows[-1] + 1) if consecutive else torch.tensor(rows), length,
                           seen[:, None, None]))
    return plan


class Decoder:
    """Weights + KV cache for `slots` concurrent sequences of up to `max_len` tokens each.

    Cache column `max_len` is scratch: batch rows of idle slots write there, so a decode step can run over a
    contiguous range of slots (a view, no gather) without touching a slot that is being prefilled.
    """

    def __init__(self, model, slots: int, max_len: int, float16: bool = False, weights: str | None = None,
                 merge_adapter: str | None = None):
        """`weights`: float32, float16 (FBGEMM) or bfloat16 (oneDNN); `float16=True` is weights="float16".
        `merge_adapter`: a PeftModel's LoRA adapter added into the base weights (in float32, before they are
        converted), so its rows cost nothing extra; for one adapter in a reduced format, where the sum rounds as the
        base weight alone would."""
        weights = weights or ("float16" if float16 else "float32")
        if weights not in WEIGHT_FORMATS:
            raise ModelError(f"decoder weights {weights!r}: valid formats are {', '.join(WEIGHT_FORMATS)}")
        config = model.config
        self.model_type = config.model_type
        if not fast_decoder_runs(config):
            raise ModelError(f"the fast decoder runs {', '.join(SUPPORTED_TYPES)} models without logit soft-capping; "
                             f"serve this {self.model_type!r} model through its own forward (model_decoder.py)")
        inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.activation = _activation(getattr(config, "hidden_activation", None) or config.hidden_act)
        scalar = getattr(config, "query_pre_attn_scalar", None)  # gemma3's attention scale
        self.scale = scalar ** -0.5 if scalar else None  # None: SDPA's 1/sqrt(head_dim)
        layer_types = getattr(config, "layer_types", None)
        windowed = applies_windows(config)
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        limit = config.max_position_embeddings  # a model-wide window without per-layer types: context up to it
        limit = limit if windowed else min(limit, window or limit)
        if max_len > limit:
            raise ModelError(f"context length {max_len} is more than this model supports ({limit}); "
                             f"set context_length to at most {limit}")
        self.adapter_names: list[str] = []
        self.embed = inner.embed_tokens.weight.detach()
        self.embed_scale = float(getattr(inner.embed_tokens, "embed_scale", 1.0))  # gemma3: sqrt(hidden size)
        offset = 1.0 if self.model_type.startswith("gemma") else 0.0  # gemma's norms scale by (1 + weight)
        self.final_norm = inner.norm.weight.detach() + offset
        self.lm_head = Linear(model.get_output_embeddings().weight.detach(), weights=weights)
        merged = lora_pairs(model, merge_adapter, merge_adapter) if merge_adapter else {}
        self.layers = [_layer(layer, weights, offset, {p: pair for (i, p), pair in merged.items() if i == index})
                       for index, layer in enumerate(inner.layers)]
        positions = torch.arange(max_len + 1)[None]
        self.ropes = {}  # layer type (None: every layer) → cos, sin: transformers' own RoPE (scaling types included)
        rope_per_type = bool(layer_types) and set(layer_types) <= set(getattr(config, "rope_parameters", None) or {})
        for index, layer in enumerate(self.layers):
            if windowed:
                layer.window = config.sliding_window if layer_types[index] == "sliding_attention" else None
            if rope_per_type:  # gemma3: local layers rotate with another base
                layer.rope = layer_types[index]
            if layer.rope not in self.ropes:
                arguments = () if layer.rope is None else (layer.rope,)
                cos, sin = inner.rotary_emb(self.embed[:1], positions, *arguments)
                self.ropes[layer.rope] = cos[0].float(), sin[0].float()
        self.slots, self.max_len = slots, max_len
        self.weights = weights
        self.float16 = weights == "float16"
        # reduced-precision weights amplify the last bits of a padded batch's attention sums into visible logit
        # changes, so those formats attend over key lengths fixed per row (_attend_each): no reply depends on the
        # rows beside it
        self.row_by_row = weights != "float32"
        shape = (len(self.layers), slots, self.kv_heads, max_len + 1, self.head_dim)
        self.k_cache, self.v_cache = _zeros_on_demand(shape), _zeros_on_demand(shape)

    # ------------------------------------------------------------------------------------------------ adapters

    def add_lora(self, name: str, peft_model, adapter_name: str) -> None:
        """Copy adapter `adapter_name`'s LoRA matrices out of a PeftModel (which parsed and checked the files)."""
        index = len(self.adapter_names) + 1  # 0 is the base model
        found = lora_pairs(peft_model, adapter_name, name)
        for i, layer in enumerate(self.layers):
            for fused, projections in FUSED.items():
                pairs = [found.get((i, p)) for p in projections]
                if any(pairs):
                    linear = getattr(layer, fused)
                    linear.lora[index] = _fuse_lora(pairs, [_out_features(self, p) for p in projections])
        self.adapter_names.append(name)

    def adapter_index(self, name: str | None) -> int:
        return 0 if name is None else self.adapter_names.index(name) + 1

    # ------------------------------------------------------------------------------------------------ forward

    def prefill(self, slot: int, token_ids: list[int], start: int, adapter: int) -> torch.Tensor:
        """Run `token_ids` at positions start… of `slot` (a prompt, or a chunk of one); return the last logits [V]."""
        return self.prefill_many([slot], [token_ids], [start], [adapter])[0]

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], token_lists: list[list[int]], starts: list[int],
                     adapters: list[int]) -> torch.Tensor:
        """Prefill several prompts (or chunks) in one forward; return each one's last logits [len(slots), V].

        Their tokens go through every projection as one packed batch of rows (no padding): simultaneous arrivals
        then cost one pass over the weights instead of one each. Attention runs per prompt over its own slot's cache.
        """
        counts = [len(tokens) for tokens in token_lists]
        positions = torch.cat([torch.arange(start, start + count) for start, count in zip(starts, counts)])
        row_slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(counts))
        groups = _adapter_groups([adapter for adapter, count in zip(adapters, counts) for _ in range(count)])
        ends = torch.tensor(counts).cumsum(0)
        offsets = [0] + ends[:-1].tolist()
        masks = [None if start == 0 else  # a fresh prompt uses is_causal; a later chunk sees what precedes it
                 torch.arange(start, start + count)[:, None] >= torch.arange(start + count)[None]
                 for start, count in zip(starts, counts)]  # [T, start+T]
        windows = {layer.window for layer in self.layers if layer.window}
        window_masks = {window: [_window_mask(start, count, window) for start, count in zip(starts, counts)]
                        for window in windows}
        hidden = self._embed(torch.tensor([t for tokens in token_lists for t in tokens]))[:, None]  # [R, 1, D]
        ropes = {name: self._rope(table, positions[:, None]) for name, table in self.ropes.items()}
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, hidden, ropes[layer.rope], groups)  # [R, heads, 1, hd]
            self.k_cache[index][row_slots, :, positions] = k[:, :, 0]
            self.v_cache[index][row_slots, :, positions] = v[:, :, 0]
            parts = []
            for slot, start, count, offset, mask in zip(slots, starts, counts, offsets,
                                                        window_masks[layer.window] if layer.window else masks):
                query = q[offset:offset + count, :, 0].transpose(0, 1)[None]  # [1, heads, T, hd]
                keys = self.k_cache[index, slot:slot + 1, :, :start + count]
                values = self.v_cache[index, slot:slot + 1, :, :start + count]
                if mask is None:
                    attended = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True,
                                                              scale=self.scale)
                else:
                    attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True,
                                                              scale=self.scale)
                parts.append(attended[0].transpose(0, 1))  # [T, heads, hd]
            hidden = self._finish_layer(layer, hidden, torch.cat(parts)[:, :, None], groups)
        return self.lm_head(_rms_norm(hidden[ends - 1, 0], self.final_norm, self.eps), [])

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int], adapters: list[int]) -> torch.Tensor:
        """One token for each listed slot at its position; returns logits [len(slots), V] in the order given."""
        width = max(slots) + 1  # rows 0..width-1 run; slots not listed write to the scratch column
        row_tokens = torch.zeros(width, dtype=torch.long)
        row_positions = torch.full((width,), self.max_len, dtype=torch.long)
        row_adapters = [0] * width
        listed = torch.tensor(slots)
        row_tokens[listed] = torch.tensor(tokens)
        row_positions[listed] = torch.tensor(positions)
        for slot, adapter in zip(slots, adapters):
            row_adapters[slot] = adapter
        length = max(positions) + 1
        visible = torch.arange(length)[None] <= row_positions[:, None]  # [width, length]
        visible[:, 0] = True  # idle rows (scratch position) see one column, never none (that would be NaN)
        masks = {None: visible[:, None, None, :]}
        for window in {layer.window for layer in self.layers if layer.window}:  # and within the window
            recent = torch.arange(length)[None] > row_positions[:, None] - window
            masks[window] = (visible & (recent | (row_positions[:, None] == self.max_len)))[:, None, None, :]
        groups = _adapter_groups(row_adapters)
        rows = torch.arange(width)
        plan = _attention_buckets(slots, positions, self.max_len) if self.row_by_row else None  # one per step
        hidden = self._embed(row_tokens)[:, None]  # [W, 1, D]
        ropes = {name: self._rope(table, row_positions[:, None]) for name, table in self.ropes.items()}
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, hidden, ropes[layer.rope], groups)
            self.k_cache[index, :width][rows, :, row_positions] = k[:, :, 0]
            self.v_cache[index, :width][rows, :, row_positions] = v[:, :, 0]
            if self.row_by_row:
                attended = self._attend_each(index, q, slots, positions, layer.window, plan)
            else:
                keys = self.k_cache[index, :width, :, :length]
                values = self.v_cache[index, :width, :, :length]
                attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=masks[layer.window],
                                                          enable_gqa=True, scale=self.scale)
            hidden = self._finish_layer(layer, hidden, attended, groups)
        last = _rms_norm(hidden[listed, 0], self.final_norm, self.eps)
        return self.lm_head(last, [])

    def _attend_each(self, index: int, q: torch.Tensor, slots: list[int], positions: list[int],
                     window: int | None, plan: list[Bucket]) -> torch.Tensor:
        """Each listed row's attention over its own keys, computed so that it does not depend on the other rows.
        One call over the batch pads every row to the longest, and the padded length changes the last bits of the
        sums, so a reply would depend on what else runs (the float16 and bfloat16 linears are row-invariant, so this
        keeps the whole step so). Instead a row attends over a key length fixed by its own position alone — rounded
        up to ATTENTION_BUCKET, the keys past its position masked out — and the rows whose lengths match share one
        call (each row is its own batch entry there: the same arithmetic as alone), so a step makes a few calls
        instead of one per row; `plan` (_attention_buckets) groups them once per step for every layer.
        Sliding-window layers attend row by row over the window."""
        if window:
            parts = [F.scaled_dot_product_attention(q[slot:slot + 1],
                                                    self.k_cache[index, slot:slot + 1, :, start:position + 1],
                                                    self.v_cache[index, slot:slot + 1, :, start:position + 1],
                                                    enable_gqa=True, scale=self.scale)
                     for slot, position, start in ((s, p, max(0, p + 1 - window)) for s, p in zip(slots, positions))]
            order = slots
        else:
            parts, order = [], []
            for bucket in plan:
                if isinstance(bucket.pick, slice):  # consecutive slots: views of the cache, no copy
                    query = q[bucket.pick]
                    keys = self.k_cache[index, bucket.pick, :, :bucket.length]
                    values = self.v_cache[index, bucket.pick, :, :bucket.length]
                else:
                    query = q.index_select(0, bucket.pick)
                    keys = self.k_cache[index, :, :, :bucket.length].index_select(0, bucket.pick)
                    values = self.v_cache[index, :, :, :bucket.length].index_select(0, bucket.pick)
                # a kv head's query heads as the query rows of one product (faster than enable_gqa's repeat)
                grouped = query.reshape(len(bucket.rows), self.kv_heads, self.heads // self.kv_heads, self.head_dim)
                attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bucket.seen,
                                                          scale=self.scale)
                parts.append(attended.reshape(query.shape))
                order += bucket.rows
        if order == list(range(q.shape[0])):  # every row listed, in order
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        attended = torch.zeros_like(q)  # idle rows stay zero
        attended[torch.tensor(order)] = torch.cat(parts)
        return attended

    def copy_slot(self, source: int, target: int, length: int) -> None:
        """Share a prefilled prompt with another sequence (n > 1 choices of one request)."""
        self.k_cache[:, target, :, :length] = self.k_cache[:, source, :, :length]
        self.v_cache[:, target, :, :length] = self.v_cache[:, source, :, :length]

    @staticmethod
    def _rope(table: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at these positions [B, T] → [B, T, 1, hd], once per forward (every layer uses them)."""
        cos, sin = table
        return cos[positions][:, :, None], sin[positions][:, :, None]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.embed[tokens]
        return rows * self.embed_scale if self.embed_scale != 1.0 else rows

    def _qkv(self, layer: Layer, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], groups):
        batch, count, _ = hidden.shape
        flat = _rms_norm(hidden, layer.input_norm, self.eps).view(batch * count, -1)
        qkv = layer.qkv(flat, _expand_groups(groups, count)).view(batch, count, -1)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        v = qkv[..., q_size + kv_size:].view(batch, count, self.kv_heads, self.head_dim)
        cos, sin = rope
        if layer.q_norm is None:  # q and k side by side in qkv: one rotation for both heads' sets
            qk = qkv[..., :q_size + kv_size].view(batch, count, self.heads + self.kv_heads, self.head_dim)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk[:, :, :self.heads], qk[:, :, self.heads:]
        else:
            q = qkv[..., :q_size].view(batch, count, self.heads, self.head_dim)
            k = qkv[..., q_size:q_size + kv_size].view(batch, count, self.kv_heads, self.head_dim)
            q, k = _rms_norm(q, layer.q_norm, self.eps), _rms_norm(k, layer.k_norm, self.eps)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _finish_layer(self, layer: Layer, hidden: torch.Tensor, attended: torch.Tensor, groups) -> torch.Tensor:
        batch, count, width = hidden.shape
        rows = _expand_groups(groups, count)
        attended = attended.transpose(1, 2).reshape(batch * count, -1)
        attention_out = layer.o(attended, rows).view(batch, count, width)
        if layer.attention_out_norm is not None:
            attention_out = _rms_norm(attention_out, layer.attention_out_norm, self.eps)
        hidden = hidden + attention_out
        gate_up = layer.gate_up(_rms_norm(hidden, layer.post_norm, self.eps).view(batch * count, -1), rows,
                                as_rounded=True)
        gate, up = gate_up.chunk(2, dim=-1)  # bf16 or float32; `* up` widens a bf16 `up` exactly, as .float() would
        mlp_out = layer.down(self.activation(gate.float()) * up, rows).view(batch, count, width)
        if layer.mlp_out_norm is not None:
            mlp_out = _rms_norm(mlp_out, layer.mlp_out_norm, self.eps)
        return hidden + mlp_out


def lora_pairs(peft_model, adapter_name: str, name: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, projection) → (A [r, in], B [out, r] with the scaling folded in) of one adapter of a PeftModel;
    ModelError where the decoder cannot apply it (DoRA, modules outside the layers' projections, modules_to_save)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name):
            raise ModelError(f"adapter {name!r}: DoRA adapters are not supported by lmforge serve; merge it "
                             f"into the model first (lmforge export) and serve the merged model")
        parts = module_name.split(".")
        if "layers" not in parts or parts[-1] not in PROJECTIONS:
            raise ModelError(f"adapter {name!r} adapts {module_name}, which lmforge serve cannot apply per "
                             f"request (only the layers' {', '.join(PROJECTIONS)}); merge it and serve the result")
        layer = int(parts[parts.index("layers") + 1])
        lora_b = module.lora_B[adapter_name].weight.detach() * module.scaling[adapter_name]
        found[(layer, parts[-1])] = (module.lora_A[adapter_name].weight.detach(), lora_b)
    if not found:
        raise ModelError(f"adapter {name!r} has no LoRA weights this server can apply")
    if any(isinstance(m, torch.nn.ModuleDict) and adapter_name in m for n, m in peft_model.named_modules()
           if n.endswith("modules_to_save")):
        raise ModelError(f"adapter {name!r} also trains whole modules (modules_to_save); merge it and serve "
                         f"the merged model")
    return found


def load_adapter_into(decoder: Decoder, model, name: str, adapter_dir: Path) -> None:
    """Read a PEFT adapter dir with peft (config checks, key mapping, rank/alpha patterns), keep its LoRA rows."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"adapter {name!r}: {adapter_dir} is not a PEFT adapter dir (no adapter_config.json)")
    kind = json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type", "?")
    if kind != "LORA":  # prefix / prompt / p-tuning, IA3, LoHa, LoKr, bottleneck adapters
        raise ModelError(f"adapter {name!r} ({adapter_dir}) is a {kind} adapter; the server batches LoRA adapters "
                         f"only. Serve it on its own with `lmforge serve {adapter_dir}` (merged in memory, or through "
                         f"the model's own forward for prefix, prompt and p-tuning)")
    if (adapter_dir / QUANTIZATION_FILE).is_file():
        print(f"note: adapter {name!r} was trained on a quantised (QLoRA) base; it is served on the full-precision "
              f"base, so replies can differ slightly from training-time outputs", file=sys.stderr)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="serve")
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelError(f"adapter {name!r} ({adapter_dir}) does not fit this base model: {err}") from err
    try:
        decoder.add_lora(name, peft_model, "serve")
    finally:
        peft_model.unload()  # back to the plain base model, which the decoder's weights come from


def _layer(layer, weights: str, offset: float, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Layer:
    """offset: 1.0 for gemma's norms, which scale by (1 + weight); deltas: projection name → a merged LoRA's pair
    (A, B), whose product B @ A is added to that projection's weight."""
    attention, mlp = layer.self_attn, layer.mlp
    gemma = hasattr(layer, "pre_feedforward_layernorm")

    def norm(module) -> torch.Tensor:
        return module.weight.detach() + offset

    return Layer(
        input_norm=norm(layer.input_layernorm),
        post_norm=norm(layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm),
        attention_out_norm=norm(layer.post_attention_layernorm) if gemma else None,
        mlp_out_norm=norm(layer.post_feedforward_layernorm) if gemma else None,
        qkv=_fused_linear([attention.q_proj, attention.k_proj, attention.v_proj], weights, deltas, FUSED["qkv"]),
        o=_fused_linear([attention.o_proj], weights, deltas, FUSED["o"]),
        gate_up=_fused_linear([mlp.gate_proj, mlp.up_proj], weights, deltas, FUSED["gate_up"]),
        down=_fused_linear([mlp.down_proj], weights, deltas, FUSED["down"]),
        q_norm=norm(attention.q_norm) if hasattr(attention, "q_norm") else None,
        k_norm=norm(attention.k_norm) if hasattr(attention, "k_norm") else None,
    )


def _fused_linear(modules, weights: str, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  names: tuple[str, ...] = ()) -> Linear:
    modules = [getattr(m, "base_layer", m) for m in modules]  # a PEFT-wrapped model: the base weights
    parts = [m.weight.detach() for m in modules]
    deltas = {name: pair for name, pair in (deltas or {}).items() if name in names}
    if weights == "bfloat16" and (len(parts) > 1 or deltas):  # fused and rounded in one pass, no float32 copy
        weight = torch.empty(sum(part.shape[0] for part in parts), parts[0].shape[1], dtype=torch.bfloat16)
    elif len(parts) > 1:
        weight = torch.cat(parts)
    else:  # a copy only where a LoRA is added into it
        weight = parts[0].clone() if deltas else parts[0]
    row = 0
    for part, name in zip(parts, names):  # a LoRA's product added in float32, before any rounding
        rows = weight[row:row + part.shape[0]]
        if name in deltas:
            lora_a, lora_b = deltas[name]
            if rows.dtype == torch.bfloat16:
                rows.copy_(torch.addmm(part, lora_b, lora_a))
            else:
                rows.addmm_(lora_b, lora_a)
        elif rows.dtype == torch.bfloat16:
            rows.copy_(part)
        row += part.shape[0]
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return Linear(weight.contiguous(), weights=weights)
    bias = torch.cat([b.detach() if b is not None else torch.zeros(m.weight.shape[0])
                      for b, m in zip(biases, modules)])
    return Linear(weight.contiguous(), bias, weights=weights)


def _fuse_lora(pairs, out_features: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA of the parts of a fused projection → one A [sum r, in] and a block B [sum out, sum r]."""
    present = [p for p in pairs if p is not None]
    lora_a = torch.cat([a for a, _ in present])
    lora_b = torch.zeros(sum(out_features), lora_a.shape[0], dtype=lora_a.dtype)
    row = col = 0
    for pair, size in zip(pairs, out_features):
        if pair is not None:
            rank = pair[0].shape[0]
            lora_b[row:row + size, col:col + rank] = pair[1]
            col += rank
        row += size
    return lora_a.contiguous(), lora_b


def _out_features(decoder: Decoder, projection: str) -> int:
    layer = decoder.layers[0]
    sizes = {"q_proj": decoder.heads * decoder.head_dim, "k_proj": decoder.kv_heads * decoder.head_dim,
             "v_proj": decoder.kv_heads * decoder.head_dim, "o_proj": layer.o.out_features,
             "gate_proj": layer.gate_up.out_features // 2, "up_proj": layer.gate_up.out_features // 2,
             "down_proj": layer.down.out_features}
    return sizes[projection]


def _adapter_groups(row_adapters: list[int]) -> list[tuple[int, torch.Tensor | None]]:
    """[(adapter, row indices or None for all rows)] for the adapters (not the base, 0) present in a batch."""
    present = sorted(set(row_adapters) - {0})
    if len(present) == 1 and all(a == present[0] for a in row_adapters):
        return [(present[0], None)]
    return [(a, torch.tensor([i for i, r in enumerate(row_adapters) if r == a])) for a in present]


def _expand_groups(groups, count: int):
    """Row indices of a [B, T] batch flattened to [B*T] rows."""
    if count == 1:
        return groups
    return [(a, None if rows is None else (rows[:, None] * count + torch.arange(count)).flatten())
            for a, rows in groups]


def _zeros_on_demand(shape) -> torch.Tensor:
    """A float32 zero tensor whose pages become resident only when written: an anonymous mmap maps zero pages
    lazily, where torch.zeros would touch (and keep) all of it at start-up. Zeros, not garbage: a NaN left in memory
    would leak through masked attention (0 × NaN). Not numpy.zeros: numpy asks for transparent huge pages on large
    arrays, so the first write into each 2 MiB zeroes all of it — the whole cache, scattered writes touch every
    huge page — which cost ~0.8 s per cache on an eval's first prefill (benchmarks/RESULTS.md); 4 KiB pages zero
    only what is written."""
    import math
    import mmap

    buffer = mmap.mmap(-1, max(1, math.prod(shape)) * 4)  # anonymous, private, zero-filled on first touch
    return torch.frombuffer(buffer, dtype=torch.float32).view(shape)  # the tensor keeps the mapping alive


def fast_decoder_runs(config) -> bool:
    """Whether Decoder runs this architecture (else the server uses the model's own forward)."""
    return (config.model_type in SUPPORTED_TYPES and not getattr(config, "final_logit_softcapping", None)
            and not getattr(config, "attn_logit_softcapping", None))


def applies_windows(config) -> bool:
    """Whether Decoder applies this model's sliding windows itself (per layer, config.layer_types); without them a
    windowed model is served up to its window only."""
    return "sliding_attention" in (getattr(config, "layer_types", None) or [])


def holds_in_float16(model) -> bool:
    """Whether decode_dtype auto can pick float16: torch has FBGEMM and every weight fits float16's range."""
    return FLOAT16_KERNELS and all(p.abs().max() <= torch.finfo(torch.float16).max for p in model.parameters()
                                   if p.dim() == 2)


def choose_decode_weights(requested: str, bf16_instructions: list[str], bf16_kernels: bool, float16_fits: bool
                          ) -> tuple[str, str]:
    """(weight format, why) for decoding many prompts at once (eval, compare, the sweep, chat). `requested`: auto or
    a format. auto takes the fastest format this CPU has at batch widths, by this project's measurements
    (benchmarks/RESULTS.md): bf16 weights through oneDNN where the CPU multiplies bf16 natively (AVX512_BF16 / AMX),
    else float16 weights through FBGEMM (float32 activations) where torch has it and the weights fit, else float32.
    Pure (the CPU's facts are arguments), so both kinds of CPU are tested on any machine."""
    if requested not in ("auto", *WEIGHT_FORMATS):
        raise ModelError(f"decode dtype {requested!r}: use auto, {', '.join(WEIGHT_FORMATS)}")
    if requested != "auto":
        exact = " (greedy replies as the model's own forward gives them)" if requested == "float32" else ""
        return requested, f"{requested} as requested{exact}"
    if bf16_instructions and bf16_kernels:
        return "bfloat16", (f"auto: this CPU multiplies bf16 natively ({', '.join(bf16_instructions)}), where bf16 "
                            f"weights are the fastest format at batch widths; replies can differ slightly from "
                            f"float32's (--decode-dtype float32 gives those exactly)")
    if float16_fits:
        why = "no native bf16 on this CPU" if not bf16_instructions else "torch's oneDNN has no bf16 kernels here"
        return "float16", (f"auto: {why}; float16 weights through FBGEMM (float32 activations) read half float32's "
                           f"bytes per step; replies can differ slightly from float32's (--decode-dtype float32 "
                           f"gives those exactly)")
    return "float32", "auto: neither native bf16 nor FBGEMM float16 for these weights on this CPU"


def _check_float16_range(weight: torch.Tensor) -> None:
    if not FLOAT16_KERNELS:
        raise ModelError("decode_dtype float16 needs torch's FBGEMM kernels (x86-64 CPUs); this torch has none. "
                         "Use decode_dtype float32")
    if weight.abs().max() > torch.finfo(torch.float16).max:
        raise ModelError("this model has weights beyond float16's range (65504); use decode_dtype float32")


def bfloat16_kernels() -> bool:
    """Whether torch's oneDNN has bf16 kernels on this CPU (else a bf16 product is emulated, far slower)."""
    return PACKED_WEIGHTS and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _check_bfloat16_kernels() -> None:
    if not bfloat16_kernels():
        raise ModelError("decode_dtype bfloat16 needs a CPU with native bf16 (AVX512_BF16 or AMX) and torch's oneDNN; "
                         "use decode_dtype float16 or float32")


def _window_mask(start: int, count: int, window: int) -> torch.Tensor:
    """[T, start+T]: query at position p sees keys p - window < k <= p (transformers' sliding-window mask)."""
    queries, keys = torch.arange(start, start + count)[:, None], torch.arange(start + count)[None]
    return (keys <= queries) & (keys > queries - window)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)  # weight * x / sqrt(mean(x²) + eps), as transformers' RMSNorm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _activation(name: str):
    from transformers.activations import ACT2FN

    if name == "silu":
        return F.silu
    return ACT2FN[name]
