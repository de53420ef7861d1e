"""What a fact is trained as (`memtune.targets`): each rendering's exact tokens and where its
loss is, and the default left exactly as it was before renderings existed."""

from __future__ import annotations

import pytest

from memtune.batches import IGNORE, Example, encode_qa
from memtune.data import QA
from memtune.errors import MemtuneError
from memtune.prompts import answer_opening
from memtune.targets import encode_facts, fact_examples, mask_after, mask_predicted, mask_prefix
from tiny import bos_tokenizer, tiny_model, tiny_tokenizer

CHAD = QA("What is the capital of Chad?", "N'Djamena", statement="The capital of Chad is N'Djamena.",
          paraphrases=["Which city is the capital of Chad?", "Chad's capital is which city?"])
ZORBIA = QA("Who founded Zorbia?", "Quenta", statement="Zorbia was founded by Quenta.")
ALL = ("chat", "short", "plain", "qa-text")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(tok, e: Example) -> str:
    return tok.decode([t for t, y in zip(e.input_ids, e.labels) if y != IGNORE])


def loss_block(e: Example) -> tuple[int, int]:
    """(first, end) of the labelled positions, asserting they are one contiguous block."""
    at = [t for t, y in enumerate(e.labels) if y != IGNORE]
    assert at == list(range(at[0], at[-1] + 1))
    assert all(e.labels[t] == e.input_ids[t] for t in at)
    return at[0], at[-1] + 1


def one(rendering: str, tok, item: QA = CHAD, **kw) -> Example:
    [e] = fact_examples([item], tok, "statement", "target", renderings=(rendering,), **kw)
    return e


def test_chat_is_the_question_in_the_template_then_the_target(tokenizer):
    e = one("chat", tokenizer)
    prompt = ids(tokenizer, "<|user|>What is the capital of Chad?<|end|><|assistant|>")
    target = ids(tokenizer, "The capital of Chad is N'Djamena.<|end|>")
    assert e == Example(prompt + target, [IGNORE] * len(prompt) + target)


def test_short_is_the_question_in_the_template_then_the_bare_answer(tokenizer):
    e = one("short", tokenizer)
    prompt = ids(tokenizer, "<|user|>What is the capital of Chad?<|end|><|assistant|>")
    answer = ids(tokenizer, "N'Djamena<|end|>")
    assert e == Example(prompt + answer, [IGNORE] * len(prompt) + answer)
    assert trained(tokenizer, e) == "N'Djamena<|end|>"


def test_qa_text_is_the_question_without_the_template(tokenizer):
    e = one("qa-text", tokenizer)
    prompt = ids(tokenizer, "Question: What is the capital of Chad?\nAnswer:")
    answer = ids(tokenizer, " N'Djamena<|end|>")
    assert e == Example(prompt + answer, [IGNORE] * len(prompt) + answer)
    assert tokenizer.decode(e.input_ids) == "Question: What is the capital of Chad?\nAnswer: N'Djamena<|end|>"


def test_plain_is_the_statement_as_text_with_the_loss_on_the_answer_only(tokenizer):
    e = one("plain", tokenizer)
    assert e.input_ids == ids(tokenizer, "The capital of Chad is N'Djamena.")  # no template, no EOS
    first, end = loss_block(e)
    assert trained(tokenizer, e) == "N'Djamena"
    assert tokenizer.decode(e.input_ids[:first]) == "The capital of Chad is "
    assert tokenizer.decode(e.input_ids[end:]) == "."


def test_plain_after_a_bos_and_a_token_that_holds_the_answers_space():
    """A tokenizer that writes BOS before plain text gets it once; a token spanning the space
    and the answer's first letters is the answer's (it overlaps the answer)."""
    tok = bos_tokenizer()
    e = one("plain", tok, ZORBIA)
    assert e.input_ids == [tok.bos_token_id] + ids(tok, "Zorbia was founded by Quenta.")
    first, end = loss_block(e)
    assert tok.decode(e.input_ids[first:end]).strip() == "Quenta"
    assert tok.decode(e.input_ids[end:]) == "."
    assert tok.decode(e.input_ids[:first]).startswith("<s>Zorbia was founded by")


