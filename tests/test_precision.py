"""The precision choice (model/precision.py) on both kinds of CPU — the capability and the probe's figures are passed
in, torch is real — and that bf16 autocast training tracks float32's losses where this CPU has bf16."""

import pytest
import torch

from lmforge.errors import UserError
from lmforge.model import precision
from lmforge.model.lean_decoder import bfloat16_kernels
from lmforge.model.precision import CpuCapability, GemmProbe, Precision, choose_cpu_training, cpu_capability

pytestmark = pytest.mark.usefixtures("one_thread")

ZEN3 = CpuCapability("AMD EPYC 7B13", frozenset({"avx2", "fma"}))  # no AVX-512: bf16 is emulated
ZEN4 = CpuCapability("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
XEON_AMX = CpuCapability("Intel(R) Xeon(R) Processor", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
FAST = GemmProbe((256, 576, 1536), fp32_gflops=90.0, bf16_gflops=290.0)
SLOW = GemmProbe((256, 576, 1536), fp32_gflops=90.0, bf16_gflops=95.0)


def never_probed() -> GemmProbe:
    raise AssertionError("the probe must not run when the flags already rule bf16 out")


@pytest.mark.parametrize("requested", ["auto", "bf16", "bfloat16", None])
def test_cpu_without_native_bf16_trains_in_float32_and_says_why(requested):
    chosen = choose_cpu_training(requested, ZEN3, 576, never_probed)
    assert chosen.autocast is None and chosen.load_dtype == torch.float32
    assert "AMD EPYC 7B13 has no native bf16" in chosen.reason and "amx_bf16 / avx512_bf16" in chosen.reason


@pytest.mark.parametrize("capability", [ZEN4, XEON_AMX])
@pytest.mark.parametrize("requested", ["auto", "bf16", "bfloat16"])
def test_cpu_with_fast_bf16_trains_under_bf16_autocast_with_float32_parameters(capability, requested):
    chosen = choose_cpu_training(requested, capability, 576, lambda: FAST)
    assert chosen.autocast == torch.bfloat16 and chosen.load_dtype == torch.float32
    assert capability.bf16_instructions[0] in chosen.reason and "3.2× fp32" in chosen.reason
    assert "bf16 290 vs fp32 90 GFLOP/s at 256×576×1536" in chosen.reason


def test_bf16_flags_without_a_fast_probe_stay_float32():
    chosen = choose_cpu_training("bf16", ZEN4, 576, lambda: SLOW)
    assert chosen.autocast is None
    assert "not fast enough here" in chosen.reason and "1.1× < 1.3×" in chosen.reason


def test_float32_requested_is_float32_everywhere():
    for capability in (ZEN3, XEON_AMX):
        assert choose_cpu_training("fp32", capability, 576, never_probed).autocast is None


def test_auto_keeps_small_models_in_float32_but_an_explicit_bf16_is_measured():
    assert choose_cpu_training("auto", XEON_AMX, 64, never_probed).autocast is None
    assert choose_cpu_training("bf16", XEON_AMX, 64, lambda: FAST).autocast == torch.bfloat16


def test_float16_on_cpu_trains_in_float32_with_the_reason():
    chosen = choose_cpu_training("fp16", XEON_AMX, 576, never_probed)
    assert chosen.autocast is None and "float16 requested" in chosen.reason


def test_unknown_precision_name_lists_valid_values():
    with pytest.raises(UserError, match="valid values: auto, float32"):
        choose_cpu_training("float8", XEON_AMX, 576, never_probed)


def test_cpuinfo_is_read_for_model_and_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16\n")
    capability = cpu_capability(cpuinfo)
    assert capability.model == "Test CPU 9000" and capability.bf16_instructions == ["amx_bf16"]
    assert capability.describe() == "Test CPU 9000 (avx2, avx512f, amx_bf16)"
    assert cpu_capability(tmp_path / "missing").flags == frozenset()


def test_the_real_probe_measures_both_precisions():
    measured = precision.probe_gemm(64, 128, tokens=32)
    assert measured.fp32_gflops > 0 and measured.bf16_gflops > 0 and measured.shape == (32, 64, 128)
    assert precision.probe_gemm(64, 128, tokens=32) is measured  # cached per process


def test_autocast_context_runs_matmuls_in_bf16_and_keeps_float32_parameters():
    linear = torch.nn.Linear(8, 4)
    bf16 = Precision(torch.float32, torch.bfloat16, "test")
    with bf16.context()():
        out = linear(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and linear.weight.dtype == torch.float32
    with Precision(torch.float32, None, "test").context()():
        assert linear(torch.randn(2, 8)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- bf16 vs fp32 training

STEPS = 20
LOSS_TOLERANCE = 0.005  # max |loss_bf16 - loss_fp32| / loss_fp32 at every step; measured 5e-4 on this tiny model


def lora_model(model_dir: str):
    from lmforge.config import MethodConfig
    from lmforge.model.loader import load_model
    from lmforge.model.methods import apply_method
    from lmforge.train.loop import prepare_for_training

    torch.manual_seed(0)
    model = apply_method(load_model(model_dir, torch.float32),
                         MethodConfig(type="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0))
    return prepare_for_training(model)


def train_losses(model_dir: str, context, steps: int = STEPS, frozen_dtype: torch.dtype | None = None,
                 keep: list | None = None) -> list[float]:
    """Per-step losses of a LoRA SFT run through lmforge's own train_step on fixed batches, forwards under
    `context`; with `frozen_dtype` the frozen weight matrices are rounded to it first, as the loop does under bf16
    autocast. `keep` receives the trained model."""
    from transformers import get_scheduler

    from lmforge.conversation import Conversation
    from lmforge.data.render import render_example
    from lmforge.model.loader import load_tokenizer
    from lmforge.model.precision import keep_frozen_weights
    from lmforge.train.batching import pack
    from lmforge.train.step import train_step

    tokenizer = load_tokenizer(model_dir)
    examples = [render_example(tokenizer, Conversation.from_dicts(
        [{"role": "user", "content": f"What is {i} plus {i}?"},
         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}, " + "and so on " * (i % 5)}]), "assistant")
        for i in range(8)]
    model = lora_model(model_dir)
    if frozen_dtype is not None:
        count, _ = keep_frozen_weights(model, frozen_dtype)
        assert count > 0
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=5e-3)
    scheduler = get_scheduler("constant", optimizer)
    losses = []
    for step in range(steps):
        batch = pack(examples[(step * 2) % 8:(step * 2) % 8 + 2])
        result = train_step(model, [batch], parameters, optimizer, scheduler, 1.0, precision=context)
        losses.append(result.loss_sum / result.units)
    assert all(p.dtype == torch.float32 for p in parameters)  # parameters and AdamW state stayed float32
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    if keep is not None:
        keep.append(model)
    return losses


no_bf16 = pytest.mark.skipif(not cpu_capability().bf16_instructions,
                             reason=f"{cpu_capability().model} has no native bf16 (amx_bf16 / avx512_bf16): lmforge "
                                    f"trains in float32 there, bf16 autocast would be emulated")
BF16 = Precision(torch.float32, torch.bfloat16, "bf16", frozen_dtype=torch.bfloat16)


@no_bf16
def test_bf16_autocast_losses_track_float32(llama_dir):
    fp32 = train_losses(llama_dir, Precision(torch.float32, None, "fp32").context())
    bf16 = train_losses(llama_dir, Precision(torch.float32, torch.bfloat16, "bf16").context())
    relative = [abs(b - f) / f for f, b in zip(fp32, bf16)]
    assert max(relative) <= LOSS_TOLERANCE
    assert bf16 != fp32  # bf16 really computed (rounded) something
    assert bf16[-1] < 0.95 * bf16[0]  # and learned as fp32 did (6.87 → 6.08 over 20 steps)


@no_bf16
def test_bf16_frozen_weights_losses_track_float32_and_only_frozen_matrices_are_bf16(llama_dir):
    """What the loop trains with under bf16 autocast: frozen weight matrices rounded to bf16 once; the LoRA weights,
    norms, gradients and AdamW state float32; losses within the same tolerance of float32's."""
    trained: list = []
    fp32 = train_losses(llama_dir, Precision(torch.float32, None, "fp32").context())
    bf16 = train_losses(llama_dir, BF16.context(), frozen_dtype=BF16.frozen_dtype, keep=trained)
    relative = [abs(b - f) / f for f, b in zip(fp32, bf16)]
    assert max(relative) <= LOSS_TOLERANCE, relative
    assert bf16 != fp32 and bf16[-1] < 0.95 * bf16[0]
    model = trained[0]
    dtypes = {name: (p.dtype, p.requires_grad, p.dim()) for name, p in model.named_parameters()}
    assert {d for d, trains, _ in dtypes.values() if trains} == {torch.float32}
    assert all(d == torch.bfloat16 for d, trains, dim in dtypes.values() if not trains and dim >= 2)
    assert all(d == torch.float32 for d, trains, dim in dtypes.values() if not trains and dim < 2)  # norms
    assert any("lora_A" in name for name in dtypes) and any("norm" in name for name in dtypes)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7]])
    assert model.get_input_embeddings()(ids).dtype == torch.float32  # the residual stream stays float32


def test_rounding_frozen_weights_keeps_trainable_norms_and_buffers_and_ties(llama_dir):
    from lmforge.model.precision import keep_frozen_weights

    model = lora_model(llama_dir)
    buffers = {name: b.dtype for name, b in model.named_buffers()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    count, saved = keep_frozen_weights(model, torch.bfloat16)
    matrices = [name for name, p in before.items() if "lora_" not in name and p.dim() >= 2]
    assert count == len({id(p) for name, p in model.named_parameters() if name in matrices}) and saved > 0
    for name, p in model.named_parameters():
        if name in matrices:  # rounded to the nearest bf16, nothing else
            assert p.dtype == torch.bfloat16 and torch.equal(p, before[name].to(torch.bfloat16))
        else:
            assert p.dtype == torch.float32 and torch.equal(p, before[name])
    assert {name: b.dtype for name, b in model.named_buffers()} == buffers
    assert keep_frozen_weights(model, torch.bfloat16)[0] == 0  # a second call changes nothing


@no_bf16
def test_adapter_saved_after_bf16_frozen_training_is_the_float32_lora_weights(llama_dir, tmp_path):
    from safetensors.torch import load_file

    from lmforge.model.loader import load_tokenizer
    from lmforge.rundir import RunDir, save_artifact, trainable_state

    trained: list = []
    train_losses(llama_dir, BF16.context(), steps=3, frozen_dtype=BF16.frozen_dtype, keep=trained)
    model = trained[0]
    run = RunDir(tmp_path / "run")
    run.prepare(overwrite=False, resuming=False)
    adapter = save_artifact(run, model, load_tokenizer(llama_dir), "lora")
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    in_memory = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(saved) == len(in_memory) > 0
    for name, tensor in saved.items():
        match = [p for key, p in in_memory.items() if key.replace(".default", "").endswith(name.split(".", 1)[1])]
        assert len(match) == 1, name
        assert tensor.dtype == torch.float32 and torch.equal(tensor, match[0].detach())
    assert all(t.dtype == torch.float32 for t in trainable_state(model).values())  # what a checkpoint holds


def test_frozen_weights_stay_float32_where_the_whole_model_is_saved_or_the_base_is_quantised(llama_dir):
    from lmforge.config import Config
    from lmforge.train.distributed import Ranks
    from lmforge.train.loop import round_frozen_weights

    def config(method: dict) -> Config:
        return Config.model_validate({"name": "p", "model": {"name_or_path": llama_dir}, "method": method,
                                      "data": {"train": ["x.jsonl"]}, "train": {"output_dir": "/tmp/x"}})

    model = lora_model(llama_dir)
    for method in ({"type": "freeze"}, {"type": "full"}, {"type": "qlora"}):
        assert round_frozen_weights(config(method), model, BF16, Ranks()) is None
    assert round_frozen_weights(config({"type": "lora"}), model, Precision(torch.float32, None, "fp32"),
                                Ranks()) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    line = round_frozen_weights(config({"type": "lora"}), model, BF16, Ranks())
    assert line.startswith("frozen weights: ") and "kept in bf16" in line
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_training_says_which_precision_it_chose(llama_dir, tmp_path, capsys):
    import json

    from lmforge.config import Config
    from lmforge.train.loop import train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(4)))
    config = Config.model_validate({"name": "p", "model": {"name_or_path": llama_dir, "dtype": "bfloat16"},
                                    "data": {"train": [str(data)]},
                                    "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}})
    train(config)
    captured = capsys.readouterr()
    assert "precision: bf16 requested: " in captured.err
    # bf16 autocast (chosen when the probe at this tiny model's shapes shows bf16 fast enough) rounds the frozen
    # weights and says so; float32 leaves them
    assert ("frozen weights: " in captured.out) == ("bf16 autocast" in captured.err)


# ---------------------------------------------------------------------------------------------- serving weights


@pytest.mark.skipif(not bfloat16_kernels(),
                    reason="no native bf16 kernels in torch's oneDNN on this CPU: decode_dtype bfloat16 is refused")
def test_bfloat16_decode_stays_close_to_float32_and_a_reply_does_not_depend_on_its_neighbours(tmp_path, tokenizer):
    """decode_dtype bfloat16: logits within bf16's rounding of float32's, the same greedy choice, and a row's
    logits bit-identical alone or beside longer sequences (so a reply does not depend on server load)."""
    from conftest import make_tiny_model

    from lmforge.model.lean_decoder import Decoder
    from lmforge.model.loader import load_model

    model = load_model(make_tiny_model("qwen2", tokenizer, tmp_path / "qwen2"), torch.float32).eval()  # q/k/v bias
    exact = Decoder(model, slots=4, max_len=96)
    alone, beside = (Decoder(model, slots=4, max_len=96, weights="bfloat16") for _ in range(2))
    prompt, longer = [(7 * i) % 200 + 5 for i in range(30)], [[(3 * i + j) % 200 + 5 for i in range(45 + 9 * j)]
                                                              for j in range(3)]
    exact.prefill(0, prompt, 0, 0)
    alone.prefill(0, prompt, 0, 0)
    beside.prefill_many([0, 1, 2, 3], [prompt] + longer, [0] * 4, [0] * 4)
    for step in range(3):
        reference = exact.decode([0], [7 + step], [30 + step], [0])[0]
        one = alone.decode([0], [7 + step], [30 + step], [0])
        many = beside.decode([0, 1, 2, 3], [7 + step] * 4, [30 + step] + [len(p) + step for p in longer], [0] * 4)
        assert torch.equal(one[0], many[0])
        assert not torch.equal(one[0], reference)  # bf16 really computed it …
        torch.testing.assert_close(one[0], reference, atol=3e-2 * reference.abs().max(), rtol=0)  # … within rounding


def test_half_activations_change_nothing_outside_autocast_and_hand_bf16_inside(llama_dir):
    """The hooks act only under autocast (fp32 evaluation and export see the model's own numbers); the fused RMSNorm
    computes the same float32 as the model's; under autocast a norm hands bf16 to its matmuls."""
    from lmforge.model.precision import half_activations

    model = lora_model(llama_dir).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert half_activations(model) > 0
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    norm = model.get_base_model().model.layers[0].input_layernorm
    hidden = torch.randn(1, 6, norm.weight.shape[0])
    assert norm(hidden).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(hidden).dtype == torch.bfloat16
