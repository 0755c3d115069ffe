"""Prefix / P-tuning v2 / prompt-tuning adapters behind an outside KV cache: peft's forward re-adds the virtual tokens
on every call, which breaks generate.py's decode loop. `VirtualTokenModel` adds them once (prefix into the cache, or
prompt embeddings before the first chunk), widens the mask and shifts positions as in training; code that runs "the
decoder" on a packed row (evaluate.py's loss) gets each example through this forward. Must not train.
"""

from __future__ import annotations

import torch


class VirtualTokenModel(torch.nn.Module):
    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        config = peft_model.active_peft_config
        self.virtual = config.num_virtual_tokens
        self.prefix = config.peft_type == "PREFIX_TUNING"

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, set_attn_implementation, get_output_embeddings, …: the peft model's
            if name == "get_base_model":  # callers that unwrap must keep this wrapper (its forward adds the tokens)
                raise
            return getattr(self.peft_model, name)

    def get_decoder(self):
        """For code that runs the decoder on a packed row (evaluate.py's loss): each example of the row goes through
        this model's own forward, so its hidden states include the virtual tokens' effect."""
        return _PerExampleDecoder(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                **kwargs):
        from transformers import DynamicCache

        base = self.peft_model.get_base_model()
        rows, length = input_ids.shape
        if past_key_values is None:
            past_key_values = DynamicCache()
        seen = past_key_values.get_seq_length()
        first = seen == 0
        if position_ids is None:  # real tokens continue where the cache ends (the cache holds the virtual ones too)
            position_ids = (torch.arange(length) + (0 if first else seen - self.virtual)).expand(rows, -1)
        mask = None if attention_mask is None else \
            torch.cat([torch.ones(rows, self.virtual, dtype=attention_mask.dtype), attention_mask], dim=1)
        positions = position_ids + self.virtual
        if self.prefix:
            if first:  # the learned key/values of every layer, as the cache's first entries
                prompt = self.peft_model.get_prompt(rows, max_cache_len=self.virtual + input_ids.shape[1])
                for layer in range(len(prompt.layers)):
                    past_key_values.update(prompt.layers[layer].keys, prompt.layers[layer].values, layer)
            return base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                        past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        if not first:
            return base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                        past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        embeds = base.get_input_embeddings()(input_ids)
        prompts = self.peft_model.get_prompt(batch_size=rows).to(embeds.dtype)
        positions = torch.cat([torch.arange(self.virtual).expand(rows, -1), positions], dim=1)
        output = base(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, position_ids=positions,
                      past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        if output.logits.shape[1] > input_ids.shape[1]:  # no outputs for the virtual tokens themselves
            output.logits = output.logits[:, -input_ids.shape[1]:]
        return output


class _PerExampleDecoder(torch.nn.Module):
    def __init__(self, owner: VirtualTokenModel):
        super().__init__()
        self.owner = [owner]  # a list: not registered as a submodule (no cycle)

    def forward(self, input_ids, cu_seq_lens_q=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        bounds = cu_seq_lens_q.tolist() if cu_seq_lens_q is not None else [0, input_ids.shape[1]]
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            output = self.owner[0](input_ids=input_ids[:, start:end], output_hidden_states=True, use_cache=False)
            pieces.append(output.hidden_states[-1][:, -(end - start):])
        return BaseModelOutputWithPast(last_hidden_state=torch.cat(pieces, dim=1))
