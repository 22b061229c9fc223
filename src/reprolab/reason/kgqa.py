"""MetaQA-style multi-hop questions over a real movie KG, question subgraphs and batching (for ReaRev / NSM).

Questions are GENERATED from templates (relation paths of 1-3 hops, MetaQA's recipe); the answer set is every entity
reached from the topic entity by following the path in the COMPLETE KG (topic excluded). Models may see an
incomplete KG (a fraction of triples removed), in which case some answers are only reachable by other routes.

Relations: film -> person (directed_by, written_by, produced_by) and film -> attribute (genre, language, country).
Attribute entities are hubs (thousands of films): subgraph retrieval treats them as leaves and never expands them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

RELATIONS = ["film.film.directed_by", "film.film.written_by", "film.film.produced_by", "film.film.genre",
             "film.film.language", "film.film.country"]
HUB_RELATIONS = {"film.film.genre", "film.film.language", "film.film.country"}
SHORT = {"film.film.directed_by": "dir", "film.film.written_by": "wri", "film.film.produced_by": "pro",
         "film.film.genre": "gen", "film.film.language": "lan", "film.film.country": "cou"}

# (question text, path of (relation short name, +1 film->x / -1 x->film)); "E" is the topic entity
TEMPLATES = [
    ("who directed E", [("dir", 1)]),
    ("who wrote E", [("wri", 1)]),
    ("who produced E", [("pro", 1)]),
    ("what genre is E", [("gen", 1)]),
    ("what language is E in", [("lan", 1)]),
    ("which films did E direct", [("dir", -1)]),
    ("which films did E write", [("wri", -1)]),
    ("which films share the director of E", [("dir", 1), ("dir", -1)]),
    ("which films share a writer with E", [("wri", 1), ("wri", -1)]),
    ("what genres are the films directed by E", [("dir", -1), ("gen", 1)]),
    ("what languages are the films written by E in", [("wri", -1), ("lan", 1)]),
    ("who directed the films written by E", [("wri", -1), ("dir", 1)]),
    ("who wrote the films produced by E", [("pro", -1), ("wri", 1)]),
    ("which genres have films directed by the director of E", [("dir", 1), ("dir", -1), ("gen", 1)]),
    ("who wrote the films directed by the director of E", [("dir", 1), ("dir", -1), ("wri", 1)]),
    ("what languages are the films written by the writer of E in", [("wri", 1), ("wri", -1), ("lan", 1)]),
    ("who directed the films written by the writer of E", [("wri", 1), ("wri", -1), ("dir", 1)]),
]


@dataclass
class KG:
    """Integer KG: triples (h, r, t) with h a film; out[r][h] and inc[r][t] adjacency sets."""
    entities: list[str]
    triples: np.ndarray  # (M, 3) int
    out: dict
    inc: dict
    hub_rel: set

    @classmethod
    def build(cls, triples: np.ndarray, n_entities: int, entities: list[str]) -> "KG":
        out, inc = defaultdict(lambda: defaultdict(set)), defaultdict(lambda: defaultdict(set))
        for h, r, t in triples:
            out[int(r)][int(h)].add(int(t))
            inc[int(r)][int(t)].add(int(h))
        hub = {RELATIONS.index(r) for r in HUB_RELATIONS}
        return cls(entities, triples, out, inc, hub)

    def step(self, frontier: set, rel: int, direction: int) -> set:
        table = self.out[rel] if direction > 0 else self.inc[rel]
        nxt = set()
        for e in frontier:
            nxt |= table.get(e, set())
        return nxt


def kg_from_frame(df) -> KG:
    ents = sorted(set(df["head"]) | set(df["tail"]))
    eid = {e: i for i, e in enumerate(ents)}
    rid = {r: i for i, r in enumerate(RELATIONS)}
    triples = np.array([(eid[h], rid[r], eid[t]) for h, r, t in zip(df["head"], df["relation"], df["tail"])],
                       dtype=np.int64)
    return KG.build(triples, len(ents), ents)


def drop_triples(kg: KG, fraction: float, rng: np.random.Generator) -> KG:
    """The same entities with a random fraction of triples removed (an incomplete KG)."""
    keep = rng.random(len(kg.triples)) >= fraction
    return KG.build(kg.triples[keep], len(kg.entities), kg.entities)


def answer_path(kg: KG, topic: int, path) -> set:
    """Entities reached from the topic by following the template's relation path (topic excluded)."""
    frontier = {topic}
    for short, direction in path:
        rel = [SHORT[r] for r in RELATIONS].index(short)
        frontier = kg.step(frontier, rel, direction)
    return frontier - {topic}


