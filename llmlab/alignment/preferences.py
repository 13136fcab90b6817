"""Preference data from real generations: sample ``k`` responses per prompt from a policy, score
them, keep the best as ``chosen`` and the worst as ``rejected`` (best-of-k / worst-of-k pairs, the
"scored by a model" variant of InstructGPT's comparison data, Ouyang et al. 2022 §3.4; the RLAIF /
UltraFeedback recipe of ranking a policy's own samples with a scorer).

``llmlab infer ckpt_path=SFT_RUN reward=vader prompts=FILE_OR_builtin num_samples=k out=prefs.jsonl``
(also from a PPO run). ``prompts``: a JSONL file of prompt rows (``{"prompt", "answer"?}``; instruction
and preference files too, as ``data=prompts`` reads them), a text file of one prompt a line, or ``builtin`` = the training split of
``data=sentiment_prompts`` ("Continue this line joyfully: ..."). Decoding: the ``generation`` group
(``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``); ``num_samples`` (or
``generation.num_samples``) is ``k >= 2``; the template is the command's ``template=`` or the run's. Each JSONL row is
``{prompt, chosen, rejected, chosen_score, rejected_score}`` with the RAW prompt (the template renders
it again when ``data=preferences data.path=prefs.jsonl`` reads it). A prompt whose non-empty responses
all score the same (or that has fewer than two) gives no pair. The file is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llmlab.errors import UserError
from llmlab.utils import atomic_write_text, plain

log = logging.getLogger(__name__)

BATCH_PROMPTS = 32  # prompts sampled together (x k rows)


def load_prompt_rows(spec: str, *, seed: int = 1337) -> list:
    """:class:`~llmlab.data.instructions.PromptRow` records of a prompts file, or of ``builtin``
    (``sentiment_prompts``: its training split, so held-out prompts stay unseen)."""
    from llmlab.data.instructions import read_records

    if str(spec) in ("builtin", "sentiment_prompts"):
        from llmlab.data.builtin_alignment import sentiment_prompts

        return list(sentiment_prompts(seed=seed)["train"])
    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix not in (".jsonl", ".json"):  # plain text: one prompt a line
        from llmlab.data.instructions import PromptRow

        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        rows = [PromptRow(line, None, f"{path}:{i + 1}") for i, line in enumerate(lines) if line]
        if not rows:
            raise UserError(f"{path} has no prompts: write one prompt a line (or JSONL rows {{\"prompt\": ...}})")
        return rows
    return read_records(spec, "prompts")


def _template(method, cfg):
    """The command's ``template`` group if given, else the one the policy was trained with (its run's)."""
    from llmlab.data.templates import build_template

    asked = plain(cfg.get("template"))
    return build_template(asked if asked else (method.run_config or {}).get("template"))


def write_preferences(method, cfg) -> dict:
    """Sample, score and write preference pairs (see the module docstring); returns the counts."""
    from llmlab.alignment.rewards import build_scorer, score_completions
    from llmlab.alignment.rollout import complete
    from llmlab.inference.generate import eval_mode

    out = cfg.get("out")
    if not out:
        raise UserError("where should the preference pairs go? pass out=prefs.jsonl")
    generation = dict(plain(cfg.get("generation")) or (method.run_config or {}).get("generation") or {})
    k = int(cfg.get("num_samples") or generation.get("num_samples") or 0)
    if k < 2:
        raise UserError(f"num_samples={k}: a preference pair needs at least 2 responses per prompt: pass num_samples=4")
    reward_cfg = plain(cfg.get("reward")) if cfg.get("reward") is not None else (method.run_config or {}).get("reward")
    tok = method.tokenizer
    if tok is None:
        raise UserError("this checkpoint has no tokenizer: load a run of llmlab train")
    scorer = build_scorer(reward_cfg, tokenizer=tok)
    rows = load_prompt_rows(str(cfg.get("prompts")), seed=int(generation.get("seed") or 1337))
    template = _template(method, cfg)
    prompts = [template.prompt_of(r.example) if r.example is not None else template.prompt(r.prompt) for r in rows]
    answers = [r.answer for r in rows]

    model = getattr(method.model, "_orig_mod", method.model)
    context = model.config.block_size - int(getattr(model, "num_virtual_tokens", 0) or 0)
    encoded = [tok.encode(p) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    room = context - longest
    if room < 1:
        where = rows[max(range(len(rows)), key=lambda i: len(encoded[i]))].source or "a prompt"
        raise UserError(f"{where}: a prompt of {longest} tokens fills the policy's context of {context} tokens: shorten it")
    max_new = min(int(generation.get("max_new_tokens") or 64), room)
    temperature = float(generation.get("temperature") or 1.0)
    seed = generation.get("seed")
    gen = torch.Generator(device=method.device).manual_seed(int(seed)) if seed is not None else None

    pairs, ties, short = [], 0, 0
    with eval_mode(model):
        for start in range(0, len(rows), BATCH_PROMPTS):
            chunk = slice(start, start + BATCH_PROMPTS)
            done = complete(model, tok, prompts[chunk], max_new_tokens=max_new, num_samples=k, temperature=temperature,
                            top_k=generation.get("top_k"), top_p=generation.get("top_p"), generator=gen,
                            prompt_ids=encoded[chunk])
            scores = score_completions(scorer, done, prompts[chunk], answers[chunk]).tolist()
            for j, row in enumerate(rows[chunk]):
                cands = [(scores[i], done.texts[i]) for i in range(j * k, (j + 1) * k) if done.texts[i].strip()]
                if len(cands) < 2:
                    short += 1
                    continue
                best, worst = max(cands, key=lambda c: c[0]), min(cands, key=lambda c: c[0])
                if best[0] == worst[0]:
                    ties += 1
                    continue
                pairs.append({"prompt": row.prompt, "chosen": best[1], "rejected": worst[1],
                              "chosen_score": best[0], "rejected_score": worst[0]})
    path = Path(str(out)).expanduser()
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} preference pairs to {path} from {len(rows)} prompts x {k} samples "
          f"(reward={scorer.name}; skipped: {ties} prompts whose responses all scored the same, "
          f"{short} with fewer than 2 non-empty responses)")
    if pairs:
        margin = sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / len(pairs)
        print(f"mean chosen score {sum(p['chosen_score'] for p in pairs) / len(pairs):.4f}, "
              f"mean rejected score {sum(p['rejected_score'] for p in pairs) / len(pairs):.4f}, mean margin {margin:.4f}")
    return {"pairs": len(pairs), "prompts": len(rows), "ties": ties, "short": short, "path": str(path)}
