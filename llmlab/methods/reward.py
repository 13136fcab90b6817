"""Reward model: a scalar score of (prompt, response) trained on human (or scorer) preferences with the
Bradley–Terry loss — Ouyang et al. 2022, "Training language models to follow instructions with human
feedback" (InstructGPT) §3.5; Stiennon et al. 2020 §3.4; Bradley & Terry 1952.

``models["model"]`` is a GPT (fresh, or ``model.init_from=SFT_RUN`` — InstructGPT starts its RM from
the SFT model with the unembedding removed; a ``peft=`` tuner may wrap it). The method owns the head
on the final hidden state of the **last real token** (:func:`llmlab.methods.classify.pool_last`:
the last position whose attention mask is 1, so right *and* left padding work; the mask also goes
into the GPT, which keeps a left-padded row's positions and attention what they would be alone):

* ``head: linear`` — ``Linear(n_embd, 1, bias=False)``, Hugging Face's ``GPT2ForSequenceClassification.
  score`` that TRL's ``RewardTrainer`` trains (a bias would cancel in the loss anyway);
* ``head: mlp`` — the seed's head, ``Linear(n_embd, head_hidden=256) -> ReLU -> Dropout -> Linear(256, 1)``,
  its width read from the model config (the seed hard-coded 768 on a 256-wide model).

``freeze_backbone: true`` trains the head only (the seed froze the GPT; its comment left it to the
compute budget). Loss over the batch's ``B`` pairs (TRL's ``RewardTrainer.compute_loss``)::

    L = mean softplus(r_rejected - r_chosen [+ margin])  [+ center_rewards_coefficient * mean((r_c + r_r)^2)]

logged as ``{split}/loss`` with TRL's metrics ``accuracy`` (``r_c > r_r``), ``margin`` (``r_c - r_r``)
and ``mean_reward``, each weighted by pairs. Batches (the data's ``PreferenceDataModule``): rows
``[0, B)`` chosen and ``[B, 2B)`` rejected, each prompt + response + EOS, right-padded.

Scoring API (used by :class:`llmlab.alignment.rewards.ModelScorer`, PPO's ``reward=model``):

* ``score_ids(input_ids, attention_mask) -> Tensor (B,)``: rewards of token rows (either padding side),
  no gradient, eval mode;
* ``score_texts(prompts, responses, rendered=False) -> Tensor (B,)``: each raw prompt and its response
  rendered by the run's ``template`` as the preference data renders a pair (``rendered=True``: the
  prompts are already rendered, the responses taken as they are), tokenised separately and ended
  with EOS as in training (``encode_pair``; too long: the response is cut, the EOS kept), then
  :meth:`score_ids`.

``llmlab infer ckpt_path=RM prompt="..." text="response"`` prints the reward; ``llmlab eval
ckpt_path=RM`` reports pairwise accuracy and margin on the test split.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.methods.base import LLMLabModule, Step
from llmlab.methods.classify import backbone_arch, hidden_size, pool_last
from llmlab.utils import plain

HEADS = ("linear", "mlp")


def build_head(kind: str, width: int, hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """The scalar head ``(B, width) -> (B, 1)``: ``linear`` (HF/TRL) or ``mlp`` (the seed's)."""
    if kind == "linear":
        head = nn.Linear(width, 1, bias=False)
    elif kind == "mlp":
        head = nn.Sequential(nn.Linear(width, int(hidden)), nn.ReLU(), nn.Dropout(float(dropout)), nn.Linear(int(hidden), 1))
    else:
        raise UserError(f"method.head={kind!r}: use linear (TRL/HF score head) or mlp (the seed's 2-layer head)")
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)  # HF's initializer_range: rewards start near 0 (loss ~ ln 2)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return head


