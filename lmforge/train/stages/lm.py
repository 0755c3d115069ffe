"""The language-modelling stages: pt (documents joined and cut into cutoff_len blocks, each document piece its own
packed example) and sft (conversations through the chat template, cleaned first when data.recipe is set, token ids
cached by content). Both train the LM head on supervised tokens; the loss is divided by supervised tokens.
Must not step optimizers or touch the run dir.
"""

from __future__ import annotations

from dataclasses import asdict

from ...config import Config
from ...data.cache import cleaned_dataset, rendered_dataset
from ...data.datasets import load_specs, resolve_many
from ...data.documents import load_documents
from ...data.recipe import load_recipe
from ...data.render import Example, RenderStats
from ...errors import DataError
from ..batching import collate
from ..losses import sft_loss_sum
from .base import LossOutput, Stage, StageData, hold_out


class LanguageModelling(Stage):
    def loss(self, config: Config, model, batch, reference=None) -> LossOutput:
        return LossOutput(sft_loss_sum(model, batch))


class Pretraining(LanguageModelling):
    """pt: continued pretraining on raw text."""
    name = "pt"
    reads = "text"

    def load(self, specs, max_samples):
        return load_documents(specs, max_samples)

    def units(self, tokenizer, documents: list[str], cutoff_len: int):
        """Documents + eos, joined and cut into blocks of cutoff_len tokens; a block is its document pieces."""
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        blocks, current, filled = [], [], 0
        for text in documents:
            ids = tokenizer(text)["input_ids"] + eos
            while ids:
                piece, ids = ids[:cutoff_len - filled], ids[cutoff_len - filled:]
                current.append(Example(piece, list(piece)))
                filled += len(piece)
                if filled == cutoff_len:
                    blocks.append(current)
                    current, filled = [], 0
        if current:
            blocks.append(current)
        tokens = sum(len(e.input_ids) for block in blocks for e in block)
        return blocks, {"documents": len(documents), "blocks": len(blocks), "tokens": tokens,
                        "supervised_tokens": sum(max(len(e.input_ids) - 1, 0) for b in blocks for e in b)}

    def batch(self, units, padded, pad_id=0):
        return collate([piece for block in units for piece in block], padded, pad_id)

    def summary(self, report: dict) -> str:
        train = report["train"]
        return f"{train['documents']} documents → {train['blocks']} blocks"


class SupervisedFineTuning(LanguageModelling):
    """sft: conversations; data.train_on says which tokens carry loss."""
    name = "sft"
    reads = "sft"

    def load(self, specs, max_samples):
        return load_specs(specs, max_samples)

    def prepare(self, config: Config, tokenizer) -> StageData:
        """Read (cleaning first when a recipe is set), split and render the datasets. Every conversation is accounted
        for in the report. Cleaned data and token ids are cached by content (data/cache.py), so a rerun does not redo
        them."""
        data = config.data
        steps = load_recipe(None if data.recipe == "default" else data.recipe) if data.recipe else None
        cleaning: dict[str, dict] = {}

        def load(entries: list[str]):
            specs = resolve_many(entries, data.dataset_dir)
            if steps:
                for i, spec in enumerate(specs):
                    specs[i], cleaning[spec.name] = cleaned_dataset(spec, steps)
                    summary = cleaning[spec.name]
                    print(f"clean {spec.name}: {summary['records_in']} records → kept {summary['kept']}, rejected "
                          f"{summary['rejected']}{' (cached)' if summary['cached'] else ''} · report "
                          f"{summary['report']}")
            return load_specs(specs, data.max_samples)

        conversations, counts = load(data.train)
        if data.val:
            val_conversations, _ = load(data.val)
        else:
            conversations, val_conversations = hold_out(conversations, data.val_size, config.train.seed)
        train, train_stats, train_cached = rendered_dataset(tokenizer, conversations, data.train_on, data.cutoff_len)
        val, val_stats, _ = rendered_dataset(tokenizer, val_conversations, data.train_on, data.cutoff_len)
        if not train:
            raise DataError(f"no training examples left: all {train_stats.read} were dropped because nothing "
                            f"trainable fits within data.cutoff_len={data.cutoff_len} (every prompt is longer than "
                            f"that). Raise data.cutoff_len.")
        report = {"datasets": counts, "train": asdict(train_stats), "val": asdict(val_stats),
                  "train_tokens": sum(len(e.input_ids) for e in train),
                  "train_supervised_tokens": sum(e.num_supervised for e in train),
                  "tokenized_from_cache": train_cached}
        if cleaning:
            report["cleaning"] = cleaning
        return StageData(train, val, report)

    def batch(self, units, padded, pad_id=0):
        return collate(units, padded, pad_id)

    def summary(self, report: dict) -> str:
        return RenderStats(**report["train"]).summary()
