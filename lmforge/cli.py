"""Command line: one verb → one function. `lmforge train|chat|eval|compare|export|data|models`.

A UserError becomes its message on stderr and exit code 2 (no traceback); Ctrl-C exits 130. Any other exception is
a bug and keeps its traceback. Heavy imports happen inside the verbs so `lmforge --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import __version__, allocator
from .errors import UserError
from .kb.commands import add_kb


def cmd_train(args) -> int:
    from .config import load_config

    if args.help_config is not None:
        from .config.reference import reference

        print(reference(args.help_config or None), end="")
        return 0
    if args.config is None:
        raise UserError("lmforge train: give a config YAML (or --help-config to list every key)")
    from .train.loop import train

    config = load_config(args.config, args.overrides)  # every problem reported before any process starts
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .train.distributed import launch

        print(f"starting {args.nproc} training processes with torchrun (DDP, gloo on CPU / nccl on GPU)")
        code = launch(args.nproc, ["train", args.config, *args.overrides], args.threads_per_rank)
        if code:
            from .rundir import RunDir, complete_checkpoints

            saved = complete_checkpoints(RunDir(config.output_dir))
            hint = (f"the last checkpoint ({saved[-1]}) is intact: continue with train.resume_from_checkpoint=latest"
                    if saved else "no checkpoint was written (see the first error above)")
            print(f"error: a training process failed (torchrun exit code {code}); {hint}", file=sys.stderr)
        return code
    run = train(config)
    return 0 if run.finished else 130  # stopped early (Ctrl-C): a checkpoint was saved, not the final artifact


def cmd_chat(args) -> int:
    from .chat import main

    return main(args)


def cmd_data_convert(args) -> int:
    from .data.convert import convert_file, parse_mapping

    report = convert_file(args.input, args.output, to=args.to, mapping=parse_mapping(args.map), where=args.where,
                          system=args.system, system_column=args.system_column, group_by=args.group_by,
                          order_by=args.order_by, encoding=args.encoding, strict=args.strict, keep=args.keep)
    print(report.summary())
    return 0


def add_data_convert(data_verbs) -> None:
    convert = data_verbs.add_parser(
        "convert", help="CSV/TSV/XLSX/Parquet/JSON/JSONL → one conversation per JSONL line",
        description="Convert a table or a dataset file into JSONL conversations. Rows that cannot be converted go "
                    "to OUT.rejects.jsonl with their line and the reason; counts go to OUT.report.json.",
        epilog="example: lmforge data convert qa.csv -o train.jsonl --map user=title --map assistant=reply "
               "--where \"is_best == 1\"")
    convert.add_argument("input", metavar="IN", help=".csv, .tsv, .xlsx, .parquet, .json or .jsonl")
    convert.add_argument("-o", "--output", required=True, metavar="OUT", help="output .jsonl")
    convert.add_argument("--to", default="messages", choices=("messages", "conversations", "alpaca", "sharegpt"),
                         help="output shape (default: messages, lmforge's own)")
    convert.add_argument("--map", action="append", metavar="ROLE=COLUMN",
                         help="the column holding a role's text: user, assistant or system (repeat the option)")
    convert.add_argument("--where", metavar="EXPR", help="keep only rows where EXPR holds, e.g. \"is_best == 1\"")
    system = convert.add_mutually_exclusive_group()
    system.add_argument("--system", metavar="TEXT", help="a system prompt for every conversation")
    system.add_argument("--system-column", metavar="COLUMN", help="the column holding the system prompt")
    convert.add_argument("--group-by", metavar="COLUMN",
                         help="rows with the same value form one multi-turn conversation (one turn pair per row)")
    convert.add_argument("--order-by", metavar="COLUMN", help="the turn order inside a --group-by conversation")
    convert.add_argument("--keep", action="append", metavar="COLUMN",
                         help="copy this column into each record as metadata, e.g. --keep votes --keep is_best "
                              "(for `data clean` filters and dedup keeper rules)")
    convert.add_argument("--encoding", metavar="ENC", help="CSV/TSV text encoding (default: detect UTF-8 / GB18030)")
    convert.add_argument("--strict", action="store_true", help="stop at the first row that cannot be converted")
    convert.set_defaults(func=cmd_data_convert)


def cmd_data_clean(args) -> int:
    from .data.clean import clean_file

    report = clean_file(args.input, args.output, recipe=args.recipe, to=args.to, num_proc=args.num_proc,
                        strict=args.strict, html=not args.no_html)
    print(report.summary())
    return 0


def add_data_clean(data_verbs) -> None:
    clean = data_verbs.add_parser(
        "clean", help="normalize, filter, mask personal information and de-duplicate conversations",
        description="Run a cleaning recipe over a JSON/JSONL dataset (any shape lmforge reads; metadata columns are "
                    "kept). Dropped records go to OUT.rejects.jsonl with their line, step and reason; counts, length "
                    "histograms, language mix, PII counts and duplicate samples go to OUT.report.json and "
                    "OUT.report.html. Without --recipe: normalize, filter (empty turns, AI boilerplate markers, "
                    "repetition, blocklists), mask PII, exact and near-duplicate removal.",
        epilog="example: lmforge data clean data/qa.jsonl -o data/qa.clean.jsonl --recipe recipe.yaml")
    clean.add_argument("input", metavar="IN", help=".jsonl or .json records, or a folder of them (one dataset); "
                                                   "convert tables first: data convert")
    clean.add_argument("-o", "--output", required=True, metavar="OUT", help="output .jsonl")
    clean.add_argument("--recipe", metavar="YAML", help="the steps to run, in order (default: the built-in recipe)")
    clean.add_argument("--to", default="messages", choices=("messages", "conversations", "alpaca", "sharegpt"),
                       help="output shape (default: messages)")
    clean.add_argument("--num-proc", type=int, default=1, metavar="N",
                       help="worker processes for the per-record steps (default 1)")
    clean.add_argument("--strict", action="store_true", help="stop at the first line that is not a valid record")
    clean.add_argument("--no-html", action="store_true", help="skip OUT.report.html")
    clean.set_defaults(func=cmd_data_clean)


def cmd_data_split(args) -> int:
    from .data.split import split_file

    report = split_file(args.input, args.output_dir, val=args.val, test=args.test, seed=args.seed,
                        stratify=args.stratify, group=args.group)
    print(report.summary())
    return 0


def add_data_split(data_verbs) -> None:
    split = data_verbs.add_parser(
        "split", help="split a dataset file into train / val / test JSONL files, reproducibly",
        description="Split a JSON/JSONL records file (any shape; records are copied unchanged) into train, val and "
                    "test JSONL files plus a report with the counts. The same file and seed give the same split on "
                    "any machine; records are ranked by a seeded hash of their content (or --group value), so "
                    "adding records to the file moves only a few across splits. Sizes are exact (with --group, as "
                    "close as whole groups allow).",
        epilog="example: lmforge data split data/qa.jsonl --val 0.05 --test 200 --stratify meta.category "
               "--group conversation_id  → data/qa.train.jsonl, qa.val.jsonl, qa.test.jsonl, qa.split.json")
    split.add_argument("input", metavar="IN", help=".jsonl or .json records")
    split.add_argument("-o", "--output-dir", metavar="OUT_DIR",
                       help="write train.jsonl, val.jsonl, test.jsonl and split.json here (default: next to IN as "
                            "IN_STEM.train.jsonl, …)")
    split.add_argument("--val", default="0.05", metavar="SIZE",
                       help="validation size: a fraction below 1 or a record count (default 0.05; 0 = none)")
    split.add_argument("--test", default="0", metavar="SIZE",
                       help="test size: a fraction below 1 or a record count (default 0 = no test file)")
    split.add_argument("--seed", type=int, default=0, help="a different seed gives a different split (default 0)")
    split.add_argument("--stratify", metavar="KEY",
                       help="keep each value's share in every split; a record key, dotted for nested ones "
                            "(meta.category)")
    split.add_argument("--group", metavar="KEY",
                       help="records with the same value stay in one split (a conversation or duplicate-cluster id)")
    split.set_defaults(func=cmd_data_split)


def cmd_data_inspect(args) -> int:
    from .data.inspect import format_report, inspect_dataset, report_json, use_colour
    from .model.loader import DEFAULT_MODEL

    report = inspect_dataset(args.input, model=args.model or DEFAULT_MODEL, template=args.template,
                             cutoff_len=args.cutoff_len, train_on=args.train_on, samples=args.samples,
                             dataset_dir=args.dataset_dir)
    print(report_json(report) if args.json else format_report(report, use_colour(sys.stdout)))
    return 1 if report.problems else 0


def add_data_inspect(data_verbs) -> None:
    inspect = data_verbs.add_parser(
        "inspect", help="check a dataset before training: problems, token lengths, trained tokens",
        description="Read a dataset as training will and report: file format and record shape; every record with a "
                    "problem (file:line and message index: unknown roles, wrong role order, non-alternating turns, "
                    "no assistant reply, empty turns, invalid JSON lines); token-length percentiles under the "
                    "model's chat template, how many fit --cutoff-len and how many would be truncated or dropped; "
                    "and rendered samples with the trained tokens marked.",
        epilog="exit status: 0 = no problems, 1 = problems found (listed), 2 = the file or model cannot be read. "
               "example: lmforge data inspect data/qa.jsonl --cutoff-len 512")
    inspect.add_argument("input", metavar="IN", help=".jsonl or .json file, or a dataset name in dataset_info.json")
    inspect.add_argument("--model", help="whose tokenizer and chat template to use: builtin alias, local dir or hub "
                                         "id (default: the default builtin model, see `lmforge models`)")
    inspect.add_argument("--template", help="chat template for a model without one (as model.template)")
    inspect.add_argument("--cutoff-len", type=int, default=1024, metavar="N", help="as data.cutoff_len (default 1024)")
    inspect.add_argument("--train-on", default="assistant", choices=("assistant", "last_assistant", "all"),
                         help="which tokens carry loss, as data.train_on (default assistant)")
    inspect.add_argument("--samples", type=int, default=2, metavar="N", help="rendered samples to show (default 2)")
    inspect.add_argument("--dataset-dir", help="where dataset names are looked up (default: data)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=cmd_data_inspect)


# `lmforge data SUBCOMMAND`: each entry adds one subcommand parser (and its set_defaults(func=...)).
DATA_SUBCOMMANDS = [add_data_convert, add_data_clean, add_data_split, add_data_inspect]


def _eval_options(args):
    from .eval.evaluate import EvalOptions
    from .generate import SamplingParams

    choices = [c.strip() for c in args.choices.split(",") if c.strip()] if args.choices else None
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, decode_dtype=args.decode_dtype)
    return EvalOptions(generate=not getattr(args, "no_generate", False), params=params, batch_size=args.batch_size,
                       cutoff_len=args.cutoff_len, choices=choices)


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _add_test_options(parser, data_required: bool = True) -> None:
    """The test set and decoding options shared by `eval` and `compare`."""
    parser.add_argument("--data", required=data_required, metavar="TEST[,TEST]",
                        help="test set(s): .json/.jsonl files or dataset_info.json names, comma-separated; the last "
                             "assistant message of each conversation is the reference, everything before it the "
                             "prompt")
    parser.add_argument("--dataset-dir", help="where dataset names are looked up (default: data)")
    parser.add_argument("--max-samples", type=int, metavar="N", help="use the first N examples of each test set")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="per answer (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="for sampling")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="prompts decoded together (on the fast decoder: rows of one continuous batch over the "
                             "whole set), and examples per loss batch (default 32)")
    _add_decode_dtype(parser)
    parser.add_argument("--cutoff-len", type=int, default=1024, metavar="N",
                        help="longest prompt + reference scored for loss, in tokens (default 1024)")
    parser.add_argument("--choices", metavar="LABEL,LABEL",
                        help="the label set of a classification test set, for choice accuracy (default: detected "
                             "when the references are a few short labels)")


def _add_decode_dtype(parser) -> None:
    parser.add_argument("--decode-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights of the fast decoder: float32 gives the model's own greedy replies exactly; "
                             "bfloat16 / float16 are faster and can differ slightly; auto (default) picks per CPU "
                             "(bfloat16 where it multiplies bf16 natively, else float16) and says which and why")


def _predict_yaml_into(args) -> None:
    """`lmforge eval predict.yaml`: LLaMA-Factory's do_predict file → the run or model, the test set and options."""
    from .config.llamafactory_infer import read_predict_yaml

    request = read_predict_yaml(args.run_dir)
    for note in request.notes:
        print(f"note: {note}")
    loaded = request.inference
    args.run_dir, args.model, args.adapter = loaded.run_dir, loaded.model, loaded.adapter
    args.data = args.data or ",".join(request.data)
    args.dataset_dir = args.dataset_dir or request.dataset_dir
    args.max_samples = args.max_samples or request.max_samples
    args.output = args.output or request.output
    args.no_generate = args.no_generate or not request.generate
    for name, value in (("cutoff_len", request.cutoff_len), ("batch_size", request.batch_size),
                        ("max_new_tokens", loaded.max_new_tokens), ("temperature", loaded.temperature),
                        ("top_p", loaded.top_p)):
        if value is not None:
            setattr(args, name, value)
    if args.model and not args.output:
        raise UserError(f"{args.run_dir or 'the prediction config'}: set output_dir (where eval.json goes)")


