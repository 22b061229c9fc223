"""TangleNAS: the superposed weight against the explicit sum of padded slices (the official MixedLinearV2 loop), one-hot
mixture weights against the single-path child (layer and whole network), gradients to alpha, the DrNAS sampler, the
depth mixture, discretisation, the evolutionary search on a known fitness, the memory measurement and the schema."""
import random

import pytest
import torch
import torch.nn.functional as F

from reprolab.tf import tanglenas as T
from reprolab.tf.tiny import TinyTransformer, lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(embed_choices=[8, 12, 16], depth_choices=[1, 2, 3], heads_choices=[1, 2], ratio_choices=[1, 2, 3],
           head_dim=4, seq_len=8, sampler="drnas")


def _rand_weights(space, L, g):
    def simplex(*shape):
        return torch.softmax(torch.randn(*shape, generator=g), -1)
    return {"embed": simplex(len(space["embed"])), "depth": simplex(len(space["depth"])),
            "heads": simplex(L, len(space["heads"])), "ratio": simplex(L, len(space["ratio"]))}


def _naive_weight(W, b, pairs, n_out, n_in):
    """The official MixedLinearV2 loop: sum over joint choices of w * pad(W[:o, :i]) (and the bias)."""
    Wm, bm = 0, 0
    for w, o, i in pairs:
        Wm = Wm + w * F.pad(W[:o, :i], (0, n_in - i, 0, n_out - o))
        bm = bm + w * F.pad(b[:o], (0, n_out - o))
    return Wm, bm


@pytest.mark.parametrize("role", ["q", "k", "v", "o", "fc1", "fc2"])
def test_superposed_weight_equals_explicit_sum_of_padded_slices(role):
    space = T.space_of(CFG)
    tf = T.tf_config(CFG)
    g = torch.Generator().manual_seed(1)
    state = T.ArchState(space, CFG["head_dim"])
    state.w = _rand_weights(space, tf.n_layers, g)
    n_in, n_out = {"q": (16, 8), "k": (16, 8), "v": (16, 8), "o": (8, 16), "fc1": (16, 48), "fc2": (48, 16)}[role]
    lin = T.EntangledLinear(n_in, n_out, role, 1, state)
    with torch.no_grad():
        lin.linear.bias.normal_(generator=g)
    W, b = lin.linear.weight, lin.linear.bias
    # the joint choices written out by hand (official outer-product weights, row-major (embed, other))
    pairs = []
    for a, e in enumerate(space["embed"]):
        if role in ("q", "k", "v", "o"):
            for j, h in enumerate(space["heads"]):
                w = state.w["embed"][a] * state.w["heads"][1][j]
                pairs.append((w, h * 4, e) if role != "o" else (w, e, h * 4))
        else:
            for k, r in enumerate(space["ratio"]):
                w = state.w["embed"][a] * state.w["ratio"][1][k]
                pairs.append((w, r * e, e) if role == "fc1" else (w, e, r * e))
    Wn, bn = _naive_weight(W, b, pairs, n_out, n_in)
    Wm, bm = lin.entangled_weight()
    assert torch.allclose(Wm, Wn, atol=1e-6) and torch.allclose(bm, bn, atol=1e-6)
    x = torch.randn(2, 3, n_in, generator=g)
    assert torch.allclose(lin(x), F.linear(x, Wn, bn), atol=1e-6)
    # the weights are a convex combination: with uniform-free random weights the mask is NOT all ones / all zeros
    M, _ = T.superposition_mask(*state.combos(role, 1), n_out, n_in)
    assert 0 < float(M.min()) <= float(M.max()) <= 1 + 1e-6 and float(M.min()) < 1 - 1e-3


def test_one_hot_layer_equals_single_path_slice():
    space = T.space_of(CFG)
    state = T.ArchState(space, 4)
    arch = {"embed": 12, "depth": 3, "heads": [1, 2, 1], "ratio": [3, 1, 2]}
    state.w = T.one_hot_weights(space, arch, 3)
    lin = T.EntangledLinear(16, 48, "fc1", 0, state)
    x = torch.randn(2, 5, 16)
    x[..., 12:] = 0  # the single-path input has width 12
    out = lin(x)
    ref = F.linear(x[..., :12], lin.linear.weight[:36, :12], lin.linear.bias[:36])
    assert torch.allclose(out[..., :36], ref, atol=1e-6) and out[..., 36:].abs().max() == 0