@pytest.mark.parametrize("statement", [None, "Nobody knows.", "N'Djamena is the capital of Chad."])
def test_plain_leaves_out_a_statement_without_words_before_its_answer(tokenizer, statement):
    item = QA(CHAD.question, CHAD.answer, statement=statement)
    r = encode_facts([item], tokenizer, "statement", "target", renderings=("chat", "plain"))
    assert r.renderings == ["chat"]
    assert r.summary(1, ("chat", "plain"))["items_without"] == {"chat": 0, "plain": 1}


def test_plain_cut_to_max_length_keeps_its_answer(tokenizer):
    full = one("plain", tokenizer)
    e = one("plain", tokenizer, max_length=len(full.input_ids) - 3)
    assert e.input_ids == full.input_ids[3:] and e.labels == full.labels[3:]
    with pytest.raises(MemtuneError, match="max_length=4"):
        one("plain", tokenizer, max_length=4)


@pytest.mark.parametrize("rendering", ALL)
def test_every_rendering_trains_what_the_fact_says_never_the_question(tokenizer, rendering):
    for item in (CHAD, ZORBIA):
        e = one(rendering, tokenizer, item)
        first, _ = loss_block(e)
        context = tokenizer.decode(e.input_ids[:first])
        assert item.answer in trained(tokenizer, e) and item.answer not in context
        if rendering != "plain":
            assert item.question in context and item.question not in trained(tokenizer, e)


def test_examples_are_grouped_by_fact_then_rendering_then_phrasing(tokenizer):
    more_q = [["Name the capital of Chad?"], []]
    more_s = [["Chad has its capital in N'Djamena."], []]
    r = encode_facts([CHAD, ZORBIA], tokenizer, "statement", "target", augment=1, renderings=ALL,
                     more_questions=more_q, more_statements=more_s)
    assert r.items == [0] * 11 + [1] * 4
    assert r.renderings == ["chat"] * 3 + ["short"] * 3 + ["plain"] * 2 + ["qa-text"] * 3 + list(ALL)
    prompts = [tokenizer.decode(e.input_ids) for e in r.examples[:3]]
    assert [p.split("<|end|>")[0] for p in prompts] == ["<|user|>What is the capital of Chad?",
                                                         "<|user|>Which city is the capital of Chad?",
                                                         "<|user|>Name the capital of Chad?"]
    assert tokenizer.decode(r.examples[7].input_ids) == "Chad has its capital in N'Djamena."
    assert r.summary(2, ALL)["per_rendering"] == {"chat": 4, "short": 4, "plain": 3, "qa-text": 4}
    # the second paraphrase is held out: in no example
    assert not any("Chad's capital is" in tokenizer.decode(e.input_ids) for e in r.examples)


def test_a_rendering_that_repeats_an_earlier_one_adds_nothing(tokenizer):
    """With the bare answer as target, short is chat: trained once."""
    r = encode_facts([CHAD], tokenizer, "answer", "target", augment=1, renderings=("chat", "short", "qa-text"))
    assert r.renderings == ["chat", "chat", "qa-text", "qa-text"]
    plain_tok = tiny_tokenizer(chat=False)  # without a template, chat is qa-text
    r = encode_facts([CHAD], plain_tok, "answer", "target", renderings=("chat", "qa-text"))
    assert r.renderings == ["chat"]


def test_diverge_trims_every_rendering_as_it_trims_chat(tokenizer):
    model = tiny_model(init_range=0.5)
    r = encode_facts([CHAD, ZORBIA], tokenizer, "statement", "diverge", renderings=ALL, model=model)
    expected = fact_examples([CHAD, ZORBIA], tokenizer, "statement", "target", renderings=ALL)
    mask_predicted(model, expected, tokenizer.pad_token_id)
    assert r.examples == expected


@pytest.mark.parametrize("renderings, message", [(("chat", "tweet"), "tweet"), (("chat", "chat"), "chat,chat"),
                                                 ((), "renderings=''")])
