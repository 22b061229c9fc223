"""ReaRev KGQA: generated answers match a naive traversal; GNN propagation matches a dense computation."""
import numpy as np
import pandas as pd
import pytest
import torch

from reprolab.reason import kgqa
from reprolab.reason.rearev import KGQAReasoner, hits_at_1, loss_fn, propagate, segment_softmax

torch.set_num_threads(1)


def _toy_frame(rng, n_films=30, n_people=12):
    rows = []
    for f in range(n_films):
        for rel, pool in (("film.film.directed_by", n_people), ("film.film.written_by", n_people),
                          ("film.film.produced_by", n_people), ("film.film.genre", 4), ("film.film.language", 3)):
            for t in rng.choice(pool, size=rng.integers(1, 3), replace=False):
                prefix = {"film.film.genre": "g", "film.film.language": "l"}.get(rel, "p")
                rows.append((f"f{f}", rel, f"{prefix}{t}"))
    return pd.DataFrame(rows, columns=["head", "relation", "tail"]).drop_duplicates()


def test_question_answers_match_naive_traversal():
    rng = np.random.default_rng(0)
    df = _toy_frame(rng)
    kg = kgqa.kg_from_frame(df)
    triples = {(h, r, t) for h, r, t in zip(df["head"], df["relation"], df["tail"])}
    qs = kgqa.generate_questions(kg, 5, 50, rng)
    assert {q["hops"] for q in qs} == {1, 2, 3}
    long = {v: k for k, v in kgqa.SHORT.items()}
    for q in qs:
        frontier = {kg.entities[q["topic"]]}
        for short, d in kgqa.TEMPLATES[q["template"]][1]:
            rel = long[short]
            frontier = {t for (h, r, t) in triples if r == rel and h in frontier} if d > 0 else \
                {h for (h, r, t) in triples if r == rel and t in frontier}
        frontier.discard(kg.entities[q["topic"]])
        assert sorted(kg.entities[a] for a in q["answers"]) == sorted(frontier)


def test_subgraph_contains_answers_on_complete_kg():
    rng = np.random.default_rng(1)
    kg = kgqa.kg_from_frame(_toy_frame(rng))
    qs = kgqa.generate_questions(kg, 3, 50, rng)
    ex = kgqa.build_examples(kg, qs, 3, 10_000, kgqa.make_vocab())
    for e in ex:
        assert e["nodes"][0] == e["topic"] and e["answer_mask"].sum() == len(e["answers"])


def test_propagation_matches_dense_matrix():
    torch.manual_seed(0)
    n, E, K, d = 7, 20, 3, 4
    src, dst = torch.randint(0, n, (E,)), torch.randint(0, n, (E,))
    p, w = torch.rand(n), torch.randn(E, K, d)
    Wd = torch.zeros(n, n, K, d)
    for e in range(E):
        Wd[src[e], dst[e]] += w[e]
    dense = torch.einsum("s,sekd->ekd", p, Wd)
    assert torch.allclose(propagate(p, src, dst, w, n), dense, atol=1e-6)


def test_segment_softmax_and_hits():
    logits = torch.tensor([0.1, 2.0, -1.0, 0.5, 0.3])
    seg = torch.tensor([0, 0, 0, 1, 1])
    p = segment_softmax(logits, seg, 2)
    assert torch.allclose(p[:3], logits[:3].softmax(0)) and torch.allclose(p[3:], logits[3:].softmax(0))
    g = {"qid": seg, "batch": 2, "n_nodes": 5, "answer": torch.tensor([False, True, False, False, True])}
    assert hits_at_1(p, g).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("adaptive", [False, True])
def test_model_runs_and_learns_toy(adaptive):
    rng = np.random.default_rng(2)
    kg = kgqa.kg_from_frame(_toy_frame(rng))
    vocab = kgqa.make_vocab()
    ex = kgqa.build_examples(kg, kgqa.generate_questions(kg, 1, 50, rng), 2, 30, vocab)
    torch.manual_seed(0)
    model = KGQAReasoner(len(vocab), len(kgqa.RELATIONS), 16, 3, adaptive, 2, 3)
    g = kgqa.collate(ex, len(kgqa.RELATIONS))
    p = model(g)
    sums = torch.zeros(g["batch"]).index_add(0, g["qid"], p)
    assert torch.allclose(sums, torch.ones(g["batch"]), atol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(loss_fn(p, g))
    for _ in range(10):
        loss = loss_fn(model(g), g)
        opt.zero_grad(); loss.backward(); opt.step()
    assert float(loss) < first


def test_fusion_matches_official_formula():
    """Official ReaRev Fusion (modules/query_update.py): g * r + (1 - g) * x, r = W_r[x;y;x-y], g = sigmoid(W_g[...])."""
    from reprolab.reason.rearev import Fusion

    torch.manual_seed(0)
    f = Fusion(4)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    z = torch.cat([x, y, x - y], -1).numpy().astype(np.float64)
    Wr, Wg = f.r.weight.detach().numpy().astype(np.float64), f.g.weight.detach().numpy().astype(np.float64)
    g = 1 / (1 + np.exp(-(z @ Wg.T)))
    want = g * (z @ Wr.T) + (1 - g) * x.numpy()
    assert np.allclose(f(x, y).detach().numpy(), want, atol=1e-6)
    assert f.r.bias is None and f.g.bias is None


def test_gated_reform_reads_the_topic_state():
    """Round 2 = fusion of each instruction with the topic entity's state, GNN re-run from the kept states."""
    rng = np.random.default_rng(3)
    kg = kgqa.kg_from_frame(_toy_frame(rng))
    vocab = kgqa.make_vocab()
    ex = kgqa.build_examples(kg, kgqa.generate_questions(kg, 1, 50, rng), 2, 30, vocab)
    g = kgqa.collate(ex[:3], len(kgqa.RELATIONS))
    torch.manual_seed(0)
    model = KGQAReasoner(len(vocab), len(kgqa.RELATIONS), 8, 2, True, 2, 2, reform="gated")
    with torch.no_grad():
        p = model(g)
        I = model.instructions(g["tokens"])
        _, h = model.gnn(g, I, model.init_states(g))
        topic = [int(torch.nonzero(g["qid"] == b)[0]) for b in range(g["batch"])]  # node 0 of each subgraph
        y = h[topic]  # (B, d)
        I2 = torch.stack([model.fusions[k](I[:, k], y) for k in range(2)], 1)
        p_manual, _ = model.gnn(g, I2, h)
    assert torch.allclose(p, p_manual, atol=1e-6)
    assert torch.allclose(torch.zeros(g["batch"]).index_add(0, g["qid"], p), torch.ones(g["batch"]), atol=1e-5)