def _copy_into_child(ent):
    """A kit TinyTransformer with the entangled supernet's weights (same parameter names)."""
    ref = TinyTransformer(ent.cfg)
    missing, unexpected = ref.load_state_dict(ent.state_dict(), strict=False)
    assert not missing and all(k.startswith("alpha.") for k in unexpected)
    return ref


@pytest.mark.parametrize("arch", [{"embed": 16, "depth": 2, "heads": [1, 2], "ratio": [3, 1]},
                                  {"embed": 16, "depth": 1, "heads": [2], "ratio": [2]},
                                  {"embed": 16, "depth": 3, "heads": [1, 1, 2], "ratio": [1, 2, 3]}])
def test_one_hot_network_equals_single_path_child(arch):
    """With one-hot mixture weights the entangled supernet IS the single-path child (full embedding width: at smaller
    widths the official full-width LayerNorm statistics include the zero padding, see the docstring)."""
    torch.manual_seed(0)
    ent = T.build_tangle(CFG, 0)
    ref = _copy_into_child(ent)
    ref.set_active_subnet(T.arch_to_child(arch))
    ent.fix_weights(T.one_hot_weights(ent.space, arch, 3))
    x = torch.randint(0, 256, (2, 8))
    assert torch.allclose(ent(x), ref(x), atol=1e-5)
    # and a different one-hot choice gives a different network (the test would catch ignored weights)
    other = dict(arch, ratio=[3] * arch["depth"]) if arch["ratio"] != [3] * arch["depth"] else dict(arch, ratio=[1] * arch["depth"])
    ent.fix_weights(T.one_hot_weights(ent.space, other, 3))
    assert not torch.allclose(ent(x), ref(x), atol=1e-4)


def test_depth_mixture_is_weighted_sum_of_depth_states():
    ent = T.build_tangle(CFG, 0)
    g = torch.Generator().manual_seed(3)
    w = _rand_weights(ent.space, 3, g)
    x = torch.randint(0, 256, (2, 8))
    outs = []
    for d in (1, 2, 3):
        ent.state.w = dict(w, depth=torch.eye(3)[d - 1])
        outs.append(ent.run_blocks(ent.embed(x))[0])
    assert not torch.allclose(outs[0], outs[2])
    ent.state.w = w
    mixed = ent.run_blocks(ent.embed(x))[0]
    assert torch.allclose(mixed, sum(w["depth"][i] * outs[i] for i in range(3)), atol=1e-6)


def test_gradients_reach_alpha_and_weights():
    ent = T.build_tangle(CFG, 0)
    ent.train()
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    lm_loss(ent, x, y).backward()
    for k, a in ent.alpha.items():
        assert a.grad is not None and a.grad.abs().sum() > 0, k
    assert ent.blocks[0].fc1.linear.weight.grad.abs().sum() > 0
    # DARTS sampler too
    ent = T.TangleTransformer(T.tf_config(CFG), T.space_of(CFG), "darts")
    lm_loss(ent, x, y).backward()
    assert all(a.grad.abs().sum() > 0 for a in ent.arch_parameters())


def test_drnas_sampler_and_expected_weights():
    ent = T.build_tangle(CFG, 0)
    with torch.no_grad():
        ent.alpha["embed"].copy_(torch.tensor([2.0, 0.0, -0.5]))
    c = F.elu(torch.tensor([2.0, 0.0, -0.5])) + 1
    assert torch.allclose(ent.expected_weights()["embed"], c / c.sum())
    ent.train()
    torch.manual_seed(0)
    draws = torch.stack([ent.draw_weights()["embed"] for _ in range(4000)])
    assert torch.allclose(draws.sum(-1), torch.ones(4000), atol=1e-5)
    assert torch.allclose(draws.mean(0), c / c.sum(), atol=0.02)  # Dirichlet(elu(alpha) + 1) mean
    ent.eval()
    assert torch.equal(ent.draw_weights()["embed"], ent.expected_weights()["embed"])


