"""lm-eval loads this task's JSONL splits from this folder (no hub access): `custom_dataset` in ifeval_lite.yaml.

Each doc's `rules` is a JSON list of {"kind", "args"}; CHECKERS has one function per kind, called with the
response (surrounding whitespace stripped) and the rule's args. configs/tasks/generate_continual.py words the
instructions and draws the args; the names here match its RULE_KINDS.
"""

import json
import re
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")  # "don't" and "well-known" are one word each


def load(**_):
    return datasets.load_dataset("json", data_files={s: str(HERE / f"{s}.jsonl") for s in ("train", "test")})


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def lowercase(response: str) -> bool:
    return _has_letters(response) and response == response.lower()


def uppercase(response: str) -> bool:
    return _has_letters(response) and response == response.upper()


def max_words(response: str, n: int) -> bool:
    """Fewer than n words."""
    return len(WORD.findall(response)) < n


def min_words(response: str, n: int) -> bool:
    """At least n words."""
    return len(WORD.findall(response)) >= n


def include_word(response: str, word: str) -> bool:
    """The word on its own (any case), not inside a longer word."""
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", response, re.IGNORECASE) is not None


def no_commas(response: str) -> bool:
    return "," not in response


def end_phrase(response: str, phrase: str) -> bool:
    return response.endswith(phrase)


def start_word(response: str, word: str) -> bool:
    """The first word, ignoring case and the punctuation after it ("Well," starts with "Well")."""
    first = WORD.search(response)
    return first is not None and first.start() == 0 and first.group().lower() == word.lower()


def bullets(response: str, n: int) -> bool:
    """Exactly n lines that start with "* ", and no "- " bullets instead."""
    lines = [line.lstrip() for line in response.splitlines()]
    stars = sum(line.startswith("* ") for line in lines)
    dashes = sum(line.startswith("- ") for line in lines)
    return stars == n and dashes == 0


def quotation(response: str) -> bool:
    return len(response) > 1 and response[0] == '"' and response[-1] == '"'


def title(response: str) -> bool:
    return re.search(r"<<[^<>\n]*\w[^<>\n]*>>", response) is not None


CHECKERS = {
    f.__name__: f
    for f in (
        lowercase,
        uppercase,
        max_words,
        min_words,
        include_word,
        no_commas,
        end_phrase,
        start_word,
        bullets,
        quotation,
        title,
    )
}


def follows(response: str, rules: list[dict]) -> list[bool]:
    """Per rule, whether the response keeps it."""
    text = response.strip()
    return [CHECKERS[rule["kind"]](text, **rule["args"]) for rule in rules]


def process_results(doc: dict, results: list[str]) -> dict:
    kept = follows(results[0], json.loads(doc["rules"]))
    return {"prompt_strict": float(all(kept)), "inst_strict": sum(kept) / len(kept)}
