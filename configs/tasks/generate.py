"""Write opd's offline lm-eval tasks (configs/tasks/arith*/): arithmetic word problems of the demo's kind.

    python3 configs/tasks/generate.py        # rewrites the JSONL files; same seed, same files

  arith     generate_until: the model answers a word problem; exact match on the last number it writes.
  arith_mc  multiple_choice: the same kind of problem, four numbers to choose from (log-likelihood).

Each has a `train` split (prompts for a distillation run: the `smollm2-task` preset samples these) and
a `test` split (what the benchmark scores), drawn from one distribution and disjoint: no question text
is in both. The YAML next to each file is lm-eval's task config; `utils.py` loads the JSONL relative
to itself, so the tasks work from any folder with no hub access.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261207
NAMES = ["Ava", "Ben", "Cleo", "Dara", "Eli", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lena", "Mia", "Noah"]
ITEMS = ["apples", "stamps", "marbles", "pencils", "cookies", "stickers", "books", "shells", "coins", "cards"]
SIZES = {"train": 512, "test": 200}


def problem(rng: random.Random) -> tuple[str, int]:
    """One word problem and its answer: addition, subtraction or multiplication of small numbers."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, 30), rng.randint(2, 20)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == "sub":
        a = rng.randint(8, 40)
        b = rng.randint(1, a - 2)
        return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{name} has {a} bags with {b} {item} in each bag. How many {item} are there in all?", a * b


def choices(rng: random.Random, answer: int) -> tuple[list[str], int]:
    """Four distinct numbers, the answer among them at a random place. The distractors are 5 to 25 away:
    with ±1..3 the demo's 135M teacher chose below chance (0.20 of 100), with these it scores 0.32 and
    its 8-layer student 0.07 (the smollm2-demo models, vLLM, chat template)."""
    options = {answer}
    while len(options) < 4:
        options.add(max(0, answer + rng.choice((-1, 1)) * rng.randint(5, 25)))
    ordered = rng.sample(sorted(options), 4)
    return [str(x) for x in ordered], ordered.index(answer)


def splits(rng: random.Random) -> dict[str, list[tuple[str, int]]]:
    seen: set[str] = set()
    out: dict[str, list[tuple[str, int]]] = {}
    for split, size in SIZES.items():
        rows = []
        while len(rows) < size:
            q, a = problem(rng)
            if q not in seen:
                seen.add(q)
                rows.append((q, a))
        out[split] = rows
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(SEED)
    for split, rows in splits(rng).items():
        gen = [
            {"id": f"arith-{split}-{i:04d}", "question": q, "answer": str(a), "reference": f"#### {a}"}
            for i, (q, a) in enumerate(rows)
        ]
        write_jsonl(HERE / "arith" / f"{split}.jsonl", gen)
    for split, rows in splits(random.Random(SEED + 1)).items():
        mc = []
        for i, (q, a) in enumerate(rows):
            options, label = choices(rng, a)
            mc.append({"id": f"arith_mc-{split}-{i:04d}", "question": q, "choices": options, "label": label})
        write_jsonl(HERE / "arith_mc" / f"{split}.jsonl", mc)


if __name__ == "__main__":
    main()
