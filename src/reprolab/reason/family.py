"""Generated family trees with ground-truth relations (the Neural Logic Machine / SpaLoc family-tree task).

Labelled as GENERATED data: people are added one at a time, either as a child of a random existing couple or as an
outsider who marries an unmarried person, so the tree is connected and locally sparse.
Relations (x, y): parent(x, y) means x is a parent of y.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FamilyTree:
    male: np.ndarray  # (N,) bool
    father: np.ndarray  # (N,) int, -1 = unknown
    mother: np.ndarray  # (N,) int, -1 = unknown

    @property
    def n(self) -> int:
        return len(self.male)

    def parent_matrix(self) -> np.ndarray:
        P = np.zeros((self.n, self.n), dtype=bool)  # P[x, y]: x is a parent of y
        for y in range(self.n):
            for x in (self.father[y], self.mother[y]):
                if x >= 0:
                    P[x, y] = True
        return P


def generate_family_tree(n: int, rng: np.random.Generator, p_marry: float = 0.3) -> FamilyTree:
    """A random family of n people: founders (a couple), then children of random couples or married-in outsiders."""
    male, father, mother, spouse = [True, False], [-1, -1], [-1, -1], [1, 0]
    couples = [(0, 1)]
    while len(male) < n:
        singles = [i for i in range(len(male)) if spouse[i] < 0 and father[i] >= 0]
        if singles and rng.random() < p_marry:
            a = int(singles[rng.integers(len(singles))])
            b = len(male)
            male.append(not male[a]); father.append(-1); mother.append(-1); spouse.append(a)
            spouse[a] = b
            couples.append((a, b) if male[a] else (b, a))
        else:
            f, m = couples[rng.integers(len(couples))]
            male.append(bool(rng.random() < 0.5)); father.append(f); mother.append(m); spouse.append(-1)
    return FamilyTree(np.array(male), np.array(father), np.array(mother))


def family_relations(tree: FamilyTree) -> dict[str, np.ndarray]:
    """Ground truth (N, N) bool matrices: parent, grandparent, sibling, uncle (x is an uncle of y)."""
    P = tree.parent_matrix()
    Pi = P.astype(np.int64)
    eye = np.eye(tree.n, dtype=bool)
    sibling = ((Pi.T @ Pi) > 0) & ~eye  # share a parent
    return {"parent": P, "grandparent": (Pi @ Pi) > 0,
            "sibling": sibling,
            "uncle": tree.male[:, None] & ((sibling.astype(np.int64) @ Pi) > 0)}


TARGETS = ("grandparent", "sibling", "uncle")


def hop_distances(P: np.ndarray, k: int) -> np.ndarray:
    """Undirected shortest-path distance in the parent graph, capped at k + 1 (so <= k means 'within k hops')."""
    A = (P | P.T).astype(np.int64)
    n = len(A)
    D = np.full((n, n), k + 1, dtype=np.int64)
    np.fill_diagonal(D, 0)
    reach = np.eye(n, dtype=np.int64)
    for d in range(1, k + 1):
        reach = ((reach @ A) > 0).astype(np.int64) | reach
        D[(reach > 0) & (D > d)] = d
    return D
