"""lm-eval loads this task's JSONL splits from this folder (no hub access): `custom_dataset` in handbook_qa.yaml.

`process_results` scores a generation by whether the fact's short answer appears in it, so "The approver is
Ines Varga." counts for "Ines Varga": both are normalised (lowercase, one space between words, punctuation
stripped from word edges, "1,450" -> "1450", "14th" -> "14"), and the answer must start at a word and, if it
ends in a digit, not run on into more digits (floor "7" is not found in "17" or "70").
"""

import re
import string
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
EDGE_PUNCTUATION = string.punctuation + "“”‘’"


def load(**_):
    return datasets.load_dataset("json", data_files={s: str(HERE / f"{s}.jsonl") for s in ("train", "test")})


def normalise(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"(?<=\d)(st|nd|rd|th)\b", "", text)
    words = (w.strip(EDGE_PUNCTUATION) for w in text.split())
    return " ".join(w for w in words if w)


def answer_match(answer: str, generation: str) -> bool:
    """Whether the normalised answer occurs in the normalised generation, whole numbers as whole numbers."""
    wanted = normalise(answer)
    if not wanted:
        return False
    tail = r"(?!\d)" if wanted[-1].isdigit() else ""
    return re.search(rf"(?<![a-z0-9]){re.escape(wanted)}{tail}", normalise(generation)) is not None


def process_results(doc: dict, results: list[str]) -> dict:
    return {"answer_match": float(answer_match(doc["answer"], results[0]))}