def test_discretize_is_argmax_and_alpha_movement():
    ent = T.build_tangle(CFG, 0)
    with torch.no_grad():
        for a in ent.arch_parameters():
            a.zero_()
    assert T.alpha_movement(ent) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        ent.alpha["embed"][1] = 1.0
        ent.alpha["depth"][1] = 1.0
        ent.alpha["heads"][:, 1] = 1.0
        ent.alpha["ratio"][0, 2] = 1.0
    a = ent.discretize()
    assert a == {"embed": 12, "depth": 2, "heads": [2, 2], "ratio": [3, 1]}
    assert T.alpha_movement(ent) > 0.05


def test_arch_encoding_roundtrip_and_child():
    arch = {"embed": 12, "depth": 2, "heads": [1, 2], "ratio": [3, 1]}
    assert T.arch_key(arch) == (2, 12, 1, 2, 3, 1)
    assert T.key_to_arch(T.arch_key(arch)) == arch
    assert T.arch_to_child(arch) == {"embed": 12, "depth": 2, "heads": [1, 2], "mlp": [36, 12]}


def test_evolution_finds_optimum_of_known_fitness():
    space = {"embed": [8, 12, 16], "depth": [1, 2, 3], "heads": [1, 2], "ratio": [1, 2, 3]}
    target = {"embed": 12, "depth": 3, "heads": [2, 1, 2], "ratio": [3, 1, 2]}

    def fit(a):  # distance to a target architecture (0 only at the target)
        d = abs(a["depth"] - 3) * 10 + abs(a["embed"] - 12)
        return d + sum(h != t for h, t in zip(a["heads"], target["heads"])) + sum(
            r != t for r, t in zip(a["ratio"], target["ratio"]))

    best, seen = T.evolution_search(fit, space, random.Random(0), population=20, select=5, mutation=10, crossover=10,
                                    generations=15, m_prob=0.2, s_prob=0.4)
    assert best == target
    assert len(seen) == len(set(seen))  # every candidate evaluated once
    best2, seen2 = T.evolution_search(fit, space, random.Random(0), 20, 5, 10, 10, 15, 0.2, 0.4)
    assert best2 == best and list(seen2) == list(seen)  # seeded
    assert fit(best) == 0 and sorted(seen.values())[0] == 0


def test_standalone_model_has_child_params_and_output():
    cfg = dict(CFG)
    arch = {"embed": 12, "depth": 2, "heads": [1, 2], "ratio": [3, 1]}
    m = T.standalone_model(cfg, arch, 0)
    assert m.active_config() == T.arch_to_child(arch)
    assert T.n_params_arch(cfg, arch) == m.n_params()
    x = torch.randint(0, 256, (2, 8))
    assert m(x).shape == (2, 8, 256)


def test_training_step_memory_counts_saved_activations():
    ent = T.build_tangle(CFG, 0)
    spos = T.build_spos(CFG, 0)
    x, y = torch.randint(0, 256, (4, 8)), torch.randint(0, 256, (4, 8))
    me, ms = T.training_step_memory(ent, x, y), T.training_step_memory(spos, x, y)
    n_alpha = sum(a.numel() for a in ent.arch_parameters())
    assert me["params"] - ms["params"] == 4 * n_alpha  # same weights + alpha
    assert ms["activations"] > 0 and me["activations"] > ms["activations"]  # superposed weights are saved too
    # doubling the batch roughly doubles activations of the single-path net
    ms2 = T.training_step_memory(spos, torch.cat([x, x]), torch.cat([y, y]))
    assert 1.6 < ms2["activations"] / ms["activations"] < 2.1


def test_unigram_loss_matches_hand_count():
    X = torch.tensor([[1, 1], [2, 1]])
    data = {"train": (X, X), "val": (X[:1], torch.tensor([[2, 2]]))}
    p2 = (1 + 1) / (4 + 256)
    assert T.unigram_loss(data) == pytest.approx(-torch.log(torch.tensor(p2)).item(), rel=1e-6)


