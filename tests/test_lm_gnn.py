"""lm_gnn: the code-graph builder on a hand-written package (exact nodes/edges), the stage-1 loss, the RGCN
normalisation against a naive per-relation mean, mean pooling and the module-grouped split."""
import os
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("DGLBACKEND", "pytorch")

from reprolab.graph import lm_gnn  # noqa: E402
from reprolab.graph.code_graph import build_code_graph, subgraph  # noqa: E402

FILES = {
    "__init__.py": '"""Root package pkg.sub.a is here."""\nfrom .sub import a\n',
    "core.py": '''
        """Core helpers."""
        import pkg as P


        def helper(x):
            """Help."""
            return P.compute(x)
        ''',
    "sub/__init__.py": "",
    "sub/a.py": '''
        """Module a, see pkg.sub.b.thing for more."""
        from . import b
        from .b import thing
        import os


        def compute(x):
            """Compute something."""
            y = thing(x)
            return b.Widget(y)


        class Runner:
            """Runs."""

            def run(self):
                return self.step() + compute(1)

            def step(self):
                return os.getpid()
        ''',
    "sub/b.py": '''
        def thing(x):
            if x:
                return thing(x - 1)
            return 0


        class Widget:
            def __init__(self, v):
                self.v = v


        def thing(x):  # a redefinition keeps the first node
            return 1
        ''',
    "util/__init__.py": "",
    "util/c.py": '''
        from ..sub.a import Runner


        def go():
            def inner():
                return 1
            return Runner().run()
        ''',
}


@pytest.fixture()
def pkg(tmp_path):
    root = tmp_path / "pkg"
    for rel, src in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src).lstrip("\n"))
    return root


def test_code_graph_exact_nodes_and_edges(pkg):
    cg = build_code_graph(pkg)
    assert cg.qualnames == [
        "pkg", "pkg.core", "pkg.core.helper",
        "pkg.sub", "pkg.sub.a", "pkg.sub.a.compute", "pkg.sub.a.Runner", "pkg.sub.a.Runner.run",
        "pkg.sub.a.Runner.step",
        "pkg.sub.b", "pkg.sub.b.thing", "pkg.sub.b.Widget", "pkg.sub.b.Widget.__init__",
        "pkg.util", "pkg.util.c", "pkg.util.c.go"]
    assert cg.kinds == ["module", "module", "function", "module", "module", "function", "class", "method", "method",
                        "module", "function", "class", "method", "module", "module", "function"]
    assert cg.labels == [None, None, None] + ["sub"] * 10 + ["util"] * 3
    i = cg.index()

    def named(edges):
        return sorted((cg.qualnames[a], cg.qualnames[b]) for a, b in edges)

    assert named(cg.edges["contains"]) == sorted([
        ("pkg.core", "pkg.core.helper"), ("pkg.sub.a", "pkg.sub.a.compute"), ("pkg.sub.a", "pkg.sub.a.Runner"),
        ("pkg.sub.a.Runner", "pkg.sub.a.Runner.run"), ("pkg.sub.a.Runner", "pkg.sub.a.Runner.step"),
        ("pkg.sub.b", "pkg.sub.b.thing"), ("pkg.sub.b", "pkg.sub.b.Widget"),
        ("pkg.sub.b.Widget", "pkg.sub.b.Widget.__init__"), ("pkg.util.c", "pkg.util.c.go")])
    assert named(cg.edges["imports"]) == sorted([
        ("pkg", "pkg.sub.a"), ("pkg.core", "pkg"), ("pkg.sub.a", "pkg.sub.b"), ("pkg.util.c", "pkg.sub.a")])
    assert named(cg.edges["calls"]) == sorted([
        ("pkg.core.helper", "pkg.sub.a.compute"),  # P.compute via the root alias and the unique-name index
        ("pkg.sub.a.compute", "pkg.sub.b.thing"), ("pkg.sub.a.compute", "pkg.sub.b.Widget"),
        ("pkg.sub.a.Runner.run", "pkg.sub.a.Runner.step"), ("pkg.sub.a.Runner.run", "pkg.sub.a.compute"),
        ("pkg.util.c.go", "pkg.sub.a.Runner")])  # recursion in thing, os.getpid, inner(): no edge
    assert all(a != b for e in cg.edges.values() for a, b in e)
    assert i["pkg.sub.b.thing"] == 10
    # determinism: a second build is identical
    cg2 = build_code_graph(pkg)
    assert cg2.qualnames == cg.qualnames and cg2.edges == cg.edges