def cmd_eval(args) -> int:
    from .eval.evaluate import (
        evaluate_run_or_model,
        format_metrics,
        format_sweep,
        load_test_set,
        sweep_checkpoints,
    )

    if args.run_dir and args.run_dir.endswith((".yaml", ".yml")):
        _predict_yaml_into(args)
    if not args.data:
        raise UserError("lmforge eval: name the test set with --data TEST (or give a LLaMA-Factory do_predict YAML)")
    if bool(args.run_dir) == bool(args.model):
        raise UserError("name a run dir (lmforge eval runs/NAME --data TEST) or a model (--model NAME "
                        "[--adapter DIR] -o OUT_DIR), not both")
    if args.all_checkpoints and (not args.run_dir or args.checkpoint):
        raise UserError("--all-checkpoints sweeps the checkpoints of a run dir: name the run dir, without "
                        "--model or --checkpoint")
    if args.metric and not args.all_checkpoints:
        raise UserError("--metric chooses the best checkpoint: use it with --all-checkpoints")
    options = _eval_options(args)
    test = load_test_set(_names(args.data), args.dataset_dir, args.max_samples)
    if args.all_checkpoints:
        result = sweep_checkpoints(args.run_dir, test, options, args.metric or "auto")
        print(format_sweep(result))
        best = result.best
        print(f"best: {best['label']} (step {best['step']}, {best['metric']} {best['value']:g}) → {args.run_dir}/"
              f"best.json; chat, compare and export on {args.run_dir} now use it. Plot: {args.run_dir}/sweep.png")
        return 0
    result, path = evaluate_run_or_model(test, options, args.run_dir, args.model, args.adapter, args.checkpoint,
                                         args.output)
    print(format_metrics(result.metrics))
    print(f"wrote {path} and {path.parent / 'predictions.jsonl'}")
    return 0