def generate_questions(kg: KG, n_per_template: int, max_answers: int, rng: np.random.Generator) -> list[dict]:
    """Sample topic entities per template and keep questions with 1..max_answers answers (on the complete KG)."""
    shorts = [SHORT[r] for r in RELATIONS]
    qs = []
    for tid, (text, path) in enumerate(TEMPLATES):
        rel0, dir0 = shorts.index(path[0][0]), path[0][1]
        pool = sorted((kg.out[rel0] if dir0 > 0 else kg.inc[rel0]).keys())
        order = rng.permutation(len(pool))
        got = 0
        for i in order:
            topic = int(pool[i])
            ans = answer_path(kg, topic, path)
            if 1 <= len(ans) <= max_answers:
                qs.append({"template": tid, "text": text, "hops": len(path), "topic": topic, "answers": sorted(ans)})
                got += 1
                if got >= n_per_template:
                    break
    return qs


def retrieve_subgraph(kg: KG, topic: int, hops: int, max_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """BFS up to `hops` hops in both directions from the topic; hub (attribute) entities are leaves.

    Returns the node ids (topic first) and the local triples (h_local, r, t_local)."""
    nodes, seen, frontier = [topic], {topic}, [topic]
    if not hasattr(kg, "_hubs"):
        kg._hubs = set().union(*[set(kg.inc[r].keys()) for r in kg.hub_rel])
    is_hub = kg._hubs
    for _ in range(hops):
        nxt = []
        for e in frontier:
            if e in is_hub and e != topic:
                continue
            for r in range(len(RELATIONS)):
                for nb in sorted(kg.out[r].get(e, ())) + sorted(kg.inc[r].get(e, ())):
                    if nb not in seen and len(nodes) < max_nodes:
                        seen.add(nb)
                        nodes.append(nb)
                        nxt.append(nb)
        frontier = nxt
    local = {e: i for i, e in enumerate(nodes)}
    trip = [(local[h], r, local[t]) for e in nodes for r in range(len(RELATIONS))
            for h, t in [(e, t) for t in kg.out[r].get(e, ())] if t in local]
    return np.array(nodes), np.array(trip, dtype=np.int64).reshape(-1, 3)


def build_examples(kg_seen: KG, questions: list[dict], max_hops: int, max_nodes: int, vocab: dict) -> list[dict]:
    """Per question: the retrieved subgraph of the KG the model sees, token ids, answer mask (complete-KG answers)."""
    out = []
    for q in questions:
        nodes, trip = retrieve_subgraph(kg_seen, q["topic"], max_hops, max_nodes)
        ans = set(q["answers"])
        out.append({**q, "nodes": nodes, "trip": trip, "tokens": [vocab[w] for w in q["text"].split()],
                    "answer_mask": np.array([n in ans for n in nodes])})
    return out


def make_vocab() -> dict:
    words = sorted({w for text, _ in TEMPLATES for w in text.split()})
    return {w: i + 1 for i, w in enumerate(words)}  # 0 = padding


def collate(batch: list[dict], n_rel: int) -> dict:
    """Disjoint union of the question subgraphs: edges in both directions (inverse relation = r + n_rel)."""
    offs, src, dst, rel, qid, seed, ans = 0, [], [], [], [], [], []
    for b, ex in enumerate(batch):
        n = len(ex["nodes"])
        h, r, t = ex["trip"].T if len(ex["trip"]) else (np.zeros(0, int),) * 3
        src += [h + offs, t + offs]
        dst += [t + offs, h + offs]
        rel += [r, r + n_rel]
        qid.append(np.full(n, b))
        s = np.zeros(n)
        s[0] = 1.0
        seed.append(s)
        ans.append(ex["answer_mask"])
        offs += n
    T = max(len(ex["tokens"]) for ex in batch)
    tokens = torch.zeros(len(batch), T, dtype=torch.long)
    for b, ex in enumerate(batch):
        tokens[b, :len(ex["tokens"])] = torch.tensor(ex["tokens"])
    cat = lambda xs, dt: torch.from_numpy(np.concatenate(xs)).to(dt)  # noqa: E731
    return {"src": cat(src, torch.long), "dst": cat(dst, torch.long), "rel": cat(rel, torch.long),
            "qid": cat(qid, torch.long), "seed": cat(seed, torch.float32), "answer": cat(ans, torch.bool),
            "tokens": tokens, "n_nodes": offs, "batch": len(batch)}
