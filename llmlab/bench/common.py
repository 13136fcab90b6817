"""Helpers shared by the ``llmlab bench`` modules.

* Load checks: :class:`CpuWatch` (CPUs kept busy by *other* processes while a block ran),
  :func:`loadavg` and :func:`contention_warning` (the bold warning under a table whose timings a
  busy machine made unreliable).
* Word-vector benchmarks (:mod:`llmlab.bench.word2vec`, :mod:`llmlab.bench.glove`): the shared
  corpus (:func:`load_word_corpus`), one timed training run (:class:`WordRun`), mean ± std per
  implementation and variant (:func:`summarize`), the Markdown table, the verdict lines and the
  ``.md`` + ``.json`` outputs.

Heavy libraries (torch, gensim, Lightning) are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# warn when other processes used more than this many CPUs beyond those --threads leaves free
CONTENTION_WARN_CPUS = 0.25


# ----------------------------------------------------------------------------- machine load
def loadavg() -> str:
    """The 1-minute load average as text ("n/a" where the platform has none)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):  # not available on every platform
        return "n/a"


class CpuWatch:
    """How many CPUs *other* processes kept busy during a ``with`` block (Linux ``/proc``; else None).

    Busy time of the whole machine minus this process's own user+system time, over the elapsed
    time of all CPUs. On a shared machine this says whether a timing can be trusted: with
    ``--threads`` equal to the core count, one competing process can halve (or, with OpenMP
    threads spinning at barriers, far more than halve) the measured speed.
    """

    def __enter__(self) -> CpuWatch:
        self._start = self._snapshot()
        self.others: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        end = self._snapshot()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return
        total, busy, own = (b - a for a, b in zip(self._start, end))
        self.others = max(0.0, (busy - own) / total * (os.cpu_count() or 1))

    @staticmethod
    def _snapshot() -> tuple[int, int, int] | None:
        """(all CPUs' jiffies, their busy jiffies, this process's jiffies), all in USER_HZ ticks."""
        try:
            with open("/proc/stat", encoding="ascii") as f:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
            with open("/proc/self/stat", encoding="ascii") as f:
                stat = f.read()
            own_fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is index 0
            own = int(own_fields[11]) + int(own_fields[12])  # utime, stime (fields 14, 15 of proc(5))
        except (OSError, ValueError, IndexError):
            return None
        total = user + nice + system + idle + iowait + irq + softirq + steal
        return total, total - idle - iowait, own


def contention_warning(contention: dict[str, float | None], threads: int) -> list[str]:
    """Markdown lines warning that other processes competed for our CPUs (empty if they did not).

    ``contention`` maps a timed phase to the CPUs other processes kept busy meanwhile (None:
    unknown); other processes may use the ``cpu_count - threads`` CPUs we leave free.
    """
    busy = {k: v for k, v in contention.items() if v is not None}
    spare = max(0, (os.cpu_count() or 1) - threads)
    if not busy or max(busy.values()) <= spare + CONTENTION_WARN_CPUS:
        return []
    worst = max(busy, key=busy.get)
    return [
        "",
        f"**WARNING: other processes kept {busy[worst]:.1f} of {os.cpu_count()} CPUs busy while "
        f"'{worst}' was timed: these timings are unreliable, re-run on an idle machine.**",
    ]


def logger(name: str):
    """``log(msg)``: progress on stderr, prefixed ``[bench NAME]`` (stdout holds only the table)."""

    def log(msg: str) -> None:
        print(f"[bench {name}] {msg}", file=sys.stderr, flush=True)

    return log


# ----------------------------------------------------------------------------- word-vector benches
QUICK_PLAYS = 5  # --quick trains on the first 5 plays
# Run-to-run noise of one seed's intrinsic scores on Shakespeare when it cannot be estimated (one
# seed): about ±0.03 (WS353/SimLex Spearman over ~100-300 covered pairs).
ASSUMED_STD = 0.03
MIN_TOLERANCE = 0.02  # never call a gap smaller than this "worse than the reference"
THROUGHPUT_TARGET = 0.5  # llmlab words/s ≥ 0.5 × the reference's
QUALITY_METRICS = {"ws353/spearman": "WS353 ρ", "simlex/spearman": "SimLex ρ", "analogy/total": "analogy acc"}


@dataclass
class WordCorpus:
    """Shakespeare's plays as sentences (lines) of words, and llmlab's word tokenizer trained on them."""

    docs: list[str]
    tok: Any  # llmlab.data.tokenizers.WordTokenizer
    sentences: list[list[str]]  # every non-empty line, all its words (in and out of vocabulary)
    raw_words: int  # words in `sentences` (words/s counts these, once per epoch)
    tokenizer_s: float  # WordTokenizer.train (llmlab's vocabulary scan; shared, not in any row)

    def describe(self) -> str:
        plays = f"the first {len(self.docs)} plays" if len(self.docs) < 38 else f"all {len(self.docs)} plays"
        return (
            f"Shakespeare ({plays}): {len(self.sentences):,} lines as sentences, {self.raw_words:,} words, "
            f"vocabulary {self.tok.vocab_size:,} (min_count {self.tok.min_count})"
        )


