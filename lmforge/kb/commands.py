"""The `lmforge kb` verbs: build, add, remove, query — their arguments and what each prints.

Owns the command line of the knowledge base; cli.py only registers it. Heavy imports (FAISS, bm25s, the embedding
model) happen inside the handlers so `lmforge --help` stays instant. Must not hold retrieval or build logic.
"""

from __future__ import annotations

import json

from ..errors import UserError


def _row_columns(args):
    from .readers import RowColumns

    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip()) if args.columns else None
    if args.columns is not None and not columns:
        raise UserError("--columns needs column names separated by commas, e.g. --columns question,answer")
    return RowColumns(columns, args.encoding) if (columns or args.encoding) else None


def _settings(args):
    from .chunking import ChunkSettings

    if args.chunk_tokens is None and args.overlap_tokens is None:
        return None
    defaults = ChunkSettings()
    return ChunkSettings(args.chunk_tokens or defaults.chunk_tokens,
                         defaults.overlap_tokens if args.overlap_tokens is None else args.overlap_tokens)


def cmd_kb_update(args) -> int:
    from .build import update_kb
    from .embedding import shared_embedder

    if args.kb_verb == "remove":
        report = update_kb(args.kb, args.files, "remove", shared_embedder())
    else:
        kb = args.output if args.kb_verb == "build" else args.kb
        report = update_kb(kb, args.docs, args.kb_verb, shared_embedder(), _settings(args), _row_columns(args))
    print(report.summary())
    return 0


def cmd_kb_query(args) -> int:
    from .retrieve import Retriever

    hits = Retriever.open(args.kb).search(args.query, args.k, args.mode, fusion=args.fusion)
    if args.json:
        print(json.dumps([hit.to_json(rank) for rank, hit in enumerate(hits, start=1)], ensure_ascii=False, indent=1))
        return 0
    if not hits:
        print("no passage matches (the knowledge base is empty)")
    for rank, hit in enumerate(hits, start=1):
        parts = [f"score {hit.score:.4f}"]
        if hit.bm25 is not None:
            parts.append(f"bm25 {hit.bm25:.2f}")
        if hit.dense is not None:
            parts.append(f"cosine {hit.dense:.3f}")
        print(f"[{rank}] {hit.chunk.source()}  ({', '.join(parts)})")
        print("    " + hit.chunk.text.replace("\n", "\n    "))
    return 0


def _add_document_options(parser) -> None:
    parser.add_argument("--chunk-tokens", type=int, metavar="N",
                        help="chunk size in the embedding model's tokens (default 256; a new value re-embeds all)")
    parser.add_argument("--overlap-tokens", type=int, metavar="N",
                        help="tokens of whole sentences repeated from the previous chunk (default 48)")
    parser.add_argument("--columns", metavar="A,B",
                        help="for .csv / .tsv / .jsonl: the fields that make a row's passage (default: all)")
    parser.add_argument("--encoding", help="text encoding of .txt / .md / .csv / .jsonl files (default: detected "
                                           "UTF-8 or GB18030)")


def add_kb(verbs) -> None:
    kb = verbs.add_parser(
        "kb", help="knowledge base: documents → passages with sources, hybrid search (BM25 + multilingual vectors)",
        description="A knowledge base beside fine-tuning: documents are cut into passages at sentence ends, indexed "
                    "by words (BM25, jieba for Chinese) and by meaning (multilingual-e5-small vectors, FAISS), and "
                    "searched by both. lmforge serve --kb answers with the passages and their sources; lmforge "
                    "compare RUN+kb:KB measures what it adds.")
    kb_verbs = kb.add_subparsers(dest="kb_verb", metavar="SUBCOMMAND", required=True)
    build = kb_verbs.add_parser(
        "build", help="build or refresh a KB: it holds exactly DOCS afterwards, only changed files are re-embedded",
        description="Read .txt .md .pdf .docx .csv .tsv .jsonl files (folders recursively). Unchanged files (same "
                    "SHA-256) keep their vectors, changed ones are re-embedded, files no longer given are removed. "
                    "Files that cannot be read are reported with the reason and skipped.",
        epilog="example: lmforge kb build docs/ faq.csv --columns question,answer -o kb/")
    build.add_argument("docs", nargs="+", metavar="DOCS", help="files and folders")
    build.add_argument("-o", "--output", required=True, metavar="KB", help="the knowledge base folder")
    _add_document_options(build)
    build.set_defaults(func=cmd_kb_update)
    add = kb_verbs.add_parser("add", help="add or refresh documents in a KB (other files stay)")
    add.add_argument("kb", metavar="KB")
    add.add_argument("docs", nargs="+", metavar="DOCS", help="files and folders")
    _add_document_options(add)
    add.set_defaults(func=cmd_kb_update)
    remove = kb_verbs.add_parser("remove", help="remove documents from a KB")
    remove.add_argument("kb", metavar="KB")
    remove.add_argument("files", nargs="+", metavar="FILE", help="files as they were added")
    remove.set_defaults(func=cmd_kb_update)
    query = kb_verbs.add_parser("query", help="the passages that best match a question, with sources and scores")
    query.add_argument("kb", metavar="KB")
    query.add_argument("query", metavar="QUESTION")
    query.add_argument("-k", type=int, default=5, help="how many passages (default 5)")
    query.add_argument("--mode", choices=["hybrid", "bm25", "dense"], default="hybrid",
                       help="hybrid (default): BM25 and vectors, fused as --fusion says")
    query.add_argument("--fusion", choices=["convex", "rrf"], default="convex",
                       help="hybrid's fusion: convex (default), 0.6 x the cosine + 0.4 x the BM25 score, each min-max "
                            "normalised over its own top 50; rrf: reciprocal rank fusion")
    query.add_argument("--json", action="store_true", help="print JSON")
    query.set_defaults(func=cmd_kb_query)
