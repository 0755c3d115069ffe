"""Command line: one verb → one function. `lmforge train|chat|data|models`.

A UserError becomes its message on stderr and exit code 2 (no traceback); Ctrl-C exits 130. Any other exception is
a bug and keeps its traceback. Heavy imports happen inside the verbs so `lmforge --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import __version__
from .errors import UserError


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.overrides)
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
    clean.add_argument("input", metavar="IN", help=".jsonl or .json records (convert tables first: data convert)")
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
    from .models import DEFAULT_MODEL

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


def cmd_models(args) -> int:
    from .models import format_models_table, list_models

    print(format_models_table(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Fine-tune a general LLM into a domain model.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser("train", help="fine-tune a model from a YAML config (ours or LLaMA-Factory's)")
    train.add_argument("config", help="config YAML")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override config keys, e.g. train.learning_rate=1e-4 or learning_rate=1e-4")
    train.set_defaults(func=cmd_train)

    chat = verbs.add_parser("chat", help="talk to a trained run or a model in the terminal")
    chat.add_argument("run_dir", nargs="?", help="a run dir (runs/NAME) from lmforge train")
    chat.add_argument("--model", help="base model: builtin alias, local dir or hub id")
    chat.add_argument("--adapter", help="a PEFT adapter dir to apply to --model")
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=cmd_chat)

    data = verbs.add_parser("data", help="prepare datasets: convert tables and files into conversations")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="SUBCOMMAND", required=True)
    for add_subcommand in DATA_SUBCOMMANDS:
        add_subcommand(data_verbs)

    models = verbs.add_parser("models", help="list builtin model aliases and what is cached")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own deprecation notices about its internals say nothing actionable to our users
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
