"""Templates: the seed's and Alpaca's exact strings, an exact prompt/response split, masking that
leaves exactly the response + EOS for every template, BPE-exact boundaries, answer parsing."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from llmlab.data.instructions import Instruction, collate_sft, encode_pair
from llmlab.data.templates import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    FLAN_FALLBACK,
    FLAN_TEMPLATES,
    TEMPLATES,
    Template,
    answer_of,
    build_template,
    exact_match,
    normalize_answer,
    split_template,
)
from llmlab.data.tokenizers import CharTokenizer, build_tokenizer
from llmlab.errors import UserError

# spec seed000_part2 §8.2, copied by hand from the spec
SEED_STRINGS = {
    "qa": ["Question: {input}\nAnswer: {output}", "Answer the following question: {input}\n{output}",
           "Q: {input}\nA: {output}"],
    "classification": ["Task: Classify the text\nInput: {input}\nLabel: {output}",
                       "Determine the category: {input}\nCategory: {output}"],
    "reasoning": ["Problem: {input}\nLet's think step by step. {chain}\nTherefore, the answer is: {output}",
                  "Q: {input}\nA: {chain} The answer is {output}."],
}

EXAMPLES = [
    Instruction("What is 2+2?", "4", chain="First, we add 2 and 2. 2 plus 2 equals 4.", task_type="reasoning"),
    Instruction('Is this positive? "I love it"', "positive", task_type="classification"),
    Instruction("Who speaks this line?", "Hamlet", input="To be, or not to be, that is the question:",
                task_type="classification"),
    Instruction("Name a colour.", "Blue, like the sea.", task_type="qa", system="You are terse."),
    Instruction("And in French?", "Bleu.", task_type="translation", history=(("user", "Name a colour."), ("assistant", "Blue."))),
]


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2", [])


def test_seed_and_alpaca_strings_are_exact():
    assert {k: list(v) for k, v in FLAN_TEMPLATES.items()} == SEED_STRINGS
    assert FLAN_FALLBACK == "Input: {input}\nOutput: {output}"
    assert ALPACA_PROMPT_NO_INPUT == ("Below is an instruction that describes a task. Write a response that appropriately "
                                      "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
    assert ALPACA_PROMPT_INPUT == ("Below is an instruction that describes a task, paired with an input that provides "
                                   "further context. Write a response that appropriately completes the request.\n\n"
                                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")


@pytest.mark.parametrize("template", [t for ts in SEED_STRINGS.values() for t in ts] + [FLAN_FALLBACK])
def test_split_point_is_where_the_response_starts(template):
    fields = {"input": "What is 3 + 4?", "chain": "3 + 4 = 7.", "output": "7"}
    prompt, response = split_template(template, **fields)
    assert prompt + response == template.format(**fields)  # nothing lost, nothing added
    first = "{chain}" if "{chain}" in template else "{output}"
    assert prompt == template[: template.index(first)].format(**fields).rstrip(" ")
    assert response.lstrip(" ").startswith(fields["chain"] if first == "{chain}" else fields["output"])
    assert "7" not in prompt  # neither the chain nor the answer leaks into the (masked) prompt


def test_flan_choice_is_seeded_per_example_and_by_task_type():
    cot = build_template({"name": "flan", "include_cot": True, "seed": 3})
    qa_prompts = {split_template(t, input="Q?", output="")[0] for t in SEED_STRINGS["qa"]}
    seen = {cot.render(Instruction(f"What is {k}?", str(k)))[0].replace(f"What is {k}?", "Q?") for k in range(60)}
    assert seen == qa_prompts  # all three qa templates used, nothing else
    ex = EXAMPLES[0]
    assert cot.render(ex) == cot.render(ex)  # same example, same template (sha512 of the text, not hash())
    assert cot.render(ex) == build_template({"name": "flan", "include_cot": True, "seed": 3}).render(ex)
    choices = {build_template({"name": "flan", "include_cot": True, "seed": s}).render(ex)[0] for s in range(20)}
    assert len(choices) == 2  # the seed picks among the two reasoning templates
    # an explicit rng draws as random.choice would
    rng = random.Random(0)
    expected = SEED_STRINGS["reasoning"][random.Random(0).randrange(2)]
    fields = {"input": ex.instruction, "chain": ex.chain, "output": ex.output}
    assert cot.render(ex, rng) == split_template(expected, **fields)


def test_flan_templates_apply_with_and_without_cot():
    with_cot = build_template({"name": "flan", "include_cot": True, "seed": 0})
    without = build_template({"name": "flan", "include_cot": False, "seed": 0})
    reasoning, cls = EXAMPLES[0], EXAMPLES[1]
    prompt, response = with_cot.render(reasoning)
    chain = reasoning.chain
    assert response in (f" {chain}\nTherefore, the answer is: 4", f" {chain} The answer is 4.")  # the chain is response
    prompt, response = without.render(reasoning)  # no chain: answered as a question
    assert response.strip() == "4" and reasoning.chain not in prompt + response
    assert (prompt + response).replace(reasoning.instruction, "{input}").replace("4", "{output}") in SEED_STRINGS["qa"]
    prompt, response = with_cot.render(cls)  # classification templates are not dead code any more
    assert (prompt + response).replace(cls.instruction, "{input}").replace("positive", "{output}") in SEED_STRINGS["classification"]
    prompt, response = with_cot.render(EXAMPLES[4])  # unknown task type -> fallback
    assert prompt.endswith("Output:") and response == " Bleu."


def test_alpaca_chatml_plain_layouts():
    alpaca = build_template(None)
    assert alpaca == Template("alpaca")
    prompt, response = alpaca.render(EXAMPLES[2])
    assert prompt == ALPACA_PROMPT_INPUT.format(instruction=EXAMPLES[2].instruction, input=EXAMPLES[2].input) + "\n"
    assert response == "Hamlet"
    prompt, response = alpaca.render(EXAMPLES[0])
    assert prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="What is 2+2?") + "\n" and response == "4"
    assert build_template({"name": "alpaca", "include_cot": True}).render(EXAMPLES[0])[1] == \
        "First, we add 2 and 2. 2 plus 2 equals 4. The answer is 4."
    chat = build_template(OmegaConf.create({"name": "chatml", "include_cot": False, "seed": 1}))
    prompt, response = chat.render(EXAMPLES[3])
    assert prompt == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert response == "Blue, like the sea."
    prompt, _ = chat.render(EXAMPLES[4])  # earlier turns rendered into the prompt
    assert prompt == ("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
                      "<|im_start|>user\nAnd in French?<|im_end|>\n<|im_start|>assistant\n")
    assert build_template({"name": "plain"}).render(EXAMPLES[2]) == (
        "Who speaks this line?\nTo be, or not to be, that is the question:\n", "Hamlet")


def test_raw_prompts_render_like_examples():
    for name in TEMPLATES:
        t = build_template({"name": name, "include_cot": False, "seed": 5})
        assert t.prompt("Continue this line joyfully: But soft") == \
            t.render(Instruction("Continue this line joyfully: But soft", "what light"))[0]
    for name in TEMPLATES:  # a raw prompt and a free-text response: the prompt is the one generation gets
        for cot in (False, True):
            t = build_template({"name": name, "include_cot": cot, "seed": 5})
            prompt, response = t.render_raw("Continue this line joyfully: But soft", "what light")
            assert prompt == t.prompt("Continue this line joyfully: But soft") and response.lstrip(" ") == "what light"
            if name == "flan":  # "Answer:" / "A:" / "step by step." + " ..."; "question: ...\n" + "..."
                assert response == ("what light" if prompt.endswith("\n") else " what light")
    cot = build_template({"name": "flan", "include_cot": True, "seed": 5})
    assert cot.prompt("What is 5 + 6?").endswith(("Let's think step by step.", "A:"))  # asks for a chain
    held_out = Instruction("What is 5 + 6?", "11", task_type="reasoning")  # no chain: still asked to reason
    assert cot.prompt_of(held_out) == cot.render(Instruction("What is 5 + 6?", "11", chain="5 + 6 = 11.",
                                                             task_type="reasoning"))[0]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("cot", [False, True])
def test_masking_leaves_exactly_the_response_and_eos(gpt2, name, cot):
    template = build_template({"name": name, "include_cot": cot, "seed": 11})
    items, responses = [], []
    for ex in EXAMPLES:
        prompt, response = template.render(ex)
        ids, n_prompt = encode_pair(gpt2, prompt, response, max_length=512)
        items.append((ids, n_prompt))
        responses.append(response)
        assert gpt2.decode(ids[:n_prompt]) == prompt  # the boundary is a token boundary
    batch = collate_sft(items, pad=gpt2.eos_id)
    for b, response in enumerate(responses):
        row = batch["targets"][b]
        kept = row[row != -100]
        assert gpt2.decode(kept) == response + "<|endoftext|>"
        # pre-shifted: the target at t is the input at t + 1, on the response tokens only
        t = torch.nonzero(row != -100).squeeze(1)
        assert torch.equal(batch["input_ids"][b, t + 1], row[t])
        assert int(batch["attention_mask"][b].sum()) == len(items[b][0])


def test_masking_with_the_char_tokenizer_eos():
    template = build_template({"name": "flan", "include_cot": True, "seed": 0})
    texts = ["".join(template.render(ex)) for ex in EXAMPLES]
    tok = CharTokenizer("".join(texts), eos=True)
    for ex in EXAMPLES:
        prompt, response = template.render(ex)
        ids, n_prompt = encode_pair(tok, prompt, response)
        targets = collate_sft([(ids, n_prompt)], pad=tok.eos_id)["targets"][0]
        assert targets[targets != -100].tolist() == tok.encode(response) + [tok.eos_id]


def test_bpe_boundary_is_exact(gpt2):
    """Tokenised apart, prompt and response meet at a token boundary; with the split's spaces moved to
    the response, the ids are also what GPT-2 makes of the whole text (" 4" is one token), which the
    seed's split ("Answer: " | "4") is not."""
    for name in TEMPLATES:
        for cot in (False, True):
            template = build_template({"name": name, "include_cot": cot, "seed": 2})
            for ex in EXAMPLES:
                prompt, response = template.render(ex)
                ids, n_prompt = encode_pair(gpt2, prompt, response)
                assert ids[:n_prompt] == gpt2.encode(prompt) and ids[n_prompt:-1] == gpt2.encode(response)
                assert ids[:-1] == gpt2.encode(prompt + response), (name, cot, ex)
    naive = gpt2.encode("Question: What is 2+2?\nAnswer: ") + gpt2.encode("4")
    assert naive != gpt2.encode("Question: What is 2+2?\nAnswer: 4")


