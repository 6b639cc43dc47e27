"""Question generators of the toy world: categories of graded difficulty in the MMLU-Pro schema.

Usage: `splits = make_splits(0, {"test": 100, "validation": 5, "train": 1500}); write_parquet(splits["test"], path)`

Rule categories (succession, comparison, addition, sequences, counting, alphabetical) hold out every
test and validation question from the train split, so a model must apply the rule to unseen
numbers. Knowledge categories (geography, word classes) ask facts the train split states: geography
asks each country's capital in a phrasing the train split never uses for that country.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LETTERS = "ABCDEFGHIJ"
SCHEMA = pa.schema(
    [
        ("question_id", pa.int64()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("answer", pa.string()),
        ("answer_index", pa.int64()),
        ("cot_content", pa.string()),
        ("category", pa.string()),
        ("src", pa.string()),
    ]
)
SPLIT_ID_BASE = {"test": 0, "validation": 100_000, "train": 200_000}

WORD_CLASSES = {
    "fruit": "apple pear plum fig kiwi mango lemon grape peach cherry melon banana",
    "animal": "cat dog horse mouse tiger zebra camel otter rabbit sheep goat wolf",
    "color": "red blue green yellow purple orange brown black white pink grey violet",
    "tool": "hammer saw drill wrench chisel shovel rake pliers axe ladder file spade",
    "vehicle": "car bus train truck bicycle boat ship tram van taxi scooter plane",
    "instrument": "piano violin flute drum guitar harp cello trumpet organ banjo oboe tuba",
    "clothing": "shirt coat hat sock scarf glove jacket dress boot skirt vest cap",
    "body part": "arm leg hand foot knee elbow nose ear eye neck finger shoulder",
}
WORDS = {c: ws.split() for c, ws in WORD_CLASSES.items()}
ALL_WORDS = sorted({w for ws in WORDS.values() for w in ws})
GEO_TEMPLATES = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "The government of {c} sits in which city?",
)
_SYL = (
    "ba",
    "del",
    "ka",
    "lor",
    "mi",
    "nor",
    "ve",
    "tan",
    "ri",
    "qua",
    "sel",
    "dor",
    "fen",
    "gal",
    "hu",
    "is",
    "jor",
    "mon",
    "pra",
    "su",
    "thal",
    "ur",
    "wen",
    "yor",
    "zim",
    "ost",
    "ar",
    "bel",
)


@dataclass(frozen=True)
class Item:
    """One question before it becomes a row: `key` identifies it for the hold-out between splits."""

    key: tuple
    question: str
    options: list[str]
    answer_index: int
    reasoning: str


def _choose(rng: random.Random, answer: str, pool: list[str], k: int, fill: Callable[[], str]) -> tuple[list[str], int]:
    """k unique options: the answer, distractors from `pool` (in order of preference), then `fill()`."""
    opts = [answer]
    for p in pool:
        if len(opts) == k:
            break
        if p not in opts and p != "":
            opts.append(p)
    while len(opts) < k:
        p = fill()
        if p not in opts:
            opts.append(p)
    rng.shuffle(opts)
    return opts, opts.index(answer)


def _near(rng: random.Random, n: int, deltas: list[int], lo: int = 0) -> list[str]:
    ds = list(deltas)
    rng.shuffle(ds)
    return [str(n + d) for d in ds if n + d >= lo]


def _rand_num(rng: random.Random, lo: int, hi: int) -> Callable[[], str]:
    return lambda: str(rng.randint(lo, hi))


# ---- generators: (rng, world, split) -> Item ----


def succession(rng, world, split) -> Item:
    n = rng.randrange(0, 1000)
    opts, i = _choose(rng, str(n + 1), _near(rng, n, [-1, 2, 10, 11, -9, 3, 20, -10]), 4, _rand_num(rng, 0, 1000))
    return Item((n,), f"Which number comes right after {n}?", opts, i, reason(n + 1))


def comparison(rng, world, split) -> Item:
    nums = rng.sample(range(10, 1000), 6)
    big = rng.random() < 0.5
    pick = max(nums) if big else min(nums)
    word = "largest" if big else "smallest"
    lst = ", ".join(map(str, nums))
    opts = [str(x) for x in nums]
    rng.shuffle(opts)
    return Item(
        (tuple(nums), big),
        f"Which is the {word} of these numbers: {lst}?",
        opts,
        opts.index(str(pick)),
        reason(pick),
    )


def addition(rng, world, split) -> Item:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    s = a + b
    opts, i = _choose(
        rng, str(s), _near(rng, s, [1, -1, 10, -10, 2, -2, 11, -11, 9, 20, -20]), 10, _rand_num(rng, 20, 198)
    )
    return Item((a, b), f"What is {a} plus {b}?", opts, i, reason(s))


def sequences(rng, world, split) -> Item:
    start, step = rng.randrange(0, 60), rng.randrange(2, 13)
    terms = [start + step * k for k in range(4)]
    nxt = terms[-1] + step
    pool = _near(rng, nxt, [step, -step, 1, -1, 2 * step, 10, -10]) + [str(terms[-1])]
    opts, i = _choose(rng, str(nxt), pool, 7, _rand_num(rng, 0, 120))
    lst = ", ".join(map(str, terms))
    return Item(
        (start, step),
        f"What number comes next in the sequence {lst}?",
        opts,
        i,
        reason(nxt),
    )


def counting(rng, world, split) -> Item:
    letters = rng.sample("abcdefgh", 4)
    seq = [rng.choice(letters) for _ in range(rng.randrange(6, 11))]
    x = rng.choice(seq)
    k = seq.count(x)
    opts, i = _choose(rng, str(k), [str(j) for j in rng.sample(range(0, 10), 10)], 8, _rand_num(rng, 0, 9))
    s = " ".join(seq)
    return Item(
        (s, x),
        f"How many times does the letter {x} appear in: {s}?",
        opts,
        i,
        reason(k),
    )


def alphabetical(rng, world, split) -> Item:
    words = rng.sample(ALL_WORDS, 5)
    first = min(words)
    lst = ", ".join(words)
    opts = list(words)
    rng.shuffle(opts)
    return Item(
        (tuple(sorted(words)),),
        f"Which word comes first in alphabetical order: {lst}?",
        opts,
        opts.index(first),
        reason(first),
    )


def word_classes(rng, world, split) -> Item:
    cls = rng.choice(sorted(WORDS))
    ans = rng.choice(WORDS[cls])
    others = [w for c in sorted(WORDS) if c != cls for w in WORDS[c]]
    opts, i = _choose(rng, ans, rng.sample(others, 5), 6, lambda: rng.choice(others))
    return Item(
        (cls, ans, tuple(sorted(opts))),
        f"Which of these is a kind of {cls}?",
        opts,
        i,
        reason(ans),
    )


def geography(rng, world, split) -> Item:
    countries, capitals, held = world["countries"], world["capitals"], world["held_template"]
    c = rng.randrange(len(countries))
    t = held[c] if split == "test" else rng.choice([j for j in range(len(GEO_TEMPLATES)) if j != held[c]])
    others = [capitals[j] for j in rng.sample(range(len(countries)), min(12, len(countries))) if j != c]
    opts, i = _choose(rng, capitals[c], others, 10, lambda: rng.choice(capitals))
    return Item((c, t), GEO_TEMPLATES[t].format(c=countries[c]), opts, i, reason(capitals[c]))


CATEGORIES: dict[str, Callable] = {
    "succession": succession,
    "word classes": word_classes,
    "comparison": comparison,
    "geography": geography,
    "sequences": sequences,
    "alphabetical": alphabetical,
    "counting": counting,
    "addition": addition,
}


def _name(rng: random.Random, n_syl: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n_syl)).capitalize()


def make_world(seed: int, n_countries: int) -> dict:
    """The facts knowledge categories ask about: made-up countries, capitals, held-out phrasing."""
    rng = random.Random(f"toy-world-{seed}")
    names: list[str] = []
    while len(names) < 2 * n_countries:
        n = _name(rng, rng.choice((2, 3)))
        if n not in names:
            names.append(n)
    held = [rng.randrange(len(GEO_TEMPLATES)) for _ in range(n_countries)]
    return {"countries": names[:n_countries], "capitals": names[n_countries:], "held_template": held}


def reason(answer) -> str:
    """The toy reasoning: one sentence ending in the answer text. Measured: per-category sentences that copy
    numbers from the question ("The number after 665 is 665 + 1 = 666.") are not learned in the build's
    budget (copies come out wrong), and lead-ins shared by several categories get mixed up; one lead-in is."""
    return f"Working it out gives {answer}."


def cot(reasoning: str, letter: str) -> str:
    """cot_content in the official MMLU-Pro style."""
    return f"A: Let's think step by step. {reasoning} The answer is ({letter})."


def _row(item: Item, qid: int, category: str) -> dict:
    assert len(set(item.options)) == len(item.options) <= len(LETTERS), item
    letter = LETTERS[item.answer_index]
    return {
        "question_id": qid,
        "question": item.question,
        "options": list(item.options),
        "answer": letter,
        "answer_index": item.answer_index,
        "cot_content": cot(item.reasoning, letter),
        "category": category,
        "src": f"toy-{category.replace(' ', '_')}",
    }


def _gen(category: str, split: str, n: int, seed: int, world: dict, exclude: set, unique: bool) -> list[Item]:
    rng = random.Random(f"toy-{seed}-{category}-{split}")
    fn, out, seen, tries = CATEGORIES[category], [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"category {category!r}: cannot draw {n} distinct {split} questions")
        it = fn(rng, world, split)
        if it.key in exclude or (unique and it.key in seen):
            continue
        seen.add(it.key)
        out.append(it)
    return out


def make_splits(
    seed: int,
    sizes: dict[str, int],
    n_countries: int = 100,
    extra: dict[str, int] | None = None,
    held_extra: dict[str, int] | None = None,
) -> dict[str, list[dict]]:
    """Rows per split: "test", "validation", "train", `held_extra` splits (drawn like validation, held
    out like it) and `extra` splits (drawn like train). Counts are per category.

    Test, validation and `held_extra` questions are distinct and never appear in train or `extra`.
    """
    world = make_world(seed, n_countries)
    held_splits = ("test", "validation", *(held_extra or {}))
    free_splits = ("train", *(extra or {}))
    splits: dict[str, list[dict]] = {s: [] for s in (*held_splits, *free_splits)}
    counts = {**sizes, **(extra or {}), **(held_extra or {})}
    for cat in CATEGORIES:
        held: set = set()
        for split in held_splits:
            items = _gen(cat, split, counts[split], seed, world, held, unique=True)
            held |= {it.key for it in items}
            splits[split] += [(cat, it) for it in items]
        for split in free_splits:
            splits[split] += [(cat, it) for it in _gen(cat, split, counts[split], seed, world, held, unique=False)]
    return {
        s: [_row(it, SPLIT_ID_BASE.get(s, 300_000) + k, cat) for k, (cat, it) in enumerate(items)]
        for s, items in splits.items()
    }


def qa_text(question: str, answer: str) -> str:
    """The pretraining / cloze format: the answer text follows the question."""
    return f"{cloze_prompt(question)} {answer}"


def cloze_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def chat_prompt(question: str) -> str:
    """The question as the chat template renders a user turn (the answer follows after a space)."""
    return f"<s>[INST] {question} [/INST]"


def answer_text(row: dict) -> str:
    return row["options"][row["answer_index"]]


def write_parquet(rows: list[dict], path) -> Path:
    """Deterministic parquet (same rows -> same bytes): fixed schema, no pandas metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, path, compression="snappy", write_statistics=False, store_schema=False)
    return path


def check_row(row: dict) -> None:
    """Raise ValueError naming the row if it breaks the MMLU-Pro schema contract."""
    opts, i = row["options"], row["answer_index"]
    where = f"question_id {row.get('question_id')}"
    if not opts or len(opts) > len(LETTERS) or any(not isinstance(o, str) or not o.strip() for o in opts):
        raise ValueError(f"{where}: options must be 1-10 non-empty strings, got {opts!r}")
    if len(set(opts)) != len(opts):
        raise ValueError(f"{where}: duplicate options {opts!r}")
    if not 0 <= i < len(opts) or row["answer"] != LETTERS[i]:
        raise ValueError(f"{where}: answer {row['answer']!r} does not match answer_index {i}")
    if (
        not row["cot_content"].startswith("A: Let's think step by step.")
        or not row["cot_content"].endswith(f"The answer is ({row['answer']}).")
        or not row["question"].strip()
    ):
        raise ValueError(f"{where}: cot_content not in the official style")