def add_eval(verbs) -> None:
    evaluate = verbs.add_parser(
        "eval", help="score a run or a model on a test set; --all-checkpoints finds the best checkpoint",
        description="Held-out loss and perplexity of each reference answer, then batch generation on the test "
                    "prompts scored with BLEU-4 and ROUGE-1/2/L (computed as LLaMA-Factory does, ×100), exact "
                    "match, and choice accuracy for classification-style sets. Writes eval.json and "
                    "predictions.jsonl (into the run dir for a run).",
        epilog="examples: lmforge eval runs/demo --data test.jsonl · lmforge eval --model smollm2-135m-instruct "
               "--data test.jsonl -o eval/base · lmforge eval runs/demo --data test.jsonl --all-checkpoints")
    evaluate.add_argument("run_dir", nargs="?", help="a run dir (runs/NAME) from lmforge train, or a LLaMA-Factory "
                                                     "do_predict YAML (its model, adapter, eval_dataset, output_dir)")
    evaluate.add_argument("--model", help="instead of a run: base model (builtin alias, local dir or hub id)")
    evaluate.add_argument("--adapter", help="a PEFT adapter dir to apply to --model")
    evaluate.add_argument("--checkpoint", metavar="step-N|final|best",
                          help="which weights of the run (default: best.json's choice, else the final weights)")
    evaluate.add_argument("--all-checkpoints", action="store_true",
                          help="evaluate every checkpoint of the run, plot sweep.png, record the best in best.json")
    evaluate.add_argument("--metric", help="what picks the best checkpoint: auto (default: choice_accuracy on a "
                                           "classification-style set, else rouge-l; eval_loss with --no-generate), "
                                           "eval_loss, perplexity, bleu-4, rouge-1, rouge-2, rouge-l, exact_match, "
                                           "choice_accuracy")
    evaluate.add_argument("--no-generate", action="store_true", help="loss and perplexity only (fast)")
    evaluate.add_argument("-o", "--output", metavar="OUT_DIR",
                          help="where eval.json and predictions.jsonl go (default for a run: the run dir; "
                               "needed with --model)")
    _add_test_options(evaluate, data_required=False)
    evaluate.set_defaults(func=cmd_eval)


