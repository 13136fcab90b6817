"""method=classify: a head on GPT / BERT / T5 — logits equal to transformers' sequence classifiers on the
same weights, padding never changes a prediction, a toy task is learned, and the CLI trains, evaluates
and infers with it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import run_dirs
from test_cli_errors import assert_user_error

transformers = pytest.importorskip("transformers")

LABELS = ["neg", "pos", "zzz"]
PAD = 0


def gpt(seed: int = 0):
    from llmlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=24, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0))


def bert(seed: int = 0):
    from llmlab.models.bert import Bert, BertConfig

    torch.manual_seed(seed)
    return Bert(BertConfig(vocab_size=24, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0))


def t5(seed: int = 0):
    from llmlab.models.t5 import T5, T5Config

    torch.manual_seed(seed)
    return T5(T5Config(vocab_size=24, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0))


BACKBONES = {"gpt": gpt, "bert": bert, "t5": t5}


def classifier(arch: str, labels=LABELS, seed: int = 0, **kw):
    from llmlab.methods.classify import SequenceClassifier

    method = SequenceClassifier({"model": BACKBONES[arch](seed)}, labels=labels, classifier_dropout=0.0, **kw)
    with torch.no_grad():  # a non-trivial head
        method.classifier.weight.normal_(0, 0.5)
        method.classifier.bias.normal_(0, 0.5)
    return method.eval()


def padded_batch():
    """Right-padded ids (no PAD inside the text) and the mask."""
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 10, 1]
    ids = torch.full((4, 10), PAD)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, 24, (n,), generator=g)
    return ids, (ids != PAD).long()


# ---------------------------------------------------------------------------- parity with transformers


def test_gpt_logits_equal_gpt2_for_sequence_classification():
    method = classifier("gpt")
    with torch.no_grad():
        method.classifier.bias.zero_()  # GPT-2's score layer has no bias
    cfg = transformers.GPT2Config(**method.model.to_hf_config(), num_labels=3, pad_token_id=PAD)
    hf = transformers.GPT2ForSequenceClassification(cfg).eval()
    state = {k: v for k, v in method.model.to_hf_state_dict().items() if k.startswith("transformer.")}
    missing, _ = hf.load_state_dict({**state, "score.weight": method.classifier.weight}, strict=False)
    assert not [k for k in missing if not k.endswith(".attn.bias")], missing
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(method(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_bert_logits_equal_bert_for_sequence_classification():
    method = classifier("bert")
    cfg = transformers.BertConfig(**method.model.to_hf_config(), num_labels=3)
    hf = transformers.BertForSequenceClassification(cfg).eval()
    state = {k: v for k, v in method.model.to_hf_state_dict().items() if k.startswith("bert.")}
    head = {f"classifier.{k}": v for k, v in method.classifier.state_dict().items()}
    missing, _ = hf.load_state_dict({**state, **head}, strict=False)
    assert not missing, missing
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(method(ids, mask), hf(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_t5_logits_are_the_head_on_the_masked_mean_of_t5_encoder_states():
    method = classifier("t5")
    hf = transformers.T5EncoderModel(transformers.T5Config(**method.model.to_hf_config())).eval()
    state = {k: v for k, v in method.model.to_hf_state_dict().items() if k.startswith(("encoder.", "shared."))}
    missing, _ = hf.load_state_dict(state, strict=False)
    assert not [k for k in missing if k != "encoder.embed_tokens.weight"], missing  # tied to shared
    ids, mask = padded_batch()
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(method(ids, mask), method.classifier(pooled), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_padding_never_changes_a_prediction(arch):
    method = classifier(arch)
    ids, mask = padded_batch()
    with torch.no_grad():
        batched = method(ids, mask)
        for b in range(len(ids)):
            n = int(mask[b].sum())
            alone = method(ids[b : b + 1, :n], mask[b : b + 1, :n])
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_head_and_options():
    from llmlab.errors import UserError

    method = classifier("gpt")
    assert method.classifier.out_features == 3 and method.pooling == "last" and method.name == "classify"
    assert classifier("bert").pooling == "cls" and classifier("t5").pooling == "mean"
    assert classifier("t5", pooling="last").pooling == "last"
    with pytest.raises(UserError, match="needs labelled data"):
        classifier("gpt", labels=None)
    with pytest.raises(UserError, match="pooler"):
        classifier("gpt", pooling="cls")


# ---------------------------------------------------------------------------- learning


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_learns_a_separable_toy_task(arch):
    """Class = which half of the vocabulary the tokens come from; 30 full-batch steps."""
    from llmlab.methods.classify import SequenceClassifier

    torch.manual_seed(0)
    y = torch.arange(32) % 2
    lengths = torch.randint(2, 9, (32,))
    low = torch.randint(1, 12, (32, 8))
    ids = torch.where(y[:, None] == 1, low + 11, low)  # 1..11 or 12..22
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = ids * mask  # right padding with PAD = 0
    method = SequenceClassifier({"model": BACKBONES[arch](0)}, labels=["a", "b"],
                                optim={"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-2}})
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        step = method.model_step({"input_ids": ids, "attention_mask": mask, "labels": y})
        opt.zero_grad()
        step.loss.backward()
        opt.step()
        losses.append(float(step.loss.detach()))
    assert step.n_tokens == 32  # weights are examples
    assert losses[-1] < 0.2 * losses[0], losses
    method.eval()
    with torch.no_grad():
        assert (method(ids, mask).argmax(-1) == y).float().mean() == 1.0


# ---------------------------------------------------------------------------- the CLI

SMALL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "data.max_passages_per_play=10",
         "data.batch_size=8", "data.eval_batch_size=32", "trainer.enable_model_summary=false",
         "callbacks.progress.kind=plain"]


def test_train_eval_infer(run_cli):
    from llmlab.data.classification import ShakespeareGenreDataModule

    run_cli("train", "method=classify", *SMALL, "trainer.max_steps=6", "trainer.val_check_interval=3")
    run = run_dirs(run_cli.root)[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/accuracy", "val/macro_f1", "test/accuracy", "test/macro_f1", "val/loss", "test/loss"):
        assert 0.0 <= metrics[key] <= (1.0 if "loss" not in key else 10.0), key
    assert "val/ppl" not in metrics and "test/ppl" not in metrics  # a classification loss has no perplexity
    expected = ShakespeareGenreDataModule(max_passages_per_play=10, val_fraction=0.15, test_fraction=0.15)
    assert metrics["train/tokens_seen"] == 6 * 8  # examples
    cm = json.loads((run / "confusion_test.json").read_text())
    assert cm["labels"] == ["comedy", "history", "tragedy"]
    assert [sum(row) for row in cm["matrix"]] == list(expected.class_counts("test").values())  # the whole split
    assert cm["accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-6)
    assert cm["macro_f1"] == pytest.approx(metrics["test/macro_f1"], abs=1e-6)
    assert (run / "confusion_test.png").read_bytes().startswith(b"\x89PNG")

    out = run_cli("infer", f"ckpt_path={run}", "text=Now is the winter of our discontent").stdout
    rows = [line.split() for line in out.strip().splitlines()[-3:]]
    assert sorted(r[0] for r in rows) == ["comedy", "history", "tragedy"]
    probs = [float(r[1]) for r in rows]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=2e-4)

    run_cli("eval", f"ckpt_path={run}", "split=val")
    ev = run_dirs(run_cli.root, "eval")[-1]
    cm = json.loads((ev / "confusion_val.json").read_text())
    assert sum(map(sum, cm["matrix"])) == len(expected.examples["val"])
    assert json.loads((ev / "metrics.json").read_text())["val/accuracy"] == pytest.approx(cm["accuracy"], abs=1e-6)


def test_bad_labeled_row_is_one_line(run_cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "to be", "label": "a"}\n{"text": "or not", "label": "b"}\n{"text": "to be", "label" "a"}\n')
    proc = run_cli("train", "method=classify", "data=labeled", f"data.path={bad}", check=False)
    assert_user_error(proc, "bad.jsonl", "line 3", "not valid JSON")


def test_config_composes_alone_and_bad_values_are_refused():
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from llmlab.errors import UserError
    from llmlab.schema import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["method=classify"])
        assert (cfg.data.corpus, cfg.model.arch, cfg.tokenizer.name, cfg.name) == \
            ("shakespeare_genre", "gpt", "char", "classify_shakespeare_genre")
        validate(cfg, "train")
        for override, needle in (("data.max_length=abc", "data.max_length=abc is not an integer"),
                                 ("method.pooling=max", "method.pooling=max is not auto, last, cls or mean"),
                                 ("data.genres=comedy", "data.genres=[comedy]")):
            with pytest.raises(UserError, match=re.escape(needle)):
                validate(compose("train", overrides=["method=classify", override]), "train")


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_trainable_parameter_gets_a_gradient(arch):
    """Unused pretraining heads (and T5's decoder) are frozen: DDP refuses parameters without gradients."""
    method = classifier(arch).train()
    ids, mask = padded_batch()
    method.model_step({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 0])}).loss.backward()
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert "classifier.weight" in trainable and any(n.endswith(("wte.weight", "word_embeddings.weight", "shared.weight"))
                                                    for n in trainable)  # tied embeddings still train
