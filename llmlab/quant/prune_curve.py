"""Pruning inside ``llmlab eval``: prune the loaded model one-shot, or draw perplexity vs sparsity.

* ``llmlab eval ckpt_path=X prune=wanda prune.amount=0.5`` prunes the loaded model (calibration
  batches from the training split of the checkpoint's data) and scores it as usual; metrics.json
  gains ``prune/sparsity`` (zeros in the targeted weights).
* ``llmlab eval ckpt_path=X prune=curve [limit_batches=20]`` scores every ``(method, amount)`` of
  ``prune.methods`` x ``prune.amounts``, restoring the dense weights between points, and writes
  ``prune_curve.csv``, ``prune_curve.png`` and ``prune/<method>@<amount>/{sparsity,<split>/loss,<split>/ppl}``
  in metrics.json (next to the dense model's own scores).
* ``prune=null`` on a checkpoint that a ``prune=`` training run wrote: ``prune/sparsity`` of its weights.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

from llmlab.errors import UserError
from llmlab.quant.prune import DEFAULTS, prune_config, prune_model, pruned_layers, remove_masks, sparsity
from llmlab.quant.prune_callback import CALIBRATED, calibration_batches
from llmlab.utils import atomic_write_bytes, atomic_write_text

Score = Callable[[], dict]  # score the method on the eval split -> {"<split>/loss": ...}


def eval_pruning(cfg, method, meta: dict, datamodule, score: Score) -> dict[str, float]:
    """Apply ``cfg.prune`` to the loaded ``method`` before ``llmlab eval`` scores it; the metrics to add."""
    asked = prune_config(cfg.get("prune"))
    model = method.model
    if asked is None:
        try:
            recorded = prune_config(((meta.get("config") or {}).get("prune")))
        except UserError:  # a config of another llmlab version: no sparsity to report
            recorded = None
        if recorded is None or recorded["name"] == "curve":
            return {}
        return {"prune/sparsity": sparsity(pruned_layers(model, recorded))}
    quant = cfg.get("quant")
    if quant and str(quant.get("name") or "none") != "none":
        raise UserError(f"prune={asked['name']} with quant={quant.get('name')}: pruning needs the float "
                        "weights; prune first (llmlab train prune=... or eval without quant), then quantize")
    batches = []
    if asked["name"] in CALIBRATED:
        batches = calibration_batches(datamodule, asked["calibration_batches"], method.device, setup=True)
    loss_fn = lambda batch: method.model_step(batch).loss  # noqa: E731
    if asked["name"] == "curve":
        return curve(asked, method, batches, loss_fn, score, cfg.split, Path(cfg.paths.output_dir))
    return prune_model(model, asked, batches, loss_fn)


def point_config(curve_cfg: dict, name: str, amount: float) -> dict:
    """One point of the curve as a method's own config (the curve's shared keys over its defaults)."""
    defaults = DEFAULTS[name]
    return {**defaults, **{k: v for k, v in curve_cfg.items() if k in defaults}, "name": name, "amount": amount}


def curve(curve_cfg: dict, method, batches, loss_fn, score: Score, split: str, out_dir: Path) -> dict[str, float]:
    """Score each (method, amount); write the CSV and the plot; the dense weights are back at the end."""
    model = method.model
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    try:
        for name in curve_cfg["methods"]:
            for amount in curve_cfg["amounts"]:
                stats = prune_model(model, point_config(curve_cfg, name, amount), batches, loss_fn)
                loss = float(score()[f"{split}/loss"])
                rows.append({"method": name, "amount": float(amount), "sparsity": stats["prune/sparsity"],
                             "loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf")})
                print(f"prune={name} amount={amount:.2f}: sparsity {stats['prune/sparsity']:.4f}, "
                      f"{split}/ppl {rows[-1]['ppl']:.4f}", flush=True)
                remove_masks(model)
                model.load_state_dict(dense)
    finally:
        remove_masks(model)
        model.load_state_dict(dense)
    write_csv(out_dir / "prune_curve.csv", rows)
    atomic_write_bytes(out_dir / "prune_curve.png", plot_curve(rows, split))
    metrics = {}
    for r in rows:
        key = f"prune/{r['method']}@{r['amount']:.2f}"
        metrics.update({f"{key}/sparsity": r["sparsity"], f"{key}/{split}/loss": r["loss"], f"{key}/{split}/ppl": r["ppl"]})
    return metrics


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["method", "amount", "sparsity", "loss", "ppl"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_curve(rows: list[dict], split: str) -> bytes:
    """Perplexity against the measured sparsity, one line per method (log scale: it explodes late)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmlab.utils import png_bytes

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == name)
        ax.plot([100 * s for s, _ in pts], [p for _, p in pts], marker="o", label=name)
    dense = [r["ppl"] for r in rows if r["amount"] == 0.0]
    if dense:
        ax.axhline(dense[0], color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel(f"{split} perplexity")
    ax.set_title("perplexity vs sparsity (one-shot, no fine-tuning)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return png_bytes(fig, dpi=120)
