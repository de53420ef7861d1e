"""Country facts from the `countryinfo` package: an offline, deterministic QA set.

About 240 countries and territories × 12 relations (capital, the country of a capital,
continent, subregion, currency code, official language, calling code, internet domain, demonym,
ISO codes, a neighbour) give ~2,500 questions. Each item's `question` is the phrasing used for
training; its `paraphrases` (two or more, always different) test whether a learned fact
generalises beyond the words it was trained on. Items are shuffled with a fixed seed so that any
prefix (`limit=`) mixes relations and countries.
"""

from __future__ import annotations

import functools
import logging
import random
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memtune.data import QA
from memtune.errors import MemtuneError

log = logging.getLogger(__name__)

# ISO 639 codes used by countryinfo -> English language names.
LANGUAGES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "ay": "Aymara", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "ch": "Chamorro",
    "cnr": "Montenegrin", "cs": "Czech", "da": "Danish", "de": "German", "dv": "Dhivehi", "dz": "Dzongkha",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "ff": "Fula",
    "fi": "Finnish", "fj": "Fijian", "fo": "Faroese", "fr": "French", "ga": "Irish", "gn": "Guarani",
    "gv": "Manx", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian",
    "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian",
    "kg": "Kongo", "kk": "Kazakh", "kl": "Greenlandic", "km": "Khmer", "ko": "Korean", "ku": "Kurdish",
    "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish", "ln": "Lingala", "lo": "Lao", "lt": "Lithuanian",
    "lu": "Luba-Katanga", "lv": "Latvian", "mg": "Malagasy", "mh": "Marshallese", "mi": "Maori",
    "mk": "Macedonian", "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan",
    "nb": "Norwegian Bokmal", "nd": "Northern Ndebele", "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian Nynorsk",
    "no": "Norwegian", "nr": "Southern Ndebele", "ny": "Chichewa", "oc": "Occitan", "pa": "Punjabi",
    "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "rn": "Kirundi", "ro": "Romanian",
    "ru": "Russian", "rw": "Kinyarwanda", "sg": "Sango", "si": "Sinhala", "sk": "Slovak", "sl": "Slovene",
    "sm": "Samoan", "sn": "Shona", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "ss": "Swazi",
    "st": "Sotho", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "tg": "Tajik", "th": "Thai",
    "ti": "Tigrinya", "tk": "Turkmen", "tn": "Tswana", "to": "Tongan", "tr": "Turkish", "ts": "Tsonga",
    "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "ve": "Venda", "vi": "Vietnamese", "xh": "Xhosa",
    "zh": "Chinese", "zu": "Zulu",
}
# Entries that duplicate another entry or no longer exist.
SKIP = {"Palestine, State of", "Holy See (Vatican City State)", "Serbia and Montenegro", "Antilles néerlandaises"}
DISPLAY = {"Virgin Islands, British": "the British Virgin Islands", "Virgin Islands, U.S.": "the U.S. Virgin Islands",
           "Sint Maarten (Dutch part)": "Sint Maarten", "Saint Martin (French part)": "Saint Martin"}
_THE_WORDS = ("United", "Islands", "Republic", "Netherlands", "Philippines", "Maldives", "Comoros", "Seychelles",
              "Federated States", "Isle of", "Territory", "Lands", "Caicos", "Grenadines")


@dataclass(frozen=True)
class Relation:
    """A question about a country; `templates[0]` is the trained phrasing, the rest paraphrases;
    `statement` states the fact as a sentence. `value` gives (answer, aliases, extra template
    fields) for a country, or None when the data lacks it."""

    name: str
    templates: tuple[str, ...]
    statement: str
    value: Callable[[dict[str, Any], "_Tables"], tuple[str, list[str], dict[str, str]] | None]


@dataclass(frozen=True)
class _Tables:
    by_alpha3: dict[str, dict[str, Any]]
    capital_count: dict[str, int]


def _plain(s: str) -> str:
    """`s` without accents (Brasília -> Brasilia), a common spelling in model outputs."""
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def _with_plain(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for s in values for v in (s, _plain(s))))


def country_name(info: dict[str, Any]) -> str:
    """The name as used inside a question (`the Netherlands`, `the United States`)."""
    name = info["name"]
    if name in DISPLAY:
        return DISPLAY[name]
    if name.startswith("The "):
        return "the " + name[4:]
    if any(w in name for w in _THE_WORDS) and not name.startswith("Saint"):
        return "the " + name
    return name


