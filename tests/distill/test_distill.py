"""method=distill / distill_bert: every objective trains (forward KL falls), the teacher stays frozen and out of the
student's state dict and checkpoint, DistilBERT's every-other-layer init copies layers 0, 2, ... exactly, and through
the CLI: experiment=distill_shakespeare from a tiny teacher trained here, eval/infer of the student, and bad inputs
(a teacher of another vocabulary, no teacher, an unknown objective) as one line, exit 2, no checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from llmlab.errors import UserError
from llmlab.methods.distill import BertDistillation, Distillation
from llmlab.models.bert import Bert, BertConfig
from llmlab.models.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CLI harness of test_peft_e2e

V = 16


def tiny_gpt(n_layer: int = 2, seed: int = 0, vocab: int = V) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=48, n_layer=n_layer, n_head=2, n_embd=32))


def tiny_bert(n_layer: int = 4, seed: int = 0, init: float = 0.02) -> Bert:
    torch.manual_seed(seed)
    return Bert(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=n_layer, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, initializer_range=init))


def lm_batch(gen: torch.Generator, B: int = 8, T: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of a repeating-ish sequence (something a teacher can know), pre-shifted targets."""
    start = torch.randint(0, V, (B, 1), generator=gen)
    seq = (start + torch.arange(T + 1)[None] * torch.randint(1, 3, (B, 1), generator=gen)) % V
    return seq[:, :-1], seq[:, 1:]


