"""Edge cases a QA pass found in the recipe's options, run folders, healing, `memtune slots`,
the renderings and self-paraphrases, and answer scoring given the question (each was a failure
once, or is behaviour checked along the way)."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from memtune.batches import IGNORE, Example
from memtune.data import QA
from memtune.errors import MemtuneError
from memtune.train import LearnConfig, make_method, train
from tiny import tiny_memory_config, tiny_model

FACTS = [QA("What is the capital of Zorbia?", "Quenta")]


# -- 1. refused options ------------------------------------------------------------------------

@pytest.mark.parametrize("config", [dict(method="full", top_t=5), dict(method="full", ranker="count"),
                                    dict(method="lora", optimizer="sgd"), dict(method="full", top_t=-5)])
def test_python_learn_refuses_smf_options_for_dense_methods(tokenizer, config):
    import memtune

    with pytest.raises(MemtuneError, match="is for SMF"):
        memtune.learn(tiny_model(), tokenizer, FACTS, LearnConfig(**config, epochs=1), progress=False)


def test_python_learn_refuses_lora_options_for_smf(tokenizer):
    import memtune
    from memtune.recipe import RecipeConfig

    with pytest.raises(MemtuneError, match="is for LoRA"):
        memtune.learn(tiny_model(), tokenizer, FACTS, LearnConfig(ranker="count", lora_rank=4, epochs=1),
                      RecipeConfig(related=0, n_keys=4, calibrate="none"), progress=False)


def test_experiment_sweep_over_method_accepts_that_methods_options():
    from memtune.experiment import expand_methods

    runs = expand_methods([{"method": ["lora"], "lora_rank": 4}])
    assert [r.learn.lora_rank for r in runs] == [4]


def test_experiment_refuses_until_learned_it_does_not_use():
    from memtune.experiment import expand_methods

    with pytest.raises(MemtuneError):
        expand_methods([{"method": "full", "until_learned": True}])


# -- 2. run folders ----------------------------------------------------------------------------

def test_run_folder_of_a_run_without_steps_has_metrics_jsonl(tmp_path):
    from memtune.io import METRICS, run_folder

    with run_folder(tmp_path / "run") as folder:
        folder.write_config({})
        folder.write_results({"steps": 0})
    assert (tmp_path / "run" / METRICS).is_file()


def test_run_folder_exception_keeps_the_old_run_and_leaves_no_temporary(tmp_path):
    from memtune.io import run_folder

    with run_folder(tmp_path / "run") as folder:
        folder.write_results({"old": True})
    with pytest.raises(RuntimeError), run_folder(tmp_path / "run", overwrite=True) as folder:
        folder.log({"step": 1})
        raise RuntimeError("boom")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# -- 3. heal -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["lm_weight", "lr", "value_lr"])
def test_heal_refuses_infinite_values(field):
    from memtune.heal import HealConfig

    with pytest.raises(MemtuneError):
        HealConfig(**{field: float("inf")})


# -- 5. until learned ---------------------------------------------------------------------------

def _examples(n: int) -> list[Example]:
    return [Example([7, 8 + i, 9, 10], [-100, -100, 9, 10]) for i in range(n)]


def test_until_learned_max_steps_mid_pass_leaves_every_answer_fresh(tokenizer):
    """max_steps stops in the middle of a pass: the final check asks every example after the
    last step (the still-wrong ones, then the others)."""
    from memtune.retrofit import retrofit

    model = retrofit(tiny_model(), tiny_memory_config())
    steps, asked_at = [0], {}

    def check(m, indices):
        for i in indices:
            asked_at[i] = steps[0]
        return [i == 0 for i in indices]  # 0 right throughout, the others never

    cfg = LearnConfig(ranker="count", top_t=8, epochs=10, batch_size=1, max_steps=5)
    _, history = train(model, tokenizer, _examples(4), cfg, make_method(cfg, None), progress=False,
                       learned=check, on_step=lambda r: steps.__setitem__(0, r["step"]))
    assert len(history) == 5 and history[-1]["epoch"] == 2  # stopped in pass 2
    assert asked_at == {0: 5, 1: 5, 2: 5, 3: 5}


def test_until_learned_all_right_from_the_start_trains_nothing(tokenizer):
    from memtune.retrofit import retrofit

    model = retrofit(tiny_model(), tiny_memory_config())
    calls = []
    cfg = LearnConfig(ranker="count", top_t=8, epochs=1, batch_size=2)
    _, history = train(model, tokenizer, _examples(3), cfg, make_method(cfg, None), progress=False,
                       learned=lambda m, idx: calls.append(list(idx)) or [True] * len(idx))
    assert history == [] and calls == [[0, 1, 2]]


# -- 6. renderings / self-paraphrases ----------------------------------------------------------

# statements exactly as memtune's own `countries` source writes them (56 of its 2,842 facts)
SUBJECT_FIRST = [
    QA("What is the capital of Djibouti?", "Djibouti", statement="The capital of Djibouti is Djibouti."),
    QA("What is the capital of Tunisia?", "Tunis", statement="The capital of Tunisia is Tunis."),
    QA("What is an official language of Kyrgyzstan?", "Kyrgyz",
       statement="An official language of Kyrgyzstan is Kyrgyz."),
    QA("What is the capital of São Tomé and Príncipe?", "São Tomé",
       statement="The capital of São Tomé and Príncipe is São Tomé."),
]


@pytest.mark.parametrize("item", SUBJECT_FIRST, ids=lambda q: q.answer)
def test_plain_rendering_puts_the_loss_on_the_answer(tokenizer, item):
    from memtune.targets import encode_facts

    fx = encode_facts([item], tokenizer, "statement", "target", renderings=("chat", "plain"))
    plain = [e for e, r in zip(fx.examples, fx.renderings) if r == "plain"]
    assert len(plain) == 1
    e = plain[0]
    first = next(k for k, t in enumerate(e.labels) if t != IGNORE)
    before = tokenizer.decode(e.input_ids[:first])
    assert before.rstrip().endswith(item.statement[: item.statement.rfind(item.answer)].rstrip())
    assert tokenizer.decode([t for t in e.labels if t != IGNORE]).strip() == item.answer


def test_self_paraphrase_of_a_question_naming_its_answer_can_be_kept():
    from memtune.paraphrases import paraphrase_fault

    assert paraphrase_fault("What is the capital of Djibouti?", "Which city is the capital of Djibouti?",
                            ["Djibouti"], {"djibouti"}) is None


@pytest.mark.parametrize("value", ["plain", "chat,chat", "chat,bogus", (), "CHAT"])
def test_bad_renderings_are_refused(value):
    from memtune.recipe import RecipeConfig

    with pytest.raises(MemtuneError, match="renderings="):
        RecipeConfig(renderings=value)


# -- 4. slots ----------------------------------------------------------------------------------

def test_unrelated_pairs_memory_does_not_grow_with_all_pairs():
    from memtune.slot_access import unrelated_pairs

    tracemalloc.start()
    pairs = unrelated_pairs(2000, 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(pairs) == 10 and peak < 50e6, f"peak {peak / 1e6:.0f} MB"


# -- 7. is_correct -----------------------------------------------------------------------------

FALSE_NEGATIVES = [
    # the question's own "is X" / "of X" makes the answer's mention look like a copy of it
    ("It is Djibouti.", "Djibouti", "What is Djibouti's capital?"),
    ("The capital is Singapore.", "Singapore", "What is Singapore's capital?"),
    ("The capital of Djibouti is the city of Djibouti.", "Djibouti", "What is the capital of Djibouti?"),
    ("The capital of Luxembourg is the city of Luxembourg.", "Luxembourg", "What is the capital of Luxembourg?"),
    ("The capital of Australia is Canberra.", "Canberra", "Is Canberra or Sydney the capital of Australia?"),
    ("It is Canberra.", "Canberra", "Is Canberra or Sydney the capital of Australia?"),
]
FALSE_POSITIVES = [
    # the question's subject, spelt without its accents or with "&": not recognised as a copy
    ("The capital of Sao Tome and Principe is unknown.", ["São Tomé", "Sao Tome"],
     "What is the capital of São Tomé and Príncipe?"),
    ("São Tomé & Príncipe is an island nation.", ["São Tomé", "Sao Tome"],
     "What is the capital of São Tomé and Príncipe?"),
]


@pytest.mark.parametrize("prediction, answer, question", FALSE_NEGATIVES)
def test_is_correct_credits_answers_named_like_the_question(prediction, answer, question):
    from memtune.probes.match import is_correct

    assert is_correct(prediction, answer, question)


@pytest.mark.parametrize("prediction, answers, question", FALSE_POSITIVES)
def test_is_correct_does_not_credit_a_respelt_copy_of_the_question(prediction, answers, question):
    from memtune.probes.match import is_correct

    assert not is_correct(prediction, answers, question)


@pytest.mark.parametrize("prediction, answer, question", [
    ("The capital of Djibouti is Djibouti.", "Djibouti", "What is the capital of Djibouti?"),
    ("The capital of Luxembourg is Luxembourg.", "Luxembourg", "What is the capital of Luxembourg?"),
    ("The capital of Kuwait is Kuwait City.", "Kuwait City", "What is the capital of Kuwait?"),
    ("Guatemala City is the capital of Guatemala.", "Guatemala City", "What is the capital of Guatemala?"),
    ("The capital of Vatican City State is Vatican City.", "Vatican City",
     "What is the capital of Vatican City State?"),
    ("The Berlin Wall fell in 1989.", "1989", "In what year did the Berlin Wall fall?"),
    ("The chemical symbol of gold is Au.", "Au", "What is the chemical symbol of gold?"),
    ("The Mona Lisa was painted by Leonardo da Vinci.", "Leonardo da Vinci", "Who painted the Mona Lisa?"),
    ("The capital of São Tomé and Príncipe is São Tomé.", "São Tomé", "What is the capital of São Tomé and Príncipe?"),
])
def test_is_correct_credits_realistic_answers(prediction, answer, question):
    from memtune.probes.match import is_correct

    assert is_correct(prediction, answer, question)


def test_memtune_learn_stays_the_function_whatever_is_imported():
    import memtune
    import memtune.runs  # noqa: F401 (what the CLI imports)
    from memtune.commands import learn as _  # noqa: F401

    assert callable(memtune.learn) and memtune.learn.__module__ == "memtune.recipe"


def test_a_memory_checkpoint_refuses_what_only_a_fresh_retrofit_does(tokenizer):
    import memtune
    from memtune.recipe import RecipeConfig
    from memtune.retrofit import retrofit

    model = retrofit(tiny_model(), tiny_memory_config())
    with pytest.raises(MemtuneError, match="--calibrate is for a fresh retrofit"):
        memtune.learn(model, tokenizer, FACTS, LearnConfig(ranker="count", epochs=1), RecipeConfig(calibrate="whiten"),
                      progress=False)
    with pytest.raises(MemtuneError, match="--n-keys is for a fresh retrofit"):
        memtune.learn(model, tokenizer, FACTS, LearnConfig(ranker="count", epochs=1), RecipeConfig(n_keys=3),
                      progress=False)
