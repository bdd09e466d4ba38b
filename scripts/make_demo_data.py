"""Generate the data of the three bundled demo tasks, deterministically.

The tasks use a small synthetic language that a tiny model learns in minutes on a CPU, yet
only by generalising: every test item (a number, a sum, a document) is absent from the
training split, which is rebuilt from the same seed by ``build_splits`` whenever needed
(the training script and the tests call it; only the test splits ship in the package).

    python scripts/make_demo_data.py            # rewrite src/evalfleet/tasks/demo/*.jsonl
    python scripts/make_demo_data.py --train-dir /tmp/demo-train   # also dump train splits
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
TASK_DIR = Path(__file__).resolve().parents[1] / "src" / "evalfleet" / "tasks" / "demo"

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

DETERMINERS = ["the", "a"]
ADJECTIVES = ["small", "big", "red", "green", "old", "young", "happy", "quiet"]
NOUNS = ["cat", "dog", "bird", "fox", "child", "farmer", "tree", "river", "house", "ball"]
TRANSITIVE = ["sees", "likes", "finds", "follows", "watches", "carries"]
INTRANSITIVE = ["runs", "sleeps", "sings", "waits", "jumps"]
PREPOSITIONS = ["near", "under", "behind"]
ADVERBS = ["quickly", "slowly", "today"]

MC_TEST_NUMBERS = 300
ARITH_TEST_PAIRS = 200
PPL_TEST_DOCS = 80
PPL_LONG_TEST_DOCS = 6
PPL_TRAIN_DOCS = 3000


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999, without 'and' or hyphens."""
    words = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(TENS[tens])
        if ones:
            words.append(ONES[ones])
    elif rest or not words:
        words.append(ONES[rest])
    return " ".join(words)


def mc_prompt(n: int) -> str:
    return f"{n} in words:"


def arith_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def _is_word_prefix(a: str, b: str) -> bool:
    return (b + " ").startswith(a + " ") or (a + " ").startswith(b + " ")


def _mc_doc(n: int, rng: random.Random) -> dict:
    """One question: the number's words among three near misses (one digit changed each).

    No choice is a word-prefix of another ("two hundred" vs "two hundred five"): summed
    log-likelihoods would favour the shorter one whatever the model knows.
    """
    digits = [n // 100, n // 10 % 10, n % 10]
    distractors: list[int] = []
    while len(distractors) < 3:
        changed = list(digits)
        place = rng.randrange(3)
        changed[place] = rng.randrange(1 if place == 0 else 0, 10)
        m = changed[0] * 100 + changed[1] * 10 + changed[2]
        if not any(_is_word_prefix(number_words(m), number_words(k)) for k in [n, *distractors]):
            distractors.append(m)
    numbers = [n, *distractors]
    rng.shuffle(numbers)
    return {
        "number": n,
        "query": mc_prompt(n),
        "choices": [number_words(m) for m in numbers],
        "label": numbers.index(n),
    }


def _arith_doc(a: int, b: int) -> dict:
    return {"question": arith_prompt(a, b), "answer": str(a + b)}


def _sentence(rng: random.Random) -> str:
    def noun_phrase() -> str:
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        words.append(rng.choice(NOUNS))
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)

    if rng.random() < 0.5:
        words = [noun_phrase(), rng.choice(TRANSITIVE), noun_phrase()]
    else:
        words = [noun_phrase(), rng.choice(INTRANSITIVE)]
        if rng.random() < 0.5:
            words += [rng.choice(PREPOSITIONS), noun_phrase()]
    if rng.random() < 0.3:
        words.append(rng.choice(ADVERBS))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _document(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def build_splits(seed: int = SEED) -> dict[str, dict[str, list[dict]]]:
    """Both splits of every task: ``{task: {"train": docs, "test": docs}}``, disjoint by item."""
    rng = random.Random(seed)

    numbers = list(range(100, 1000))
    rng.shuffle(numbers)
    mc_test = [_mc_doc(n, rng) for n in sorted(numbers[:MC_TEST_NUMBERS])]
    mc_train = [{"query": mc_prompt(n), "answer": number_words(n)}
                for n in sorted(numbers[MC_TEST_NUMBERS:])]

    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    arith_test = [_arith_doc(a, b) for a, b in sorted(pairs[:ARITH_TEST_PAIRS])]
    arith_train = [_arith_doc(a, b) for a, b in sorted(pairs[ARITH_TEST_PAIRS:])]

    lengths = [rng.randint(1, 20) for _ in range(PPL_TEST_DOCS - PPL_LONG_TEST_DOCS)]
    lengths += [rng.randint(40, 55) for _ in range(PPL_LONG_TEST_DOCS)]
    ppl_test = [{"text": _document(rng, k)} for k in lengths]
    held_out = {doc["text"] for doc in ppl_test}
    ppl_train: list[dict] = []
    while len(ppl_train) < PPL_TRAIN_DOCS:
        text = _document(rng, rng.randint(1, 24))
        if text not in held_out:
            ppl_train.append({"text": text})

    return {
        "demo_mc": {"train": mc_train, "test": mc_test},
        "demo_arith": {"train": arith_train, "test": arith_test},
        "demo_ppl": {"train": ppl_train, "test": ppl_test},
    }


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--task-dir", type=Path, default=TASK_DIR)
    parser.add_argument("--train-dir", type=Path, help="also write the train splits here")
    args = parser.parse_args()
    for task, splits in build_splits(args.seed).items():
        write_jsonl(args.task_dir / f"{task}.jsonl", splits["test"])
        if args.train_dir:
            write_jsonl(args.train_dir / f"{task}.jsonl", splits["train"])


if __name__ == "__main__":
    main()