def load_word_corpus(plays: int | None = None, min_count: int = 5) -> WordCorpus:
    """The benchmark corpus: ``plays`` first plays (all if None), lines as sentences, llmlab's words."""
    from llmlab.data.corpora import load_corpus
    from llmlab.data.tokenizers import WordTokenizer

    docs = load_corpus("shakespeare")
    if plays is not None:
        docs = docs[:plays]
    t0 = time.perf_counter()
    tok = WordTokenizer.train(docs, min_count=min_count)
    tokenizer_s = time.perf_counter() - t0
    sentences = [tok.split(line) for d in docs for line in d.splitlines()]
    sentences = [s for s in sentences if s]
    return WordCorpus(docs, tok, sentences, sum(len(s) for s in sentences), tokenizer_s)


def intrinsic(words: list[str], vectors) -> dict[str, float]:
    """llmlab's intrinsic metrics (WS353, SimLex-999, Google analogies) of any embedding matrix."""
    from llmlab.evaluation.word_vectors import WordVectors, intrinsic_metrics

    return {k: float(v) for k, v in intrinsic_metrics(WordVectors(words, vectors)).items()}


@dataclass
class WordRun:
    """One training run of one implementation: its timings and the intrinsic scores of its vectors."""

    impl: str  # "gensim", "glove-python", "llmlab"
    variant: str
    seed: int
    setup_s: float  # vocabulary / ids / co-occurrence counting, whatever precedes training
    train_s: float  # training wall time
    words_per_s: float  # raw corpus words × epochs / train_s
    metrics: dict[str, float]
    contention: float | None = None  # CPUs other processes kept busy while training was timed
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class WordRow:
    """mean ± std over the seeds of one (implementation, variant)."""

    impl: str
    variant: str
    reference: bool  # the reference implementation's row (ratio 1 by definition)
    n: int
    stats: dict[str, tuple[float, float]]  # field -> (mean, std); std is NaN with one seed
    ratio: float  # words/s ÷ the reference's words/s of the same variant
    ratio_of: str  # which reference row the ratio is against


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def summarize(runs: list[WordRun], reference: str, ratio_key: dict[str, str] | None = None) -> list[WordRow]:
    """One row per (implementation, variant), in order of first appearance.

    The ratio compares words/s with the ``reference`` implementation's row of the variant
    ``ratio_key.get(variant, variant)`` (for rows that reuse another variant's runs).
    """
    groups: dict[tuple[str, str], list[WordRun]] = {}
    for r in runs:
        groups.setdefault((r.impl, r.variant), []).append(r)
    stats = {}
    for key, rs in groups.items():
        fields = {"setup_s": [r.setup_s for r in rs], "train_s": [r.train_s for r in rs],
                  "words_per_s": [r.words_per_s for r in rs]}
        for name in rs[0].metrics:
            fields[name] = [r.metrics.get(name, math.nan) for r in rs]
        stats[key] = {k: _mean_std(v) for k, v in fields.items()}
    rows = []
    for (impl, variant), rs in groups.items():
        ref_variant = (ratio_key or {}).get(variant, variant)
        ref = stats.get((reference, ref_variant))
        ratio = stats[(impl, variant)]["words_per_s"][0] / ref["words_per_s"][0] if ref else math.nan
        rows.append(WordRow(impl, variant, impl == reference, len(rs), stats[(impl, variant)], ratio,
                            f"{reference} {ref_variant}"))
    return rows


def fmt(mean: float, std: float, digits: int = 3) -> str:
    """``0.512 ± 0.021`` (just the mean with one seed)."""
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_rate(mean: float, std: float) -> str:
    if math.isnan(std):
        return f"{mean:,.0f}"
    return f"{mean:,.0f} ± {std:,.0f}"


def _fmt_time(mean: float, std: float) -> str:
    return fmt(mean, std, 2)


