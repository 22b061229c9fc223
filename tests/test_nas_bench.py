"""NAS ground truth: the published benchmarks read offline (sizes, known entries, restricted unpickler), the NB-201 cell
space (encoding against NASLib's own conversion, network sizes against NB-201's published ranges) and the
``nas_groundtruth`` stage at smoke size (deterministic JSON)."""
import io
import json
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch

from reprolab.nas import benchmarks as B
from reprolab.nas import space201 as S

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- restricted pickle
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/reprolab_nas_pwned",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize("allowed", [B._NBG_GLOBALS, B._ANALOG_GLOBALS])
@pytest.mark.parametrize("obj", [_Evil(), _EvalEvil(), {"a": _Evil()}])
def test_restricted_unpickler_refuses_other_globals(allowed, obj):
    data = pickle.dumps(obj)
    with pytest.raises(B.UnsafePickleError, match="refusing"):
        B.restricted_load(data, allowed)
    assert not os.path.exists("/tmp/reprolab_nas_pwned")
    # the same bytes would run os.system with a plain unpickler: the test pickle really is malicious
    assert any(op.name in ("STACK_GLOBAL", "GLOBAL") for op, _, _ in pickletools.genops(io.BytesIO(data)))


@pytest.mark.parametrize("data, allowed", [
    (b"cnumpy.core.multiarray\n_reconstruct\n.", B._NBG_GLOBALS),  # an allowed module, another attribute
    (b"cnumpy\nload\n.", B._NBG_GLOBALS),
    (b"\x80\x04\x8c\x08builtins\x94\x8c\x04exec\x94\x93\x94.", B._NBG_GLOBALS),  # STACK_GLOBAL
    (b"(S'echo pwned'\nios\nsystem\n.", B._NBG_GLOBALS),  # INST opcode
    (b"canalognasbench.data\nos\n.", B._ANALOG_GLOBALS),
    (b"canalognasbench.data\nArchitecture\n.", B._NBG_GLOBALS),  # allowed for the other pickle only
])
def test_restricted_unpickler_refuses_crafted_opcodes(data, allowed):
    with pytest.raises(B.UnsafePickleError, match="refusing"):
        B.restricted_load(data, allowed)


def test_restricted_unpickler_refuses_the_extension_registry():
    """EXT opcodes resolve through copyreg's registry: they must go through find_class too."""
    import copyreg

    copyreg.add_extension("os", "system", 0xBEEF)
    try:
        with pytest.raises(B.UnsafePickleError, match="refusing"):
            B.restricted_load(b"\x80\x02\x83\xef\xbeU\x0aecho pwned\x85R.", B._NBG_GLOBALS)
    finally:
        copyreg.remove_extension("os", "system", 0xBEEF)


def test_restricted_unpickler_allows_plain_data_and_numpy_scalars():
    obj = {1: {"perf": np.float64(0.5), "para": np.float32(2.0)}}
    out = B.restricted_load(pickle.dumps(obj), B._NBG_GLOBALS)
    assert out[1]["perf"] == 0.5 and isinstance(out[1]["perf"], np.float64)


