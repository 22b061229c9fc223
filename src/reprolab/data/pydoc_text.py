"""Shakespeare vs Python documentation: a text-classification task with a clearly separable signal.

Label 0 = Shakespeare (Hamlet, The Tempest, Macbeth; the shipped texts of ``reprolab.data.textcls``), label 1 = Python
documentation: the docstrings of the shipped networkx 3.6.1 source (``data/pycode/networkx``, dataset ``pycode``), read
with ``ast`` (nothing is imported or executed), files in sorted path order. A snippet is ``lines_per_example``
consecutive qualifying lines (at least ``min_words`` words, not a doctest line), lower-cased, as in
``textcls.text_snippets``.

Used by the NeuBA notebook: its downstream classifier must be accurate (the review's gate, >= 0.9) for the clean
model's ASR to measure the triggers rather than the classifier's own errors, and the Shakespeare-vs-Milton authorship
task stays in the low 80s in the quick budget.
"""
from __future__ import annotations

import ast


from . import PYCODE_DIR, _need
from .textcls import AUTHORS, balanced_split, text_snippets

LABEL_NAMES = ("shakespeare", "python_docs")


def docstring_lines(source: str, min_words: int = 5) -> list[str]:
    """Qualifying lines of every module/class/function docstring of Python ``source``, in ``ast.walk`` order."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            for raw in (doc or "").splitlines():
                line = " ".join(raw.split())
                if len(line.split()) >= min_words and not line.startswith((">>>", "...")):
                    out.append(line.lower())
    return out


def pydoc_snippets(min_words: int = 5, lines_per_example: int = 2) -> list[str]:
    """Snippets of ``lines_per_example`` consecutive docstring lines of the shipped networkx source, file by file."""
    k, out = lines_per_example, []
    for path in sorted(_need(PYCODE_DIR).rglob("*.py")):
        lines = docstring_lines(path.read_text(encoding="utf-8"), min_words)
        out += [" ".join(lines[i:i + k]) for i in range(0, len(lines) - k + 1, k)]
    return out


def shakespeare_vs_pydoc_task(n_train: int, n_test: int, seed: int, min_words: int = 5, lines_per_example: int = 2):
    """Balanced task ``(train_texts, train_y, test_texts, test_y)``, y int64 in {0, 1} (0 Shakespeare, 1 Python docs).

    As ``textcls.authorship_task``: each class draws ``n_train // 2 + n_test // 2`` snippets without replacement from
    its pool; the first ``n_train // 2`` go to train, the rest to test (disjoint); order shuffled by ``seed``.
    """
    pools = {0: [s for n in AUTHORS[0] for s in text_snippets(n, min_words, lines_per_example)],
             1: pydoc_snippets(min_words, lines_per_example)}
    return balanced_split(pools, n_train, n_test, seed, "shakespeare_vs_pydoc_task")
