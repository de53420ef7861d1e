"""Answer matching: Unicode folding for every score; "contains" credits the entity asked for only."""

import unicodedata

import pytest

from memtune.probes import exact_match, is_correct, normalize_answer, token_f1
from memtune.probes.match import fold


@pytest.mark.parametrize("typed, plain", [
    ("N’Djamena", "N'Djamena"),            # typographic apostrophe
    ("Côte d’Ivoire", "Côte d'Ivoire"),
    ("Côte dʼIvoire", "Côte d'Ivoire"),    # modifier letter apostrophe
    ("N´Djamena", "N'Djamena"),             # acute accent as an apostrophe
    ("“Paris”", '"Paris"'),                 # typographic quotes
    ("Guinea‑Bissau", "Guinea-Bissau"),     # non-breaking hyphen
    ("Port–au–Prince", "Port-au-Prince"),   # en dash
    ("Ｐａｒｉｓ", "Paris"),                  # full-width letters (NFKC)
    ("São\u00a0Tomé", "São Tomé"),          # non-breaking space
    (unicodedata.normalize("NFD", "Bogotá"), "Bogotá"),  # decomposed accent
    ("Para\u00adguay", "Paraguay"),            # soft hyphen
    ("Ban\u200bgkok", "Bangkok"),              # zero-width space
    ("STRASSE", "Straße"),                     # full case folding
    ("ﬁnland", "finland"),                     # ligature (NFKC)
])
def test_every_score_folds_unicode_and_typography(typed, plain):
    assert normalize_answer(typed) == normalize_answer(plain)
    assert exact_match(typed, [plain]) and exact_match(plain, [typed])
    assert token_f1(typed, [plain]) == 1.0 and token_f1(plain, [typed]) == 1.0
    assert is_correct(f"The answer is {typed}.", [plain]) and is_correct(f"The answer is {plain}.", [typed])


def test_issue_cases_of_unicode_answers():
    assert is_correct("The capital of Chad is N’Djamena.", ["N'Djamena"])
    assert exact_match("Côte d’Ivoire", ["Côte d'Ivoire"]) and token_f1("Côte d’Ivoire", ["Côte d'Ivoire"]) == 1.0
    assert fold("it’s — “x”") == "it's - \"x\""


def test_short_answers_match_verbatim_after_folding():
    assert is_correct("Its code is ＩＮ.", ["IN"])         # full-width, NFKC
    assert is_correct("Dial ＋33 first.", ["+33"])
    assert not is_correct("It lies in Asia.", ["IN"])


@pytest.mark.parametrize("prediction, answers", [
    ("The capital of France is Paris.", ["Paris"]),
    ("Paris", ["Paris"]),
    ("Paris, France.", ["Paris"]),
    ("Paris (France) is the capital.", ["Paris"]),
    ("It's not Lyon, it's Paris.", ["Paris"]),
    ("Paris, not Lyon.", ["Paris"]),
    ("No, the capital of France is Paris.", ["Paris"]),
    ("I'm not sure, but I think it is Paris.", ["Paris"]),
    ("The capital is Khartoum, in Sudan.", ["Sudan"]),
    ("Sudan's capital is Khartoum.", ["Sudan"]),
    ("The Capital Of France Is Paris", ["Paris"]),
    ("The capital of South Sudan is Juba.", ["South Sudan"]),
    ("It is the United States of America.", ["United States"]),
    ("The Bahamas.", ["The Bahamas"]),
])
def test_contains_credits_sentences_that_name_the_answer(prediction, answers):
    assert is_correct(prediction, answers)


@pytest.mark.parametrize("prediction, answers", [
    ("The capital is Juba, in South Sudan.", ["Sudan"]),            # a longer name of another entity
    ("It is Papua New Guinea.", ["Guinea"]),
    ("Equatorial Guinea", ["Guinea"]),
    ("Guinea-Bissau", ["Guinea"]),
    ("It is Mexico City.", ["Mexico"]),
    ("North Korea", ["Korea"]),
    ("It is the United States Virgin Islands.", ["United States"]),
    ("Not Paris; the capital of France is Lyon.", ["Paris"]),       # negated mentions
    ("It is not Paris.", ["Paris"]),
    ("The capital isn’t Paris, it is Lyon.", ["Paris"]),
    ("Neither Lyon nor Paris.", ["Paris"]),
    ("Paris is not the capital of France; Lyon is.", ["Paris"]),
    ("The capital is Lyon rather than Paris.", ["Paris"]),
    ("Its code is not IN.", ["IN"]),
])
def test_contains_refuses_longer_names_and_negations(prediction, answers):
    assert not is_correct(prediction, answers)


def test_any_mention_that_names_the_answer_is_enough():
    assert is_correct("Juba is in South Sudan; Khartoum is the capital of Sudan.", ["Sudan"])
    assert is_correct("Not Lyon. Paris.", ["Paris"])


@pytest.mark.parametrize("prediction, answer, question, right", [
    # the answer only inside the question's subject, repeated: not named
    ("The capital of Saint-Pierre and-Miquelon is Saint-Bartholomele.", "Saint-Pierre",
     "What is the capital of Saint Pierre and Miquelon?", False),
    ("São Tomé and Príncipe is a sovereign state in the Gulf of Guinea.", "São Tomé",
     "What is the capital of São Tomé and Príncipe?", False),
    ("The capital of Djibouti is Obock.", "Djibouti", "What is the capital of Djibouti?", False),
    # named after the repeated subject: right
    ("The capital of Saint Pierre and Miquelon is Saint-Pierre.", "Saint-Pierre",
     "What is the capital of Saint Pierre and Miquelon?", True),
    ("The capital of Djibouti is Djibouti.", "Djibouti", "What is the capital of Djibouti?", True),
    ("Djibouti", "Djibouti", "What is the capital of Djibouti?", True),
    ("The capital of Kuwait is Kuwait City.", "Kuwait City", "What is the capital of Kuwait?", True),
    ("The chemical symbol of dubnium is Db.", "Db", "What is the chemical symbol of dubnium?", True),
])
def test_contains_given_the_question_does_not_credit_a_copy_of_it(prediction, answer, question, right):
    assert is_correct(prediction, answer, question) is right
    assert is_correct(prediction, answer) is True  # without the question every one of these counts