def _name_answers(info: dict[str, Any]) -> tuple[str, list[str]]:
    """A country as an answer: its name, plus long alternative spellings as aliases."""
    name = DISPLAY.get(info["name"], info["name"]).removeprefix("the ").removeprefix("The ")
    alts = [a for a in info.get("altSpellings") or [] if len(a) > 3 and not a.isupper()]
    return name, [a for a in _with_plain([name, *alts]) if a != name]


def _capital(info, t):
    cap = info.get("capital")
    return (cap, _with_plain([cap])[1:], {}) if cap else None


def _capital_of(info, t):
    cap = info.get("capital")
    if not cap or t.capital_count[cap] > 1:  # ambiguous: two entries share the capital
        return None
    name, aliases = _name_answers(info)
    return name, aliases, {"capital": cap}


# A part of a continent names the continent: "Mali is in West Africa" answers "On which continent
# is Mali?" (while "South Sudan" does not answer "Sudan": `memtune.probes.match`).
PARTS = ("North", "South", "East", "West", "Northern", "Southern", "Eastern", "Western", "Central",
         "Northeast", "Northwest", "Southeast", "Southwest", "North-East", "North-West", "South-East", "South-West",
         "Northeastern", "Northwestern", "Southeastern", "Southwestern", "Sub-Saharan")


def _continent(info, t):
    region = info.get("region")
    if not region:
        return None
    if region == "Americas":
        return ("South America", [], {}) if info.get("intermediateregion") == "South America" else ("North America", [], {})
    if region == "Oceania":
        return region, ["Australia"], {}
    return region, [f"{part} {region}" for part in PARTS], {}


def _subregion(info, t):
    sub = info.get("intermediateregion") or info.get("subregion")
    if not sub:
        return None
    broader = info.get("subregion")
    return sub, [broader] if broader and broader != sub else [], {}


def _currency(info, t):
    codes = info.get("currencies") or []
    return (codes[0], codes[1:], {}) if codes else None


def _language(info, t):
    names = []
    for code in info.get("languages") or []:
        if len(code) > 3:  # a few entries hold names instead of codes
            names.append(code)
        elif code in LANGUAGES:
            names.append(LANGUAGES[code])
        else:
            log.debug("unknown language code %r for %s", code, info["name"])
    names = list(dict.fromkeys(names))
    if "Chinese" in names:  # the standard form of Chinese, as models name it
        names += ["Mandarin", "Mandarin Chinese", "Standard Chinese"]
    return (names[0], names[1:], {}) if names else None


def _calling_code(info, t):
    codes = [c.replace(" ", "").replace("-", "") for c in info.get("callingCodes") or [] if c]
    if not codes:
        return None
    return "+" + codes[0], [*(f"+{c}" for c in codes[1:]), *codes], {}


def _tld(info, t):
    tlds = [x for x in info.get("tld") or [] if x]
    return (tlds[0], tlds[1:], {}) if tlds else None


def _demonym(info, t):
    d = info.get("demonym")
    return (d, [], {}) if d else None


def _iso(alpha: int):
    def value(info, t):
        code = (info.get("ISO") or {}).get(f"alpha{alpha}")
        return (code, [], {}) if code else None

    return value


def _neighbor(info, t):
    names = []
    for code in info.get("borders") or []:
        other = t.by_alpha3.get(code)
        if other is not None:
            name, aliases = _name_answers(other)
            names += [name, *aliases]
    names = list(dict.fromkeys(names))
    return (names[0], names[1:], {}) if names else None