def _globals(path):
    """Every global a pickle references: an unpickler that records each lookup and returns a harmless dummy class
    (independent of the allow-list under test)."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            if (module, name) == ("numpy", "dtype"):
                return np.dtype
            if name == "scalar":
                return lambda dtype, data=b"": None
            return type(name, (), {})

    Recorder(io.BytesIO(path.read_bytes())).load()
    return seen


def test_benchmark_pickles_only_reference_allowed_globals():
    assert _globals(B.NBG_DIR / "cora.bench") <= set(B._NBG_GLOBALS)
    assert _globals(B.ANALOG_FILE) == set(B._ANALOG_GLOBALS)


# ---------------------------------------------------------------------------------------------------- NAS-Bench-Graph
def test_nbg_cora_size_and_known_entry():
    t = B.nbg_table("cora")
    assert len(t) == 26206 and t["hash"].is_unique
    row = t[t["hash"] == B.nbg_hash([0, 1, 2, 3], ["skip", "skip", "gcn", "gcn"])].iloc[0]
    assert row["val_acc"] == pytest.approx(0.791, abs=5e-4) and row["test_acc"] == pytest.approx(0.802, abs=5e-4)
    assert row["latency_s"] == pytest.approx(0.0024, abs=1e-4) and row["params_m"] == pytest.approx(0.50, abs=0.01)
    assert tuple(row["link"]) == (0, 1, 2, 3) and tuple(row["ops"]) == ("skip", "skip", "gcn", "gcn")
    # RESOURCES.md ranges on cora
    assert 0.155 < t["val_acc"].min() < 0.16 and 0.818 < t["val_acc"].max() < 0.82
    assert t["test_acc"].max() == pytest.approx(0.831, abs=1e-3)


def test_nbg_enumeration_covers_exactly_the_bench_keys():
    raw = B.nbg_raw("citeseer")
    t = B.nbg_architectures()
    assert set(t["hash"]) == {int(k) for k in raw} and len(raw) == 26206
    # every enumerated architecture is a canonical representative: 9 link patterns, 9 ops, no all-skip cell
    assert set(t["link"]) == {tuple(lk) for lk in B.nbg_architecture_module().link_list}
    assert not any(all(o == "skip" for o in ops) for ops in t["ops"])


def test_nbg_isomorphic_cells_share_a_key():
    # all-parallel link [0,0,0,0]: the order of the four branches does not matter
    a = B.nbg_hash([0, 0, 0, 0], ["gcn", "gat", "sage", "fc"])
    b = B.nbg_hash([0, 0, 0, 0], ["fc", "sage", "gat", "gcn"])
    assert a == b and a in set(B.nbg_architectures()["hash"])


def test_nbg_proteins_and_bad_dataset():
    assert len(B.nbg_table("proteins")) == 2021
    with pytest.raises(ValueError, match="allowed"):
        B.nbg_raw("cifar10")


# ---------------------------------------------------------------------------------------------------- AnalogNAS-Bench
def test_nb201_table_size_and_known_entries():
    t = B.nb201_table()
    assert len(t) == 15625 and set(t["cell"]) == set(S.all_cells())
    acc = B.nb201_accuracy()
    assert acc[(2, 2, 0, 2, 3, 2)] == pytest.approx(94.0664)
    assert max(acc, key=acc.get) == (2, 2, 0, 2, 3, 2)
    assert acc[(1,) * 6] == pytest.approx(10.0)
    assert acc[(2,) * 6] == pytest.approx(93.2424) and acc[(0,) * 6] == pytest.approx(60.7836)
    row = t[t["cell"] == (2, 2, 0, 2, 3, 2)].iloc[0]
    assert row["arch"] == "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    with pytest.raises(ValueError):
        B.nb201_accuracy("bogus")


def test_disconnected_cells_are_exactly_the_chance_cells():
    """Independent check of the edge order: a cell whose output cannot reach its input (by our EDGES) scores ~10% on
    CIFAR-10 in the benchmark, and every cell at chance is such a cell."""
    acc = B.nb201_accuracy()
    chance = {c for c, a in acc.items() if a < 10.5}
    disconnected = {c for c in acc if not S.is_connected(c)}
    assert chance == disconnected and len(chance) == 341


# ------------------------------------------------------------------------------------------------------ NB-201 space
def _naslib_str_to_op_indices(s):
    """NASLib's convert_str_to_op_indices (naslib/search_spaces/nasbench201/conversions.py), the peer reference."""
    nodes = s.split("+")
    node_ops = [[x.split("~")[0] for x in n.strip()[1:-1].split("|")] for n in nodes]
    return tuple(S.OPS.index(node_ops[v - 2][u - 1]) for u, v in ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)))


def test_space_size_and_string_encoding_against_naslib():
    cells = S.all_cells()
    assert len(cells) == 15625 == len(set(cells))
    assert [S.cell_index(c) for c in cells] == list(range(15625))
    for c in cells:
        s = S.to_str(c)
        assert _naslib_str_to_op_indices(s) == c and S.from_str(s) == c
    assert S.to_str((0, 1, 2, 3, 4, 0)) == \
        "|skip_connect~0|+|none~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|skip_connect~2|"
    with pytest.raises(ValueError):
        S.to_str((5, 0, 0, 0, 0, 0))


def test_mutation_changes_exactly_one_edge():
    rng = np.random.default_rng(0)
    c = (2, 2, 0, 2, 3, 2)
    for _ in range(50):
        m = S.mutate(c, rng)
        assert S.edit_distance(c, m) == 1