def cmd_compare(args) -> int:
    from pathlib import Path

    from .eval.compare import JudgeSettings, compare
    from .eval.evaluate import load_test_set

    judge = None
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise UserError("the LLM judge needs both --judge-url (an OpenAI-compatible endpoint ending in /v1) and "
                            "--judge-model")
        judge = JudgeSettings(args.judge_url, args.judge_model, args.judge_key or os.environ.get("OPENAI_API_KEY"))
    options = _eval_options(args)
    test = load_test_set(_names(args.data), args.dataset_dir, args.max_samples)
    out = Path(args.output)
    compare(args.models, test, options, out, judge, kb=args.kb, kb_k=args.kb_k)
    print(f"wrote {out / 'report.html'}, {out / 'report.md'} and {out / 'compare.json'}")
    return 0


def add_compare(verbs) -> None:
    comparison = verbs.add_parser(
        "compare", help="base vs tuned (and any runs or checkpoints) side by side on the same test prompts",
        description="Evaluate every model on the same test set with the same decoding, then write a metrics table "
                    "and every example's answers side by side as report.md and a self-contained report.html. "
                    "Optionally an LLM judge (any OpenAI-compatible endpoint) compares each model with the first, "
                    "asking every pair in both orders: win / tie / loss.",
        epilog="example: lmforge compare base=smollm2-135m-instruct tuned=runs/demo runs/demo/checkpoints/step-20 "
               "--data test.jsonl -o compare/")
    comparison.add_argument("models", nargs="+", metavar="MODEL",
                            help="a run dir (its best checkpoint if best.json names one, else its final weights), a "
                                 "checkpoint dir (RUN/checkpoints/step-N), an adapter dir, or a model (alias, dir, hub "
                                 "id); LABEL=MODEL names it in the report. The first is the judge's baseline")
    comparison.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="where the reports go")
    comparison.add_argument("--judge-url", metavar="URL", help="OpenAI-compatible endpoint, e.g. "
                                                               "http://127.0.0.1:8000/v1")
    comparison.add_argument("--judge-model", metavar="NAME", help="the judge model's name at that endpoint")
    comparison.add_argument("--judge-key", metavar="KEY", help="API key (default: $OPENAI_API_KEY, if set)")
    comparison.add_argument("--kb", metavar="KB", help="also run every model with this knowledge base's passages in "
                                                       "its prompts (base tuned --kb kb/ → base, tuned, base+kb, "
                                                       "tuned+kb); or give one model as MODEL+kb:KB")
    comparison.add_argument("--kb-k", type=int, default=3, metavar="K", help="passages per question (default 3)")
    _add_test_options(comparison)
    comparison.set_defaults(func=cmd_compare)


