"""How lmforge kb's hybrid fusion was chosen: fusions and BM25 settings on development seeds of the planted set.

benchmarks/kb.py reports seed 7 (the test set). This script builds the same planted set for other seeds (8 and 9 by
default; do not pass 7 to choose anything), scores every question against every chunk once (BM25 per (k1, b), the e5
cosine) and ranks with each candidate fusion, exactly as lmforge/kb/retrieve.py does for its default (union of each
retriever's top 50, min_max / convex_fusion from retrieve.py):
- convex "min-max": each score normalised by its own list's minimum and maximum (retrieve.py's default),
- convex "theoretical min-max" (TM2C2 in Bruch et al. 2023): the minimum is the score's floor (0 for BM25, -1 for
  the cosine), the maximum the list's,
  each as dense_weight · dense + (1 - dense_weight) · BM25,
- reciprocal rank fusion (k 60) with BM25's share scaled by 1, 0.7, 0.5, 0.3,
- and BM25 alone, dense alone.
Rule used for retrieve.py's default (printed at the end): among the settings within 0.001 of the highest mean MRR@10
over the development seeds, the one whose worse neighbour (dense weight ± 0.1; weight 1 is dense alone) has the
highest mean MRR — a setting that holds when its weight is a little off; then bm25s's default k1 1.5 on a tie.

    python benchmarks/kb_fusion_sweep.py                 # seeds 8, 9; ~2 minutes a seed on a quiet 2-core machine
    python benchmarks/kb_fusion_sweep.py --seeds 8,9,10 --top 30
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kb as bench  # benchmarks/kb.py: the planted set, its scoring; puts the repo on sys.path

from lmforge.kb.retrieve import RRF_K, convex_fusion, min_max, words

DEPTH = 50
B_VALUES, K1_VALUES = (0.0, 0.25, 0.5, 0.75), (1.2, 1.5)
DENSE_WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9)
RRF_BM25_WEIGHTS = (1.0, 0.7, 0.5, 0.3)


def score_matrices(seed: int, entities: int) -> dict:
    """Every question against every chunk: the cosine and BM25 per (k1, b); which chunks hold each answer."""
    import bm25s

    from lmforge.kb.build import update_kb
    from lmforge.kb.chunking import ChunkSettings
    from lmforge.kb.embedding import shared_embedder
    from lmforge.kb.retrieve import Retriever

    passages, questions = bench.planted_set(entities, seed)
    embedder = shared_embedder()
    with tempfile.TemporaryDirectory() as tmp:
        bench.write_documents(passages, Path(tmp) / "docs", per_file=20, seed=seed)
        update_kb(Path(tmp) / "kb", [str(Path(tmp) / "docs")], "build", embedder, ChunkSettings(32, 8))
        retriever = Retriever.open(Path(tmp) / "kb", embedder)
    texts = [retriever.kb.chunks[i].text for i in retriever.ids]
    vectors = np.concatenate([embedder.queries([q["text"]]) for q in questions])  # one by one, as search() does
    cosine = vectors @ retriever.kb.vectors(retriever.ids).T
    corpus = [words(text) or [""] for text in texts]
    bm25 = {}
    for k1, b in itertools.product(K1_VALUES, B_VALUES):
        model = bm25s.BM25(k1=k1, b=b)
        model.index(corpus, show_progress=False)
        matrix = np.zeros(cosine.shape, dtype=np.float64)
        for row, question in enumerate(questions):
            terms = [term for term in words(question["text"]) if term in model.vocab_dict]
            if terms:
                matrix[row] = model.get_scores(terms)
        bm25[(k1, b)] = matrix
    relevant = np.array([[q["key"] in text for text in texts] for q in questions])
    return {"cosine": cosine.astype(np.float64), "bm25": bm25, "relevant": relevant}


def figures(orders: list[np.ndarray], relevant: np.ndarray) -> np.ndarray:
    """recall@1, recall@5, MRR@10, as benchmarks/kb.py counts them."""
    out = np.zeros(3)
    for row, order in enumerate(orders):
        hit = np.nonzero(relevant[row, order[:10]])[0]
        if len(hit):
            out += [hit[0] == 0, hit[0] < 5, 1 / (hit[0] + 1)]
    return out / len(orders)


def top(scores: np.ndarray, positive: bool = False) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")[:DEPTH]
    return order[scores[order] > 0] if positive else order


def rank(candidates: np.ndarray, fused: np.ndarray) -> np.ndarray:
    return candidates[sorted(range(len(candidates)), key=lambda n: (-fused[n], candidates[n]))]


def evaluate(data: dict, how: tuple) -> np.ndarray:
    cosine, relevant = data["cosine"], data["relevant"]
    orders = []
    for row in range(len(cosine)):
        dense = cosine[row]
        bm25 = data["bm25"][how[1]][row] if how[0] != "dense" else None
        lexical, semantic = (top(bm25, positive=True) if bm25 is not None else None), top(dense)
        if how[0] == "bm25":
            orders.append(lexical)
            continue
        if how[0] == "dense":
            orders.append(semantic)
            continue
        candidates = np.union1d(lexical, semantic)
        if how[0] == "rrf":
            fused = np.zeros(len(candidates))
            position = {c: n for n, c in enumerate(candidates.tolist())}
            for ranking, weight in ((lexical, how[2]), (semantic, 1.0)):
                for r, chunk in enumerate(ranking.tolist(), start=1):
                    fused[position[chunk]] += weight / (RRF_K + r)
        elif how[2] == "min-max":
            fused = convex_fusion(bm25[candidates], bm25[lexical], dense[candidates], dense[semantic], how[3])
        else:  # theoretical min-max: the floor as the minimum (the list's own maximum stays)
            def floor_max(scores, listed, floor):
                return min_max(scores, np.array([floor, listed.max()])) if len(listed) else np.zeros(len(scores))

            fused = (how[3] * floor_max(dense[candidates], dense[semantic], -1.0)
                     + (1 - how[3]) * floor_max(bm25[candidates], bm25[lexical], 0.0))
        orders.append(rank(candidates, fused))
    return figures(orders, relevant)


def settings() -> list[tuple]:
    out = [("dense",)] + [("bm25", kb) for kb in itertools.product(K1_VALUES, B_VALUES)]
    for kb in itertools.product(K1_VALUES, B_VALUES):
        out += [("rrf", kb, weight) for weight in RRF_BM25_WEIGHTS]
        out += [("convex", kb, norm, weight) for norm in ("min-max", "theoretical") for weight in DENSE_WEIGHTS]
    return out


def name(how: tuple) -> str:
    if how[0] == "dense":
        return "dense alone"
    bm25 = f"BM25 k1 {how[1][0]} b {how[1][1]}"
    if how[0] == "bm25":
        return f"{bm25} alone"
    if how[0] == "rrf":
        return f"RRF, BM25 share {how[2]}, {bm25}"
    return f"convex {how[2]}, dense weight {how[3]}, {bm25}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="8,9", help="development seeds (7 is benchmarks/kb.py's test set)")
    parser.add_argument("--entities", type=int, default=80)
    parser.add_argument("--top", type=int, default=20, help="rows to print, best mean MRR first")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if 7 in seeds:
        print("note: seed 7 is the test set benchmarks/kb.py reports; choosing settings on it fits the test",
              file=sys.stderr)
    data = {seed: score_matrices(seed, args.entities) for seed in seeds}
    results = {how: {seed: evaluate(d, how) for seed, d in data.items()} for how in settings()}
    mean = {how: np.mean(list(per_seed.values()), axis=0) for how, per_seed in results.items()}
    dense = mean[("dense",)]
    header = " | ".join(f"seed {s} R@1 / R@5 / MRR" for s in seeds)
    print(f"| setting | {header} | mean R@1 / R@5 / MRR | above dense alone on all three, every seed |")
    print("|---|" + "---|" * len(seeds) + "---|---|")
    ranked = sorted(mean, key=lambda how: (-mean[how][2], -mean[how][0], name(how)))
    shown = ranked[:args.top] + [how for how in (("dense",), ("bm25", (1.5, 0.75)), ("rrf", (1.5, 0.75), 1.0))
                                 if how not in ranked[:args.top]]
    for how in shown:
        cells = " | ".join(" / ".join(f"{x:.3f}" for x in results[how][s]) for s in seeds)
        above = all((np.round(results[how][s], 3) > np.round(results[("dense",)][s], 3)).all() for s in seeds)
        print(f"| {name(how)} | {cells} | {' / '.join(f'{x:.3f}' for x in mean[how])} | {'yes' if above else ''} |")
    print(f"\ndense alone, mean: {' / '.join(f'{x:.3f}' for x in dense)}")
    best = max(m[2] for m in mean.values())

    def worse_neighbour(how):
        if how[0] != "convex":
            return -1.0
        near = [round(how[3] + step, 2) for step in (-0.1, 0.1)]
        return min(mean[("dense",)][2] if w >= 1 else mean.get((*how[:3], w), [0, 0, -1.0])[2] for w in near)

    tied = [how for how in mean if mean[how][2] >= best - 0.001]
    chosen = max(tied, key=lambda how: (round(worse_neighbour(how), 6), how[0] == "convex" and how[1][0] == 1.5))
    print(f"chosen (highest MRR within 0.001, then the best worse neighbour): {name(chosen)}; mean "
          f"{' / '.join(f'{x:.3f}' for x in mean[chosen])}, worse neighbour's MRR {worse_neighbour(chosen):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