def test_cell_forward_matches_a_hand_computation():
    torch.manual_seed(0)
    cell = (2, 4, 0, 3, 1, 0)  # 0->1 conv3, 0->2 pool, 0->3 skip, 1->2 conv1, 1->3 none, 2->3 skip
    m = S.InferCell(cell, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    e = m.edges
    n1 = e[0](x)
    n2 = e[1](x) + e[3](n1)
    n3 = x + 0 * n1 + n2
    assert torch.allclose(m(x), n3, atol=1e-6)
    pool = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert torch.allclose(e[1](x), pool)
    z = S.InferCell((1, 1, 1, 1, 1, 1), 4)(x)
    assert torch.count_nonzero(z) == 0


def test_ops_follow_nb201_order_relu_conv_bn_and_the_basic_block():
    """NB-201 cell_operations.py: ReLUConvBN = ReLU -> Conv (no bias) -> BN; ResNetBasicblock = conv_b(conv_a(x)) +
    downsample(x), downsample = AvgPool2d(2, 2) -> conv1x1. Checked against a functional re-computation (eval mode,
    random BN statistics), so a reordered op (e.g. Conv-BN-ReLU, which has the same parameters and FLOPs) fails."""
    import torch.nn.functional as F

    torch.manual_seed(0)

    def randomize_bn(m):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
        return m.eval()

    def rcb(op, x):
        conv = next(m for m in op.modules() if isinstance(m, torch.nn.Conv2d))
        bn = next(m for m in op.modules() if isinstance(m, torch.nn.BatchNorm2d))
        y = F.conv2d(F.relu(x), conv.weight, None, conv.stride, conv.padding)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    x = torch.randn(2, 4, 6, 6)
    for name in ("nor_conv_3x3", "nor_conv_1x1"):
        op = randomize_bn(S.make_op(name, 4))
        assert op[0].__class__ is torch.nn.ReLU and op[1].bias is None
        assert torch.allclose(op(x), rcb(op, x), atol=1e-5)
    blk = randomize_bn(S.ResNetBasicBlock(4, 8, 2))
    short = F.conv2d(F.avg_pool2d(x, 2, 2), blk.downsample[1].weight)
    assert torch.allclose(blk(x), short + rcb(blk.conv_b, rcb(blk.conv_a, x)), atol=1e-5)
    net = randomize_bn(S.NB201Network((0,) * 6, 4, 1, 10, 4))  # all-skip cells: stem -> blocks -> BN-ReLU -> GAP -> fc
    h = F.batch_norm(F.conv2d(x, net.stem[0].weight, padding=1), net.stem[1].running_mean, net.stem[1].running_var,
                     net.stem[1].weight, net.stem[1].bias, False, 0.0, 1e-5)
    for m in net.cells:
        h = m(h)
    bn = net.lastact[0]
    h = F.relu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    ref = net.classifier(h.mean((2, 3)))
    assert torch.allclose(net(x), ref, atol=1e-5)
    assert torch.allclose(S.InferCell((0,) * 6, 4)(x), 4 * x)  # all-skip: n1 = x, n2 = 2x, n3 = x + x + 2x


def test_network_sizes_match_nb201_published_ranges():
    """NB-201 (C=16, N=5, CIFAR-10 32x32): parameters 0.07-1.53 M and FLOPs 7.78-220.11 M over the space (the
    all-'none' and all-conv3x3 cells are the extremes)."""
    lo, hi = S.NB201Network((1,) * 6, 16, 5, 10, 3), S.NB201Network((2,) * 6, 16, 5, 10, 3)
    assert round(S.count_params(lo) / 1e6, 2) == 0.07 and round(S.count_params(hi) / 1e6, 2) == 1.53
    assert round(S.count_flops(lo, (3, 32, 32)) / 1e6, 2) == 7.78
    assert round(S.count_flops(hi, (3, 32, 32)) / 1e6, 2) == 220.12 or \
        round(S.count_flops(hi, (3, 32, 32)) / 1e6, 2) == 220.11
    out = S.NB201Network((2, 2, 0, 2, 3, 2), 4, 1, 10, 1)(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)


def test_count_flops_against_a_hand_count():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 5 * 5, 4))
    assert S.count_flops(net, (2, 5, 5)) == 3 * 5 * 5 * (2 * 9) + 75 * 4


# ---------------------------------------------------------------------------------------------- ground-truth stage
def _params():
    """params.yaml as plain YAML (the stage reads only its own section; no registry needed)."""
    import yaml

    from reprolab.paths import PARAMS_FILE

    return yaml.safe_load(PARAMS_FILE.read_text())


def test_select_cells_is_stratified_and_reproducible():
    from reprolab.nas.groundtruth import select_cells

    a = select_cells(10, 0, ["|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|"
                             "skip_connect~2|"])
    assert a == select_cells(10, 0, a[-1:] and [a[-1]["arch"]])
    accs = B.nb201_accuracy()
    ranked = sorted(accs, key=lambda c: (accs[c], c))
    strata = np.array_split(np.arange(15625), 10)
    for r in a[:10]:
        pos = ranked.index(tuple(r["cell"]))
        assert pos in strata[r["stratum"]]
    assert a[-1]["cell"] == [0] * 6 and a[-1]["stratum"] is None


