"""method=sft: the loss is the response's (+EOS) and nothing else, packing isolates examples, a tiny
arithmetic run learns to answer (loss falls, exact match rises), self-consistency's vote, bad inputs,
and the experiments under fast_dev_run through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, test_peft_e2e's harness
from test_peft_e2e import llmlab_batch  # noqa: E402

from llmlab.data.instructions import Instruction, collate_sft, encode_pair  # noqa: E402
from llmlab.data.templates import build_template  # noqa: E402
from llmlab.data.tokenizers import CharTokenizer  # noqa: E402
from llmlab.errors import UserError  # noqa: E402
from llmlab.methods.sft import InstructionTuning, majority_vote, parse_answer, score_examples  # noqa: E402
from llmlab.models.gpt import GPT, GPTConfig  # noqa: E402

CHARS = "0123456789+=?. \nWhatisTheanswrAQ:"


def tiny_sft(tok, n_layer=1, n_embd=32, block_size=64, seed=0) -> InstructionTuning:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd))
    method = InstructionTuning({"model": gpt}, eval_examples=50)
    method.attach_tokenizer(tok)
    return method


def right_padded(pairs, tok, max_length=64):
    """The SFT batch of the data contract: encode_pair + collate_sft (what the datamodule does)."""
    encoded = [encode_pair(tok, p, r, max_length) for p, r in pairs]
    return collate_sft(encoded, tok.eos_id), encoded


def test_loss_is_cross_entropy_over_response_and_eos_only():
    tok = CharTokenizer(CHARS, eos=True)
    method = tiny_sft(tok).eval()
    pairs = [("What is 2+3?\n", "5"), ("What is 12+30?\nA:", " 42."), ("Q: 1+1=", "2")]
    batch, encoded = right_padded(pairs, tok)
    step = method.model_step(batch)
    logits = method.model(batch["input_ids"]).detach()  # right padding never reaches a real token (causal)
    nll, n = 0.0, 0
    for b, (ids, n_prompt) in enumerate(encoded):
        assert ids[-1] == tok.eos_id and tok.decode(ids[n_prompt:]) == pairs[b][1]  # response + EOS, exact boundary
        for t in range(n_prompt - 1, len(ids) - 1):  # logits at t predict token t + 1: the response and the EOS
            nll -= float(F.log_softmax(logits[b, t], -1)[ids[t + 1]])
            n += 1
    assert step.n_tokens == n == sum(len(r) + 1 for _, r in pairs)
    assert float(step.loss.detach()) == pytest.approx(nll / n, rel=1e-5)


def test_packing_gives_the_per_token_losses_of_the_unpacked_batch():
    tok = CharTokenizer(CHARS, eos=True)
    method = tiny_sft(tok, n_layer=2).eval()
    pairs = [("What is 2+3?\n", "5"), ("What is 12+30?\n", "42"), ("Q: 7+1=", "8")]
    batch, encoded = right_padded(pairs, tok)
    with torch.no_grad():
        logits = method.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        unpacked = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")  # (B, T), 0 at -100
        ids = torch.cat([torch.tensor(i) for i, _ in encoded])[None]  # one row, the three examples back to back
        segment_ids = torch.cat([torch.full((len(i),), s + 1) for s, (i, _) in enumerate(encoded)])[None]
        targets = torch.cat([batch["targets"][b, :len(i)] for b, (i, _) in enumerate(encoded)])[None]
        packed_logits = method.model(ids, segment_ids=segment_ids)
        packed = F.cross_entropy(packed_logits.transpose(1, 2), targets, reduction="none")
        step = method.model_step({"input_ids": ids, "targets": targets, "segment_ids": segment_ids,
                                  "attention_mask": torch.ones_like(ids)})
        mixed = method.model(ids)  # without the segment mask, later examples read earlier ones
    expected = torch.cat([unpacked[b, :len(i)] for b, (i, _) in enumerate(encoded)])
    torch.testing.assert_close(packed[0], expected, rtol=1e-5, atol=1e-6)
    assert float(step.loss) == pytest.approx(float(expected.sum() / (targets != -100).sum()), rel=1e-5)
    second = slice(len(encoded[0][0]), len(encoded[0][0]) + len(encoded[1][0]))
    assert not torch.allclose(mixed[0, second], packed_logits[0, second], atol=1e-4)  # the mask did something


def test_majority_vote_and_answer_parsing():
    assert majority_vote(["7", "7.", "8", None, "1,000"]) == "7"  # normalised before counting
    assert majority_vote(["8", "7", "7", "8"]) == "8"  # a tie goes to the answer seen first
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    assert majority_vote(["1,000", "1000", "5"]) == "1000"
    assert parse_answer("2 plus 5 is 7. The answer is 7.", cot=True) == "7"
    assert parse_answer("2 plus 5 is 7.", cot=True) is None  # a chain without its answer sentence answers nothing
    assert parse_answer(" 14 ", cot=False) == "14"


def test_bad_inputs_are_one_line():
    with pytest.raises(UserError, match="tokenizer.eos=true"):
        tiny_sft(CharTokenizer(CHARS))
    from llmlab.models.bert import Bert, BertConfig

    bert = Bert(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32))
    with pytest.raises(UserError, match="fine-tunes a GPT"):
        InstructionTuning({"model": bert})


# ---------------------------------------------------------------------------- learning: single-digit additions


def addition_examples(pairs):
    return [Instruction(instruction=f"What is {a} + {b}?", output=str(a + b),
                        chain=f"{a} plus {b} is {a + b}.", task_type="reasoning") for a, b in pairs]


def test_a_tiny_run_learns_single_digit_addition():
    """A 2-layer GPT trained on 90 of the 100 single-digit sums answers held-out ones: the loss falls
    and greedy exact match (answers parsed from the chain) rises from the untrained model's 0."""
    import random

    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    train, held_out = addition_examples(pairs[10:]), addition_examples(pairs[:10])
    template = build_template({"name": "plain", "include_cot": True})
    texts = [p + r for p, r in (template.render(ex) for ex in train + held_out)]
    tok = CharTokenizer("".join(sorted(set("".join(texts)))), eos=True)
    method = tiny_sft(tok, n_layer=2, n_embd=48)
    generation = {"greedy": True, "temperature": 0.8, "top_k": None, "seed": 0, "num_samples": 3}
    before, _ = score_examples(method, held_out, template, generation, num_samples=1)

    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    rng, losses = random.Random(0), []
    method.train()
    for step in range(400):
        batch, _ = right_padded([template.render(ex) for ex in rng.sample(train, 16)], tok)
        loss = method.model_step(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    after, records = score_examples(method, held_out, template, generation, num_samples=3)
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:20]) / 20
    assert before["exact_match"] == 0.0
    assert after["exact_match"] >= 0.5, records[:3]
    assert 0.0 <= after["exact_match_sc"] <= 1.0 and all(len(r["samples"]) == 3 for r in records)
    assert all(r["correct"] == (r["parsed"] == r["target"]) for r in records)


