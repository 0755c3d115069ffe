"""`lmforge data clean` at scale: records/s per step, peak memory, and whether planted duplicates, near-duplicates and
personal information are found (recall) without false alarms (precision).

The data is synthetic and generated here, deterministically: mixed Chinese/English Q&A records of ~300 characters,
with planted exact duplicates (re-spaced, re-cased copies), near-duplicates (3 % of characters edited), PII (valid ID
card numbers, mobile and landline phones, e-mail, Luhn-valid bank cards, IPv4, passports, token URLs) and decoys that
must stay (order numbers, invalid IDs, dates, prices). Ground truth is kept per record id.
The peer is datasketch's MinHash + MinHashLSH (the near-dedup used by text-dedup / data-juicer-style pipelines), run
on a subset in the same run for a records/s ratio of the near-duplicate step (skipped if datasketch is absent:
pip install -e '.[bench]').

    python benchmarks/data_pipeline.py                          # 1,000,000 records, default recipe, 2 processes
    python benchmarks/data_pipeline.py --records 50000 --peer-records 20000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PII_KINDS = ("ID_CARD", "PHONE", "EMAIL", "BANK_CARD", "IP", "PASSPORT", "SECRET_URL")
_ZH = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
       "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还"
       "因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结"
       "解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级"
       "少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质信院租房押金合同律师")
_SYLLABLES = ("ka", "lo", "mi", "ren", "ta", "vo", "sel", "dar", "pi", "nu", "ex", "ob", "tra", "fen", "qu", "zi",
              "mor", "lin", "gat", "hu", "bri", "sto", "pel", "wan", "cor", "dis", "ju", "ry", "ten", "ant")
_WORDS = [a + b for a in _SYLLABLES for b in _SYLLABLES] + [a + b + c for a in _SYLLABLES[:12]
                                                          for b in _SYLLABLES[10:22] for c in _SYLLABLES[18:]]


# --- synthetic data --------------------------------------------------------------------------------------------------

def _zh_text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        piece = "".join(rng.choices(_ZH, k=rng.randint(6, 16)))
        out.append(piece + rng.choice("，。；"))
        n += len(piece) + 1
    return "".join(out)[:chars - 1] + "。"


def _en_text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        n += len(word) + 1
    return (" ".join(out)[:chars - 1] + ".").capitalize()


def _id_card(rng: random.Random) -> str:
    weights, check = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2), "10X98765432"
    body = f"{rng.choice(['110101', '310104', '440305', '510107'])}{rng.randint(1960, 2005)}" \
           f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    return body + check[sum(int(d) * w for d, w in zip(body, weights)) % 11]


def _bank_card(rng: random.Random) -> str:
    digits = [6, 2, 2, 8] + [rng.randint(0, 9) for _ in range(11)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit makes the Luhn sum a multiple of 10
        n = d * (1 if i % 2 else 2)
        total += n - 9 if n > 9 else n
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


def _pii(rng: random.Random, kind: str) -> str:
    return {
        "ID_CARD": lambda: _id_card(rng),
        "PHONE": lambda: rng.choice(["13", "15", "18"]) + f"{rng.randint(0, 999999999):09d}",
        "EMAIL": lambda: f"{rng.choice(_WORDS)}.{rng.choice(_WORDS)}{rng.randint(1, 99)}@example.com",
        "BANK_CARD": lambda: _bank_card(rng),
        "IP": lambda: f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "PASSPORT": lambda: f"E{rng.randint(10000000, 99999999)}",
        "SECRET_URL": lambda: f"https://api.example.com/v1/files?id={rng.randint(1, 9999)}&token="
                              f"{rng.getrandbits(64):016x}",
    }[kind]()


def _decoy(rng: random.Random) -> str:
    """Numbers that look like PII but are not: they must survive masking."""
    choice = rng.randrange(5)
    if choice == 0:
        return f"订单号{rng.choice('23456789')}{rng.randint(0, 10**13 - 1):013d}"  # 14 digits: no card, no phone
    if choice == 1:
        return f"工单 2{rng.randint(0, 10**10 - 1):010d}"  # 11 digits, but mobiles start with 1
    if choice == 2:
        return (f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}")
    if choice == 3:
        return f"version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 300)}"
    return f"¥{rng.randint(100, 99999)}.{rng.randint(0, 99):02d}"


def _assemble(text: str, placed: list[tuple[int, str]]) -> str:
    """`text` with each (offset, piece) set in at its offset (never inside one another), spaces around it."""
    out, last = [], 0
    for cut, piece in placed:
        out += [text[last:cut], f" {piece} "]
        last = cut
    return "".join(out) + text[last:]


def _edit(rng: random.Random, text: str, share: float) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), max(1, int(len(chars) * share))):
        chars[i] = rng.choice(_ZH) if "\u4e00" <= chars[i] <= "\u9fff" else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(chars)


def generate(path: Path, records: int, seed: int = 0) -> dict:
    """Write `records` JSONL records; return the ground truth: groups of duplicates and PII per record id."""
    rng = random.Random(seed)
    originals: list[tuple[str, str]] = []
    truth = {"group_of": {}, "pii": {}, "decoys": {}, "planted": Counter()}
    with path.open("w", encoding="utf-8") as f:
        for i in range(records):
            roll = rng.random()
            if originals and roll < 0.05:  # exact duplicate, cosmetically changed (normalisation makes it exact)
                source = rng.randrange(len(originals))
                question, base, placed = originals[source]
                answer = _assemble(base, placed)
                answer = answer.replace("。", "。 ", 1) if rng.random() < 0.5 else answer.upper()
                truth["group_of"][i] = source
                truth["planted"]["exact"] += 1
            elif originals and roll < 0.10:  # near duplicate: 3 % of the answer's characters edited
                source = rng.randrange(len(originals))
                question, base, placed = originals[source]
                answer = _assemble(_edit(rng, base, 0.03), placed)  # the planted PII stays intact
                truth["group_of"][i] = source
                truth["planted"]["near"] += 1
            else:
                chinese = rng.random() < 0.6
                question = (_zh_text if chinese else _en_text)(rng, rng.randint(30, 60))
                base = (_zh_text if chinese else _en_text)(rng, rng.randint(200, 300))
                pii, inserts = [], []
                if rng.random() < 0.10:
                    kind = rng.choice(PII_KINDS)
                    inserts.append(_pii(rng, kind))
                    pii.append([kind, inserts[-1]])
                if rng.random() < 0.05:
                    inserts.append(_decoy(rng))
                    truth["decoys"][len(originals)] = inserts[-1]
                placed = list(zip(sorted(rng.randrange(len(base)) for _ in inserts), inserts))
                answer = _assemble(base, placed)
                if pii:
                    truth["pii"][len(originals)] = pii
                truth["group_of"][i] = len(originals)
                originals.append((question, base, placed))
                truth.setdefault("original_id", {})[len(originals) - 1] = i
            record = {"id": i, "messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}], "votes": rng.randint(0, 20)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return truth


# --- scoring ----------------------------------------------------------------------------------------------------------

def score(truth: dict, out: Path, rejects: Path, in_path: Path) -> dict:
    """Duplicate and PII recall/precision from the outputs and the ground truth."""
    group_of = truth["group_of"]
    original_id = truth["original_id"]
    line_to_id = {}  # line numbers are ids + 1 (one record per line)
    dup_drops, other_drops, correct_drops = 0, Counter(), 0
    if rejects.exists():
        with rejects.open(encoding="utf-8") as f:
            for line in f:
                entry = json.loads(line)
                rid = int(entry["line"].rsplit(":", 1)[1]) - 1
                if entry["step"].startswith("dedup"):
                    dup_drops += 1
                    keeper = int(re.search(r":(\d+) \(", entry["reason"]).group(1)) - 1
                    correct_drops += group_of[rid] == group_of[keeper]
                else:
                    other_drops[entry["step"]] += 1
    del line_to_id
    group_sizes = Counter(group_of.values())
    expected_drops = sum(size - 1 for size in group_sizes.values())
    # PII: in kept records that descend from an original with planted PII, the value must be gone and its
    # placeholder present; placeholders elsewhere (or beyond the planted count) are false positives.
    placeholders = re.compile("<(" + "|".join(PII_KINDS) + ")>")
    found, missed, false_positive, decoys_kept, decoys_lost = 0, 0, 0, 0, 0
    with out.open(encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            text = record["messages"][1]["content"]
            source = group_of[record["id"]]
            planted = truth["pii"].get(source, [])
            masks = Counter(placeholders.findall(text))
            for kind, value in planted:
                if value not in text and masks[kind] > 0:
                    found += 1
                    masks[kind] -= 1
                else:
                    missed += 1
            false_positive += sum(masks.values())
            decoy = truth["decoys"].get(source)
            if decoy is not None and record["id"] == original_id[source]:
                decoys_kept += decoy in text
                decoys_lost += decoy not in text
    return {
        "planted": dict(truth["planted"]),
        "duplicates": {"expected_drops": expected_drops, "dropped": dup_drops, "correct": correct_drops,
                       "recall": round(correct_drops / max(expected_drops, 1), 4),
                       "precision": round(correct_drops / max(dup_drops, 1), 4)},
        "pii": {"planted_in_kept": found + missed, "masked": found, "false_positives": false_positive,
                "recall": round(found / max(found + missed, 1), 4),
                "precision": round(found / max(found + false_positive, 1), 4),
                "decoys_kept": decoys_kept, "decoys_masked": decoys_lost},
        "other_rejects": dict(other_drops),
    }


# --- the peer ---------------------------------------------------------------------------------------------------------

def peer_near_dedup(in_path: Path, records: int, threshold: float, ngram: int, num_perm: int = 128) -> dict | None:
    """datasketch MinHash + MinHashLSH over character n-grams of the first `records` records: records/s."""
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        return None
    texts = []
    with in_path.open(encoding="utf-8") as f:
        for line in f:
            if len(texts) >= records:
                break
            record = json.loads(line)
            texts.append("\n".join(m["content"] for m in record["messages"]).lower())
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dropped = 0
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm)
        m.update_batch([text[j:j + ngram].encode() for j in range(max(1, len(text) - ngram + 1))])
        if lsh.query(m):
            dropped += 1
        else:
            lsh.insert(str(i), m)
    seconds = time.perf_counter() - start
    return {"records": len(texts), "seconds": round(seconds, 2), "records_per_second": round(len(texts) / seconds),
            "dropped": dropped, "num_perm": num_perm}


def ours_near_dedup(in_path: Path, records: int, threshold: float, ngram: int) -> dict:
    """lmforge's NearDuplicateIndex alone on the same records and texts as the peer."""
    from lmforge.data.dedup import NearDuplicateIndex

    texts = []
    with in_path.open(encoding="utf-8") as f:
        for line in f:
            if len(texts) >= records:
                break
            texts.append("\n".join(m["content"] for m in json.loads(line)["messages"]))
    start = time.perf_counter()
    index = NearDuplicateIndex(threshold, ngram)
    for text in texts:
        index.add(text)
    labels = index.clusters()
    seconds = time.perf_counter() - start
    return {"records": len(texts), "seconds": round(seconds, 2), "records_per_second": round(len(texts) / seconds),
            "dropped": int((labels != range(len(labels))).sum())}