class RewardModel(LLMLabModule):
    """A scalar reward head on a GPT's last real token, trained with Bradley–Terry; see the module docstring.

    Scoring: ``score_ids(input_ids, attention_mask) -> Tensor (B,)`` and ``score_texts(prompts,
    responses) -> Tensor (B,)`` (prompts rendered with the run's template, responses + EOS as in training).
    """

    name = "reward"
    loss_is_token_nll = False  # a loss over pairs: no perplexity
    eval_ppl = False

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, head: str = "linear",
                 head_hidden: int = 256, head_dropout: float = 0.1, freeze_backbone: bool = False,
                 center_rewards_coefficient: float | None = None, **method_keys) -> None:
        super().__init__(models, plain(optim))
        self.save_hyperparameters(ignore=["models"], logger=False)  # load_method rebuilds the head from them
        if backbone_arch(self.model) != "gpt":
            raise UserError("method=reward scores the last token of a causal model: use a GPT "
                            "(model=gpt_nano, or model.init_from=an SFT / GPT run)")
        if not 0.0 <= float(head_dropout) < 1.0:
            raise UserError(f"method.head_dropout={head_dropout}: use a probability in [0, 1), e.g. 0.1")
        self.center_rewards_coefficient = None if center_rewards_coefficient is None else float(center_rewards_coefficient)
        self.head = build_head(str(head), hidden_size(self.model, "gpt"), head_hidden, head_dropout)
        gpt = getattr(self.model, "_orig_mod", self.model)
        if freeze_backbone:
            from llmlab.peft import peft_config

            if peft_config(gpt):
                raise UserError("method.freeze_backbone=true trains the head only, so the peft tuner would not train: "
                                "drop peft=... or set method.freeze_backbone=false")
            gpt.requires_grad_(False)  # outside the optimizer and the trainable count
        in_use = {id(p) for n, p in gpt.named_parameters(remove_duplicate=False) if not n.startswith("lm_head.")}
        for p in gpt.lm_head.parameters():  # the LM head is never run (tied to wte by default: then it stays)
            if id(p) not in in_use:
                p.requires_grad_(False)
        weight = next((p for p in gpt.parameters() if p.is_floating_point()), None)
        if weight is not None:
            self.head.to(device=weight.device, dtype=weight.dtype)

    # ----------------------------------------------------------------- the model
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards ``(B,)`` of token rows (right or left padded; no mask = no padding)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.model.encode(input_ids, attention_mask=attention_mask)  # (B, T, C)
        return self.head(pool_last(h, attention_mask)).squeeze(-1).float()  # (B,)

    def model_step(self, batch: dict) -> Step:
        from llmlab.alignment.losses import bradley_terry_loss

        rewards = self(batch["input_ids"], batch["attention_mask"])  # (2B,): chosen rows, then rejected rows
        n = rewards.size(0) // 2
        chosen, rejected = rewards[:n], rewards[n:]
        loss, metrics = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"))  # accuracy, margin
        if self.center_rewards_coefficient:  # TRL / Eisenstein et al. 2023: keep rewards centred on 0
            loss = loss + self.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        metrics["mean_reward"] = rewards.detach().mean()
        return Step(loss, n, {k: (v, n) for k, v in metrics.items()})  # weights = pairs

    # ----------------------------------------------------------------- scoring (PPO's reward=model)
    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards ``(B,)`` of prompt + response (+ EOS) rows, either padding side, in eval mode."""
        from llmlab.inference.generate import eval_mode

        device = next(self.head.parameters()).device
        mask = None if attention_mask is None else attention_mask.to(device)
        with eval_mode(self):
            return self(input_ids.to(device), mask)

    def score_texts(self, prompts: list[str], responses: list[str], *, rendered: bool = False,
                    batch_size: int = 64) -> torch.Tensor:
        """Rewards ``(B,)`` of raw ``prompts`` (rendered with the run's template unless ``rendered``) and
        their ``responses``, encoded as training encoded them (``encode_pair``: prompt | response | EOS)."""
        from llmlab.alignment.rollout import left_pad
        from llmlab.data.instructions import Instruction, encode_pair

        if len(prompts) != len(responses):
            raise UserError(f"{len(prompts)} prompts but {len(responses)} responses: pass one response per prompt")
        if self.tokenizer is None:
            raise UserError("this reward model has no tokenizer attached: load it with load_method(ckpt_path)")
        template = None if rendered else self.template()
        pairs = [(p, r) if template is None else template.render(Instruction(p, r))  # as PreferenceDataModule renders
                 for p, r in zip(prompts, responses)]
        rows = [encode_pair(self.tokenizer, p, r, self.max_length(), where="a prompt to score")[0] for p, r in pairs]
        out = []
        for i in range(0, len(rows), batch_size):
            ids, mask = left_pad(rows[i:i + batch_size], self.tokenizer.eos_id or 0)  # the last token is each row's own
            out.append(self.score_ids(ids, mask).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def template(self):
        """The run's prompt template (the ``template`` group the reward model was trained with)."""
        from llmlab.data.templates import build_template

        return build_template((self.run_config or {}).get("template"))

    def max_length(self) -> int:
        """Tokens per row: the data's ``max_length`` within the model's context (minus virtual tokens)."""
        gpt = getattr(self.model, "_orig_mod", self.model)
        context = int(gpt.config.block_size) - int(getattr(gpt, "num_virtual_tokens", 0) or 0)
        length = ((self.run_config or {}).get("data") or {}).get("max_length") or context
        return min(int(length), context)

    def infer(self, cfg) -> float:
        """``llmlab infer ckpt_path=RM prompt="..." text="response"``: print the reward."""
        prompt, text = cfg.get("prompt"), cfg.get("text")
        if text is None:
            raise UserError('the reward model scores a response to a prompt: llmlab infer ckpt_path=RM '
                            'prompt="Continue joyfully: The day" text=" was bright and lovely."')
        unescape = lambda s: str(s).replace("\\n", "\n")  # noqa: E731 - a newline typed on the command line
        reward = float(self.score_texts([unescape(prompt or "")], [unescape(text)])[0])
        print(f"reward: {reward:.4f}")
        return reward