# ---------------------------------------------------------------------------- the CLI


TINY = ["trainer.enable_model_summary=false", "callbacks.progress.kind=plain", "model.n_layer=1", "model.n_embd=32",
        "model.n_head=2", "generation.max_new_tokens=8", "callbacks.samples.max_new_tokens=8"]
FDR = ["debug=fdr", *TINY]


def test_experiments_fast_dev_run_then_eval_and_infer(tmp_path):
    """Both recipes under fast_dev_run; a 2-step sft_arithmetic run (with checkpoint) then goes through
    eval (greedy and self-consistency exact match) and infer (one answer; k samples and their majority)."""
    fdr_arith, fdr_shake, short, evaluate, infer, sc, bad = llmlab_batch(
        tmp_path,
        ["train", "experiment=sft_arithmetic", *FDR],
        ["train", "experiment=sft_shakespeare", *FDR, "data.builder.examples_per_play=5"],
        ["train", "experiment=sft_arithmetic", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=1", "method.eval_examples=6", "generation.num_samples=2"],
        ["eval", "ckpt_path={run2}", "generation.num_samples=3", "limit_batches=1"],
        ["infer", "ckpt_path={run2}", "prompt=Ann has 3 apples. Ann finds 4 more. How many apples does Ann have now?",
         "generation.max_new_tokens=8"],
        ["infer", "ckpt_path={run2}", "prompt=What is 3 + 4?", "generation.num_samples=3", "generation.max_new_tokens=8"],
        ["train", "method=sft", "tokenizer.eos=false", *FDR],
    )
    for result in (fdr_arith, fdr_shake):
        metrics = json.loads((result.ok().run / "metrics.json").read_text())
        assert {"test/loss", "test/exact_match", "val/exact_match"} <= set(metrics), metrics
    run = short.ok().run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"test/exact_match", "test/exact_match_sc", "val/exact_match", "val/exact_match_untrained"} <= set(metrics)
    records = [json.loads(line) for line in (run / "test_generations.jsonl").read_text().splitlines()]
    assert len(records) == 6 and set(records[0]) >= {"prompt", "target", "generation", "parsed", "correct", "samples"}
    assert (run / "hf" / "model.safetensors").is_file()  # exported as GPTLM does
    scored = json.loads((evaluate.ok().run / "metrics.json").read_text())
    assert {"test/loss", "test/exact_match", "test/exact_match_sc"} <= set(scored)
    assert len(json.loads((evaluate.run / "test_generations.jsonl").read_text().splitlines()[0])["samples"]) == 3
    assert infer.ok().output.strip()
    assert "majority answer of 3 samples" in sc.ok().output
    assert bad.returncode == 2 and "tokenizer.eos=true" in bad.stderr and "Traceback" not in bad.stderr
