"""A synthetic negation-compositional sentiment task (the honeypot planning note's construction).

Each sentence states one opinion about a subject with one sentiment adjective under 0, 1 or 2 negations, e.g.
"the plot was good", "the plot was not good", "i would not say the plot was not good". The label is the
adjective's polarity flipped once per negation: y = polarity(adjective) XOR (number of negations is odd), with
1 = positive, 0 = negative.

The draw makes every single word useless on its own: the adjective's polarity is drawn independently of the parity of
the negation count, and the parity is odd with probability 1/2 (0, 1, 2 negations with probability 1/4, 1/2, 1/4). So
a bag of words predicts the label no better than chance from any one word; the task needs the composition of the
negation words with the adjective, which lower layers of a pre-trained encoder are not expected to carry (the
method's premise, which the honeypot notebook measures with a probe). Labels are balanced exactly per split.

Limit (pinned by a unit test): the label is a function of word COUNTS (the adjective's polarity and the parity of the
number of "not"/"never"/"nobody"), not of word order. A linear model on bag-of-words counts stays at chance, but a
small MLP on the same counts solves the task once it has thousands of sentences (test accuracy 1.0 at 4,000 training
sentences, 0.55 at 300). So the task needs a non-linear combination of words, not syntax; "a lower layer cannot solve
it" is an empirical property of the encoder measured by the probe, not a guarantee of the generator.
"""
from __future__ import annotations

import numpy as np

LABEL_NAMES = ("negative", "positive")
POSITIVE = ("good", "great", "excellent", "wonderful", "brilliant", "delightful", "enjoyable", "superb", "charming",
            "moving", "fun", "clever", "beautiful", "fantastic", "impressive", "pleasant", "solid", "lovely",
            "gripping", "touching")
NEGATIVE = ("bad", "awful", "terrible", "boring", "dull", "poor", "weak", "horrible", "dreadful", "tedious",
            "annoying", "clumsy", "ugly", "lame", "silly", "bland", "messy", "painful", "shallow", "disappointing")
SUBJECTS = ("the movie", "the film", "the plot", "the acting", "the story", "the ending", "the cast", "the music",
            "the script", "the dialogue", "the show", "the book", "the soundtrack", "the direction", "the pacing",
            "the sequel")
FILLERS = ("", "", "", "honestly ", "to be fair ", "in my view ", "overall ", "frankly ")
INTENSIFIERS = ("", "", "", "really ", "very ", "quite ", "truly ")
# templates by number of negations: {s} subject, {a} (intensifier +) adjective
TEMPLATES = {
    0: ("{s} was {a}", "{s} is {a}", "i found {s} {a}", "i thought {s} was {a}", "everyone agrees {s} is {a}"),
    1: ("{s} was not {a}", "{s} is never {a}", "i did not find {s} {a}", "i do not think {s} was {a}",
        "nobody would call {s} {a}"),
    2: ("it is not true that {s} was not {a}", "i would not say {s} was not {a}", "{s} was never not {a}",
        "i do not think {s} was not {a}", "nobody would say {s} is not {a}"),
}
NEGATION_PROBS = (0.25, 0.5, 0.25)


def negation_sentence(rng: np.random.Generator, label: int) -> tuple[str, int]:
    """One sentence with the given label; returns (text, number of negations)."""
    k = int(rng.choice(3, p=NEGATION_PROBS))
    positive_adj = bool(label) ^ bool(k % 2)  # the adjective's polarity that gives this label under k negations
    adj = str(rng.choice(POSITIVE if positive_adj else NEGATIVE))
    tpl = str(rng.choice(TEMPLATES[k]))
    text = str(rng.choice(FILLERS)) + tpl.format(s=str(rng.choice(SUBJECTS)), a=str(rng.choice(INTENSIFIERS)) + adj)
    return text, k


def label_of(text: str) -> int:
    """The label recomputed from the text alone (the task's definition; an independent check of the generator)."""
    words = text.split()
    adj = words[-1]
    if adj not in POSITIVE and adj not in NEGATIVE:
        raise ValueError(f"label_of: no sentiment adjective at the end of {text!r}")
    negations = sum(w in ("not", "never", "nobody") for w in words)
    return int((adj in POSITIVE) ^ (negations % 2 == 1))


def negation_task(n_train: int, n_test: int, seed: int):
    """Balanced negation-sentiment task: ``(train_texts, train_y, test_texts, test_y)``, y int64 in {0, 1}.

    Each split has ``n // 2`` sentences per label, drawn independently from the seed's generator (train and test are
    disjoint as sets of texts: a test sentence that also occurs in train is redrawn).
    """
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for n in (n_train, n_test):
        rows = []
        for label in (0, 1):
            got = 0
            while got < n // 2:
                text, _ = negation_sentence(rng, label)
                if text in seen and out:  # test split: keep it disjoint from train
                    continue
                rows.append((text, label))
                got += 1
        order = rng.permutation(len(rows))
        texts = [rows[i][0] for i in order]
        seen |= set(texts)
        out += [texts, np.array([rows[i][1] for i in order], dtype=np.int64)]
    return tuple(out)
