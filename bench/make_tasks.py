"""Writes the data of the bundled lm-eval tasks (trainer/harness_tasks/*.jsonl); the YAML files beside
that data define the tasks. Run once by hand; the outputs are committed:

    apt-get install -y dict-gcide dict-foldoc
    python bench/make_tasks.py

- fullft_general.jsonl: 200 four-choice questions "what does the word X mean?" from GCIDE's
  WordNet-derived entries (`word pos. 1. definition`): general English vocabulary.
- fullft_computing.jsonl: 200 four-choice questions "in computing, what is X?" from FOLDOC: the
  domain of the forgetting benchmark (bench/forgetting.py's real profile tunes on FOLDOC).
- fullft_medical.jsonl: the bundled held-out medical QA as four-choice questions (the answer among
  three other held-out answers): the domain of the medical recipe (conf/exp/medical.yaml).
- fullft_ifeval.jsonl: 50 prompts with format constraints checked by code (utils.py), IFEval-style.

Distractors are the definitions of other entries of the same part of speech (GCIDE) or other entries
(FOLDOC), drawn with a fixed seed; the correct answer's position is drawn too.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "trainer" / "harness_tasks"
sys.path.insert(0, str(ROOT / "bench"))

from corpora import DICTD, clean, entries  # noqa: E402

ITEMS = 200
SEED = 20261207


def _mc(question: str, answer: str, distractors, rng: random.Random) -> dict:
    choices = list(distractors) + [answer]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "label": choices.index(answer)}


def _words(text: str) -> int:
    return len(text.split())


def general(rng: random.Random) -> list:
    pattern = re.compile(r"^([a-z]{4,12}) (n|v|adj|adv)\. 1\. (?:\d )?([^;\[]+?)(?:;|\s+Syn:|\s+\[|$)")
    by_pos, seen = {}, set()
    for entry in entries("gcide", DICTD):
        m = pattern.match(clean(entry))
        if not m or m.group(1) in seen:
            continue
        word, pos, definition = m.group(1), m.group(2), m.group(3).strip().rstrip(".")
        if not 4 <= _words(definition) <= 14 or word in definition.lower():
            continue
        seen.add(word)
        by_pos.setdefault(pos, []).append((word, definition))
    pool = [(pos, w, d) for pos, items in sorted(by_pos.items()) for w, d in items]
    picked = rng.sample(pool, ITEMS)
    out = []
    for pos, word, definition in picked:
        others = [d for w, d in rng.sample(by_pos[pos], 8) if w != word and d != definition][:3]
        out.append(_mc(f'What does the word "{word}" mean?', definition, others, rng))
    return out


def computing(rng: random.Random) -> list:
    pattern = re.compile(r"^([A-Za-z][\w+#-]{1,20}) <([^>]+)> (?:\(Or [^)]*\) )?([A-Z][^.]{15,110}\.)")
    items, seen = [], set()
    for entry in entries("foldoc", DICTD):
        m = pattern.match(clean(entry))
        if not m or m.group(1).lower() in seen:
            continue
        term, definition = m.group(1), m.group(3).rstrip(".")
        if term.lower() in definition.lower() or not 4 <= _words(definition) <= 18:
            continue
        seen.add(term.lower())
        items.append((term, definition))
    out = []
    for term, definition in rng.sample(items, ITEMS):
        others = [d for t, d in rng.sample(items, 6) if t != term][:3]
        out.append(_mc(f'In computing, what is "{term}"?', definition, others, rng))
    return out


def medical(rng: random.Random) -> list:
    bundled = ROOT / "data_pipeline" / "bundled" / "medical_qa_heldout.jsonl"
    rows = [json.loads(line) for line in bundled.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows):
        question = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        others = rng.sample([r["output"] for j, r in enumerate(rows) if j != i], 3)
        out.append(_mc(question, row["output"], others, rng))
    return out


TOPICS = [
    ("the water cycle", ["evaporation", "rain"], "water"),
    ("photosynthesis", ["sunlight", "leaves"], "plant"),
    ("the history of bread", ["wheat", "oven"], "bread"),
    ("how bicycles work", ["pedals", "chain"], "wheel"),
    ("why the sky is blue", ["light", "scattering"], "blue"),
    ("the moon", ["orbit", "tides"], "moon"),
    ("volcanoes", ["lava", "eruption"], "mountain"),
    ("honey bees", ["hive", "pollen"], "bee"),
    ("the importance of sleep", ["brain", "rest"], "sleep"),
    ("learning a new language", ["practice", "vocabulary"], "language"),
    ("the first airplanes", ["wings", "flight"], "plane"),
    ("recycling", ["plastic", "waste"], "recycle"),
    ("the game of chess", ["king", "board"], "chess"),
    ("coffee", ["beans", "caffeine"], "coffee"),
    ("the human heart", ["blood", "beat"], "heart"),
    ("rainforests", ["trees", "species"], "forest"),
    ("how a library works", ["books", "borrow"], "library"),
    ("the ocean tides", ["moon", "gravity"], "tide"),
    ("the invention of the printing press", ["Gutenberg", "books"], "print"),
    ("snow", ["winter", "crystals"], "cold"),
    ("owning a dog", ["walk", "training"], "dog"),
    ("the solar system", ["planets", "sun"], "space"),
    ("public parks", ["trees", "city"], "park"),
    ("the piano", ["keys", "music"], "piano"),
    ("washing your hands", ["soap", "germs"], "hands"),
]

END_PHRASE = "Is there anything else I can help with?"


def ifeval(rng: random.Random) -> list:
    """Two prompts a topic; each with one or two of the constraints utils.py checks."""
    forms = [
        (
            "Write a short paragraph about {t}. Your entire answer must be in lowercase letters; "
            "no capital letters are allowed.",
            lambda k, f: [["lowercase", {}]],
        ),
        ("Describe {t} in fewer than 50 words.", lambda k, f: [["length_words", {"relation": "less than", "num": 50}]]),
        (
            "Explain {t}. Your answer must contain at least 60 words.",
            lambda k, f: [["length_words", {"relation": "at least", "num": 60}]],
        ),
        (
            "Write two sentences about {t}. Include the words '{k0}' and '{k1}'.",
            lambda k, f: [["keywords", {"words": k}]],
        ),
        (
            "Give exactly three facts about {t} as a markdown list. Use exactly 3 bullet points that start with '* '.",
            lambda k, f: [["bullets", {"num": 3}]],
        ),
        (
            'Tell me about {t}. Give your entire answer as valid JSON, for example {{"answer": "..."}}.',
            lambda k, f: [["json", {}]],
        ),
        (
            "Write one sentence about {t}, in English, using only capital letters.",
            lambda k, f: [["uppercase", {}]],
        ),
        ("Describe {t} without using any commas.", lambda k, f: [["no_comma", {}]]),
        (
            "Write a few sentences about {t}. End your response with the exact phrase '" + END_PHRASE + "'",
            lambda k, f: [["ends_with", {"phrase": END_PHRASE}]],
        ),
        (
            "Write a short paragraph about {t} without using the word '{f}'.",
            lambda k, f: [["forbidden_words", {"words": [f]}]],
        ),
        (
            "Describe {t} in fewer than 40 words, all in lowercase letters.",
            lambda k, f: [["length_words", {"relation": "less than", "num": 40}], ["lowercase", {}]],
        ),
        (
            "Write about {t} and mention '{k0}'. Do not use any commas.",
            lambda k, f: [["keywords", {"words": k[:1]}], ["no_comma", {}]],
        ),
    ]
    out = []
    for topic, keywords, forbidden in TOPICS:
        for j in rng.sample(range(len(forms)), 2):
            text, checks = forms[j]
            prompt = text.format(t=topic, k0=keywords[0], k1=keywords[1], f=forbidden)
            kinds = checks(keywords, forbidden)
            out.append(
                {"key": len(out), "prompt": prompt, "checks": [k for k, _ in kinds], "kwargs": [a for _, a in kinds]}
            )
    return out


def main() -> None:
    for name, make in (("general", general), ("computing", computing), ("medical", medical), ("ifeval", ifeval)):
        rows = make(random.Random(f"{SEED}-{name}"))
        path = HERE / f"fullft_{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} items")


if __name__ == "__main__":
    main()
