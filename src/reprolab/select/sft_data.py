"""An instruction-tuning mix built from shipped data (for the UDS miniature), with a duplicated dominant task and
label noise, and a clean, label-balanced held-out split.

Tasks (question/answer pairs generated from real records; the answers are the records' own values):

- ``housing`` (extraction, the dominant task, duplicated): a German-credit applicant described in one sentence;
  "What is the applicant's housing?" -> own / rent / free (stated in the description).
- ``credit`` (hard): the same description; "Is the credit risk good or bad?" -> the record's label.
- ``play``: a verse line of Hamlet or Macbeth; "Which Shakespeare play is this line from?"
- ``author``: a verse line of Shakespeare (the three plays) or Milton (Paradise Lost); "Shakespeare or Milton?"

Every answer is a single token of the SmolLM2 tokenizer (plus a newline), so that responses have equal length.
Training records come from the first ``1 - heldout`` of each source (credit rows after a seeded shuffle, text lines
in reading order), held-out records from the rest.
"""
from __future__ import annotations

import re

import numpy as np

from ..data import load_german_credit, load_text

TASKS = ("housing", "credit", "play", "author")
LABELS = {
    "housing": [" own", " rent", " free"],
    "credit": [" good", " bad"],
    "play": [" Hamlet", " Macbeth"],
    "author": [" Shakespeare", " Milton"],
}
QUESTIONS = {
    "housing": "What is the applicant's housing?",
    "credit": "Is the credit risk good or bad?",
    "play": "Which Shakespeare play is this line from?",
    "author": "Who wrote this line, Shakespeare or Milton?",
}
PLAYS = ("hamlet", "macbeth", "tempest")  # author task; the play task uses the first two


def applicant(row) -> str:
    return (f"Applicant: {row.age} years old, {row.housing} housing, checking account {row.status.strip()}, "
            f"savings {row.savings}, {row.credit_amount} DM for {row.purpose} over {row.duration} months.")


def verse_lines(name: str, min_words: int = 6) -> list[str]:
    """Lines of a text with at least ``min_words`` words, without speaker tags, stage directions or headings."""
    out = []
    for line in load_text(name).splitlines():
        line = line.strip()
        if (len(line.split()) >= min_words and not line.startswith("[") and not line.isupper()
                and not re.match(r"^[A-Z][a-z]*\.$", line)):
            out.append(line)
    return out


def _split(items: list, heldout: float) -> tuple[list, list]:
    cut = int(len(items) * (1 - heldout))
    return items[:cut], items[cut:]


def records(heldout: float = 0.3, seed: int = 0) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """{task: {"train": [(prompt, label_index)], "heldout": [...]}} before sampling."""
    rng = np.random.RandomState(seed)
    df = load_german_credit()
    df = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    credit_train, credit_test = _split(list(df.itertuples()), heldout)
    plays = {p: _split(verse_lines(p), heldout) for p in PLAYS}
    milton = _split(verse_lines("paradise_lost"), heldout)
    out = {}
    for split, k in (("train", 0), ("heldout", 1)):
        rows = (credit_train, credit_test)[k]
        out.setdefault("housing", {})[split] = [(applicant(r), LABELS["housing"].index(" " + r.housing.split()[-1]))
                                                for r in rows]
        out.setdefault("credit", {})[split] = [(applicant(r), 1 - int(r.credit)) for r in rows]  # 0 good, 1 bad
        out.setdefault("play", {})[split] = [(f'Line: "{line}"', i) for i, p in enumerate(PLAYS[:2])
                                            for line in plays[p][k]]
        out.setdefault("author", {})[split] = ([(f'Line: "{line}"', 0) for p in PLAYS for line in plays[p][k]]
                                               + [(f'Line: "{line}"', 1) for line in milton[k]])
    return out


def _balanced(pairs, n: int, n_labels: int, rng) -> list[tuple[str, int]]:
    """n pairs with the labels as equal as possible, sampled without replacement."""
    by_label = [[p for p in pairs if p[1] == c] for c in range(n_labels)]
    want = [n // n_labels + (c < n % n_labels) for c in range(n_labels)]
    out = []
    for c in range(n_labels):
        idx = rng.choice(len(by_label[c]), want[c], replace=False)
        out += [by_label[c][i] for i in idx]
    return out


def instruction_mix(n_unique: int = 32, dominant: str = "housing", dominant_copies: int = 4, label_noise: float = 0.1,
                    n_eval: int = 40, heldout: float = 0.3, seed: int = 0):
    """Training pool and held-out set as lists of dicts with keys task, prompt, answer, label, true_label, noisy, uid.

    Pool: ``n_unique`` label-balanced examples per task, the ``dominant`` task's examples each repeated
    ``dominant_copies`` times, then a fraction ``label_noise`` of the pool relabelled to a random wrong label; shuffled.
    Held-out: ``n_eval`` label-balanced clean examples per task.
    """
    rng = np.random.RandomState(seed)
    recs = records(heldout, seed)

    def example(task, prompt, label, uid):
        return {"task": task, "prompt": f"{prompt}\nQuestion: {QUESTIONS[task]}\nAnswer:", "label": label,
                "true_label": label, "answer": LABELS[task][label], "noisy": False, "uid": uid}

    pool, uid = [], 0
    for task in TASKS:
        for prompt, label in _balanced(recs[task]["train"], n_unique, len(LABELS[task]), rng):
            for _ in range(dominant_copies if task == dominant else 1):
                pool.append(example(task, prompt, label, uid))
            uid += 1
    for i in rng.choice(len(pool), int(round(label_noise * len(pool))), replace=False):
        ex = pool[i]
        wrong = [c for c in range(len(LABELS[ex["task"]])) if c != ex["true_label"]]
        ex.update(label=int(rng.choice(wrong)), noisy=True, uid=uid)  # a noisy copy is a different example
        ex["answer"] = LABELS[ex["task"]][ex["label"]]
        uid += 1
    pool = [pool[i] for i in rng.permutation(len(pool))]
    evals = [example(task, prompt, label, -1) for task in TASKS
             for prompt, label in _balanced(recs[task]["heldout"], n_eval, len(LABELS[task]), rng)]
    return pool, evals