def test_bad_configs_rejected():
    with pytest.raises(ValueError):
        T.TangleTransformer(T.tf_config(CFG), T.space_of(CFG), "gdas")
    with pytest.raises(ValueError):
        T.TangleTransformer(T.tf_config(dict(CFG, head_dim=4)), {**T.space_of(CFG), "embed": [8, 12]}, "drnas")


def test_params_schema_rejects_bad_values():
    import jsonschema

    from reprolab.config import load_params
    from reprolab.registry import paper_entry

    schema = {"type": "object", "properties": paper_entry("tanglenas")["params"]}
    jsonschema.validate(load_params("tanglenas", "quick"), schema)  # the shipped quick profile is valid
    for bad in ({"sampler": "gdas"}, {"train_portion": 1.0}, {"seeds": []}, {"arch_lr": 0}, {"head_dim": 0},
                {"embed_choices": [32]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert schema["properties"]["sampler"]["enum"] == list(T.SAMPLERS)


def test_embedding_layernorm_and_head_superpose_embedding_widths():
    ent = T.build_tangle(CFG, 0)
    g = torch.Generator().manual_seed(5)
    w = _rand_weights(ent.space, 3, g)
    ent.state.w = w
    with torch.no_grad():
        ent.ln_f.weight.normal_(generator=g)
        ent.ln_f.bias.normal_(generator=g)
    pad = lambda v, e: F.pad(v[..., :e], (0, 16 - e))  # noqa: E731
    x = torch.randint(0, 256, (2, 8))
    tok = sum(w["embed"][i] * pad(ent.tok.weight, e) for i, e in enumerate(ent.space["embed"]))
    pos = sum(w["embed"][i] * pad(ent.pos[0, :8], e) for i, e in enumerate(ent.space["embed"]))
    assert torch.allclose(ent.embed(x), tok[x] + pos, atol=1e-6)
    h = torch.randn(2, 8, 16, generator=g)
    gm = sum(w["embed"][i] * pad(ent.ln_f.weight, e) for i, e in enumerate(ent.space["embed"]))
    bm = sum(w["embed"][i] * pad(ent.ln_f.bias, e) for i, e in enumerate(ent.space["embed"]))
    assert torch.allclose(ent.ln_f(h), F.layer_norm(h, (16,), gm, bm), atol=1e-5)
    Wh = sum(w["embed"][i] * pad(ent.head.linear.weight, e) for i, e in enumerate(ent.space["embed"]))
    assert torch.allclose(ent.pool_head(h), F.linear(F.layer_norm(h, (16,), gm, bm), Wh, ent.head.linear.bias),
                          atol=1e-5)


def test_search_loop_uses_disjoint_halves_and_moves_alpha_only_by_arch_batches():
    X = torch.arange(40)[:, None].repeat(1, 8)  # row i = byte i: rows are distinct
    data = {"train": (X, X), "val": (X[:4], X[:4]), "test": (X[:4], X[:4])}
    wdata, (Xa, _) = T.split_train(data, 0.5)
    assert len(wdata["train"][0]) == 20 and len(Xa) == 20 and not set(map(tuple, Xa.tolist())) & set(
        map(tuple, wdata["train"][0].tolist()))
    cfg = dict(CFG, lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1, batch_size=4, warmup_steps=0, grad_clip=1.0,
               arch_lr=1e-2, arch_betas=[0.5, 0.999], arch_weight_decay=1e-3, arch_grad_clip=5.0, train_portion=0.5,
               steps=3)
    ent0 = T.build_tangle(cfg, 0)
    a0 = {k: v.detach().clone() for k, v in ent0.alpha.items()}
    ent, wl, al, mv = T.train_tanglenas(data, cfg, 0)
    assert len(wl) == len(al) == len(mv) == 3
    assert all(not torch.equal(a0[k], ent.alpha[k].detach()) for k in a0)  # the architecture optimiser stepped
    # with arch_lr 0 alpha never moves: the weight optimiser does not touch it
    ent, *_ = T.train_tanglenas(data, dict(cfg, arch_lr=1e-12, arch_weight_decay=0.0), 0)
    assert all(torch.allclose(a0[k], ent.alpha[k].detach(), atol=1e-9) for k in a0)


# ---------------------------------------------------------------------------------------------- added in review
_TRAIN = dict(lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1, batch_size=4, warmup_steps=0, grad_clip=1.0,
              arch_lr=1e-12, arch_betas=[0.5, 0.999], arch_weight_decay=0.0, arch_grad_clip=5.0, train_portion=0.5,
              steps=3)


def test_weights_never_train_on_the_architecture_half():
    """Official train_search.py zeroes the weights' gradients of the architecture pass: changing only the
    architecture half's bytes (alpha frozen by a ~0 lr) must leave the trained weights unchanged."""
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, 256, (40, 8), generator=g)
    X2 = X.clone()
    X2[20:] = torch.randint(0, 256, (20, 8), generator=g)  # another architecture half, same weights half
    cfg = dict(CFG, **_TRAIN)
    out = []
    for XX in (X, X2):
        data = {"train": (XX, XX), "val": (XX[:4], XX[:4]), "test": (XX[:4], XX[:4])}
        torch.manual_seed(0)
        ent, *_ = T.train_tanglenas(data, cfg, 0)
        out.append([p.detach().clone() for p in ent.weight_parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*out))


def test_spos_fitness_is_the_inherited_childs_loss():
    spos = T.build_spos(CFG, 0)
    X = torch.randint(0, 256, (6, 8), generator=torch.Generator().manual_seed(1))
    fit = T.spos_fitness(spos, X, X)
    a1 = {"embed": 8, "depth": 1, "heads": [1], "ratio": [1]}
    a2 = {"embed": 16, "depth": 3, "heads": [2, 2, 2], "ratio": [2, 2, 2]}  # homogeneous: get_active_subnet
    f1, f2 = fit(a1), fit(a2)
    assert f1 != f2
    for a, f in ((a1, f1), (a2, f2)):
        spos.set_active_subnet(T.arch_to_child(a))
        child = spos.get_active_subnet()
        assert abs(f - T.mean_loss(child, X, X)) < 1e-5


def test_spos_supernet_trains_sampled_single_paths(monkeypatch):
    seen = []
    orig = TinyTransformer.set_active_subnet

    def record(self, cfg):
        seen.append(repr(cfg))
        return orig(self, cfg)

    monkeypatch.setattr(TinyTransformer, "set_active_subnet", record)
    X = torch.randint(0, 256, (40, 8), generator=torch.Generator().manual_seed(2))
    data = {"train": (X, X), "val": (X[:4], X[:4]), "test": (X[:4], X[:4])}
    T.train_spos(data, dict(CFG, **dict(_TRAIN, steps=8)), 0)
    assert len(seen) >= 8 and len(set(seen[:8])) >= 3  # a uniformly sampled child per step


def test_mean_loss_is_per_byte_cross_entropy():
    m = T.build_spos(CFG, 0).eval()
    X = torch.randint(0, 256, (7, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = float(F.cross_entropy(m(X).reshape(-1, 256), X.reshape(-1)))
    assert abs(T.mean_loss(m, X, X, batch_size=3) - ref) < 1e-5


def test_evolution_evaluates_a_full_population_each_generation():
    space = {"embed": [8, 12, 16], "depth": [1, 2, 3], "heads": [1, 2], "ratio": [1, 2, 3]}
    _, seen = T.evolution_search(lambda a: a["embed"] + a["depth"], space, random.Random(1), population=10, select=3,
                                 mutation=2, crossover=2, generations=4, m_prob=0.2, s_prob=0.4)
    assert len(seen) == 10 * 5  # mutants + crossovers + random fill-up = population, every generation


def test_largest_arch_and_argmax_margins():
    space = T.space_of(CFG)
    assert T.largest_arch(space) == {"embed": 16, "depth": 3, "heads": [2, 2, 2], "ratio": [3, 3, 3]}
    ent = T.build_tangle(dict(CFG, sampler="darts"), 0)
    with torch.no_grad():
        ent.alpha["embed"].copy_(torch.tensor([0.0, 1.0, 0.5]))
    p = torch.softmax(torch.tensor([0.0, 1.0, 0.5]), -1)
    mg = T.argmax_margins(ent)
    assert abs(mg["embed"] - float(p[1] - p[2])) < 1e-5 and len(mg["heads"]) == 3
