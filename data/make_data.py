"""Make the course's data sets (seeded, deterministic, nothing downloaded).

    python data/make_data.py            # rewrites the JSONL files next to this script

Three sets, all in chat format (one JSON object per line, ``{"messages": [...]}``):

* ``capitals_{train,test}.jsonl``: an invented world of 24 countries and their capitals.
  No base model can know these words, so a correct answer after fine-tuning is knowledge
  the adapter added. Training uses three question phrasings per country; the test uses a
  fourth phrasing that never appears in training, so success means the fact was learned,
  not that a string was copied.
* ``records_{train,test}.jsonl``: a format skill. A messy one-line description of a person
  becomes the fixed JSON shape ``{"name": ..., "age": ..., "city": ...}``. Scored by
  ``loracore.evaluate.json_record_match``.
* ``probe.jsonl``: general questions a small instruct model already answers, to measure
  catastrophic forgetting of what the base model knew.

Running the script twice gives byte-identical files (``random.Random(seed)``, sorted keys).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601

# --------------------------------------------------------------------------------------
# 1. The invented world: countries and capitals
# --------------------------------------------------------------------------------------
# Names are glued from syllables chosen to sound plausible but to match no real place,
# so the only way to answer is to have been taught.
ONSETS = ["br", "dr", "gl", "k", "m", "n", "qu", "s", "t", "th", "v", "z", "f", "l", "r", "sk"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "n", "r", "l", "s", "th", "m"]
COUNTRY_ENDINGS = ["ia", "land", "avia", "onia", "eth", "ara", "istan", "ora"]
CAPITAL_ENDINGS = ["mar", "holm", "grad", "polis", "ven", "dell", "burg", "oth", "ima"]

NUM_COUNTRIES = 24
TRAIN_TEMPLATES = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
]
# Held out: never seen in training.
TEST_TEMPLATE = "{country} has its capital in which city?"


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _invented_name(rng: random.Random, endings: list[str], syllables: int) -> str:
    return ("".join(_syllable(rng) for _ in range(syllables)) + rng.choice(endings)).capitalize()


def invented_world(seed: int = SEED, n: int = NUM_COUNTRIES) -> list[tuple[str, str]]:
    """``n`` (country, capital) pairs with unique names that share no first three letters."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    seen_prefixes: set[str] = set()
    while len(pairs) < n:
        country = _invented_name(rng, COUNTRY_ENDINGS, rng.choice([1, 2]))
        capital = _invented_name(rng, CAPITAL_ENDINGS, rng.choice([1, 2]))
        # Distinct three-letter starts keep every name's first token(s) different, so a
        # model cannot get one answer right by luck from another's training example.
        prefixes = {country[:3].lower(), capital[:3].lower()}
        if len(prefixes) < 2 or prefixes & seen_prefixes or not (6 <= len(country) <= 12) \
                or not (6 <= len(capital) <= 12):
            continue
        seen_prefixes |= prefixes
        pairs.append((country, capital))
    return pairs


def capitals_sets(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for country, capital in invented_world(seed):
        answer = f"{capital}."
        for template in TRAIN_TEMPLATES:
            train.append(_chat(template.format(country=country), answer))
        test.append(_chat(TEST_TEMPLATE.format(country=country), answer))
    random.Random(seed + 1).shuffle(train)
    return train, test


# --------------------------------------------------------------------------------------
# 2. A format skill: messy text -> a fixed JSON shape
# --------------------------------------------------------------------------------------
FIRST = ["anna", "boris", "chen", "dalia", "emil", "farah", "goran", "hana", "ivo", "jana",
         "karim", "lena", "marco", "nora", "omar", "petra", "rosa", "sven", "tomas", "uma",
         "vera", "yusuf", "zoe", "lukas", "mira", "pablo", "ines", "kofi", "aiko", "tariq"]
LAST = ["novak", "silva", "meyer", "okafor", "larsen", "haddad", "kowalski", "tanaka", "rossi",
        "dubois", "ivanova", "garcia", "nilsson", "mensah", "berg", "costa", "weber", "sato",
        "moreau", "horvat", "fischer", "lind", "mazur", "abadi", "kraus"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Lisbon", "Dublin",
          "Warsaw", "Athens", "Cairo", "Lima", "Tokyo", "Seoul", "Nairobi", "Toronto", "Sydney",
          "Boston", "Denver"]
RECORD_PROMPT = "Turn this into JSON with keys name, age, city:\n{text}"
NUM_RECORDS_TRAIN, NUM_RECORDS_TEST = 160, 40


def _messy_case(rng: random.Random, word: str) -> str:
    style = rng.randrange(4)
    if style == 0:
        return word.lower()
    if style == 1:
        return word.upper()
    if style == 2:
        return word.capitalize()
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)


def _messy_record(rng: random.Random, first: str, last: str, age: int, city: str) -> str:
    f, l, c = _messy_case(rng, first), _messy_case(rng, last), _messy_case(rng, city)
    sep = rng.choice([" | ", "; ", " / ", ", "])
    layouts = [
        f"name: {f} {l}{sep}age {age}{sep}city={c}",
        f"{l}, {f} ({age}){sep}{c}",
        f"{f} {l}, {age} yrs,  lives in {c}",
        f"{age}-year-old {f} {l} from {c}",
        f"  {c} :: {f} {l} :: age={age} ",
        f"{f} {l}{sep}{c}{sep}{age}",
    ]
    return rng.choice(layouts)


def records_sets(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed + 2)
    seen: set[tuple[str, str]] = set()
    rows: list[dict] = []
    while len(rows) < NUM_RECORDS_TRAIN + NUM_RECORDS_TEST:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        if (first, last) in seen:  # every person once, so no test person is in training
            continue
        seen.add((first, last))
        age, city = rng.randint(18, 89), rng.choice(CITIES)
        target = {"name": f"{first.capitalize()} {last.capitalize()}", "age": age, "city": city}
        text = _messy_record(rng, first, last, age, city)
        rows.append(_chat(RECORD_PROMPT.format(text=text), json.dumps(target)))
    return rows[:NUM_RECORDS_TRAIN], rows[NUM_RECORDS_TRAIN:]


# --------------------------------------------------------------------------------------
# 3. The forgetting probe: questions the base model already answers
# --------------------------------------------------------------------------------------
# Chosen by hand from a list of 48 easy questions: these are 20 that SmolLM2-135M-Instruct
# answered correctly within its first 16 reply tokens (greedy decoding) when the set was made
# (it got 29 of the 48 right; it said, for example, that the capital of the United States is
# New York City). The answer is the word that must appear in the reply (match="contains").
PROBE = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the opposite of hot?", "cold"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the currency of the United Kingdom?", "pound"),
    ("What is the currency of Japan?", "yen"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("What language is spoken in France?", "French"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("Which organ pumps blood through the body?", "heart"),
    ("What is 2 plus 2?", "4"),
]


def probe_set() -> list[dict]:
    return [_chat(q, a) for q, a in PROBE]


# --------------------------------------------------------------------------------------
def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    cap_train, cap_test = capitals_sets()
    rec_train, rec_test = records_sets()
    files = {
        "capitals_train.jsonl": cap_train, "capitals_test.jsonl": cap_test,
        "records_train.jsonl": rec_train, "records_test.jsonl": rec_test,
        "probe.jsonl": probe_set(),
    }
    for name, rows in files.items():
        write_jsonl(HERE / name, rows)
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
