"""The typed schema of a training run, grouped by concern (model, method, data, train, preference).

Owns: every field and its meaning (documented once, here, and printed by `lmforge train --help-config`).
Must not read files: load.py reads YAML and overrides, llamafactory.py translates LLaMA-Factory's keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..model.method_specs import ALL, LAYERS, METHOD_SPECS, MethodSpec, spoken_list


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    name_or_path: str = "smollm2-135m-instruct"
    """Builtin alias (see `lmforge models`), a local HF model dir, or a hub id."""
    template: str | None = None
    """Chat template: a Jinja string, a name (chatml, human_assistant: replace the model's own), or a LLaMA-Factory
    name (llama3, llama2, qwen, qwen3, mistral, gemma, glm4, alpaca, default, empty: used when the model has none)."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. On a CPU, bfloat16 and auto train under bf16 autocast (float32
    parameters) where the CPU multiplies bf16 fast (AMX / AVX512_BF16, confirmed by a probe; auto: models of hidden
    size 256 and up), else in float32; one line says which and why. On a GPU: the weights in that dtype."""
    adapter: str | None = None
    """A trained PEFT adapter dir (or an lmforge run dir) to continue training: its weights replace the method's fresh
    ones, so method.type and the LoRA settings must be the adapter's (LLaMA-Factory: adapter_name_or_path)."""


MethodName = Literal[tuple(METHOD_SPECS)]  # the methods of model/method_specs.py, in its order
OptimName = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop", "adamw_8bit",
                    "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "muon"]  # built in train/optimizers.py
StageName = Literal["pt", "sft", "rm", "dpo", "orpo", "simpo", "kto"]  # train/stages/'s STAGES (tests check they agree)
METHODS, STAGES = tuple(METHOD_SPECS), get_args(StageName)