def test_texts_drop_module_paths(pkg):
    cg = build_code_graph(pkg)
    t = dict(zip(cg.qualnames, cg.texts()))
    assert t["pkg.sub.a"] == "module a: Module a, see for more."
    assert t["pkg.sub.a.compute"] == "function compute: Compute something."
    assert t["pkg"] == "module package: Root package is here."
    assert t["pkg.sub.b.Widget"] == "class Widget: "


def test_subgraph_reindexes(pkg):
    cg = build_code_graph(pkg)
    keep = [i for i, lab in enumerate(cg.labels) if lab == "util"] + [cg.index()["pkg.sub.a.Runner"]]
    sg = subgraph(cg, keep)
    assert sg.qualnames == ["pkg.sub.a.Runner", "pkg.util", "pkg.util.c", "pkg.util.c.go"]
    assert sg.edges["calls"] == [(3, 0)] and sg.edges["contains"] == [(2, 3)] and sg.edges["imports"] == []


def test_link_bce_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    b = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    tau = 0.1
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    ref = 0.0
    for k in range(5):
        ref += -np.log(sig(float(a[k] @ b[k]) / tau)) / 5
        ref += -np.log(1 - sig(float(a[k] @ b[(k - 1) % 5]) / tau)) / 5
    assert float(lm_gnn.link_bce_loss(a, b, tau)) == pytest.approx(ref / 2, rel=1e-5)


def test_mean_pool_ignores_padding():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = lm_gnn.mean_pool(h, mask)
    assert torch.allclose(out[0], h[0, :2].mean(0)) and torch.allclose(out[1], h[1, 0])


def test_rgcn_layer_equals_naive_relational_mean(pkg):
    cg = build_code_graph(pkg)
    g, names = lm_gnn.relational_graph(cg)
    assert names == ["contains", "rev_contains", "imports", "rev_imports", "calls", "rev_calls"]
    torch.manual_seed(0)
    model = lm_gnn.RGCN(3, 4, 2, len(names), n_layers=1)
    X = torch.randn(cg.num_nodes, 3)
    with torch.no_grad():
        out = model(g, X)
        layer = model.layers[0]
        W = layer.linear_r.W if hasattr(layer.linear_r, "W") else None
        ref = X @ layer.loop_weight + layer.h_bias
        for r, t in enumerate(names):
            base = t.replace("rev_", "")
            e = cg.edges[base]
            pairs = [(b, a) for a, b in e] if t.startswith("rev_") else list(e)
            for i in range(cg.num_nodes):
                nbrs = [s for s, d in pairs if d == i]
                if nbrs:
                    ref[i] += torch.stack([X[s] @ W[r] for s in nbrs]).mean(0)
    assert torch.allclose(out, ref, atol=1e-5)


def test_module_split_groups_by_module(pkg):
    cg = build_code_graph(pkg)
    sp = lm_gnn.module_split(cg, (0.5, 0.25, 0.25), seed=0)
    allidx = sorted(sum((v.tolist() for v in sp.values()), []))
    assert allidx == [i for i, lab in enumerate(cg.labels) if lab is not None]
    where = {i: k for k, v in sp.items() for i in v.tolist()}
    q = cg.index()
    assert where[q["pkg.sub.a.Runner.run"]] == where[q["pkg.sub.a"]] == where[q["pkg.sub.a.compute"]]
    assert where[q["pkg.sub.b.Widget.__init__"]] == where[q["pkg.sub.b"]]


def test_link_infonce_loss_matches_naive_softmax():
    """GraphStorm's contrastive loss (loss_func.py:808-880) with in-batch negatives, against a naive loop."""
    g = torch.Generator().manual_seed(1)
    a, b = F.normalize(torch.randn(6, 4, generator=g), dim=-1), F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    tau = 0.05
    ref = 0.0
    for i in range(6):
        scores = [float(a[i] @ b[j]) / tau for j in range(6)]
        ref += -(scores[i] - np.log(np.sum(np.exp(scores)))) / 6
    assert float(lm_gnn.link_infonce_loss(a, b, tau)) == pytest.approx(ref, rel=1e-5)