def word_table(rows: list[WordRow], setup_label: str = "setup s") -> str:
    """The side-by-side Markdown table."""
    lines = [
        f"| implementation | variant | seeds | {setup_label} | train s | words/s | ratio | "
        + " | ".join(QUALITY_METRICS.values())
        + " | analogies covered |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(QUALITY_METRICS) + "---:|",
    ]
    for r in rows:
        s = r.stats
        cells = [
            r.impl,
            r.variant,
            str(r.n),
            _fmt_time(*s["setup_s"]),
            _fmt_time(*s["train_s"]),
            _fmt_rate(*s["words_per_s"]),
            f"{r.ratio:.2f}",
            *(fmt(*s[k]) for k in QUALITY_METRICS),
            f"{s['analogy/covered'][0]:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tolerance(a: tuple[float, float], n_a: int, b: tuple[float, float], n_b: int) -> float:
    """How far below the reference a mean may fall and still be "the same within noise".

    Two standard errors of the difference of the means, each side's run-to-run std estimated from
    its seeds (``ASSUMED_STD`` with a single seed), never below ``MIN_TOLERANCE``.
    """
    sa = a[1] if n_a > 1 and not math.isnan(a[1]) else ASSUMED_STD
    sb = b[1] if n_b > 1 and not math.isnan(b[1]) else ASSUMED_STD
    return max(MIN_TOLERANCE, 2.0 * math.sqrt(sa * sa / n_a + sb * sb / n_b))


def verdicts(ours: WordRow, ref: WordRow) -> list[dict[str, Any]]:
    """Throughput (≥ ``THROUGHPUT_TARGET`` × the reference) and quality (≥ the reference within noise)."""
    out = [{
        "name": "throughput",
        "ok": ours.ratio >= THROUGHPUT_TARGET,
        "detail": f"llmlab {ours.stats['words_per_s'][0]:,.0f} vs {ref.impl} {ref.stats['words_per_s'][0]:,.0f} "
                  f"words/s = {ours.ratio:.2f}× (target ≥ {THROUGHPUT_TARGET}×)",
    }]
    gaps, ok = [], True
    for key, label in QUALITY_METRICS.items():
        a, b = ours.stats[key], ref.stats[key]
        tol = tolerance(a, ours.n, b, ref.n)
        diff = a[0] - b[0]
        fine = diff >= -tol
        ok &= fine
        gaps.append(f"{label} {a[0]:.3f} vs {b[0]:.3f} (Δ {diff:+.3f}, noise ±{tol:.3f}{'' if fine else ', BELOW'})")
    out.append({"name": "quality", "ok": ok, "detail": "; ".join(gaps)})
    return out


def verdict_lines(items: list[dict[str, Any]], what: str) -> list[str]:
    return [f"- **{v['name']}** ({what}): {v['detail']} — {'MET' if v['ok'] else 'NOT MET'}" for v in items]


def check_lines(checks: list[dict[str, Any]]) -> list[str]:
    return [f"- {c['name']}: {c['detail']} — {'ok' if c['ok'] else '**MISMATCH**'}" for c in checks] or ["- (none run)"]


def out_paths(out: Path) -> tuple[Path, Path]:
    """``--out X`` → (X.md, X.json); a given ``.md``/``.json`` suffix is replaced."""
    out = Path(out)
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".md"), out.with_name(out.name + ".json")


def write_outputs(out: Path, markdown: str, record: dict[str, Any]) -> tuple[Path, Path]:
    """Write the Markdown table and the raw JSON record next to each other (atomically)."""
    from llmlab.utils import atomic_write_text, write_json

    md, js = out_paths(out)
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md, markdown)
    write_json(js, _jsonable(record))
    return md, js


def finish(out: Path, markdown: str, record: dict[str, Any], log) -> None:
    """End of a bench: print the table, write ``out``.md/.json, exit 1 when a check of
    ``record["checks"]`` failed (each ``{"name", "ok", "detail"}``)."""
    print(markdown, end="", flush=True)
    md, js = write_outputs(out, markdown, record)
    log(f"wrote {md} and {js}")
    bad = [c for c in record.get("checks", []) if not c["ok"]]
    if bad:
        print("CHECK FAILED: " + "; ".join(f"{c['name']}: {c['detail']}" for c in bad), file=sys.stderr, flush=True)
        sys.exit(1)


def _jsonable(obj: Any) -> Any:
    """Dataclasses, tuples and NaN/inf floats as plain JSON (NaN → null)."""
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def quiet_lightning():
    """Context manager: Lightning's info chatter and its known-harmless warnings off (they go to stderr)."""
    import contextlib
    import logging
    import warnings

    @contextlib.contextmanager
    def cm():
        names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning")
        levels = {n: logging.getLogger(n).level for n in names}
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*`configure_optimizers` returned `None`.*")
            warnings.filterwarnings("ignore", message=".*You defined a `validation_step` but have no `val_dataloader`.*")
            warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning vs newer torch, harmless
            warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")  # torch.sparse chatter
            try:
                yield
            finally:
                for n, level in levels.items():
                    logging.getLogger(n).setLevel(level)

    return cm()


def lightning_trainer(epochs: int):
    """The bare Trainer both word benches fit with: CPU, no logger/checkpoints/validation/progress bar."""
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                     enable_model_summary=False)


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "n/a"
    return out
