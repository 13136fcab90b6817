"""``llmlab bench word2vec``: llmlab's word2vec against gensim's ``Word2Vec``, side by side.

Both train in one process, on the same sentences (Shakespeare's plays, every non-empty line a
sentence, words as llmlab's word tokenizer splits them), with the same hyperparameters: skip-gram,
100 dimensions, window 5 (dynamically shrunk), min_count 5 (gensim applies it itself; the two
vocabularies are checked to be equal), 5 negatives, subsampling 1e-3, 5 epochs, learning rate
0.025 decaying linearly to 0.0001, ``--threads`` threads (gensim ``workers``, torch intra-op).

Measured per run: training wall time (gensim ``Word2Vec.train``; llmlab ``Trainer.fit``, i.e.
including Lightning's loop) and the setup before it (gensim ``build_vocab``: vocabulary scan and
tables; llmlab: the corpus as id arrays), words/s = raw corpus words × epochs / training time, and
the intrinsic scores of the vectors by :mod:`llmlab.evaluation.word_vectors` (WordSim-353 and
SimLex-999 Spearman, Google analogy accuracy). Quality is noisy run to run, so each side trains
``--seeds`` times and the table shows mean ± std. ``--variants`` adds one run each of skip-gram
with per-pair negatives (word2vec.c's draws instead of one draw per window), skip-gram with
hierarchical softmax and CBOW with negative sampling.

Checks (a failure exits with code 1): the vocabularies are equal, and gensim's own
``evaluate_word_pairs`` on WordSim-353 gives the same Spearman as llmlab's evaluation of the same
gensim vectors. Verdicts (reported, never fatal): llmlab's throughput ≥ 0.5× gensim's, and its
quality at least gensim's within noise.
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

NAME = "word2vec"
DEFAULTS = dict(seeds=3, epochs=5, plays=None)
QUICK = dict(seeds=1, epochs=1, plays=QUICK_PLAYS)
HYPER = dict(vector_size=100, window=5, min_count=5, sample=1e-3, alpha=0.025, min_alpha=0.0001)
MAIN = "skip-gram, 5 negatives"
VARIANTS = {  # gensim / llmlab names: sg, hs, negative (+ llmlab's shared_negatives, default True)
    MAIN: dict(sg=1, hs=0, negative=5),
    "skip-gram, 5 negatives per pair": dict(sg=1, hs=0, negative=5, shared_negatives=False),
    "skip-gram, hierarchical softmax": dict(sg=1, hs=1, negative=0),
    "CBOW, 5 negatives": dict(sg=0, hs=0, negative=5),
}
BATCH_WORDS = 8192  # llmlab: centers per batch (processed in cache-sized chunks; gensim: 10000 words per job)
WS353_ATOL = 1e-4  # gensim's evaluate_word_pairs vs llmlab's evaluation of the same vectors

log = logger(NAME)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"llmlab bench {NAME}",
        description=(
            "Training words/s and intrinsic quality (WS353, SimLex-999, Google analogies) of llmlab's "
            "word2vec vs gensim's Word2Vec on Shakespeare, same hyperparameters, one process."
        ),
    )
    p.add_argument("--seeds", type=int, help=f"training runs per implementation (default {DEFAULTS['seeds']})")
    p.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ... (default 0)")
    p.add_argument("--epochs", type=int, help=f"epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--plays", type=int, help="train on the first N of the 38 plays (default: all)")
    p.add_argument("--threads", type=int, default=2, help="gensim workers = torch threads (default 2)")
    p.add_argument(
        "--variants",
        action="store_true",
        help="also one run each of skip-gram with per-pair negatives (word2vec.c's draws), skip-gram with "
        "hierarchical softmax and CBOW with 5 negatives",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 seed, 1 epoch, the first {QUICK_PLAYS} plays (explicit options still win)",
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
    """``llmlab bench word2vec [options]``: print the table, write ``--out``; exit 1 if a check fails."""
    args = resolve_args(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    text, record = run(args)
    finish(args.out, text, record, log)


# ----------------------------------------------------------------------------- the two sides
def _check_imports() -> None:
    try:
        import gensim  # noqa: F401
    except ImportError as e:
        raise UserError("llmlab bench word2vec compares against gensim, which is not installed: pip install -e .") from e


def run_gensim(corpus, variant: str, seed: int, args) -> tuple[WordRun, object]:
    from gensim.models import Word2Vec

    v = VARIANTS[variant]
    t0 = time.perf_counter()
    model = Word2Vec(
        vector_size=HYPER["vector_size"], window=HYPER["window"], min_count=HYPER["min_count"],
        sg=v["sg"], hs=v["hs"], negative=v["negative"], sample=HYPER["sample"],
        alpha=HYPER["alpha"], min_alpha=HYPER["min_alpha"], epochs=args.epochs, workers=args.threads, seed=seed,
    )
    model.build_vocab(corpus.sentences)  # what the constructor does first: vocabulary scan, tables
    setup_s = time.perf_counter() - t0
    with CpuWatch() as watch:
        t0 = time.perf_counter()
        trained, raw = model.train(corpus.sentences, total_examples=model.corpus_count, epochs=model.epochs)
        train_s = time.perf_counter() - t0
    metrics = intrinsic(model.wv.index_to_key, model.wv.vectors)
    wps = corpus.raw_words * args.epochs / train_s
    return WordRun("gensim", variant, seed, setup_s, train_s, wps, metrics, watch.others,
                   {"trained_words": int(trained), "raw_words_seen": int(raw)}), model


def run_llmlab(corpus, variant: str, seed: int, args) -> WordRun:
    import torch

    from llmlab.data.words import Word2VecDataModule
    from llmlab.methods.word2vec import Word2VecModule
    from llmlab.models.build import build_model

    v = VARIANTS[variant]
    dm = Word2VecDataModule(window=HYPER["window"], shrink_windows=True, sample=HYPER["sample"],
                            batch_words=BATCH_WORDS, shared_negatives=v.get("shared_negatives", True), corpus="shakespeare", seed=seed)
    dm.tokenizer = corpus.tok
    t0 = time.perf_counter()
    dm.ids, dm.sent = corpus.tok.encode_sentences(corpus.docs)  # dm.setup() with our (maybe cut) corpus
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial vectors and the negatives drawn during training
        arch = dict(arch="word2vec", vector_size=HYPER["vector_size"], sg=v["sg"], hs=v["hs"], negative=v["negative"])
        m = Word2VecModule(models={"model": build_model(arch, corpus.tok)}, alpha=HYPER["alpha"],
                           min_alpha=HYPER["min_alpha"], **{k: v for k, v in arch.items() if k != "arch"})
        m.attach_tokenizer(corpus.tok)
        with quiet_lightning():
            trainer = lightning_trainer(args.epochs)
            with CpuWatch() as watch:
                t0 = time.perf_counter()
                trainer.fit(m, datamodule=dm)
                train_s = time.perf_counter() - t0
    vectors = m.vectors().detach().float().numpy()
    metrics = intrinsic(corpus.tok.words, vectors)
    wps = corpus.raw_words * args.epochs / train_s
    return WordRun("llmlab", variant, seed, setup_s, train_s, wps, metrics, watch.others,
                   {"tokens_seen": int(m.tokens_seen), "steps": int(trainer.global_step)})


def _gensim_ws353(model) -> float:
    from gensim.test.utils import datapath

    from llmlab.evaluation.word_vectors import WORDSIM353

    _, spearman, _ = model.wv.evaluate_word_pairs(datapath(WORDSIM353))
    return float(spearman[0])


# ----------------------------------------------------------------------------- the benchmark
def run(args: argparse.Namespace) -> tuple[str, dict]:
    """Train both sides ``--seeds`` times (and the variants); returns (Markdown, JSON record)."""
    import torch

    _check_imports()
    load_start = loadavg()
    corpus = load_word_corpus(args.plays, HYPER["min_count"])
    log(corpus.describe())
    seeds = [args.seed + k for k in range(args.seeds)]
    plan = [(MAIN, s) for s in seeds]
    if args.variants:
        plan += [(name, args.seed) for name in VARIANTS if name != MAIN]

    runs: list[WordRun] = []
    checks: list[dict] = []
    ws353_pairs: list[tuple[float, float]] = []
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for k, (variant, seed) in enumerate(plan):
            order = ("gensim", "llmlab") if k % 2 == 0 else ("llmlab", "gensim")  # neither always first
            for impl in order:
                gc.collect()
                if impl == "gensim":
                    r, model = run_gensim(corpus, variant, seed, args)
                    if not checks:
                        same = set(model.wv.index_to_key) == set(corpus.tok.words)
                        checks.append({
                            "name": "vocabulary",
                            "ok": same,
                            "detail": f"gensim {len(model.wv):,} words (its own min_count={HYPER['min_count']}) vs "
                                      f"llmlab {corpus.tok.vocab_size:,}, equal as sets: {same}",
                        })
                    ws353_pairs.append((_gensim_ws353(model), r.metrics["ws353/spearman"]))
                    del model
                else:
                    r = run_llmlab(corpus, variant, seed, args)
                runs.append(r)
                log(f"{variant}, seed {seed}, {impl}: train {r.train_s:.2f} s, {r.words_per_s:,.0f} words/s, "
                    f"WS353 {r.metrics['ws353/spearman']:.3f}, SimLex {r.metrics['simlex/spearman']:.3f}, "
                    f"analogy {r.metrics['analogy/total']:.3f}; other processes kept "
                    f"{'n/a' if r.contention is None else f'{r.contention:.2f}'} CPUs busy")
    finally:
        torch.set_num_threads(prev_threads)

    diffs = [abs(a - b) for a, b in ws353_pairs if not (math.isnan(a) and math.isnan(b))]
    checks.append({
        "name": "WS353 cross-check (gensim's evaluate_word_pairs vs llmlab's evaluation, same gensim vectors)",
        "ok": len(diffs) == len(ws353_pairs) and all(d <= WS353_ATOL for d in diffs),
        "detail": "; ".join(f"{a:.6f} vs {b:.6f}" for a, b in ws353_pairs)
                  + f" (max |Δ| {max(diffs, default=math.nan):.1e}, tol {WS353_ATOL:g})",
    })

    rows = summarize(runs, reference="gensim")
    main_rows = {r.impl: r for r in rows if r.variant == MAIN}
    verdict = verdicts(main_rows["llmlab"], main_rows["gensim"])
    contention = {f"{r.impl} {r.variant} seed {r.seed}": r.contention for r in runs}
    load_end = loadavg()

    vers = versions("torch", "lightning", "gensim", "numpy")
    first = runs[0].metrics
    header = (
        f"{corpus.describe()}. Hyperparameters (both): {HYPER['vector_size']} dims, window {HYPER['window']} "
        f"(shrunk at random), min_count {HYPER['min_count']}, sample {HYPER['sample']:g}, alpha "
        f"{HYPER['alpha']} → {HYPER['min_alpha']}, {args.epochs} epoch{'s' if args.epochs > 1 else ''}, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''} (gensim workers, torch threads); llmlab "
        f"batches of {BATCH_WORDS} centers (applied in cache-sized chunks, one after the other), one draw of "
        "negatives per window unless the variant says per pair, plain SGD. "
        + ", ".join(f"{k} {v}" for k, v in vers.items()) + "."
    )
    notes = [
        "train s: gensim `Word2Vec.train`, llmlab `Trainer.fit` (Lightning loop included). setup s: gensim "
        "`build_vocab` (vocabulary scan + tables; constructor = setup + train), llmlab the corpus as id arrays "
        f"(`encode_sentences`); llmlab's tokenizer training ({corpus.tokenizer_s:.2f} s) is shared by both "
        "and counted in neither.",
        f"words/s = {corpus.raw_words:,} raw corpus words × epochs / train s; ratio = words/s ÷ gensim's "
        "(same variant).",
        f"Quality by llmlab.evaluation.word_vectors on both (mean ± sample std over seeds): Spearman ρ over "
        f"the pairs whose words are in the vocabulary (WS353 {first['ws353/coverage']:.0%}, SimLex "
        f"{first['simlex/coverage']:.0%} of pairs), 3CosAdd accuracy over the covered Google analogy questions "
        "(30,000 most frequent words).",
    ]
    lines = [f"## llmlab bench {NAME}", "", word_table(rows), "", header, ""]
    lines += [f"- {n}" for n in notes]
    lines += contention_warning(contention, args.threads)
    lines += ["", f"Verdicts ({MAIN}):"] + verdict_lines(verdict, "llmlab vs gensim")
    lines += ["", "Checks:"] + check_lines(checks)
    per_seed = [
        f"{r.impl} {r.variant} seed {r.seed}: train {r.train_s:.2f} s, WS353 {r.metrics['ws353/spearman']:.3f}, "
        f"SimLex {r.metrics['simlex/spearman']:.3f}, analogy {r.metrics['analogy/total']:.3f}"
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
        "hyperparameters": HYPER,
        "variants": VARIANTS,
        "corpus": {"plays": len(corpus.docs), "sentences": len(corpus.sentences), "raw_words": corpus.raw_words,
                   "vocab": corpus.tok.vocab_size, "tokenizer_s": corpus.tokenizer_s},
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