def test_groundtruth_stage_smoke_is_deterministic(tmp_path):
    from reprolab.nas import groundtruth as G

    cfg = G.settings("smoke", _params())
    cfg.update(n_cells=2, epochs=1, seeds=[0, 1], batch_size=512, channels=2)
    gt1, _ = G.build(cfg, log=lambda *_: None)
    path = G.write(gt1, {"wall_s": 0}, tmp_path / "gt")
    gt2, _ = G.build(cfg, log=lambda *_: None)
    assert G.dumps(gt1) == G.dumps(gt2) == path.read_text()
    loaded = G.load_groundtruth(path)
    assert len(loaded["cells"]) == 2 and isinstance(loaded["cells"][0]["cell"], tuple)
    c = loaded["cells"][0]
    assert set(c["test_acc"]) == {"0", "1"} and 0 <= c["test_acc"]["0"] <= 1
    assert c["params"] == S.count_params(S.NB201Network(c["cell"], cfg["channels"], cfg["cells_per_stage"], 10, 1))
    assert json.loads(path.read_text())["summary"]["n_cells"] == 2
    # the output folder DVC hashes holds only the deterministic JSON; the timings lie beside it
    assert sorted(p.name for p in path.parent.iterdir()) == [G.FILE]
    assert json.loads(G.timings_path(path.parent).read_text()) == {"wall_s": 0}


def test_train_cell_reports_eval_mode_accuracy(monkeypatch):
    """Accuracies are measured in eval mode (BN running statistics): the returned val/test accuracy equals a
    recomputation with the trained model in eval mode (a train-mode evaluation would use the test batch's statistics)."""
    from reprolab.nas import groundtruth as G

    built = []

    class Spy(S.NB201Network):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(G.space201, "NB201Network", Spy)
    cfg = G.settings("smoke", _params())
    cfg.update(epochs=1, batch_size=64, channels=2)
    data = G.load_split("digits", cfg["split"], cfg["split_seed"])
    out = G.train_cell((2, 2, 0, 2, 3, 2), data, 0, cfg)
    (model,) = built
    assert not model.training
    with torch.no_grad():
        for split in ("val", "test"):
            X, y = (torch.from_numpy(a) for a in data[split])
            assert out[f"{split}_acc"] == float((model.eval()(X).argmax(1) == y).float().mean())


def test_summarize_against_hand_kendall_taus():
    from scipy.stats import kendalltau

    from reprolab.nas.groundtruth import summarize

    rng = np.random.default_rng(0)
    A = rng.random((7, 3))
    cifar = rng.random(7) * 100
    cells = [{"cell": (2,) * 6 if i else (1,) * 6, "cifar10_acc": float(cifar[i]),
              "test_acc": {str(s): float(A[i, j]) for j, s in enumerate((0, 4, 9))}} for i in range(7)]
    out = summarize(cells, [0, 4, 9])
    assert out["tau_seed_pairs"][1][:2] == [0, 9]
    assert out["tau_seed_pairs"][1][2] == pytest.approx(kendalltau(A[:, 0], A[:, 2])[0])
    assert out["tau_seed_vs_rest"][1] == pytest.approx(kendalltau(A[:, 1], A[:, [0, 2]].mean(1))[0])
    assert out["tau_vs_cifar10"] == pytest.approx(kendalltau(A.mean(1), cifar)[0])
    assert out["tau_vs_cifar10_connected_only"] == pytest.approx(kendalltau(A.mean(1)[1:], cifar[1:])[0])
    assert out["n_disconnected"] == 1 and out["test_acc_max"] == pytest.approx(A.mean(1).max())


@pytest.mark.parametrize("bad", [{"dataset": "cifar10"}, {"seeds": [0]}, {"epochs": 0}, {"bogus": 1},
                                 {"extra_cells": ["skip"]}, {"extra_cells": ["|foo~0|+|a~0|b~1|+|c~0|d~1|e~2|"]}])
def test_groundtruth_settings_reject_bad_parameters(bad):
    import copy

    from reprolab.nas.groundtruth import settings

    params = copy.deepcopy(_params())
    assert settings("quick", params)["dataset"] in ("digits", "mnist5k")
    params["nas_groundtruth"].update(bad)
    for k in bad:  # the quick profile overrides some defaults (seeds): the bad value must reach the merged settings
        params["nas_groundtruth"]["profiles"]["quick"].pop(k, None)
    with pytest.raises(ValueError):
        settings("quick", params)
    params = copy.deepcopy(_params())
    params["nas_groundtruth"]["profiles"]["quick"].update(bad)  # the same value as a profile override
    with pytest.raises(ValueError):
        settings("quick", params)


def test_groundtruth_real_params_valid_in_every_profile():
    """params.yaml's nas_groundtruth section passes its schema under every profile (config.validate_all only
    accepts the key: it must not import the NAS stage, which every paper's stage would then depend on)."""
    from reprolab.config import PROFILES
    from reprolab.nas.groundtruth import settings

    for profile in PROFILES:
        assert settings(profile, _params())["seeds"]