def cmd_export(args) -> int:
    from pathlib import Path

    from .export.pipeline import ExportRequest, export, request_from_yaml, summary

    options = dict(output=args.output, checkpoint=args.checkpoint, adapter_only=args.adapter_only, gguf=args.gguf,
                   dtype=args.dtype, shard_size_gb=args.shard_size, overwrite=args.overwrite)
    if args.source.endswith((".yaml", ".yml")):
        request = request_from_yaml(args.source, **options)
    else:
        request = ExportRequest(source=args.source, **{k: v for k, v in options.items() if v is not None})
    manifest = export(request)
    for note in manifest.get("notes", []):
        print(f"note: {note}")
    print(summary(manifest, Path(request.output)))
    return 0


def add_export(verbs) -> None:
    export = verbs.add_parser(
        "export", help="merge a run into a model dir (safetensors), optionally GGUF + Ollama Modelfile",
        description="Export a trained run (or a PEFT adapter dir, a model dir, or a LLaMA-Factory export YAML): merge "
                    "the adapter into the base model and write sharded safetensors with the training chat template, "
                    "or the adapter alone; optionally a GGUF file and an Ollama Modelfile. Every export is verified "
                    "(merged logits == base+adapter logits, the written files reload to the same logits, the "
                    "exported tokenizers render like training) and described in OUT/manifest.json. Written to a "
                    "temp dir and renamed into place only when complete.",
        epilog="examples: lmforge export runs/demo -o exports/demo --gguf q8_0   ·   "
               "lmforge export configs/llamafactory_export.yaml")
    export.add_argument("source", metavar="SOURCE",
                        help="run dir (runs/NAME), PEFT adapter dir, model dir, or LLaMA-Factory export .yaml")
    export.add_argument("-o", "--output", metavar="OUT", help="output dir (export_dir in a LLaMA-Factory YAML)")
    export.add_argument("--gguf", choices=("f32", "f16", "q8_0"),
                        help="also write OUT/model-TYPE.gguf (Llama and Qwen2 architectures) and point the "
                             "Modelfile at it")
    export.add_argument("--adapter-only", action="store_true",
                        help="write the LoRA adapter (PEFT format) + tokenizer instead of merged weights")
    export.add_argument("--checkpoint", metavar="WHICH",
                        help="run dirs: best, final or step-N (default: best.json's choice, else final)")
    export.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of the merged safetensors (default auto: the base model's stored dtype)")
    export.add_argument("--shard-size", type=float, metavar="GB",
                        help="largest safetensors shard in GB (default 5; export_size in LLaMA-Factory)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    export.set_defaults(func=cmd_export)


def _inference_yaml_into(args) -> None:
    """`lmforge serve infer.yaml` or `--config infer.yaml` with LLaMA-Factory's inference file: serve what it names."""
    from .config.llamafactory_infer import is_inference_file, read_inference_yaml

    path = next((p for p in (args.target, args.config) if p and p.endswith((".yaml", ".yml")) and
                 is_inference_file(p)), None)
    if path is None:
        return
    request = read_inference_yaml(path)
    for note in request.notes:
        print(f"note: {note}")
    if request.template:
        print(f"note: {path}: template: {request.template} — serve uses the chat template of the run or model "
              f"(ignored)")
    args.config = None if args.config == path else args.config
    args.target = None if args.target == path else args.target
    if args.target or args.model:
        raise UserError(f"{path} already names what to serve; drop the run dir / --model from the command line")
    if request.run_dir or request.adapter:  # an adapter dir records its base model
        args.target = request.run_dir or request.adapter
    else:
        args.model = request.model
    args.backend = args.backend or request.backend


def cmd_serve(args) -> int:
    from .serve.app import run_server
    from .serve.loading import build_engine, parse_adapters
    from .serve.retrieval import check_kbs
    from .serve.retrieval import describe as describe_kbs
    from .serve.settings import load_settings, parse_kb_options
    from .serve.vllm_engine import parse_vllm_args

    _inference_yaml_into(args)
    kb, kb_per_model = parse_kb_options(args.kb)
    settings = load_settings(args.config, {
        "host": args.host, "port": args.port, "api_keys": args.api_key, "api_key_file": args.api_key_file,
        "admin_keys": args.admin_key, "requests_per_minute": args.requests_per_minute,
        "tokens_per_minute": args.tokens_per_minute, "max_concurrent": args.max_concurrent,
        "served_model_name": args.served_model_name, "kill_switch_file": args.kill_switch_file,
        "cors_origins": args.cors_origin, "threads": args.threads, "decode_dtype": args.decode_dtype,
        "backend": args.backend, "metrics_keys": args.metrics_key, "max_queue": args.max_queue,
        "max_body_bytes": args.max_body_bytes, "request_timeout": args.request_timeout,
        "kill_switch_mode": args.kill_switch_mode, "state": args.state, "state_fail": args.state_fail,
        "kb": kb, "kb_k": args.kb_k})
    settings.vllm_args = {**settings.vllm_args, **parse_vllm_args(args.vllm_arg)}
    settings.kb_per_model = {**settings.kb_per_model, **kb_per_model}
    settings.check_bind()  # before minutes of loading, not after
    check_kbs(settings)  # a missing or damaged knowledge base is said before the model loads
    adapters = {**settings.adapters, **parse_adapters(args.adapter)}
    engine = build_engine(args.target, args.model, adapters, settings)
    if settings.kb or settings.kb_per_model:  # names are known once the model is loaded: an unknown one → exit 2
        print(describe_kbs(settings.kbs_for(list(engine.models)), settings.kb_k), file=sys.stderr)
    return run_server(engine, settings)  # 1: the engine died


def add_serve(verbs) -> None:
    serve = verbs.add_parser(
        "serve", help="OpenAI-compatible API (+ chat page at /) for a run of any method, an export, or a model "
                      "+ LoRA adapters",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models with continuous batching, API keys, "
                    "per-key rate limits, a bounded queue, a kill switch and Prometheus /metrics. Binds 127.0.0.1 "
                    "unless given keys. Every setting can also live in --config serve.yaml.",
        epilog="example: lmforge serve runs/legal --adapter medical=runs/medical/adapter --api-key-file keys.txt")
    serve.add_argument("target", nargs="?", metavar="RUN_OR_EXPORT_DIR",
                       help="run dir, export dir, adapter dir, or a LLaMA-Factory inference YAML")
    serve.add_argument("--model", help="base model instead of a dir: builtin alias, local dir or hub id")
    serve.add_argument("--adapter", action="append", metavar="NAME=DIR",
                       help="a LoRA adapter on the same base, requested as model NAME (repeat the option)")
    serve.add_argument("--config", metavar="serve.yaml", help="settings file (flags override it)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--api-key", action="append", metavar="KEY",
                       help="accepted key: KEY, NAME=KEY or NAME=sha256:HEX (repeat the option)")
    serve.add_argument("--api-key-file", metavar="FILE", help="one key per line, in the --api-key forms")
    serve.add_argument("--admin-key", action="append", metavar="KEY",
                       help="key for /admin (kill switch, usage) and /metrics")
    serve.add_argument("--metrics-key", action="append", metavar="KEY",
                       help="key that may read /metrics only (for a Prometheus scraper); API keys never can")
    serve.add_argument("--requests-per-minute", type=int, metavar="N", help="per key")
    serve.add_argument("--tokens-per-minute", type=int, metavar="N", help="prompt + completion tokens per key")
    serve.add_argument("--max-concurrent", type=int, metavar="N", help="sequences generated together (default 8)")
    serve.add_argument("--max-queue", type=int, metavar="N",
                       help="sequences waiting for a slot (default 128); beyond it 503 with Retry-After")
    serve.add_argument("--max-body-bytes", type=int, metavar="N",
                       help="largest request body (default 2097152 = 2 MiB); beyond it 413")
    serve.add_argument("--request-timeout", type=float, metavar="SECONDS",
                       help="a request is cut off after this long (default 300): 504, or a final error event")
    serve.add_argument("--served-model-name", metavar="NAME", help="the name clients use for the model or run")
    serve.add_argument("--kill-switch-file", metavar="FILE", help="while FILE exists, answer 503 (degraded mode)")
    serve.add_argument("--kb", action="append", metavar="[NAME=]KB",
                       help="answer chat requests with passages from this knowledge base (lmforge kb build): a "
                            "Sources line in the reply, a `sources` field; a request sends \"kb\": false to skip "
                            "it. KB: for every served model; NAME=KB: for the served model or adapter NAME only "
                            "(over KB; NAME= for none; repeat the option)")
    serve.add_argument("--kb-k", type=int, metavar="K", help="passages per chat request with --kb (default 3)")
    serve.add_argument("--kill-switch-mode", choices=["drain", "abort"],
                       help="what the kill switch does to running streams: drain (default) lets them finish, abort "
                            "ends them with a final error event")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser calls from ORIGIN")
    serve.add_argument("--threads", type=int, metavar="N", help="torch threads for the model (default: cores - 1)")
    serve.add_argument("--backend", choices=["lmforge", "vllm"],
                       help="vllm: vLLM's engine (GPU machines: pip install vllm; this CPU: make vllm) behind the "
                            "same API, keys and limits (default lmforge: the built-in engine)")
    serve.add_argument("--vllm-arg", action="append", metavar="KEY=VALUE",
                       help="a vLLM engine argument with --backend vllm, e.g. tensor_parallel_size=2 (repeat the "
                            "option); on a CPU lmforge sets enforce_eager, dtype and the KV cache size unless given")
    serve.add_argument("--state", metavar="redis://HOST:PORT/DB",
                       help="share rate limits, usage and the kill switch with other replicas through Redis "
                            "(default: this process only)")
    serve.add_argument("--state-fail", choices=["open", "closed"],
                       help="when Redis is unreachable: open (default) serves with local limits, closed answers 503")
    serve.add_argument("--decode-dtype", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights in float16 (half the memory, ~2x faster on CPU), bfloat16 (CPUs with AMX / "
                            "AVX512_BF16; fastest at wide batches there) or float32 (replies exactly as "
                            "`lmforge chat`); default auto: float16 on x86-64, else float32")
    serve.set_defaults(func=cmd_serve)


def cmd_ui(args) -> int:
    from .ui.app import UISettings, read_token_file, run_board

    if args.auth_token and args.auth_token_file:
        raise UserError("give --auth-token or --auth-token-file, not both")
    token = read_token_file(args.auth_token_file) if args.auth_token_file else args.auth_token
    run_board(UISettings(workspace=args.workspace, host=args.host, port=args.port, token=token,
                         max_runs=args.max_runs, max_upload_bytes=args.max_upload_mb * 2**20))
    return 0


def add_ui(verbs) -> None:
    board = verbs.add_parser(
        "ui", help="the board: a web page to prepare data, train, watch, compare, export and serve",
        description="Serve a JSON API and one page (English / 中文) over a workspace folder. Every action runs the "
                    "matching lmforge verb as a child process and everything shown is read from the files the verbs "
                    "write (runs/NAME/…), so reloading the page or restarting the board loses nothing and runs "
                    "started from the command line appear too. Binds 127.0.0.1 unless given a token.",
        epilog="examples: lmforge ui --workspace . --port 7860   ·   "
               "lmforge ui --host 0.0.0.0 --auth-token-file token.txt")
    board.add_argument("--workspace", default=".", metavar="DIR",
                       help="the folder the board reads and writes (data files, runs/, exports/; default: here)")
    board.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a "
                                                           "token)")
    board.add_argument("--port", type=int, default=7860, help="default 7860")
    board.add_argument("--auth-token", metavar="TOKEN", help="required on every API call (16+ characters)")
    board.add_argument("--auth-token-file", metavar="FILE", help="read the token from the first line of FILE")
    board.add_argument("--max-runs", type=int, default=1, metavar="N",
                       help="trainings at once; more wait in a queue (default 1)")
    board.add_argument("--max-upload-mb", type=int, default=200, metavar="MB", help="largest upload (default 200)")
    board.set_defaults(func=cmd_ui)


def cmd_score(args) -> int:
    from .eval.reward import score_file

    summary = score_file(args.run_dir, _names(args.data), args.dataset_dir, args.output, args.checkpoint,
                         args.batch_size)
    if "accuracy" in summary:
        print(f"{summary['pairs']} pairs: accuracy {summary['accuracy']:.4f} (chosen scored above rejected), mean "
              f"margin {summary['mean_margin']:+.4f}")
    else:
        print(f"{summary['conversations']} conversations: mean score {summary['mean_score']:+.4f}")
    if args.output:
        print(f"wrote {args.output} (one line per record)")
    return 0


def add_score(verbs) -> None:
    score = verbs.add_parser(
        "score", help="score conversations or preference pairs with a reward model (a run trained with stage rm)",
        description="Reward of each conversation: the run's value head on the last token of the conversation, "
                    "rendered with the training chat template. Preference pairs (chosen/rejected) also get the "
                    "accuracy: how often the chosen reply scores higher.",
        epilog="example: lmforge score runs/rm_lora --data examples/data/stages/tenant_pairs.jsonl -o scores.jsonl")
    score.add_argument("run_dir", help="a run dir trained with train.stage: rm")
    score.add_argument("--data", required=True, metavar="FILE[,FILE]",
                       help="preference pairs or conversations (.json/.jsonl, or dataset_info.json names)")
    score.add_argument("--dataset-dir", help="where dataset names are looked up (default: data)")
    score.add_argument("-o", "--output", metavar="OUT.jsonl", help="write each record's score(s) here")
    score.add_argument("--checkpoint", metavar="step-N|final|best", help="which weights of the run")
    score.add_argument("--batch-size", type=int, default=8)
    score.set_defaults(func=cmd_score)


def cmd_models(args) -> int:
    from .model.loader import format_models_table, list_models

    print(format_models_table(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Fine-tune a general LLM into a domain model.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser("train", help="fine-tune a model from a YAML config (ours or LLaMA-Factory's)")
    train.add_argument("config", nargs="?", help="config YAML")
    train.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                       choices=["", "model", "method", "data", "train", "preference"],
                       help="print every config key (or one section's) with its default and meaning, then exit")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train on N processes of this machine through torchrun (data parallel; see "
                            "train.distributed); for several machines run torchrun yourself: torchrun ... -m lmforge "
                            "train CONFIG")
    train.add_argument("--threads-per-rank", type=int, metavar="T",
                       help="with --nproc: torch threads of each process (default: torchrun's, 1)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override config keys, e.g. train.learning_rate=1e-4 or learning_rate=1e-4")
    train.set_defaults(func=cmd_train)

    chat = verbs.add_parser("chat", help="talk to a trained run or a model in the terminal")
    chat.add_argument("run_dir", nargs="?", help="a run dir (runs/NAME) from lmforge train, or a LLaMA-Factory "
                                                 "inference YAML (model_name_or_path, adapter_name_or_path, template)")
    chat.add_argument("--model", help="base model: builtin alias, local dir or hub id")
    chat.add_argument("--adapter", help="a PEFT adapter dir to apply to --model")
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    _add_decode_dtype(chat)
    chat.set_defaults(func=cmd_chat)

    add_eval(verbs)
    add_compare(verbs)
    add_export(verbs)
    add_serve(verbs)
    add_score(verbs)
    add_kb(verbs)
    add_ui(verbs)

    data = verbs.add_parser("data", help="prepare datasets: convert tables and files into conversations")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="SUBCOMMAND", required=True)
    for add_subcommand in DATA_SUBCOMMANDS:
        add_subcommand(data_verbs)

    models = verbs.add_parser("models", help="list builtin model aliases and what is cached")
    models.set_defaults(func=cmd_models)
    return parser


# verbs that run a model: they allocate activation tensors by the hundred per step, where jemalloc saves CPU time and
# memory, and meet new matmul shapes, which oneDNN's bounded kernel caches keep from piling up (allocator.py); the data
# verbs and `models` stay on the system allocator
TENSOR_VERBS = ("train", "eval", "compare", "export", "serve", "score", "chat", "ui", "kb")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own deprecation notices about its internals say nothing actionable to our users
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # bitsandbytes (imported by peft) logs on import that an optional Hub-downloaded CPU kernel is missing; its
    # built-in CPU kernels are what lmforge uses, and lmforge never downloads code at run time
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    if args.verb in TENSOR_VERBS:
        allocator.bound_kernel_caches()  # before any matmul; inherited by the re-executed process and its children
        if argv is None:  # the real command line, not a call from Python
            allocator.reexec_with_jemalloc(sys.argv[1:])
    try:
        return args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
