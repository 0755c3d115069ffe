"""Command line: one verb → one function. `lmforge train|chat|models`.

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