def test_inbatch_false_negatives_and_masked_infonce_match_a_naive_loop():
    """Masked in-batch InfoNCE against a naive per-row loop that keeps only the valid negatives of each row: not the
    row's own target again, not the source itself, not a known edge (either direction given in ``known``)."""
    src = np.array([0, 1, 2, 3, 4, 5, 1])
    dst = np.array([7, 7, 8, 0, 9, 8, 2])  # rows 0/1 and 2/5 share a target; dst of row 3 is source of row 0
    known = {(0, 8), (8, 0), (4, 7), (7, 4), (1, 2), (2, 1)}  # (0, 8), (4, 7) are in-batch false negatives
    B = len(src)
    g = torch.Generator().manual_seed(3)
    a, b = F.normalize(torch.randn(B, 5, generator=g), dim=-1), F.normalize(torch.randn(B, 5, generator=g), dim=-1)
    tau = 0.1
    ref_mask = np.zeros((B, B), dtype=bool)
    ref = 0.0
    for i in range(B):
        keep = [i]
        for j in range(B):
            if j == i:
                continue
            bad = dst[j] == dst[i] or dst[j] == src[i] or (int(src[i]), int(dst[j])) in known
            ref_mask[i, j] = bad
            if not bad:
                keep.append(j)
        scores = np.array([float(a[i] @ b[j]) / tau for j in keep])
        ref += -(scores[0] - np.log(np.exp(scores).sum())) / B
    mask = lm_gnn.inbatch_false_negatives(src, dst, known)
    assert np.array_equal(mask, ref_mask)
    assert mask[0, 1] and mask[1, 0] and mask[2, 5] and mask[0, 2] and mask[4, 0] and mask[0, 3] and mask[1, 6]
    assert not mask.diagonal().any()
    assert float(lm_gnn.link_infonce_loss(a, b, tau, mask)) == pytest.approx(ref, rel=1e-5)
    # without known edges only duplicates and self-pairs are masked; with no mask the plain loss
    assert not lm_gnn.inbatch_false_negatives(src, dst)[0, 2]
    assert float(lm_gnn.link_infonce_loss(a, b, tau, None)) == pytest.approx(
        float(lm_gnn.link_infonce_loss(a, b, tau, np.zeros((B, B), dtype=bool))), rel=1e-6)


class _WordTokenizer:
    """A stand-in tokenizer: [CLS] words [SEP], right padding, ids from a fixed vocabulary."""

    def __init__(self, vocab):
        self.vocab = {w: i + 3 for i, w in enumerate(vocab)}

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        rows = [[1] + [self.vocab[w] for w in t.split()][:max_length - 2] + [2] for t in texts]
        T = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.int64)
        mask = torch.zeros(len(rows), T, dtype=torch.int64)
        for k, r in enumerate(rows):
            ids[k, :len(r)], mask[k, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture()
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    words = "alpha beta gamma delta graph node edge text model layer".split()
    cfg = BertConfig(vocab_size=len(words) + 3, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(11)]
    return BertModel(cfg).eval(), _WordTokenizer(words), texts


@pytest.mark.parametrize("ft_layers", [1, 2, 3])
def test_node_encoder_cached_top_layers_equal_the_full_forward(tiny_bert, ft_layers):
    """The cached lower layers + top layers give the embeddings of the full HF forward (encode_texts, per-batch
    padding), for every split point; the full-model path (ft_layers = all) too."""
    model, tok, texts = tiny_bert
    ref = lm_gnn.encode_texts(model, tok, texts, 12, batch_size=4)
    enc = lm_gnn.NodeEncoder(model, tok, texts, 12, ft_layers)
    E0 = enc.build_cache(batch_size=5)
    assert torch.allclose(E0, ref, atol=1e-5)
    assert torch.allclose(enc.encode_all(batch_size=3), ref, atol=1e-5)


def test_finetune_updates_only_the_top_layers(tiny_bert):
    model, tok, texts = tiny_bert
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = lm_gnn.NodeEncoder(model, tok, texts, 12, 1)
    enc.build_cache()
    pairs = np.array([[i, (i + 1) % len(texts)] for i in range(len(texts))])
    stats = {}
    losses = lm_gnn.finetune_link(enc, pairs, batch_size=4, lr=1e-2, epochs=2, tau=0.05, seed=0, loss="infonce",
                                  known={(int(u), int(v)) for u, v in pairs}, stats=stats)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert stats["rows"] == 22 and stats["candidates"] == 2 * (4 * 3 + 4 * 3 + 3 * 2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.layer.2.") for k in changed)
