"""Stop strings: per-row stops on decoded text (multi-token, mid-token, multi-byte BPE), OpenAI's cut."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from llmlab.data.tokenizers import CharTokenizer, GPT2Tokenizer
from llmlab.errors import UserError
from llmlab.inference.generate import generate
from llmlab.inference.stopping import StopStrings
from llmlab.methods.gpt import GPTLM
from llmlab.models.gpt import GPT, GPTConfig


class Scripted(nn.Module):
    """A stub LM that emits ``script[row][step]`` whatever the input (no KV cache)."""

    def __init__(self, script: list[list[int]], prompt_len: int, vocab: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_size=256)
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.calls = 0

    def forward(self, idx, kv_cache=None, last_only=False):
        self.calls += 1
        step = idx.size(1) - self.prompt_len
        tokens = torch.tensor([row[min(step, len(row) - 1)] for row in self.script])
        return nn.functional.one_hot(tokens, self.vocab).float()[:, None, :] * 10.0  # (B, 1, V)


def _run(tok, texts: list[str], stop, n: int | None = None, **kw):
    script = [tok.encode(t) for t in texts]
    n = n or max(len(s) for s in script)
    script = [s + [s[-1]] * (n - len(s)) for s in script]
    model = Scripted(script, 1, tok.vocab_size)
    out = generate(model, torch.zeros(len(texts), 1, dtype=torch.long), n, greedy=True, stop_strings=stop,
                   tokenizer=tok, **kw)
    return out, model.calls


def test_check_finds_the_earliest_stop_and_cut_drops_it():
    s = StopStrings(["\n\n", "END", "d E"])
    assert s.check("abc") is None
    assert s.check("ab\n\ncd END") == 2 and s.cut("ab\n\ncd END") == "ab"
    assert s.check("and END\n\n") == 2  # "d E" starts before "END"
    assert s.cut("no stop here") == "no stop here"
    assert s.check("xxEND", start=4) == 2  # "xxEN" was searched before: the match ending in the new "D" is found
    assert s.check("END and more text", start=17) is None  # already-checked text is not searched again
    assert StopStrings("ab").stop == ["ab"] and not StopStrings(None)


def test_rows_stop_individually_on_multi_token_stops_with_the_char_tokenizer():
    tok = CharTokenizer("\nabcdefgh ")
    out, calls = _run(tok, ["ab\n\ncdefgh", "abcdefgh\nabc", "a\nb\nc\nd\n\ne"], ["\n\n"], n=12)
    rows = [tok.decode(r) for r in out[:, 1:].tolist()]
    stop = StopStrings(["\n\n"])
    assert [stop.cut(r) for r in rows] == ["ab", "abcdefgh\nabc", "a\nb\nc\nd"]
    assert out.shape == (3, 13) and calls == 12  # row 1 never stops: all steps run
    assert out[0, 5:].tolist() == [0] * 8  # a stopped row is filled (no eos, no pad: id 0)
    out, calls = _run(tok, ["ab\n\ncdefgh", "a\n\nb"], ["\n\n"], n=12, pad_id=9)
    assert calls == 4 and out.shape == (2, 5)  # both stopped at step 4: the loop ended there
    assert out[1, 4].item() == 9


def test_bpe_stop_strings_split_over_tokens_and_bytes():
    tok = GPT2Tokenizer()
    texts = ["ab🙂cd and more", " the ending story", "x\n\ny z w"]
    out, _ = _run(tok, texts, ["🙂", "end", "\n\n"], n=8)
    rows = [tok.decode(r) for r in out[:, 1:].tolist()]
    stop = StopStrings(["🙂", "end", "\n\n"])
    assert [stop.cut(r) for r in rows] == ["ab", " the ", "x"]
    # the emoji's 3 tokens: after 2 the text ends in U+FFFD (no match), the 3rd completes it, then the row stops
    assert out[0, 1:].tolist() == tok.encode("ab🙂")[:3]  # every row stopped by step 3: the loop ended there
    out, _ = _run(tok, ["ab🙂cd"], ["\ufffd"], n=4)  # half characters are never matched as text
    assert tok.decode(out[0, 1:].tolist()) == "ab🙂cd"


def test_gptlm_sample_cuts_at_stop_strings_and_respects_eos():
    tok = CharTokenizer("\nabcdefgh ", eos=True)
    torch.manual_seed(0)
    method = GPTLM({"model": GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))})
    method.attach_tokenizer(tok)
    free = method.sample("ab", max_new_tokens=20, seed=3, num_samples=3)
    stops = sorted({t[2:4] for t in free if len(t) >= 4})  # a 2-character piece some sample contains at 2..3
    cut = method.sample("ab", max_new_tokens=20, seed=3, num_samples=3, stop_strings=stops[:1])
    assert cut == [StopStrings(stops[:1]).cut(t) for t in free]
    assert any(len(c) < len(f) for c, f in zip(cut, free))
    with pytest.raises(UserError, match="num_beams"):
        method.sample("ab", max_new_tokens=4, num_beams=2, stop_strings=["a"])


def test_bad_stop_strings_are_user_errors(run_cli):
    with pytest.raises(UserError):
        StopStrings(["ok", ""])
    with pytest.raises(UserError, match="tokenizer"):
        generate(Scripted([[1]], 1, 5), torch.zeros(1, 1, dtype=torch.long), 2, stop_strings=["a"])
    proc = run_cli("infer", "ckpt_path=missing.ckpt", "generation.stop_strings=[a,'']", check=False)
    assert proc.returncode == 2 and "generation.stop_strings" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("infer", "ckpt_path=missing.ckpt", "generation.repetition_penalty=-1", check=False)
    assert proc.returncode == 2 and "generation.repetition_penalty" in proc.stderr