class MethodConfig(Section):
    type: MethodName = "lora"
    """How parameters are made trainable (LLaMA-Factory: finetuning_type). lora/dora/qlora/loha/lokr/ia3 add weights
    to linear layers; prefix (prefix tuning), ptuning (P-tuning v2) and prompt (prompt tuning) add virtual tokens;
    adapter adds bottleneck adapters after each attention and MLP block; freeze trains some layers; full trains all."""
    lora_rank: int = 8
    """Rank of lora / dora / qlora / loha / lokr."""
    lora_alpha: float | None = None
    """Defaults to 2 × lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input during training (0 = none)."""
    lora_target: list[str] | Literal["all"] = "all"
    """Module names (q_proj, v_proj, …) or "all" for every linear layer of the decoder (lora, dora, qlora, loha, lokr,
    ia3; ia3 with "all" uses peft's defaults for the architecture: attention k/v and the MLP's down projection)."""
    use_dora: bool = False
    """lora: weight-decomposed LoRA (same as type: dora)."""
    use_rslora: bool = False
    """lora: rank-stabilised scaling alpha/sqrt(r) instead of alpha/r."""
    lora_init: Literal["default", "pissa", "olora"] = "default"
    """lora: initialise A and B from the weights' principal singular vectors (pissa) or a QR decomposition (olora)
    instead of B = 0; the saved adapter is converted back to a plain LoRA on the original base."""
    pissa_iter: int | None = None
    """lora_init pissa: find the singular vectors by fast randomised SVD with this many subspace iterations (peft's
    pissa_niter_N; LLaMA-Factory's default is 16) instead of an exact SVD (unset)."""
    loraplus_lr_ratio: float | None = None
    """lora / dora / qlora: LoRA+ — the B matrices learn this many times faster than the A matrices (peft's
    create_loraplus_optimizer; the paper suggests 16). Unset: one learning rate."""
    loraplus_lr_embedding: float = 1e-6
    """LoRA+: the learning rate of LoRA B matrices on embedding layers."""
    oft_rank: int = 0
    """oft: number of orthogonal blocks per layer (0: derived from oft_block_size; set one of the two)."""
    oft_block_size: int = 32
    """oft: size of each orthogonal block (must divide the targeted layers' input size; 0: derived from oft_rank)."""
    module_dropout: float = 0.0
    """oft: probability of switching off a whole orthogonal block during training (multiplicative dropout)."""
    quantization_bit: Literal[4, 8] | None = None
    """Quantise the frozen base linear layers with bitsandbytes (qlora; type qlora defaults to 4)."""
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quantization: bool = True
    """4-bit: quantise the quantisation constants too."""
    num_virtual_tokens: int = 16
    """prefix / ptuning / prompt: how many virtual tokens."""
    prefix_projection_dim: int = 512
    """prefix: hidden size of the MLP that reparameterises the prefix (Li & Liang); ptuning trains the prefix
    directly (P-tuning v2, as ChatGLM3's demo)."""
    prompt_init_text: str | None = None
    """prompt: initialise the virtual tokens from the embeddings of this text (repeated/cut to num_virtual_tokens);
    random initialisation when unset."""
    adapter_size: int = 64
    """adapter: bottleneck width of each adapter."""
    adapter_target: list[str] | Literal["auto"] = "auto"
    """adapter: the linear layers whose output gets an adapter; auto = attention output and MLP output projections
    (Houlsby placement: after each sub-layer, before the residual add)."""
    freeze_trainable_layers: int = 2
    """freeze: train the last N decoder layers (negative: the first N); with llama_pro: the N expanded blocks."""
    freeze_trainable_modules: list[str] | Literal["all"] = "all"
    """freeze: inside the trained layers, only these modules train (self_attn, mlp, input_layernorm, …; names
    directly under a decoder layer); all = the whole layers (LLaMA-Factory's meaning and default)."""
    freeze_extra_modules: list[str] = []
    """freeze: modules outside the decoder layers that train too (embed_tokens, norm, lm_head, …)."""
    llama_pro: bool = False
    """freeze / lora / dora: LLaMA Pro — the model was block-expanded (LLaMA-Factory's scripts/llama_pro.py, or
    method.llama_pro_expand) and only the expanded blocks train: every (layers / freeze_trainable_layers)-th layer."""
    llama_pro_expand: int = 0
    """freeze + llama_pro: expand the loaded model by this many blocks before training (each a copy of the block
    before it with o_proj and down_proj zeroed, so the model computes the same function); the saved model has them.
    0: the model is already expanded."""

    @field_validator("lora_target", "adapter_target", "freeze_trainable_modules", "freeze_extra_modules",
                     mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() not in ("all", "auto"):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> MethodConfig:
        if self.quantization_bit is not None and not self.spec.quantized_base:
            quantizable = spoken_list(name for name, spec in METHOD_SPECS.items() if spec.quantized_base)
            why = (" (OFT on a 4/8-bit base, LLaMA-Factory's QOFT: the installed peft has a bitsandbytes variant of "
                   "LoRA but not of OFT)" if self.type == "oft" else "")
            raise ValueError(f"method.quantization_bit: a quantised base trains with {quantizable}, not "
                             f"{self.type!r}{why} (set method.type: qlora, or remove quantization_bit)")
        if self.lora_init != "default" and not self.spec.lora_init:
            raise ValueError(f"method.lora_init: {self.lora_init} initialises a LoRA on an unquantised base; it does "
                             f"not apply to {self.type!r}")
        if self.num_virtual_tokens < 1:
            raise ValueError("method.num_virtual_tokens must be at least 1")
        if self.pissa_iter is not None and self.lora_init != "pissa":
            raise ValueError("method.pissa_iter sets PiSSA's SVD; it needs method.lora_init: pissa")
        if self.loraplus_lr_ratio is not None and not self.spec.loraplus:
            usable = spoken_list(name for name, spec in METHOD_SPECS.items() if spec.loraplus)
            raise ValueError(f"method.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices; it applies "
                             f"to {usable}, not {self.type!r}")
        if self.llama_pro and self.type not in ("freeze", "lora", "dora"):
            raise ValueError(f"method.llama_pro trains the expanded blocks with freeze, lora or dora, not "
                             f"{self.type!r} (LLaMA-Factory: use_llama_pro is only valid for freeze or LoRA)")
        if self.llama_pro_expand and not (self.llama_pro and self.type == "freeze"):
            raise ValueError("method.llama_pro_expand expands the model for a freeze run: set method.type: freeze "
                             "and method.llama_pro: true (a LoRA adapter needs the expanded model as its base: "
                             "expand it with a freeze run, or LLaMA-Factory's scripts/llama_pro.py, first)")
        return self

    @property
    def spec(self) -> MethodSpec:
        """What the method is (model/method_specs.py)."""
        return METHOD_SPECS[self.type]

    @property
    def peft(self) -> bool:
        """Saved as a PEFT adapter dir (adapter/); full and freeze save the whole model (model/)."""
        return not self.spec.saves_model

    @property
    def virtual_tokens(self) -> bool:
        """Methods that add tokens in front of each sequence: packing does not apply, rows are padded instead."""
        return self.spec.virtual_tokens

    @property
    def dora(self) -> bool:
        return self.type == "dora" or self.use_dora

    @property
    def bits(self) -> int | None:
        """Quantisation of the frozen base: qlora defaults to 4-bit."""
        return self.quantization_bit or self.spec.default_bits


class DataConfig(Section):
    train: list[str] = []
    """Dataset files (json/jsonl in alpaca, sharegpt, conversations or messages shape) or names in dataset_info.json."""
    val: list[str] = []
    """Validation files or names. Alternative: val_size."""
    dataset_dir: str = "data"
    """Where dataset names are looked up (dataset_info.json), as in LLaMA-Factory."""
    val_size: float = 0.0
    """Fraction (< 1) or count (≥ 1) of the training data held out for validation."""
    cutoff_len: int = 1024
    """Maximum tokens per example; longer examples are truncated, and dropped if nothing trainable is left."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn, only the last one, or every token."""
    max_samples: int | None = None
    """Use at most this many examples from each dataset."""
    recipe: str | None = None
    """Clean every dataset before training (as `lmforge data clean` does): a recipe YAML file, or "default" for the
    built-in recipe. The cleaned data and its report are cached by content, so a second run does no work."""

    @field_validator("train", "val", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class PreferenceConfig(Section):
    """Options of the preference stages (dpo, orpo, simpo, kto) and of rm's evaluation."""
    beta: float = 0.1
    """dpo/kto: strength of the pull towards the reference model; orpo: weight of the odds-ratio term; simpo: reward
    scale (LLaMA-Factory: pref_beta)."""
    loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """dpo's loss: sigmoid (the DPO paper), hinge (SLiC), ipo (IPO, on length-averaged log-probs)."""
    label_smoothing: float = 0.0
    """dpo sigmoid: assumed fraction of flipped preference labels (conservative DPO)."""
    ftx: float = 0.0
    """dpo/simpo/kto: add this × the SFT loss on the chosen (desirable) responses (LLaMA-Factory: pref_ftx)."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin."""
    kto_desirable_weight: float = 1.0
    """kto: weight of the loss on replies labelled desirable."""
    kto_undesirable_weight: float = 1.0
    """kto: weight of the loss on replies labelled undesirable."""


class TrainConfig(Section):
    stage: StageName = "sft"
    """pt: continued pretraining on raw text; sft: conversations; rm: a reward model on preference pairs; dpo / orpo /
    simpo: preference pairs; kto: single responses labelled desirable or undesirable."""
    output_dir: str | None = None
    """Run directory. Default: runs/<name>."""
    seed: int = 42
    """Seeds data order, initialisation and dropout; a run is reproducible from it."""
    learning_rate: float = 2e-4
    """Peak learning rate of the optimizer (after warm-up)."""
    optim: OptimName = "adamw_torch"
    """The optimizer, by its Hugging Face name: adamw_torch, adamw_torch_fused, adafactor, sgd, adagrad, rmsprop
    (torch / transformers, built by transformers' Trainer.get_optimizer_cls_and_kwargs), adamw_8bit / adamw_bnb_8bit
    / paged_adamw_8bit / paged_adamw_32bit (bitsandbytes; on a CPU paged ones run unpaged), muon (torch.optim.Muon
    on the decoder's 2-D weights, AdamW on the rest). galore / apollo / adam_mini below replace it."""
    galore: bool = False
    """GaLore: gradients of the decoder's linear weights projected to galore_rank (galore-torch; optim adamw_torch
    or adafactor). Trains full or freeze weights with less optimizer state (LLaMA-Factory: use_galore)."""
    galore_target: list[str] | Literal["all"] = "all"
    """GaLore: the linear layers (short names) whose weights get projected gradients."""
    galore_rank: int = 16
    """GaLore: rank of the projected gradients."""
    galore_update_interval: int = 200
    """GaLore: steps between recomputing the projection."""
    galore_scale: float = 2.0
    """GaLore: scale of the projected update."""
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    """GaLore: which side is projected."""
    apollo: bool = False
    """APOLLO: AdamW with low-rank auxiliary states scaling SGD-like updates (apollo-torch; optim adamw_torch),
    on the decoder's linear weights (LLaMA-Factory: use_apollo)."""
    apollo_target: list[str] | Literal["all"] = "all"
    """APOLLO: the linear layers (short names) it applies to."""
    apollo_rank: int = 16
    """APOLLO: rank of the auxiliary space."""
    apollo_update_interval: int = 200
    """APOLLO: steps between new projections."""
    apollo_scale: float = 32.0
    """APOLLO: scale of the update."""
    apollo_proj: Literal["svd", "random"] = "random"
    """APOLLO: projection by SVD or random."""
    apollo_proj_type: Literal["std", "right", "left"] = "std"
    """APOLLO: which side is projected."""
    apollo_scale_type: Literal["channel", "tensor"] = "channel"
    """APOLLO: scaling per channel or per tensor."""
    apollo_scale_front: bool = False
    """APOLLO: apply the norm-growth limiter before the gradient scaling."""
    adam_mini: bool = False
    """Adam-mini: one second-moment value per block of parameters instead of one per parameter (adam-mini;
    LLaMA-Factory: use_adam_mini)."""
    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed); max_steps, when set, wins."""
    max_steps: int = -1
    """Optimizer steps; overrides num_train_epochs when > 0."""
    batch_size: int = 4
    """Examples per micro-batch (per_device_train_batch_size)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised over the whole step, so this equals one batch this
    many times larger."""
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = 0.0
    """Share of the total steps spent warming the learning rate up from 0 (warmup_steps wins when set)."""
    warmup_steps: int = 0
    """Steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """Weight decay of the optimizer."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this."""
    logging_steps: int = 10
    """Write a line to metrics.jsonl (loss, learning rate, grad norm, tokens/s) every N steps."""
    eval_steps: int | None = None
    """Evaluate every N steps (and at the end) when there is validation data."""
    eval_batch_size: int = 8
    """Examples per batch when computing the validation loss."""
    save_steps: int | None = None
    """Checkpoint every N steps (and on Ctrl-C)."""
    save_total_limit: int | None = None
    """Keep only the newest N checkpoints."""
    resume_from_checkpoint: str | None = None
    """A checkpoint dir, or "latest" for the newest complete one in output_dir."""
    overwrite_output_dir: bool = False
    """Replace a previous run in output_dir (without it, a non-empty output_dir is refused unless resuming)."""
    distributed: Literal["auto", "ddp", "fsdp", "fsdp_grad_op"] = "auto"
    """Under torchrun (`--nproc N` or `torchrun ... -m lmforge train`): ddp keeps a whole model on every process and
    averages gradients; fsdp shards weights, gradients and optimizer state across processes (FSDP2, one shard group
    per decoder layer: DeepSpeed ZeRO-3), for models that do not fit one device; fsdp_grad_op shards gradients and
    optimizer state but keeps whole weights between forward and backward (ZeRO-2); auto = ddp. batch_size is per
    process: the global batch is processes × batch_size × gradient_accumulation_steps."""
    ddp_find_unused_parameters: bool = False
    """ddp: let gradient averaging wait only for parameters the step used (needed when some trainable parameters
    get no gradient in a step; slower)."""
    ddp_timeout: int = 1800
    """Seconds a process waits for the others at a synchronisation point before the job fails."""
    skip_memory_check: bool = False
    """Start even when the memory pre-flight estimates that the run will not fit (the estimate is still printed)."""

    @field_validator("galore_target", "apollo_target", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() != "all":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_optimizer(self) -> TrainConfig:
        chosen = [name for name in ("galore", "apollo", "adam_mini") if getattr(self, name)]
        if len(chosen) > 1:
            raise ValueError(f"train.{' and train.'.join(chosen)}: each is an optimizer of its own; choose one")
        if self.galore and self.optim not in ("adamw_torch", "adafactor"):
            raise ValueError(f"train.galore runs GaLore's AdamW (optim adamw_torch) or Adafactor (optim adafactor), "
                             f"not optim {self.optim}")
        if (self.apollo or self.adam_mini) and self.optim != "adamw_torch":
            raise ValueError(f"train.{chosen[0]} is an AdamW of its own: leave train.optim at adamw_torch "
                             f"(not {self.optim})")
        return self

    @property
    def low_rank_optimizer(self) -> str | None:
        """galore or apollo when one of them is on."""
        return "galore" if self.galore else "apollo" if self.apollo else None


class Config(Section):
    name: str = "run"
    """Run name; the default output_dir is runs/<name>."""
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    preference: PreferenceConfig = PreferenceConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.data.train:
            raise ValueError("data.train is empty: name at least one dataset file (data.train: [path/to/file.jsonl])")
        if self.data.recipe and self.train.stage != "sft":
            raise ValueError(f"data.recipe cleans conversations (stage sft); stage {self.train.stage} reads "
                             f"{'documents' if self.train.stage == 'pt' else 'preference data'}: clean the files "
                             f"before training, or remove data.recipe")
        if self.train.low_rank_optimizer and self.method.spec.changes not in (LAYERS, ALL):
            raise ValueError(f"train.{self.train.low_rank_optimizer} projects the gradients of the model's own weights "
                             f"(method.type full or freeze), not of {self.method.type!r}'s added ones; LoRA is "
                             f"already low-rank")
        if self.train.adam_mini and self.method.spec.changes not in (LAYERS, ALL):
            raise ValueError(f"train.adam_mini partitions the model's own weights by attention head and layer "
                             f"(method.type full or freeze); {self.method.type!r}'s added weights have no such blocks: "
                             f"use train.optim adamw_torch")
        other = self.train.low_rank_optimizer or ("adam_mini" if self.train.adam_mini else None) or (
            "optim muon" if self.train.optim == "muon" else None)
        if self.method.loraplus_lr_ratio is not None and other:
            raise ValueError(f"method.loraplus_lr_ratio groups LoRA's matrices for one optimizer; it does not combine "
                             f"with train.{other}")
        if self.train.stage == "rm" and self.method.virtual_tokens:
            usable = spoken_list(name for name, spec in METHOD_SPECS.items() if not spec.virtual_tokens)
            raise ValueError(f"train.stage rm with method.type {self.method.type}: a reward model scores the last "
                             f"token's hidden state, which virtual-token methods do not train towards; use {usable}")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


SECTIONS = {"model": ModelConfig, "method": MethodConfig, "data": DataConfig, "train": TrainConfig,
            "preference": PreferenceConfig}


def known_paths() -> list[str]:
    """Every settable key as a dotted path (train.learning_rate, …) plus the top-level ones."""
    paths = [name for name in Config.model_fields if name not in SECTIONS]
    for section, cls in SECTIONS.items():
        paths += [f"{section}.{field}" for field in cls.model_fields]
    return paths