# --- main -------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--peer-records", type=int, default=50_000, help="records for the near-dedup peer (0: skip)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the data goes (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lmforge-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    in_path, out = work / "synthetic.jsonl", work / "clean.jsonl"
    start = time.perf_counter()
    truth = generate(in_path, args.records)
    print(f"generated {args.records} records ({in_path.stat().st_size / 1e6:.0f} MB) in "
          f"{time.perf_counter() - start:.0f}s: {dict(truth['planted'])}", flush=True)
    command = [sys.executable, "-m", "lmforge", "data", "clean", str(in_path), "-o", str(out),
               "--num-proc", str(args.num_proc)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # largest single child process, KB → GB
    report = json.loads((work / "clean.report.json").read_text())
    scores = score(truth, out, work / "clean.rejects.jsonl", in_path)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "command": shlex.join(["python", "benchmarks/data_pipeline.py",
                                                               *(argv if argv is not None else sys.argv[1:])]),
              "records": args.records, "wall_seconds": round(wall, 1), "peak_rss_gb": round(peak_gb, 2),
              "records_per_second": round(args.records / wall),
              "steps": [{k: s[k] for k in ("step", "in", "rejected", "seconds", "records_per_second")}
                        for s in report["steps"]], **scores}
    if args.peer_records:
        ours = ours_near_dedup(in_path, args.peer_records, 0.4, 5)
        peer = peer_near_dedup(in_path, args.peer_records, 0.4, 5)
        result["near_dedup_vs_peer"] = {"lmforge": ours, "datasketch": peer,
                                        "speedup": round(ours["records_per_second"] / peer["records_per_second"], 1)
                                        if peer else None}
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