def test_truncation_keeps_the_prompt_and_the_eos(gpt2):
    ids, n_prompt = encode_pair(gpt2, "Q: name ten colours\nA:", " red blue green yellow black white", max_length=12)
    assert len(ids) == 12 and ids[-1] == gpt2.eos_id and gpt2.decode(ids[:n_prompt]) == "Q: name ten colours\nA:"
    with pytest.raises(UserError, match=r"row 7 is \d+ tokens, longer than the context"):
        encode_pair(gpt2, "a long prompt " * 10, "x", max_length=8, where="row 7")
    with pytest.raises(UserError, match="tokenizer.eos=true"):
        encode_pair(CharTokenizer("abc"), "a", "b")


def test_answer_parsing():
    assert answer_of("3 + 4 = 7.\nTherefore, the answer is: 7") == "7"
    assert answer_of("First 2 and 2. The answer is 4.") == "4"
    assert answer_of("the answer is 1,000.") == "1000"
    assert answer_of("The answer is 3. No wait, the answer is 5.") == "5"  # the last statement counts
    assert answer_of("Q: What is 2+2?\nA: 4") == "4"
    assert answer_of("I am not sure") is None and answer_of("") is None
    assert normalize_answer("  positive. ") == "positive" and normalize_answer("3.5") == "3.5"
    assert exact_match(" 4", "4") and exact_match("2 + 2 = 4. The answer is 4.", "4")
    assert not exact_match("The answer is 14.", "4") and not exact_match("2+2=4?", "4")  # the seed's substring test passed these


def test_bad_template_config_is_one_line():
    with pytest.raises(UserError, match="unknown template 'llama'"):
        build_template({"name": "llama"})
    with pytest.raises(UserError, match="unknown keys"):
        build_template({"name": "flan", "cot": True})
