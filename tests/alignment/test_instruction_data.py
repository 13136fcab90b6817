"""Instruction / preference / prompt data: format detection, one-line errors naming file:line, seeded
splits by prompt, held-out plays and problems, batches (SFT, packed, pairs, left-padded prompts),
batch i a pure function of (seed, i)."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from llmlab.data.builtin_alignment import (
    arithmetic_cot,
    play_title,
    sentiment_preferences,
    sentiment_prompts,
    shakespeare_instruct,
)
from llmlab.data.classification import split_plays
from llmlab.data.corpora import play_genre, shakespeare_plays
from llmlab.data.instructions import (
    Instruction,
    InstructionDataModule,
    Preference,
    PreferenceDataModule,
    PromptDataModule,
    PromptRow,
    detect_format,
    pack,
    read_records,
    split_records,
)
from llmlab.data.tokenizers import CharTokenizer, build_tokenizer
from llmlab.errors import UserError

CONF = Path(__file__).resolve().parents[2] / "conf"
GENRES = ["roman", "romance"]  # 8 plays: enough for a train, val and test play per genre, quick to read


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2", [])


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------


def test_format_detection_from_keys():
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert detect_format({"input": "a", "output": "b", "chain": "c", "task_type": "reasoning"}) == "seed"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "preference"
    assert detect_format({"chosen": [], "rejected": []}) == "preference"  # TRL conversational, implicit prompt
    assert detect_format({"prompt": "p", "responses": [], "ranking": []}) == "ranked"
    assert detect_format({"prompt": "p", "responses": [], "scores": []}) == "ranked"
    assert detect_format({"prompt": "p", "answer": "4"}) == "prompt"
    assert detect_format({"text": "t", "label": 1}) is None


def test_instruction_formats_read(tmp_path):
    f = write(tmp_path / "mixed.jsonl", [
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"input": "What is 2+2?", "output": 4, "chain": "2 plus 2 equals 4.", "task_type": "Reasoning"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colour?"},
                      {"role": "assistant", "content": "Blue."}]},
    ])
    alpaca, seed, chat = read_records(f, "instructions")
    assert alpaca == Instruction("Add.", "4", "2 and 2", source="mixed.jsonl:1")
    assert seed == Instruction("What is 2+2?", "4", "", "2 plus 2 equals 4.", "reasoning", source="mixed.jsonl:2")
    assert chat == Instruction("Colour?", "Blue.", system="Be brief.", source="mixed.jsonl:3",
                               history=(("user", "Hi"), ("assistant", "Hello.")))


def test_seed_json_array_file_reads_with_line_numbers(tmp_path):
    rows = [{"input": "What is 2+2?", "output": "4", "chain": "First, we add 2 and 2. 2 plus 2 equals 4.",
             "task_type": "reasoning"},
            {"input": 'Is this positive? "I love it"', "output": "positive", "task_type": "classification"}] * 2
    f = tmp_path / "instructions.json"
    f.write_text(json.dumps(rows, indent=1))
    out = read_records(f, "instructions")
    assert [r.output for r in out] == ["4", "positive"] * 2 and out[1].task_type == "classification"
    assert out[1].source == f"instructions.json:{f.read_text().splitlines().index(' {', 3) + 1}"
    f.write_text(f.read_text().replace('"positive"', "positive", 1))
    with pytest.raises(UserError, match=r"instructions\.json:\d+: not valid JSON"):
        read_records(f, "instructions")


def test_preference_formats_and_ranked_expansion(tmp_path):
    conv = lambda role, text: {"role": role, "content": text}  # noqa: E731
    f = write(tmp_path / "prefs.jsonl", [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
        {"prompt": [conv("user", "Say hi")], "chosen": [conv("assistant", "Hello")], "rejected": [conv("assistant", "Go")]},
        {"chosen": [conv("user", "Greet"), conv("assistant", "Hey")], "rejected": [conv("user", "Greet"), conv("assistant", "Bah")]},
        {"prompt": "Rank", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1]},
        {"prompt": "Score", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.1]},
    ])
    pairs = read_records(f, "preferences")
    assert pairs[0] == Preference("Say hi", "Hi!", "No.", "prefs.jsonl:1")
    assert pairs[1] == Preference("Say hi", "Hello", "Go", "prefs.jsonl:2")
    assert pairs[2] == Preference("Greet", "Hey", "Bah", "prefs.jsonl:3")
    ranked = [(p.chosen, p.rejected) for p in pairs if p.prompt == "Rank"]
    assert len(ranked) == comb(4, 2)  # all C(K,2) pairs, best first
    assert ranked == [("r2", "r0"), ("r2", "r3"), ("r2", "r1"), ("r0", "r3"), ("r0", "r1"), ("r3", "r1")]
    scored = [(p.chosen, p.rejected) for p in pairs if p.prompt == "Score"]
    assert scored == [("b", "a"), ("b", "c")]  # the tie a = c states no preference


def test_prompt_formats_read(tmp_path):
    f = write(tmp_path / "prompts.jsonl", [
        {"prompt": "Continue: But soft"},
        {"prompt": "What is 3+4?", "answer": "7"},
        {"prompt": "What is 1+1?", "output": 2},
        {"input": "What is 5+5?", "output": "10", "chain": "5 + 5 = 10.", "task_type": "reasoning"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ])
    rows = read_records(f, "prompts")
    assert [r.answer for r in rows] == [None, "7", "2", "10", None]
    assert rows[3].example is not None and rows[3].example.chain == "5 + 5 = 10."
    assert rows[4] == PromptRow("p", None, "prompts.jsonl:5")


@pytest.mark.parametrize("kind,rows,line,pattern", [
    ("instructions", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}, "{not json"], 3,
     "not valid JSON"),
    ("preferences", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "  "}], 2,
     "empty 'rejected'"),
    ("preferences", [{"prompt": "p", "chosen": [], "rejected": "b"}], 1, "'chosen' is not a non-empty list"),
    ("instructions", [{"text": "a", "label": "b"}], 1, "fits no instructions format"),
    ("instructions", [{"prompt": "p", "chosen": "a", "rejected": "b"}], 1, "use data=preferences"),
    ("preferences", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}], 1, "not a list of distinct"),
    ("instructions", [{"messages": [{"role": "user", "content": "hi"}]}], 1, "does not end with an assistant"),
    ("instructions", [[1, 2]], 1, "not an object"),
    ("prompts", [{"prompt": ""}], 1, "empty 'prompt'"),
])
def test_bad_rows_are_one_line_naming_file_and_line(tmp_path, kind, rows, line, pattern):
    f = write(tmp_path / "data.jsonl", rows)
    with pytest.raises(UserError, match=rf"data\.jsonl:{line}: .*{pattern}") as e:
        read_records(f, kind)
    assert "\n" not in str(e.value)


def test_missing_path_and_file_are_one_line(tmp_path):
    with pytest.raises(UserError, match="needs data.path=FILE"):
        InstructionDataModule(path="???")
    with pytest.raises(UserError, match="does not exist"):
        InstructionDataModule(path=str(tmp_path / "nope.jsonl")).records
    with pytest.raises(UserError, match="data.builder=.* is not a function"):
        PromptDataModule(builder=OmegaConf.create({"val_fraction": 0.1}))  # a builder config without _target_


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def test_seeded_split_is_reproducible_and_keeps_a_prompts_rows_together(tmp_path):
    rows = [{"prompt": f"p{k}", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]} for k in range(50)]
    pairs = read_records(write(tmp_path / "r.jsonl", rows), "preferences")
    a = split_records(pairs, 0.2, 0.1, seed=1)
    assert a == split_records(pairs, 0.2, 0.1, seed=1)
    assert a != split_records(pairs, 0.2, 0.1, seed=2)
    prompts = {s: {p.prompt for p in a[s]} for s in a}
    assert [len(prompts[s]) for s in ("train", "val", "test")] == [35, 10, 5]
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])
    assert all(len(a[s]) == 3 * len(prompts[s]) for s in a)  # all C(3,2) pairs of a prompt in one split


def test_val_and_test_files_replace_the_fractions(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"instruction": f"q{k}", "output": "a"} for k in range(10)])
    val = write(tmp_path / "val.jsonl", [{"instruction": "v", "output": "a"}])
    dm = InstructionDataModule(path=str(train), val_path=str(val), val_fraction=0.3, test_fraction=0.2)
    assert [len(dm.records[s]) for s in ("train", "val", "test")] == [8, 1, 2]


def test_shakespeare_instruct_is_held_out_by_play():
    splits = shakespeare_instruct(val_fraction=0.25, test_fraction=0.25, seed=3, genres=GENRES, examples_per_play=20)
    by_genre = {}
    for name, _ in shakespeare_plays(GENRES):
        by_genre.setdefault(play_genre(name), []).append(name)
    expected = split_plays(by_genre, 0.25, 0.25, 3)
    sources = {s: {ex.source for ex in splits[s]} for s in splits}
    assert all(expected[p] == s for s in sources for p in sources[s]) and all(sources.values())
    assert len(splits["train"]) == 4 * 20  # 4 training plays, 20 examples each (4 per task)
    assert splits == shakespeare_instruct(val_fraction=0.25, test_fraction=0.25, seed=3, genres=GENRES,
                                          examples_per_play=20)
    text = dict(shakespeare_plays(GENRES))
    for ex in splits["test"]:  # answers come from the text itself
        if ex.instruction == "Which play is this line from?":
            assert ex.output == play_title(ex.source) and ex.input in text[ex.source]
        if ex.instruction == "Continue the verse:":
            assert f"{ex.input}\n{ex.output}" in text[ex.source]
        if ex.instruction.startswith("Continue this line: "):
            assert f"{ex.instruction.removeprefix('Continue this line: ')} {ex.output}" in text[ex.source]
    assert play_title("comedies/a-midsummer-night-s-dream") == "A Midsummer Night's Dream"


def test_arithmetic_held_out_problems_never_occur_in_training():
    splits = arithmetic_cot(val_fraction=0.1, test_fraction=0.1, seed=0, max_number=12, examples_per_problem=2)
    triples = {s: {ex.source for ex in splits[s]} for s in splits}
    assert not (triples["train"] & triples["val"]) and not (triples["train"] & triples["test"])
    assert not (triples["val"] & triples["test"])
    assert sum(len(t) for t in triples.values()) == 144 + 78 + 144  # +, - (a >= b), x over 1..12
    for ex in splits["train"][:50]:
        a, op, b = ex.source.split()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        assert ex.output == str(value) and ex.chain == f"{a} {op} {b} = {value}." and ex.task_type == "reasoning"
        assert f" {a} " in f" {ex.instruction} " and f" {b} " in f" {ex.instruction} "
    assert splits == arithmetic_cot(val_fraction=0.1, test_fraction=0.1, seed=0, max_number=12, examples_per_problem=2)


def test_sentiment_data_is_vader_labelled_and_held_out_by_play():
    from llmlab.alignment.vader import compound

    prefs = sentiment_preferences(val_fraction=0.25, test_fraction=0.25, seed=3, genres=GENRES, lines_per_play=80)
    prompts = sentiment_prompts(val_fraction=0.25, test_fraction=0.25, seed=3, genres=GENRES, prompts_per_play=10)
    instruct = shakespeare_instruct(val_fraction=0.25, test_fraction=0.25, seed=3, genres=GENRES, examples_per_play=5)
    for s in ("train", "val", "test"):  # the same held-out plays in all three
        assert {p.source for p in prefs[s]} <= {ex.source for ex in instruct[s]}
        assert {p.source for p in prompts[s]} == {ex.source for ex in instruct[s]}
    pairs = prefs["train"] + prefs["test"]
    assert len(pairs) > 20
    chosen, rejected = compound([p.chosen for p in pairs]), compound([p.rejected for p in pairs])
    assert all(c - r >= 0.5 for c, r in zip(chosen, rejected))  # min_gap, the more positive chosen
    text = dict(shakespeare_plays(GENRES))
    for p in pairs[:20]:  # real text: prompt head + chosen or rejected is a line of that play
        head = p.prompt.removeprefix("Continue this line joyfully: ")
        assert f"{head} {p.chosen}" in text[p.source] or f"{head} {p.rejected}" in text[p.source]
    assert all(r.prompt.startswith("Continue this line joyfully: ") for r in prompts["val"])


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def sft_file(tmp_path, n=40):
    rows = [{"instruction": f"What is {k} + {k % 7}?", "output": str(k + k % 7) + " exactly" * (k % 5)} for k in range(n)]
    return str(write(tmp_path / "sft.jsonl", rows))


def sft_module(tmp_path, tok, **kw):
    dm = InstructionDataModule(path=sft_file(tmp_path), template={"name": "plain", "include_cot": False, "seed": 0},
                               batch_size=4, seed=5, **kw)
    dm.tokenizer = tok
    dm.setup()
    return dm


def test_sft_batches_mask_the_prompt_and_are_a_pure_function_of_seed_and_index(tmp_path, gpt2):
    dm = sft_module(tmp_path, gpt2)
    batches = dm.train_dataloader().dataset
    b = batches.batch(13)
    assert set(b) == {"input_ids", "targets", "attention_mask"}
    for row in range(4):
        ids = b["input_ids"][row][b["attention_mask"][row] == 1].tolist()
        text = gpt2.decode(ids)
        prompt, response = text.split("\n", 1)
        kept = b["targets"][row][b["targets"][row] != -100]
        assert gpt2.decode(kept) == response  # response + <|endoftext|>, nothing of the prompt
        assert response.endswith("<|endoftext|>")
    again = sft_module(tmp_path, gpt2).train_dataloader().dataset.batch(13)  # fresh module, same (seed, i)
    assert all(torch.equal(b[k], again[k]) for k in b)
    resumed = sft_module(tmp_path, gpt2)
    resumed.load_state_dict({"next_batch": 13})
    first = next(iter(resumed.train_dataloader()))
    assert all(torch.equal(b[k], first[k]) for k in b)
    other = InstructionDataModule(path=sft_file(tmp_path), template={"name": "plain"}, batch_size=4, seed=6)
    other.tokenizer = gpt2
    other_batches = other.train_dataloader().dataset
    assert any(not torch.equal(other_batches.batch(i)["input_ids"], batches.batch(i)["input_ids"]) for i in range(3))


def test_packing_never_splits_an_example_and_numbers_segments(tmp_path, gpt2):
    dm = sft_module(tmp_path, gpt2, packing=True, max_length=48)
    plain = {tuple(ids): n for ids, n in dm.encoded["train"]}
    batches = dm.train_dataloader().dataset
    seen = []
    for row in batches.items:
        assert sum(len(ids) for ids, _ in row) <= 48
    for i in range(batches.per_epoch):
        b = batches.batch(i)
        assert set(b) == {"input_ids", "targets", "attention_mask", "segment_ids"}
        for r in range(b["input_ids"].size(0)):
            seg, ids, tgt = b["segment_ids"][r], b["input_ids"][r], b["targets"][r]
            assert torch.equal(b["attention_mask"][r], (seg > 0).long())
            n_seg = int(seg.max())
            assert seg[seg > 0].tolist() == sorted(seg[seg > 0].tolist())  # 1, 1, ..., 2, 2, ..., 0 padding
            assert set(seg[seg > 0].tolist()) == set(range(1, n_seg + 1))
            for s in range(1, n_seg + 1):
                span = (seg == s).nonzero().squeeze(1)
                example = tuple(ids[span].tolist())
                assert example in plain  # a whole example, exactly as encoded alone
                n_prompt = plain[example]
                expected = [example[t + 1] if t + 1 >= n_prompt else -100 for t in range(len(example) - 1)] + [-100]
                assert tgt[span].tolist() == expected  # no target reaches into the next segment
                seen.append(example)
    assert len(seen) == len(set(seen))  # within an epoch no example comes twice
    assert pack([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]  # best-fit decreasing
    rows = pack([7, 3, 3, 2, 6, 1, 4], 8)
    assert sorted(i for r in rows for i in r) == list(range(7))


def test_every_packed_example_appears_once_per_epoch(tmp_path, gpt2):
    dm = sft_module(tmp_path, gpt2, packing=True, max_length=64)
    batches = dm.train_dataloader().dataset
    rows = [row for row in batches.items]
    assert sorted(tuple(ids) for row in rows for ids, _ in row) == sorted(tuple(ids) for ids, _ in dm.encoded["train"])


def test_overlong_examples_are_dropped_or_truncated(tmp_path, gpt2):
    dm = sft_module(tmp_path, gpt2, max_length=12)
    stats = dm.stats()
    assert stats["train_dropped"] > 0 and all(len(ids) <= 12 for ids, _ in dm.encoded["train"])
    assert stats["train_examples"] + stats["train_dropped"] == len(dm.records["train"])
    cut = sft_module(tmp_path, gpt2, max_length=12, truncation="truncate")
    assert cut.stats()["train_dropped"] < stats["train_dropped"]
    assert all(ids[-1] == gpt2.eos_id and len(ids) <= 12 for ids, _ in cut.encoded["train"])
    capped = InstructionDataModule(path=sft_file(tmp_path), max_length=512, block_size=32)
    assert capped.max_length == 32  # the model's context caps max_length


def test_preference_batches_put_chosen_rows_first(tmp_path, gpt2):
    rows = [{"prompt": f"Say something about {k}", "chosen": f"I like {k}.", "rejected": f"I hate {k} a lot."}
            for k in range(20)]
    dm = PreferenceDataModule(path=str(write(tmp_path / "p.jsonl", rows)), batch_size=3, seed=1)
    dm.tokenizer = gpt2
    b = dm.train_dataloader().dataset.batch(2)
    assert b["input_ids"].shape[0] == 6 and b["targets"].shape == b["input_ids"].shape
    for r in range(3):
        chosen = gpt2.decode(b["targets"][r][b["targets"][r] != -100])
        rejected = gpt2.decode(b["targets"][r + 3][b["targets"][r + 3] != -100])
        k = chosen.split()[-1].rstrip(".<|endoftext|>")
        assert chosen == f"I like {k}.<|endoftext|>" and rejected == f"I hate {k} a lot.<|endoftext|>"
        prompt_c = b["input_ids"][r][b["targets"][r] == -100][: 5]
        assert torch.equal(prompt_c, b["input_ids"][r + 3][: 5])  # the same prompt for both rows
    assert len(dm.pairs("train")) == 16 and dm.stats()["train_examples"] == 16


def test_prompt_batches_are_left_padded(tmp_path, gpt2):
    rows = [{"prompt": "Hi" + " there" * k, "answer": str(k)} for k in range(10)]
    dm = PromptDataModule(path=str(write(tmp_path / "q.jsonl", rows)), template={"name": "plain"}, batch_size=4,
                          val_fraction=0.0, test_fraction=0.0)
    dm.tokenizer = gpt2
    b = dm.train_dataloader().dataset.batch(0)
    assert set(b) == {"prompt_ids", "prompt_mask", "prompts", "raw", "answers"}
    for r in range(4):
        n = int(b["prompt_mask"][r].sum())
        assert b["prompt_mask"][r, -n:].all() and not b["prompt_mask"][r, :-n].any()  # padding on the left
        assert gpt2.decode(b["prompt_ids"][r, -n:]) == b["prompts"][r] == b["raw"][r] + "\n"
        assert b["answers"][r] == str(b["raw"][r].count("there"))
    assert [r.answer for r in dm.rows("train")] != []


def test_a_prompt_longer_than_the_context_names_its_row(tmp_path, gpt2):
    rows = [{"prompt": "short"}, {"prompt": "far too long " * 20}]
    dm = PromptDataModule(path=str(write(tmp_path / "long.jsonl", rows)), max_length=16, val_fraction=0.0,
                          test_fraction=0.0, template={"name": "plain"})
    dm.tokenizer = gpt2
    with pytest.raises(UserError, match=r"prompt of long\.jsonl:2 is \d+ tokens, longer than the context"):
        dm.setup()


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    dm = InstructionDataModule(path=sft_file(tmp_path))
    with pytest.raises(UserError, match="tokenizer.eos=true"):
        dm.tokenizer = CharTokenizer("".join(dm.documents()))
    dm.tokenizer = CharTokenizer("".join(dm.documents()), eos=True)  # the char tokenizer's EOS works
    dm.setup()
    assert dm.stats()["train_examples"] == len(dm.records["train"])


def test_data_configs_instantiate_with_a_template(tmp_path, gpt2):
    f = sft_file(tmp_path)
    for data, extra in (("instructions", {"path": f}), ("arithmetic_cot", {}), ("preferences", {}), ("prompts", {"path": f})):
        cfg = OmegaConf.create({"seed": 3, "template": OmegaConf.load(CONF / "template" / "flan.yaml"),
                                "data": OmegaConf.load(CONF / "data" / f"{data}.yaml")})
        if data == "preferences":
            rows = [{"prompt": f"p{k}", "chosen": "yes", "rejected": "no"} for k in range(10)]
            extra = {"path": str(write(tmp_path / "prefs.jsonl", rows))}
        cfg.data.merge_with(extra)
        dm = instantiate(cfg.data)
        assert dm.template.name == "flan" and dm.template.seed == 3 and dm.template.include_cot
        dm.tokenizer = gpt2
        dm.setup()
        assert dm.stats()["train_examples"] > 0
    for name in ("alpaca", "flan", "chatml", "plain"):
        t = OmegaConf.load(CONF / "template" / f"{name}.yaml")
        assert set(t) == {"name", "include_cot", "seed"} and t.name == name


def test_prompt_datamodule_reads_instruction_builders_with_answers():
    """data=arithmetic_prompts: the arithmetic problems as PPO prompts, each answer kept for reward=arithmetic,
    rendered from the instruction (flan + CoT asks for a chain); the held-out problems are arithmetic_cot's."""
    from functools import partial

    from llmlab.data.builtin_alignment import arithmetic_cot
    from llmlab.data.instructions import PromptDataModule, PromptRow

    builder = partial(arithmetic_cot, max_number=6)
    dm = PromptDataModule(builder=builder, template={"name": "flan", "include_cot": True, "seed": 0}, corpus="ap")
    rows = dm.rows("test")
    assert rows and all(isinstance(r, PromptRow) and r.answer is not None for r in rows)
    held_out = {e.source for e in builder(val_fraction=0.1, test_fraction=0.1, seed=1337)["test"]}
    assert {r.source for r in rows} == held_out
    a, op, b = rows[0].source.split()
    assert rows[0].answer == str({"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op])
    assert rows[0].prompt in dm.rendered(rows[0])