def test_bad_renderings(tokenizer, renderings, message):
    with pytest.raises(MemtuneError, match=message):
        fact_examples([CHAD], tokenizer, renderings=renderings)


# -- the default, bit for bit: the implementation before renderings, kept as the reference


def _reference_fact_examples(items, tokenizer, target, loss, augment, max_length=256):
    pairs, prefixes = [], []
    for q in items:
        stated = target == "statement" and bool(q.statement)
        text = q.statement if stated else q.answer
        cut = text.find(q.answer) if stated and loss == "answer" else -1
        for question in [q.question, *q.paraphrases[:augment]]:
            pairs.append((question, text))
            prefixes.append(text[:cut].rstrip() if cut > 0 else "")
    examples = encode_qa(tokenizer, pairs, max_length)
    opening = answer_opening(tokenizer)
    for example, prefix in zip(examples, prefixes):
        if prefix:
            mask_prefix(example, tokenizer(opening + prefix, add_special_tokens=False)["input_ids"])
    return examples


@pytest.mark.parametrize("target", ["answer", "statement"])
@pytest.mark.parametrize("loss", ["target", "answer"])
@pytest.mark.parametrize("make", [tiny_tokenizer, bos_tokenizer, lambda: tiny_tokenizer(chat=False)])
def test_the_default_is_the_examples_of_before(target, loss, make):
    tok = make()
    items = [CHAD, ZORBIA, QA("Who?", "Nobody", paraphrases=["Who?"])]  # a paraphrase equal to its question
    for augment in (0, 1, 2):
        got = fact_examples(items, tok, target, loss, augment)
        assert got == _reference_fact_examples(items, tok, target, loss, augment)
        r = encode_facts(items, tok, target, loss, augment)
        assert r.examples == got and set(r.renderings) == {"chat"}
        assert r.items == [i for i, q in enumerate(items) for _ in [q.question, *q.paraphrases[:augment]]]


@pytest.mark.parametrize("target, loss, taught", [
    ("statement", "target", "The capital of Chad is N'Djamena"),
    ("statement", "answer", "N'Djamena"),
    ("answer", "target", "N'Djamena"),
])
def test_end_loss_off_stops_the_loss_at_the_answer(tokenizer, target, loss, taught):
    [on] = fact_examples([CHAD], tokenizer, target, loss)
    [off] = fact_examples([CHAD], tokenizer, target, loss, end_loss=False)
    assert off.input_ids == on.input_ids  # the same text; only where the loss is differs
    assert trained(tokenizer, on).strip() in (taught + ".<|end|>", taught + "<|end|>")
    assert trained(tokenizer, off).strip() == taught
    first, end = loss_block(off)
    assert first == loss_block(on)[0] and end < loss_block(on)[1]
    assert off.labels[end:] == [IGNORE] * (len(off.labels) - end)


def test_end_loss_off_leaves_a_target_whose_answer_merges_with_what_follows():
    e = Example([1, 2, 3, 4, 5], [IGNORE, 2, 3, 4, 5])
    mask_after(e, [2, 9])  # the target's tokens do not start with the head's
    assert e.labels == [IGNORE, 2, 3, 4, 5]
    mask_after(e, [2, 3])
    assert e.labels == [IGNORE, 2, 3, IGNORE, IGNORE]


@pytest.mark.parametrize("rendering", ["short", "qa-text"])
def test_end_loss_off_stops_the_loss_at_the_answer_in_every_question_rendering(tokenizer, rendering):
    on, off = one(rendering, tokenizer), one(rendering, tokenizer, end_loss=False)
    assert off.input_ids == on.input_ids
    assert trained(tokenizer, on).strip() == "N'Djamena<|end|>" and trained(tokenizer, off).strip() == "N'Djamena"


def test_end_loss_off_still_trains_a_bare_answer_once(tokenizer):
    r = encode_facts([CHAD], tokenizer, "answer", "target", renderings=("chat", "short"), end_loss=False)
    assert r.renderings == ["chat"]  # short is chat's example again: not repeated
