"""The optimizer of a run, built by the library that owns each one.

Owns: build_optimizer(), the one place an optimizer is constructed. train.optim by its Hugging Face name through
transformers' own table (Trainer.get_optimizer_cls_and_kwargs: torch's AdamW / SGD / Adagrad / RMSprop,
transformers' Adafactor, bitsandbytes' 8-bit and paged AdamW), torch.optim.Muon (muon), LoRA+ through peft's
create_loraplus_optimizer, GaLore (galore-torch), APOLLO (apollo-torch) and Adam-mini (adam-mini) with their own
parameter groups. Every optimizer sees only the trainable parameters. Must not know about data, stages or the
loop's schedule (the loop wraps whatever this returns in its learning-rate schedule).
"""

from __future__ import annotations

import contextlib
import io
import tempfile

import torch

from ..errors import ConfigError

PINS = {"galore": "galore-torch==1.0", "apollo": "apollo-torch==1.0.3", "adam_mini": "adam-mini==1.1.1"}


def build_optimizer(config, model, world: int = 1) -> torch.optim.Optimizer:
    """The run's optimizer over the model's trainable parameters (config is the run's Config)."""
    train = config.train
    special = train.low_rank_optimizer or ("adam_mini" if train.adam_mini else None) or (
        "optim muon" if train.optim == "muon" else None)
    if special and world > 1:
        raise ConfigError(f"train.{special} trains in one process here (its state is not sharded or gathered "
                          f"across processes); under torchrun use train.optim adamw_torch, adafactor, sgd, adagrad "
                          f"or rmsprop")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if train.adam_mini:
        return _adam_mini(config, model)
    if train.optim == "muon":
        return _muon(train, named)
    optimizer_cls, kwargs = hf_optimizer(train.optim, train.learning_rate)
    if train.low_rank_optimizer:
        return _low_rank(train, named, kwargs)
    if config.method.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        kwargs.pop("lr")
        return create_loraplus_optimizer(model, optimizer_cls, lr=train.learning_rate,
                                         loraplus_lr_ratio=config.method.loraplus_lr_ratio,
                                         loraplus_lr_embedding=config.method.loraplus_lr_embedding,
                                         weight_decay=train.weight_decay, **kwargs)
    return optimizer_cls([p for _, p in named], weight_decay=train.weight_decay, **kwargs)


def hf_optimizer(name: str, lr: float) -> tuple[type, dict]:
    """The optimizer class and arguments transformers' Trainer uses for optim `name`."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as scratch:  # TrainingArguments wants an output_dir; nothing is written
        args = TrainingArguments(output_dir=scratch, optim=name, learning_rate=lr, report_to="none", use_cpu=True)
    try:
        return Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"train.optim {name}: {error} (bitsandbytes optimizers: pip install "
                          f"bitsandbytes==0.50.2; or use adamw_torch)") from None


def _require(key: str, module: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise ConfigError(f"train.{key} needs {PINS[key]} ({error}): pip install {PINS[key]}") from None


def _linear_weights(named, targets) -> list[torch.nn.Parameter]:
    """The decoder layers' linear weights named by targets (short names, or "all")."""
    chosen = []
    for name, parameter in named:
        parts = name.split(".")
        if ".layers." in name and parameter.ndim == 2 and parts[-1] == "weight" and (
                targets == "all" or parts[-2] in targets):
            chosen.append(parameter)
    return chosen


def _low_rank(train, named, kwargs) -> torch.optim.Optimizer:
    """GaLore or APOLLO: low-rank settings on the decoder's linear weights, plain updates on the rest."""
    kind = train.low_rank_optimizer
    targets = getattr(train, f"{kind}_target")
    projected = _linear_weights(named, targets)
    if not projected:
        raise ConfigError(f"train.{kind}_target: {targets} — no trainable linear weight of the decoder layers matches "
                          f"(train full or freeze layers with linear layers of these names)")
    ids = {id(p) for p in projected}
    rest = [p for _, p in named if id(p) not in ids]
    kwargs = {key: value for key, value in kwargs.items() if key in ("lr", "betas", "eps")}
    if kind == "galore":
        galore = _require("galore", "galore_torch")
        settings = {"rank": train.galore_rank, "update_proj_gap": train.galore_update_interval,
                    "scale": train.galore_scale, "proj_type": train.galore_proj_type}
        if train.optim == "adafactor":
            optimizer_cls = galore.GaLoreAdafactor
            kwargs = {"lr": train.learning_rate, "scale_parameter": False, "relative_step": False}
        else:
            optimizer_cls = galore.GaLoreAdamW
            kwargs["no_deprecation_warning"] = True
    else:
        optimizer_cls = _require("apollo", "apollo_torch").APOLLOAdamW
        settings = {"rank": train.apollo_rank, "proj": train.apollo_proj, "proj_type": train.apollo_proj_type,
                    "update_proj_gap": train.apollo_update_interval, "scale": train.apollo_scale,
                    "scale_type": train.apollo_scale_type, "scale_front": train.apollo_scale_front}
    groups = [{"params": projected, "weight_decay": train.weight_decay, **settings}]
    if rest:
        groups.insert(0, {"params": rest, "weight_decay": train.weight_decay})
    return optimizer_cls(groups, **kwargs)


def _adam_mini(config, model) -> torch.optim.Optimizer:
    adam_mini = _require("adam_mini", "adam_mini")
    base = model.config
    with contextlib.redirect_stdout(io.StringIO()):  # it prints one line per parameter it classifies
        return adam_mini.Adam_mini(named_parameters=model.named_parameters(), lr=config.train.learning_rate,
                                   weight_decay=config.train.weight_decay, model_sharding=False,
                                   dim=base.hidden_size, n_heads=base.num_attention_heads,
                                   n_kv_heads=getattr(base, "num_key_value_heads", None) or base.num_attention_heads)


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the hidden 2-D weights, AdamW on everything else (embeddings, LM head, norms, biases), as
    Muon is meant to be used; one optimizer to the schedule and the checkpoint (param_groups are the parts' own, read
    afresh each time: load_state_dict replaces a part's group dicts)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer | None):
        super().__init__([p for part in (muon, adamw) if part for g in part.param_groups for p in g["params"]],
                         muon.defaults)
        self.parts = [muon] + ([adamw] if adamw is not None else [])

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in getattr(self, "parts", []) for group in part.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:
        pass  # the parts own their groups (Optimizer.__init__ assigns a list of its own here)

    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts:
            part.zero_grad(set_to_none)

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict):
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)


def _muon(train, named) -> torch.optim.Optimizer:
    hidden = [p for name, p in named if p.ndim == 2 and "embed" not in name and "lm_head" not in name]
    ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in ids]
    if not hidden:
        raise ConfigError("train.optim muon: no trainable 2-D weight inside the model (Muon orthogonalises "
                          "matrix updates); use adamw_torch")
    muon = torch.optim.Muon(hidden, lr=train.learning_rate, weight_decay=train.weight_decay,
                            adjust_lr_fn="match_rms_adamw")  # the learning rate an AdamW run would use
    adamw = torch.optim.AdamW(rest, lr=train.learning_rate, weight_decay=train.weight_decay) if rest else None
    return MuonWithAdamW(muon, adamw)