def train_steps(method, steps: int, gen: torch.Generator, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    method.train()
    kds = []
    for _ in range(steps):
        step = method.model_step(lm_batch(gen))
        opt.zero_grad()
        step.objective.backward()
        opt.step()
        kds.append(float(step.metrics["kd"]))
    return kds


@pytest.fixture(scope="module")
def teacher() -> GPT:
    """A 2-layer GPT taught the toy sequences (100 steps), then frozen by the method."""
    model, gen = tiny_gpt(2, seed=1), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        x, y = lm_batch(gen)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------- in process


def test_forward_kl_falls_and_the_teacher_stays_frozen(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = Distillation({"model": tiny_gpt(1), "teacher": teacher}, objective="forward_kl", temperature=2.0)
    kds = train_steps(method, 40, torch.Generator().manual_seed(1))
    assert sum(kds[-5:]) / 5 < 0.5 * sum(kds[:5]) / 5, kds
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any(k.startswith("roles.") for k in method.state_dict())  # recorded by source + hash, not stored
    assert method.model_config["n_layer"] == 1 and method.model_config["arch"] == "gpt"


@pytest.mark.parametrize("objective", ["reverse_kl", "minillm", "seq_kd"])
def test_every_objective_trains(teacher, objective):
    method = Distillation({"model": tiny_gpt(1), "teacher": teacher}, objective=objective, prompt_length=8,
                          response_length=8)
    gen = torch.Generator().manual_seed(2)
    before = [p.clone() for p in method.model.parameters()]
    kds = train_steps(method, 3, gen)
    assert all(torch.isfinite(torch.tensor(kds)))
    assert any(not torch.equal(a, b) for a, b in zip(before, method.model.parameters()))
    method.eval()
    with torch.no_grad():
        step = method.model_step(lm_batch(gen))  # val/test: the student's CE on the data
    assert step.n_tokens == 8 * 40 and 0 < float(step.loss) < 10


def test_every_other_init_copies_layers_0_2_exactly(teacher):
    big = tiny_gpt(4, seed=3)
    method = Distillation({"model": tiny_gpt(1), "teacher": big}, student_init="every_other")
    student, t = method.model.state_dict(), big.state_dict()
    assert method.model.config.n_layer == 2 and method.model_config["n_layer"] == 2
    for key, value in student.items():
        src = key.replace("transformer.h.1.", "transformer.h.2.")  # student layer i = teacher layer 2i
        assert torch.equal(value, t[src]), key
    assert method.model.lm_head.weight is method.model.transformer.wte.weight  # still tied
    assert all(p.requires_grad for p in method.model.parameters())

    bert = tiny_bert(4)
    bmethod = BertDistillation({"model": tiny_bert(1), "teacher": bert}, student_init="every_other", cosine_weight=1.0)
    assert bmethod.model.config.num_hidden_layers == 2
    for key, value in bmethod.model.state_dict().items():
        assert torch.equal(value, bert.state_dict()[key.replace("layers.1.", "layers.2.")]), key


def test_bert_student_distils_mlm_logits():
    teacher, gen = tiny_bert(2, seed=4, init=0.5), torch.Generator().manual_seed(5)  # a confident random teacher
    method = BertDistillation({"model": tiny_bert(1, seed=6), "teacher": teacher}, temperature=2.0, alpha=1.0)
    ids = torch.randint(5, 40, (4, 16), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, 3::4] = ids[:, 3::4]
    batch = {"input_ids": ids.masked_fill(labels != -100, 4), "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids), "labels": labels, "next_sentence_label": torch.zeros(4, dtype=torch.long)}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.train()
    kds = []
    for _ in range(30):
        step = method.model_step(batch)
        opt.zero_grad()
        step.objective.backward()
        opt.step()
        kds.append(float(step.metrics["kd"]))
    assert step.n_tokens == 16 and kds[-1] < 0.5 * kds[0]
    assert not any(k.startswith("roles.") for k in method.state_dict())
    with pytest.raises(UserError, match="BERT student"):
        BertDistillation({"model": tiny_bert(1), "teacher": teacher}, objective="minillm")


def test_bad_settings_are_one_line(teacher):
    with pytest.raises(UserError, match="method.objective="):
        Distillation({"model": tiny_gpt(1), "teacher": teacher}, objective="kl")
    with pytest.raises(UserError, match="method.alpha="):
        Distillation({"model": tiny_gpt(1), "teacher": teacher}, alpha=1.5)
    with pytest.raises(UserError, match="needs a trained teacher"):
        Distillation({"model": tiny_gpt(1)})
    with pytest.raises(UserError, match="vocabulary"):
        Distillation({"model": tiny_gpt(1, vocab=V + 3), "teacher": teacher})
    with pytest.raises(UserError, match="method=distill_bert"):
        Distillation({"model": tiny_gpt(1), "teacher": tiny_bert(2)})


# ---------------------------------------------------------------------------- through the CLI

QUIET = ["trainer.enable_model_summary=false", "callbacks.progress.kind=plain", "callbacks.samples.max_new_tokens=8",
         "generation.max_new_tokens=8"]
TINY = ["model.n_head=2", "model.n_embd=32", "model.block_size=64", "data.batch_size=8", "data.eval_batch_size=16",
        "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]
STEPS = ["trainer.max_steps=3", "trainer.val_check_interval=3", "optim.scheduler.warmup_steps=0",
         "method.prompt_length=8", "method.response_length=8"]


def ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_distill_through_the_cli(tmp_path, small_corpus):
    from test_cli_errors import assert_user_error
    from test_peft_e2e import llmlab_batch

    data = ["data=text", f"data.path={small_corpus}"]
    other = tmp_path / "other.txt"
    other.write_text("abc abc abd\n" * 400, encoding="utf-8")  # another character set: another vocabulary
    results = llmlab_batch(
        tmp_path,
        ["train", *data, *TINY, "model.n_layer=2", "trainer.max_steps=20", "trainer.val_check_interval=20", "test=false", *QUIET],
        ["train", "experiment=distill_shakespeare", "method.teacher={run0}", *data, *TINY, "model.n_layer=1",
         "trainer.fast_dev_run=true", *QUIET],
        ["train", "experiment=distill_shakespeare", "method.teacher={run0}", *data, *TINY, "model.n_layer=1", *STEPS, *QUIET],
        ["eval", "ckpt_path={run2}", "limit_batches=2"],
        ["infer", "ckpt_path={run2}", "prompt=ROMEO:"],
        ["train", "method=distill", "method.teacher={run0}", "method.objective=minillm", "method.student_init=every_other",
         *data, *TINY, *STEPS, "test=false", *QUIET],
        ["train", "method=distill", "method.teacher={run0}", "method.objective=seq_kd", *data, *TINY, "model.n_layer=1",
         *STEPS, "test=false", *QUIET],
        ["train", "data=text", f"data.path={other}", *TINY, "model.n_layer=1", "trainer.max_steps=2", "test=false", *QUIET],
        ["train", "method=distill", "method.teacher={run0}", "model.init_from={run7}", *data, *STEPS, *QUIET],
        ["train", "method=distill", *data, *TINY, *STEPS, *QUIET],
        ["train", "method=distill", "method.teacher={run0}", "method.objective=kl", *data, *TINY, *STEPS, *QUIET],
        ["train", "method=distill", f"method.teacher={tmp_path / 'nowhere'}", *data, *TINY, *STEPS, *QUIET],
    )
    teacher, fdr, short, evaluated, infer, every_other, seq_kd, other_run, wrong_vocab, no_teacher, bad_obj, missing = results
    teacher.ok(), fdr.ok()
    metrics = json.loads((short.ok().run / "metrics.json").read_text())
    assert {"train/kd", "train/ce", "val/loss", "val/ppl", "test/loss", "test/ppl", "val/kd"} <= set(metrics)
    assert metrics["test/ppl"] == pytest.approx(2.718281828 ** metrics["test/loss"], rel=1e-4)
    student = ckpt(short.run)
    meta = student["llmlab"]
    assert meta["method"] == "distill" and set(meta["roles"]) == {"teacher"}
    assert meta["roles"]["teacher"]["sha256"] and meta["model"]["n_layer"] == 1
    assert not any(k.startswith("roles.") for k in student["state_dict"])  # the teacher is never saved
    assert meta["tokenizer"] == ckpt(teacher.run)["llmlab"]["tokenizer"]  # the teacher's tokenizer
    assert (short.run / "hf" / "model.safetensors").is_file()  # the student exports like any GPT
    scored = json.loads((evaluated.ok().run / "metrics.json").read_text())
    assert "test/ppl" in scored
    assert infer.ok().output.strip()

    distilbert = ckpt(every_other.ok().run)["llmlab"]
    assert distilbert["model"]["n_layer"] == 1  # half of the teacher's 2 layers
    assert "train/importance_weight" in json.loads((every_other.run / "metrics.json").read_text())
    assert "train/kd" in json.loads((seq_kd.ok().run / "metrics.json").read_text())

    other_run.ok()
    for bad, needles in ((wrong_vocab, ["teacher", "tokenizer"]), (no_teacher, ["method.teacher"]),
                         (bad_obj, ["method.objective", "forward_kl"]), (missing, ["does not exist"])):
        assert_user_error(bad, *needles)
        assert bad.run_dir is None or not (Path(bad.run_dir) / "checkpoints").exists()
