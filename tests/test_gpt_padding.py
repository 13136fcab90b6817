"""Padded and packed batches in GPT (attention_mask, segment_ids), batched generation of prompts of
different lengths, and the char tokenizer's end-of-text id: a padded row computes what it would
alone, and Hugging Face's GPT-2 agrees on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.alignment.rollout import complete, forward_response, left_pad, response_logprobs, response_mask_of
from llmlab.data.tokenizers import CharTokenizer, build_tokenizer, tokenizer_from_state
from llmlab.errors import UserError
from llmlab.models.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).eval()


def _rows():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, (n,), generator=g).tolist() for n in (7, 3, 5)]


@torch.no_grad()
def test_left_padded_rows_equal_each_row_alone(gpt):
    rows = _rows()
    ids, mask = left_pad(rows, pad_id=0)
    logits = gpt(ids, attention_mask=mask)
    for b, row in enumerate(rows):
        alone = gpt(torch.tensor([row]))[0]
        torch.testing.assert_close(logits[b, ids.size(1) - len(row):], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(logits).all()  # padding queries see themselves: no NaN rows


@torch.no_grad()
def test_right_padded_rows_equal_each_row_alone(gpt):
    rows = _rows()
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    hidden = gpt.encode(ids, attention_mask=mask)
    for b, row in enumerate(rows):
        torch.testing.assert_close(hidden[b, : len(row)], gpt.encode(torch.tensor([row]))[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_kv_cache_with_padding_matches_full_forward(gpt):
    ids, mask = left_pad(_rows(), pad_id=0)
    cache = gpt.new_kv_cache(ids.size(0))
    gpt(ids, kv_cache=cache, attention_mask=mask)
    nxt = torch.tensor([[3], [9], [1]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    step = gpt(nxt, kv_cache=cache, attention_mask=mask2)[:, -1]
    full = gpt(torch.cat([ids, nxt], 1), attention_mask=mask2)[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="attention_mask has shape"):
        gpt(nxt, kv_cache=cache, attention_mask=mask)  # the mask must cover the cached tokens too


@torch.no_grad()
def test_packed_segments_do_not_attend_to_each_other(gpt):
    a, b, _ = _rows()
    packed = torch.tensor([a + b[:3] + [0, 0]])
    seg = torch.tensor([[1] * len(a) + [2] * 3 + [0, 0]])
    out = gpt(packed, segment_ids=seg)[0]
    torch.testing.assert_close(out[: len(a)], gpt(torch.tensor([a]))[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[len(a): len(a) + 3], gpt(torch.tensor([b[:3]]))[0], atol=1e-5, rtol=0)


def test_hf_gpt2_agrees_on_left_padded_batches(gpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    state = gpt.to_hf_state_dict()
    state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    config = gpt.to_hf_config()
    config.update(bos_token_id=0, eos_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, mask = left_pad(_rows(), pad_id=0)
    with torch.no_grad():
        ours = gpt(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    # greedy batched generation: HF's generate with left padding gives the same tokens
    ours_gen = gpt.generate(ids, 6, greedy=True, attention_mask=mask)
    theirs_gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_gen, theirs_gen)


@torch.no_grad()
def test_batched_generation_equals_each_prompt_alone(gpt):
    tok = CharTokenizer("abcdefghij ", eos=True)
    prompts = ["abc", "a", "jihgf"]
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
    batch = complete(model, tok, prompts, max_new_tokens=6, greedy=True)
    for i, p in enumerate(prompts):
        assert batch.texts[i] == complete(model, tok, [p], max_new_tokens=6, greedy=True).texts[0]
    lp = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    assert lp.shape == batch.response_ids.shape and (lp <= 0).all()
    out = forward_response(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    assert out.hidden.shape[:2] == out.logits.shape[:2] == batch.response_ids.shape
    sampled = complete(model, tok, prompts, max_new_tokens=4, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert sampled.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(sampled.texts) == 9


def test_response_mask_ends_at_first_eos():
    r = torch.tensor([[5, 2, 9, 9], [5, 5, 5, 5], [9, 1, 9, 2]])
    assert response_mask_of(r, 9).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_generation_with_padding_must_fit_the_context(gpt):
    ids, mask = left_pad(_rows(), pad_id=0)
    with pytest.raises(UserError, match="exceed the model's context"):
        gpt.generate(ids, 40, attention_mask=mask)


def test_char_tokenizer_end_of_text_id():
    tok = build_tokenizer("char", ["abc", "cd"], eos=True)
    assert tok.eos_id == tok.vocab_size - 1 and tok.unk_id == tok.eos_id - 1
    assert tok.decode(tok.encode("abc") + [tok.eos_id]) == "abc"
    again = tokenizer_from_state(tok.state_dict())
    assert again.eos_id == tok.eos_id and again.fingerprint == tok.fingerprint
    plain = build_tokenizer("char", ["abc", "cd"])
    assert plain.eos_id is None and "eos" not in plain.state_dict()  # older checkpoints keep their fingerprint
