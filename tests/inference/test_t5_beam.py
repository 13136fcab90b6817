"""T5 beam search (and greedy) through T5.generate: token-for-token parity with Hugging Face's
T5ForConditionalGeneration.generate on the same weights (exported with to_hf_state_dict /
to_hf_config), KV cache == no cache, the encoder runs once, bad options are one line."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.t5 import T5, T5Config

transformers = pytest.importorskip("transformers")
V, NEW, EOS, PAD2, BOOST = 64, 9, 1, 2, 7.0  # PAD2: a nonzero fill id (HF fills with eos when pad_token_id is 0)
TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two inputs in one batch, the second right-padded (as T5's tokenizer pads)."""
    x = torch.randint(3, V, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    return x.masked_fill(mask == 0, 0), mask


def _pair(tmp_path, proj: str, tie: bool, seed: int):
    """A random llmlab T5 with peaky logits and a likely EOS, and HF's model loaded from its export."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    ours = T5(T5Config(**TINY, feed_forward_proj=proj, tie_word_embeddings=tie)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # weights far from the init: varied tokens, few near-ties between beams
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "position_bias" in name or name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 3 / math.sqrt(p.shape[1]))
        if not tie:  # point EOS's output row along the mean decoder state: p(EOS) ~ 0.1-0.3, varied lengths
            x, mask = _batch()
            dec = torch.randint(2, V, (2, 8), generator=torch.Generator().manual_seed(7))
            h = ours.decoder(ours.shared(dec), ours.encode(x, mask), mask).reshape(-1, 32).mean(0)
            ours.lm_head.weight[EOS] += BOOST * h / h.norm() ** 2
    path = tmp_path / f"{proj}_{tie}"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(ours.to_hf_config()))
    save_file({k: v.clone().contiguous() for k, v in ours.to_hf_state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    hf = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    return hf, ours


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t5beam")
    return {"untied": _pair(tmp, "gated-gelu", False, 0), "tied": _pair(tmp, "relu", True, 1)}


def _hf(hf, x, mask, eos, **kw):
    hf.generation_config.eos_token_id = eos  # None: no eos at all (a generate() kwarg None means "the default")
    with torch.no_grad():
        return hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kw)


# every value of every option appears, and with both heads; not the whole product (time)
GRID = [(K, lp, es, R, eos, cache)
        for i, (K, lp, es) in enumerate(itertools.product([2, 3], [1.0, 0.0, 2.0], [True, False, "never"]))
        for R, eos, cache in [((1, 2)[i % 2], (EOS, EOS, None)[i % 3], (True, False)[(i // 2) % 2])]]


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_beam_search_matches_hf(pairs, head):
    hf, ours = pairs[head]
    x, mask = _batch()
    lengths = set()
    for K, lp, es, R, eos, cache in GRID:
        ref = _hf(hf, x, mask, eos, num_beams=K, length_penalty=lp, early_stopping=es, num_return_sequences=R,
                  pad_token_id=PAD2, use_cache=cache)
        got = ours.generate(x, mask, NEW, num_beams=K, length_penalty=lp, early_stopping=es, num_return_sequences=R,
                            eos_token_id=eos, pad_token_id=PAD2, use_kv_cache=cache)
        assert got.shape == ref.shape and torch.equal(got, ref), (K, lp, es, R, eos, cache, got, ref)
        assert (got[:, 0] == 0).all()  # every hypothesis starts with decoder_start_token_id
        lengths.add(got.size(1))
    if head == "untied":  # the likely EOS: some settings stop before max_new_tokens
        assert len(lengths) > 1, lengths


def test_padding_after_eos_and_greedy(pairs):
    hf, ours = pairs["untied"]
    x, mask = _batch()
    # the default fill is the config's pad_token_id (0): HF's beams fill with eos there (0 is falsy)
    ref = _hf(hf, x, mask, EOS, num_beams=3, num_return_sequences=3, length_penalty=0.0, pad_token_id=PAD2)
    got = ours.generate(x, mask, NEW, num_beams=3, num_return_sequences=3, length_penalty=0.0)
    ended = 0
    for row, ref_row in zip(got.tolist(), ref.tolist()):
        if EOS in row[1:-1]:
            end = row.index(EOS, 1) + 1
            assert row[:end] == ref_row[:end] and set(row[end:]) == {0} and set(ref_row[end:]) == {PAD2}
            ended += 1
        else:
            assert row == ref_row
    assert ended  # the test saw a hypothesis end early
    # greedy (num_beams=1) goes through the same step function
    for eos in (EOS, None):
        for cache in (True, False):
            ref = _hf(hf, x, mask, eos, pad_token_id=PAD2, use_cache=cache)
            assert torch.equal(ours.generate(x, mask, NEW, eos_token_id=eos, pad_token_id=PAD2, use_cache=cache), ref)


def test_processors_match_hf(pairs):
    """repetition_penalty / no_repeat_ngram_size over the decoder sequence, in beam search and greedy."""
    hf, ours = pairs["untied"]
    x, mask = _batch()
    for K in (1, 3):
        plain = ours.generate(x, mask, NEW, num_beams=K, eos_token_id=None)
        for kw in (dict(repetition_penalty=1.8), dict(no_repeat_ngram_size=2)):
            ref = _hf(hf, x, mask, None, num_beams=K, pad_token_id=PAD2, **kw)
            got = ours.generate(x, mask, NEW, num_beams=K, eos_token_id=None, pad_token_id=PAD2, **kw)
            assert torch.equal(got, ref) and not torch.equal(got, plain), (K, kw)


def test_encoder_runs_once_and_cache_equals_no_cache(pairs):
    _, ours = pairs["tied"]
    x, mask = _batch()
    calls = []
    handle = ours.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        a = ours.generate(x, mask, 12, num_beams=4, num_return_sequences=4, eos_token_id=None)
    finally:
        handle.remove()
    assert len(calls) == 1 and a.shape == (8, 13)
    b = ours.generate(x, mask, 12, num_beams=4, num_return_sequences=4, eos_token_id=None, use_kv_cache=False)
    assert torch.equal(a, b)
    assert len({tuple(r) for r in a[:4].tolist()}) == 4  # four different beams
    # one beam is greedy search; no tokens: the decoder start only
    assert torch.equal(ours.generate(x, mask, 12, num_beams=1), ours.generate(x, mask, 12))
    none = ours.generate(x, mask, 0, num_beams=2, num_return_sequences=2)
    assert torch.equal(none, torch.zeros(4, 1, dtype=torch.long))


@pytest.mark.parametrize("kw,msg", [
    (dict(num_beams=0), "num_beams=0 must be an integer >= 1"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 must be <= num_beams=2"),
    (dict(num_beams=2, early_stopping="maybe"), "early_stopping='maybe' must be true, false or never"),
    (dict(num_beams=2, temperature=-1), "temperature=-1 must be finite and >= 0"),
    (dict(num_beams=2, length_penalty=float("inf")), "length_penalty=inf must be a finite number"),
])
def test_bad_input_is_one_line(kw, msg):
    torch.manual_seed(0)
    model = T5(T5Config(**TINY)).eval()
    with pytest.raises(UserError) as e:
        model.generate(torch.ones(1, 4, dtype=torch.long), None, 3, **kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- llmlab infer (CLI)
def test_cli_bad_num_beams_is_one_line(run_cli, tmp_path):
    proc = run_cli("infer", f"ckpt_path={tmp_path / 'missing.ckpt'}", "text=a <extra_id_0> b", "generation.num_beams=0",
                   check=False)  # the value check comes before the checkpoint is even looked at
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and "generation.num_beams=0" in errors[0], proc.stderr


@pytest.mark.slow
def test_cli_infer_prints_beams(run_cli, small_corpus):
    from conftest import run_dirs

    run_cli("train", "experiment=t5_shakespeare", "data=text", f"data.path={small_corpus}", "tokenizer.vocab_size=512",
            "method.input_length=32", "model.d_model=32", "model.d_kv=16", "model.num_heads=2", "model.d_ff=64",
            "data.batch_size=8", "data.eval_batch_size=16", "trainer.enable_model_summary=false", "logger=csv",
            "debug=limit", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1")
    proc = run_cli("infer", "ckpt_path=last", "text=Thank you <extra_id_0> me to your party <extra_id_1> week.",
                   "generation.max_new_tokens=8", "generation.num_beams=3", "generation.num_return_sequences=2")
    lines = proc.stdout.splitlines()
    assert [l for l in lines if l.startswith("---")] == ["--- beam 1/2 ---", "--- beam 2/2 ---"], proc.stdout
    assert sum(l.startswith("target:") for l in lines) == 2 and sum(l.startswith("filled:") for l in lines) == 2
    saved = json.loads((run_dirs(run_cli.root, "infer")[-1] / "t5_fill.json").read_text())
    assert len(saved["beams"]) == 2 and saved["target"] == saved["beams"][0]["target"]
    assert saved["beams"][0] != saved["beams"][1]  # two different hypotheses
    for beam in saved["beams"]:
        assert beam["filled"].startswith("Thank you") and beam["filled"].endswith("week.")
