"""``llmlab bench glove``: llmlab's GloVe against glove-python (PyPI ``bicleaner-ai-glove``), side by side.

Both run in one process on the same sentences (Shakespeare's plays, every non-empty line a
sentence, llmlab's words), over the same vocabulary (llmlab's word tokenizer, min_count 5: the
reference gets it as its ``dictionary`` and the sentences with out-of-vocabulary words removed,
which is what llmlab does before forming windows), window 10 with 1/d weighting, 100 dimensions,
x_max 100, α 0.75, AdaGrad with learning rate 0.05, ``--epochs`` epochs, ``--threads`` threads.

Measured per run: the co-occurrence counting (glove-python ``Corpus.fit``; llmlab
``CooccurrenceDataModule.setup`` on the corpus as id arrays), the training (``Glove.fit``;
``Trainer.fit``), words/s = raw corpus words × epochs / training time (so the ratio is the ratio of
epochs per second), and the intrinsic scores of the vectors users get (WordSim-353, SimLex-999,
Google analogies, by :mod:`llmlab.evaluation.word_vectors`), mean ± std over ``--seeds`` runs.

What each side trains on, and what its vectors are:

* glove-python keeps only the upper triangle of the symmetric X (i < j, no diagonal), so an epoch
  visits each unordered pair once and updates both words; it has *one* matrix of word vectors
  (and one of biases) used on both sides of wᵢᵀw̃ⱼ, so W̃ is tied to W and ``word_vectors`` is all
  there is. Its per-pair loss is clipped to ±10. This build's ``Corpus.matrix`` also holds
  duplicate (i, j) entries (a pair's count split into parts); ``Glove.fit`` fits each part as its
  own entry, log of the partial count and all. The benchmark trains on the matrix as users get it,
  and checks that, duplicates summed, it equals the upper triangle of llmlab's X.
* llmlab counts the full symmetric X (both (i, j) and (j, i), and Xᵢᵢ), visits every non-zero
  entry each epoch in shuffled batches of 16384, and trains separate W and W̃; its vectors are
  W + W̃ by default (``combine=sum``, paper §4.2). The ``W only`` row scores W of the same runs.

``--variants`` adds one glove-python run on its matrix with the duplicates summed.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

from llmlab.bench.common import (
    QUICK_PLAYS,
    CpuWatch,
    WordRun,
    check_lines,
    contention_warning,
    finish,
    intrinsic,
    lightning_trainer,
    load_word_corpus,
    loadavg,
    logger,
    quiet_lightning,
    summarize,
    verdict_lines,
    verdicts,
    versions,
    word_table,
)
from llmlab.errors import UserError

NAME = "glove"
DEFAULTS = dict(seeds=3, epochs=25, plays=None)
QUICK = dict(seeds=1, epochs=2, plays=QUICK_PLAYS)
HYPER = dict(vector_size=100, window=10, min_count=5, x_max=100.0, alpha=0.75, eta=0.05)
BATCH_SIZE = 16384  # llmlab: co-occurrence entries per AdaGrad step
REF = "glove-python"
REF_VARIANT = "W (W̃ tied to W)"
REF_SUMMED = "W, duplicates summed"
OURS = "W + W̃ (default)"
OURS_W = "W only (same runs)"
COUNT_RTOL = 1e-3  # glove-python accumulates X in float32, llmlab in float64

log = logger(NAME)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"llmlab bench {NAME}",
        description=(
            "Co-occurrence counting and training speed, and intrinsic quality (WS353, SimLex-999, Google "
            "analogies), of llmlab's GloVe vs glove-python on Shakespeare, same hyperparameters, one process."
        ),
    )
    p.add_argument("--seeds", type=int, help=f"training runs per implementation (default {DEFAULTS['seeds']})")
    p.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ... (default 0)")
    p.add_argument("--epochs", type=int, help=f"epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--plays", type=int, help="train on the first N of the 38 plays (default: all)")
    p.add_argument("--threads", type=int, default=2, help="glove-python no_threads = torch threads (default 2)")
    p.add_argument(
        "--variants",
        action="store_true",
        help="also one glove-python run on its co-occurrence matrix with the duplicate entries summed",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 seed, 2 epochs, the first {QUICK_PLAYS} plays (explicit options still win)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs") / "bench" / f"{NAME}.md",
        help=f"write the Markdown table to OUT.md and the raw results to OUT.json "
        f"(default outputs/bench/{NAME}.{{md,json}} under the current directory)",
    )
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("seeds", "epochs", "threads"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key}={getattr(args, key)} must be >= 1")
    if args.plays is not None and not 1 <= args.plays <= 38:
        raise UserError(f"--plays={args.plays}: Shakespeare has 38 plays, choose 1..38")
    return args


def main(argv: list[str] | None = None) -> None:
    """``llmlab bench glove [options]``: print the table, write ``--out``; exit 1 if a check fails."""
    args = resolve_args(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    text, record = run(args)
    finish(args.out, text, record, log)


# ----------------------------------------------------------------------------- the two sides
def _import_glove():
    try:
        from glove import Corpus, Glove
    except ImportError as e:
        raise UserError(
            "llmlab bench glove compares against glove-python, which is not installed: "
            "pip install bicleaner-ai-glove==0.2.1 (or pip install -e '.[dev]')"
        ) from e
    return Corpus, Glove


def in_vocab_sentences(corpus) -> list[list[str]]:
    """The sentences with out-of-vocabulary words removed (windows then span the kept words, as in llmlab)."""
    stoi = corpus.tok.stoi
    kept = ([w for w in s if w in stoi] for s in corpus.sentences)
    return [s for s in kept if s]


def sum_duplicates(matrix):
    """The COO matrix with duplicate (i, j) entries summed (what glove-python's counts add up to)."""
    m = matrix.tocsr().tocoo()  # tocsr sums duplicates
    m.row, m.col = m.row.astype("int32"), m.col.astype("int32")  # fit_vectors wants int32 indices
    return m


def count_glove_python(corpus, sentences):
    Corpus, _ = _import_glove()
    t0 = time.perf_counter()
    co = Corpus(dictionary=corpus.tok.stoi)
    co.fit(sentences, window=HYPER["window"])
    return co.matrix, time.perf_counter() - t0


def run_glove_python(corpus, matrix, count_s: float, variant: str, seed: int, args) -> WordRun:
    _, Glove = _import_glove()
    model = Glove(no_components=HYPER["vector_size"], learning_rate=HYPER["eta"], alpha=HYPER["alpha"],
                  max_count=HYPER["x_max"], random_state=seed)
    with CpuWatch() as watch:
        t0 = time.perf_counter()
        model.fit(matrix, epochs=args.epochs, no_threads=args.threads)
        train_s = time.perf_counter() - t0
    metrics = intrinsic(corpus.tok.words, model.word_vectors)  # rows follow the dictionary = tok.stoi
    wps = corpus.raw_words * args.epochs / train_s
    return WordRun(REF, variant, seed, count_s, train_s, wps, metrics, watch.others,
                   {"entries": int(matrix.nnz), "entries_per_s": matrix.nnz * args.epochs / train_s})


def run_llmlab(corpus, seed: int, args) -> tuple[list[WordRun], object]:
    """One llmlab run → its rows for W + W̃ and for W only, and the datamodule (for the count check)."""
    import torch

    from llmlab.data.words import CooccurrenceDataModule
    from llmlab.methods.glove import GloVeModule
    from llmlab.models.build import build_model

    dm = CooccurrenceDataModule(window=HYPER["window"], symmetric=True, distance_weighting=True,
                                batch_size=BATCH_SIZE, corpus="shakespeare", seed=seed)
    dm.tokenizer = corpus.tok
    t0 = time.perf_counter()
    dm.ids, dm.sent = corpus.tok.encode_sentences(corpus.docs)  # our (maybe cut) corpus as id arrays
    encode_s = time.perf_counter() - t0
    with quiet_lightning():
        t0 = time.perf_counter()
        dm.setup("fit")  # the co-occurrence counting
        count_s = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial vectors
        model = build_model({"arch": "glove", "vector_size": HYPER["vector_size"]}, corpus.tok)
        m = GloVeModule(models={"model": model}, vector_size=HYPER["vector_size"], x_max=HYPER["x_max"],
                        alpha=HYPER["alpha"], eta=HYPER["eta"], optimizer="adagrad")
        m.attach_tokenizer(corpus.tok)
        with quiet_lightning():
            trainer = lightning_trainer(args.epochs)
            with CpuWatch() as watch:
                t0 = time.perf_counter()
                trainer.fit(m, datamodule=dm)
                train_s = time.perf_counter() - t0
    nnz = int(len(dm.triples[2]))
    wps = corpus.raw_words * args.epochs / train_s
    extra = {"entries": nnz, "entries_per_s": nnz * args.epochs / train_s, "encode_s": encode_s,
             "steps": int(trainer.global_step)}
    runs = []
    for variant, combine in ((OURS, m.combine), (OURS_W, "w")):
        m.combine = combine
        metrics = intrinsic(corpus.tok.words, m.vectors().detach().float().numpy())
        runs.append(WordRun("llmlab", variant, seed, count_s, train_s, wps, metrics, watch.others,
                            dict(extra, combine=combine)))
    return runs, dm


def count_check(matrix, dm) -> dict:
    """glove-python's matrix, duplicates summed, must equal the upper triangle (i < j) of llmlab's X."""
    import numpy as np
    import scipy.sparse as sp

    i, j, x = (t.numpy() for t in dm.triples)
    V = dm.tokenizer.vocab_size
    ours = sp.coo_matrix((x, (i, j)), shape=(V, V)).tocsr()
    upper = sp.triu(ours, k=1).tocsr()
    theirs = matrix.tocsr()
    theirs.sum_duplicates()
    theirs.sort_indices()
    upper.sort_indices()
    same_pattern = bool(
        theirs.nnz == upper.nnz
        and np.array_equal(theirs.indptr, upper.indptr)
        and np.array_equal(theirs.indices, upper.indices)
    )
    rel = float(np.max(np.abs(theirs.data - upper.data) / upper.data, initial=0.0)) if same_pattern else math.inf
    asym = abs(ours - ours.T)
    symmetric = bool(asym.nnz == 0 or asym.max() <= 1e-9 * abs(ours).max())  # same sums, any order
    ok = bool(same_pattern and rel <= COUNT_RTOL and symmetric)
    return {
        "name": "co-occurrence counts (glove-python's matrix, duplicates summed, == upper triangle of llmlab's X)",
        "ok": ok,
        "detail": f"{theirs.nnz:,} vs {upper.nnz:,} pairs i < j, same pattern: {same_pattern}, max relative "
                  f"difference {rel:.1e} (tol {COUNT_RTOL:g}, float32 vs float64 sums); llmlab's X symmetric: "
                  f"{symmetric}",
        "glove_python_entries": int(matrix.nnz),
        "glove_python_pairs": int(theirs.nnz),
        "llmlab_entries": int(ours.nnz),
        "llmlab_diagonal": int((i == j).sum()),
    }


# ----------------------------------------------------------------------------- the benchmark
def run(args: argparse.Namespace) -> tuple[str, dict]:
    """Count and train both sides ``--seeds`` times; returns (Markdown, JSON record)."""
    import torch

    _import_glove()
    load_start = loadavg()
    corpus = load_word_corpus(args.plays, HYPER["min_count"])
    log(corpus.describe())
    t0 = time.perf_counter()
    sentences = in_vocab_sentences(corpus)
    prep_s = time.perf_counter() - t0
    seeds = [args.seed + k for k in range(args.seeds)]

    runs: list[WordRun] = []
    checks: list[dict] = []
    counts: dict = {}
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for k, seed in enumerate(seeds):
            order = (REF, "llmlab") if k % 2 == 0 else ("llmlab", REF)  # neither always first
            for impl in order:
                gc.collect()
                if impl == REF:
                    matrix, count_s = count_glove_python(corpus, sentences)
                    new = [run_glove_python(corpus, matrix, count_s, REF_VARIANT, seed, args)]
                else:
                    new, dm = run_llmlab(corpus, seed, args)
                    llmlab_dm = dm
                runs += new
                for r in new:
                    log(f"seed {seed}, {impl} {r.variant}: count {r.setup_s:.2f} s, train {r.train_s:.2f} s, "
                        f"{r.words_per_s:,.0f} words/s, WS353 {r.metrics['ws353/spearman']:.3f}, SimLex "
                        f"{r.metrics['simlex/spearman']:.3f}, analogy {r.metrics['analogy/total']:.3f}; other "
                        f"processes kept {'n/a' if r.contention is None else f'{r.contention:.2f}'} CPUs busy")
            if k == 0:
                check = count_check(matrix, llmlab_dm)
                counts = {k_: v for k_, v in check.items() if k_ not in ("name", "ok", "detail")}
                checks.append({k_: check[k_] for k_ in ("name", "ok", "detail")})
            del llmlab_dm
        if args.variants:
            gc.collect()
            matrix, count_s = count_glove_python(corpus, sentences)
            t0 = time.perf_counter()
            summed = sum_duplicates(matrix)
            r = run_glove_python(corpus, summed, count_s + time.perf_counter() - t0, REF_SUMMED, args.seed, args)
            runs.append(r)
            log(f"seed {args.seed}, {REF} {REF_SUMMED}: train {r.train_s:.2f} s, WS353 "
                f"{r.metrics['ws353/spearman']:.3f}, SimLex {r.metrics['simlex/spearman']:.3f}, "
                f"analogy {r.metrics['analogy/total']:.3f}")
    finally:
        torch.set_num_threads(prev_threads)

    rows = summarize(runs, reference=REF, ratio_key={OURS: REF_VARIANT, OURS_W: REF_VARIANT, REF_SUMMED: REF_VARIANT})
    by = {(r.impl, r.variant): r for r in rows}
    verdict = verdicts(by[("llmlab", OURS)], by[(REF, REF_VARIANT)])
    contention = {
        f"{r.impl}{'' if r.variant in (REF_VARIANT, OURS) else f' {r.variant}'} seed {r.seed}": r.contention
        for r in runs
        if r.variant != OURS_W  # same training run as the W + W̃ row
    }
    load_end = loadavg()

    vers = versions("torch", "lightning", "bicleaner-ai-glove", "scipy", "numpy")
    ref_runs = [r for r in runs if r.impl == REF and r.variant == REF_VARIANT]
    our_runs = [r for r in runs if r.impl == "llmlab" and r.variant == OURS]
    first = runs[0].metrics
    header = (
        f"{corpus.describe()}. Hyperparameters (both): {HYPER['vector_size']} dims, window {HYPER['window']} "
        f"(1/d weighting, symmetric), x_max {HYPER['x_max']:g}, α {HYPER['alpha']}, AdaGrad η {HYPER['eta']} "
        f"(accumulators start at 1), {args.epochs} epoch{'s' if args.epochs > 1 else ''}, {args.threads} "
        f"thread{'s' if args.threads > 1 else ''} (glove-python no_threads, Hogwild; torch threads); llmlab "
        f"batches of {BATCH_SIZE} entries. " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "."
    )
    mean = lambda rs, key: sum(r.extra[key] for r in rs) / len(rs)  # noqa: E731
    ref_count = sum(r.setup_s for r in ref_runs) / len(ref_runs)
    our_count = sum(r.setup_s for r in our_runs) / len(our_runs)
    notes = [
        "count s: glove-python `Corpus.fit` on the in-vocabulary sentences (preparing them in Python took "
        f"{prep_s:.2f} s, not counted), llmlab `CooccurrenceDataModule.setup` on the corpus as id arrays "
        f"(`encode_sentences` took {mean(our_runs, 'encode_s'):.2f} s, not counted); llmlab / glove-python "
        f"counting time = {our_count / ref_count:.2f}. train s: `Glove.fit` vs `Trainer.fit` (Lightning loop "
        "included).",
        f"words/s = {corpus.raw_words:,} raw corpus words × epochs / train s, so ratio = epochs/s ÷ "
        "glove-python's. Entries visited per second: glove-python "
        f"{mean(ref_runs, 'entries_per_s'):,.0f} ({counts['glove_python_entries']:,} entries per epoch), "
        f"llmlab {mean(our_runs, 'entries_per_s'):,.0f} ({counts['llmlab_entries']:,} per epoch).",
        f"What each trains on: glove-python's `Corpus.matrix` holds only the upper triangle of X (i < j, "
        f"no diagonal) and {counts['glove_python_entries']:,} entries for {counts['glove_python_pairs']:,} "
        "distinct pairs: duplicate (i, j) entries, each fit on its own with the log of its partial count; "
        f"llmlab trains on the full symmetric X ({counts['llmlab_entries']:,} entries = 2 × "
        f"{counts['glove_python_pairs']:,} + {counts['llmlab_diagonal']:,} diagonal).",
        "What users get: glove-python `word_vectors` is its only matrix (W̃ and the context biases are tied "
        "to W and the word biases; per-entry loss clipped to ±10); llmlab returns W + W̃ by default, and W "
        "alone with `combine=w` (row 'W only', same runs).",
        f"Quality by llmlab.evaluation.word_vectors on both (mean ± sample std over seeds): Spearman ρ over "
        f"the pairs whose words are in the vocabulary (WS353 {first['ws353/coverage']:.0%}, SimLex "
        f"{first['simlex/coverage']:.0%} of pairs), 3CosAdd accuracy over the covered Google analogy questions "
        "(30,000 most frequent words).",
    ]
    lines = [f"## llmlab bench {NAME}", "", word_table(rows, setup_label="count s"), "", header, ""]
    lines += [f"- {n}" for n in notes]
    lines += contention_warning(contention, args.threads)
    lines += ["", f"Verdicts (llmlab {OURS} vs {REF}):"] + verdict_lines(verdict, f"llmlab vs {REF}")
    lines += ["", "Checks:"] + check_lines(checks)
    per_seed = [
        f"{r.impl} {r.variant} seed {r.seed}: count {r.setup_s:.2f} s, train {r.train_s:.2f} s, WS353 "
        f"{r.metrics['ws353/spearman']:.3f}, SimLex {r.metrics['simlex/spearman']:.3f}, analogy "
        f"{r.metrics['analogy/total']:.3f}"
        for r in runs
    ]
    lines += ["", "Details:"] + [f"- {d}" for d in per_seed]
    lines.append(
        f"- CPUs (of {os.cpu_count()}) kept busy by other processes while training was timed: "
        + ", ".join("n/a" if v is None else f"{k} {v:.2f}" for k, v in contention.items())
        + f"; 1-minute load average at start {load_start}, at end {load_end}"
    )
    text = "\n".join(lines) + "\n"
    record = {
        "bench": NAME,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hyperparameters": dict(HYPER, batch_size=BATCH_SIZE),
        "corpus": {"plays": len(corpus.docs), "sentences": len(corpus.sentences), "raw_words": corpus.raw_words,
                   "vocab": corpus.tok.vocab_size, "tokenizer_s": corpus.tokenizer_s, "prep_s": prep_s},
        "cooccurrence": counts,
        "versions": vers,
        "runs": runs,
        "rows": rows,
        "verdicts": verdict,
        "checks": checks,
        "load": {"start": load_start, "end": load_end, "contention": contention},
        "markdown": text,
    }
    return text, record


if __name__ == "__main__":
    main()