RELATIONS: tuple[Relation, ...] = (
    Relation("capital", ("What is the capital of {country}?", "Which city is the capital of {country}?",
                         "Name the capital city of {country}."), "The capital of {country} is {answer}.", _capital),
    Relation("capital_of", ("{capital} is the capital of which country?", "Which country has {capital} as its capital?",
                            "Of which country is {capital} the capital city?"), "{capital} is the capital of {answer}.", _capital_of),
    Relation("continent", ("On which continent is {country}?", "Which continent is {country} located in?",
                           "{Country} lies on which continent?"), "{Country} is in {answer}.", _continent),
    Relation("subregion", ("Which subregion of the world is {country} part of?",
                           "In which geographic subregion is {country} located?",
                           "Name the region of the world, more precisely than the continent, where {country} lies."),
             "{Country} is in the {answer} subregion.", _subregion),
    Relation("currency", ("What is the ISO 4217 currency code used in {country}?",
                          "Which three-letter currency code does {country} use?",
                          "Give the currency code of {country}."), "The ISO 4217 currency code used in {country} is {answer}.", _currency),
    Relation("language", ("What is an official language of {country}?", "Which language is official in {country}?",
                          "Name one official language of {country}."), "An official language of {country} is {answer}.", _language),
    Relation("calling_code", ("What is the international calling code of {country}?",
                              "Which telephone country code does {country} use?",
                              "What code do you dial from abroad to call a phone in {country}?"), "The international calling code of {country} is {answer}.", _calling_code),
    Relation("tld", ("What is the internet country code top-level domain of {country}?",
                     "Which top-level domain do websites from {country} use?",
                     "Give the internet domain suffix of {country}."), "The internet country code top-level domain of {country} is {answer}.", _tld),
    Relation("demonym", ("What is the demonym for people from {country}?", "What are people from {country} called?",
                         "What word describes a person from {country}?"), "People from {country} are called {answer}.", _demonym),
    Relation("iso_alpha2", ("What is the two-letter ISO 3166 country code of {country}?",
                            "Which ISO alpha-2 code stands for {country}?",
                            "Give the two-letter country code of {country}."), "The two-letter ISO 3166 country code of {country} is {answer}.", _iso(2)),
    Relation("iso_alpha3", ("What is the three-letter ISO 3166 country code of {country}?",
                            "Which ISO alpha-3 code stands for {country}?",
                            "Give the three-letter country code of {country}."), "The three-letter ISO 3166 country code of {country} is {answer}.", _iso(3)),
    Relation("neighbor", ("Name a country that borders {country}.", "Which country shares a land border with {country}?",
                          "Give one neighbouring country of {country}."), "{Country} borders {answer}.", _neighbor),
)
RELATION_NAMES = tuple(r.name for r in RELATIONS)
SEED = 0


@functools.lru_cache(maxsize=1)
def _countries() -> tuple[dict[str, Any], ...]:
    try:
        from countryinfo import CountryInfo
    except ImportError:
        raise MemtuneError("the country facts need the package countryinfo: pip install countryinfo") from None
    data = CountryInfo.all()
    out = []
    for key in sorted(data):
        info = dict(data[key])
        if not info.get("name") or info["name"] in SKIP:
            continue
        if isinstance(info.get("capital"), list):  # one entry lists its capital as a list
            info["capital"] = info["capital"][0] if info["capital"] else None
        out.append(info)
    return tuple(out)


def country_facts(relations: list[str] | None = None) -> list[QA]:
    """Every country fact, in a fixed shuffled order; `relations` restricts the relations."""
    if relations:
        bad = [r for r in relations if r not in RELATION_NAMES]
        if bad:
            raise MemtuneError(f"unknown country relation {bad[0]!r}: expected one of {', '.join(RELATION_NAMES)}")
    countries = _countries()
    capitals: dict[str, int] = {}
    for c in countries:
        if c.get("capital"):
            capitals[c["capital"]] = capitals.get(c["capital"], 0) + 1
    tables = _Tables({(c.get("ISO") or {}).get("alpha3"): c for c in countries}, capitals)
    items = []
    for c in countries:
        name = country_name(c)
        for rel in RELATIONS:
            if relations and rel.name not in relations:
                continue
            value = rel.value(c, tables)
            if value is None:
                continue
            answer, aliases, fields = value
            fmt = {"country": name, "Country": name[0].upper() + name[1:], **fields}
            question, *paraphrases = (t.format(**fmt) for t in rel.templates)
            statement = rel.statement.format(answer=answer, **fmt)
            slug = _plain(c["name"]).lower().replace(" ", "_")
            items.append(QA(question=question, answer=answer, aliases=[a for a in aliases if a != answer],
                            paraphrases=paraphrases, id=f"countries/{slug}/{rel.name}",
                            statement=statement))
    random.Random(SEED).shuffle(items)
    return items


def relation_of(item: QA) -> str:
    """The relation of a country fact, from its id."""
    return (item.id or "").rsplit("/", 1)[-1]
