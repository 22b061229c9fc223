"""ViT-ResNAS: the residual spatial reduction against a hand computation (shapes, pooled shortcut, convolution),
the masked multi-architecture supernet pass against the sliced children run one by one (outputs and the accumulated
gradient == the sum of per-sub-batch gradients), a one-stage network against the kit's TinyTransformer, the balanced
sampler and warm-up, the MAC / parameter accounting against torch, and the params schema."""

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reprolab.registry import paper_entry
from reprolab.tf import vit_resnas as V
from reprolab.tf.tiny import TFConfig, TinyTransformer

STAGES = [dict(dim=8, heads=2, mlp=16, blocks=2), dict(dim=12, heads=3, mlp=20, blocks=2)]


def _model(seed=0, residual=True, stages=STAGES):
    torch.manual_seed(seed)
    m = V.ResNASViT(stages, head_dim=4, image_size=8, patch_size=2, n_classes=5, residual=residual)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters so that slicing / masking errors show
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m


def test_reduction_shortcut_by_hand():
    torch.manual_seed(0)
    r = V.ResidualSpatialReduction(3, 5, grid=4)
    with torch.no_grad():  # silence the main path: the output is the shortcut alone
        for p in (r.conv.weight, r.conv.bias, r.token.weight, r.token.bias, r.pos):
            p.zero_()
    x = torch.randn(2, 1 + 16, 3)
    y = r(x)
    assert y.shape == (2, 1 + 4, 5)
    want = torch.zeros(2, 5, 5)
    want[:, 0, :3] = x[:, 0]  # the raw class token, zero-padded 3 -> 5 channels
    for i in range(2):
        for j in range(2):  # 2x2 average of the RAW (not normalised) patches, row-major grid
            idx = [1 + (2 * i + a) * 4 + (2 * j + b) for a in (0, 1) for b in (0, 1)]
            want[:, 1 + i * 2 + j, :3] = x[:, idx].mean(1)
    assert torch.allclose(y, want, atol=1e-6)
    r.residual = False
    assert torch.allclose(r(x), torch.zeros_like(y))


def test_reduction_main_path_by_hand():
    torch.manual_seed(1)
    r = V.ResidualSpatialReduction(3, 5, grid=4, residual=False)
    x = torch.randn(2, 17, 3)
    y = r(x)
    z = F.layer_norm(x, (3,), r.norm.weight, r.norm.bias, r.norm.eps)
    grid = torch.zeros(2, 6, 6, 3)  # zero padding 1
    grid[:, 1:5, 1:5] = z[:, 1:].reshape(2, 4, 4, 3)
    W, b = r.conv.weight, r.conv.bias  # (5, 3, 3, 3)
    for i in range(2):
        for j in range(2):  # stride 2, 3x3 kernel
            patch = grid[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]  # (B, 3, 3, C)
            out = torch.einsum("bklc,ockl->bo", patch, W) + b + r.pos[0, i * 2 + j]
            assert torch.allclose(y[:, 1 + i * 2 + j], out, atol=1e-5)
    assert torch.allclose(y[:, 0], z[:, 0] @ r.token.weight.T + r.token.bias, atol=1e-6)


def test_one_stage_equals_kit_vit():
    torch.manual_seed(2)
    m = V.ResNASViT([dict(dim=8, heads=2, mlp=16, blocks=2)], head_dim=4, image_size=8, patch_size=2, n_classes=5)
    kit = TinyTransformer(TFConfig(kind="vit", d_model=8, n_layers=2, n_heads=2, head_dim=4, mlp_hidden=16,
                                   n_classes=5, image_size=8, patch_size=2))
    sd = {k.replace("stages.0.", "blocks."): v for k, v in m.state_dict().items()}
    kit.load_state_dict(sd)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(m(x), kit(x), atol=1e-6)


def _configs(m, K, seed=0):
    units = V.build_space(m, [1, 0.75, 0.5], [0, 1], [1, 0.5], skip_every=2)
    cfgs = V.sample_archs(m, units, K, np.random.default_rng(seed))
    cfgs[0] = m.max_config()
    for s in range(len(m.stages_spec)):  # the last child skips the 2nd block of every stage and is narrower
        cfgs[-1]["keep"][s][1] = 0
        cfgs[-1]["embed"][s] = units[[u["kind"] == "embed" for u in units].index(True)]["choices"][-1] if s == 0 \
            else m.stages_spec[s]["dim"] - 3
    return cfgs


def test_masked_pass_equals_sliced_children():
    m = _model()
    cfgs = _configs(m, 3)
    assert len({str(c) for c in cfgs}) == 3
    K, assign = V.assignment(9, 3, single_arch=False)
    x = torch.randn(9, 1, 8, 8)
    out = m.forward_masked(x, V.masks_for(m, cfgs, assign))
    for i in range(9):
        ref = m(x[i:i + 1], cfgs[int(assign[i])])
        assert torch.allclose(out[i], ref[0], atol=1e-5), i


@pytest.mark.parametrize("residual", [True, False])
def test_multi_arch_gradient_is_sum_of_sub_batch_gradients(residual):
    m = _model(3, residual)
    cfgs = _configs(m, 3, seed=4)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 5, (12,))
    K, assign = V.assignment(12, 4, single_arch=False)
    assert K == 3 and assign.tolist() == [0, 1, 2] * 4  # official mask.repeat(example_per_arch): example i -> i mod K
    m.zero_grad()
    V.supernet_loss(m, x, y, cfgs, assign, 0.1).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    # reference: each sub-batch through its SLICED child separately, its own backward, gradients summed (weight n_k / B)
    ref = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for k in range(K):
        m.zero_grad()
        sel = assign == k
        (F.cross_entropy(m(x[sel], cfgs[k]), y[sel], label_smoothing=0.1) * sel.sum() / 12).backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                ref[n] += p.grad
    for n, p in m.named_parameters():
        g = got.get(n, torch.zeros_like(p))
        assert torch.allclose(g, ref[n], atol=1e-6), n
    assert any(ref[n].abs().sum() > 0 for n in ref if "stages.1" in n)


def test_single_arch_uses_one_child_for_the_batch():
    m = _model()
    K, assign = V.assignment(8, 4, single_arch=True)
    assert K == 1 and assign.tolist() == [0] * 8
    cfg = _configs(m, 2)[1]
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(m.forward_masked(x, V.masks_for(m, [cfg], assign)), m(x, cfg), atol=1e-5)


def test_balanced_sampler_and_warmup():
    m = _model()
    units = V.build_space(m, [1, 0.75, 0.5], [0, 1], [1, 0.5], skip_every=2)
    kinds = [(u["kind"], u["stage"], u["block"]) for u in units]
    assert ("keep", 0, 1) in kinds and ("keep", 0, 0) not in kinds  # every 2nd block of a stage is skippable
    assert [u for u in units if u["kind"] == "keep"][0]["choices"] == [1, 1, 0, 0]
    emb = units[0]
    assert emb["choices"] == [8, 6, 4]
    cfgs = V.sample_archs(m, units, 6, np.random.default_rng(0))
    assert sorted(c["embed"][0] for c in cfgs) == [4, 4, 6, 6, 8, 8]  # each choice equally often
    assert sorted(c["keep"][0][1] for c in cfgs) == [0, 0, 0, 1, 1, 1]
    # warm-up: only the largest choice at step 0, all choices after the warm-up steps
    assert V.n_active_choices(3, 0, 100) == 1 and V.n_active_choices(3, 50, 100) == 2
    assert V.n_active_choices(3, 100, 100) == 3 and V.n_active_choices(4, 10, 0) == 4
    first = V.sample_archs(m, units, 6, np.random.default_rng(1), step=0, warmup_steps=100)
    assert all(c == m.max_config() for c in first)


def test_macs_and_params_accounting():
    m = _model()
    cfg = _configs(m, 3, seed=5)[2]
    assert 0 in cfg["keep"][0] and cfg["embed"] != m.max_config()["embed"]  # a narrower child with skipped blocks
    x = torch.randn(1, 1, 8, 8)
    with FlopCounterMode(display=False) as fc:
        m(x, cfg)
    assert fc.get_total_flops() == 2 * m.macs(cfg)
    assert m.n_params(m.max_config()) == sum(p.numel() for p in m.parameters())
    small = V.ResNASViT([dict(dim=cfg["embed"][s], heads=cfg["heads"][s][0], mlp=cfg["mlp"][s][0], blocks=2)
                         for s in range(2)], 4, 8, 2, 5)
    uni = {"embed": cfg["embed"], "heads": [[cfg["heads"][s][0]] * 2 for s in range(2)],
           "mlp": [[cfg["mlp"][s][0]] * 2 for s in range(2)], "keep": [[1, 1], [1, 1]]}
    assert m.n_params(uni) == sum(p.numel() for p in small.parameters())


def test_eval_children_fixed_and_distinct():
    m = _model()
    cfg = dict(embed_fracs=[1, 0.75], heads_removed=[0, 1], mlp_fracs=[1, 0.5], skip_every=2)
    a, b = V.eval_children(m, cfg, 5, 7), V.eval_children(m, cfg, 5, 7)
    assert a == b and a[0] == m.max_config() and len(a) == 7
    assert m.macs(a[1]) < min(m.macs(c) for c in a[2:]) <= max(m.macs(c) for c in a[2:]) <= m.macs(a[0])


def test_params_schema_rejects_bad_values():
    schema = {"type": "object", "properties": paper_entry("vit_resnas")["params"]}
    jsonschema.validate({"example_per_arch": 8, "dataset": "mnist5k"}, schema)
    for bad in ({"example_per_arch": 0}, {"dataset": "cifar"}, {"embed_fracs": [1.5]}, {"patch_size": 0}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_single_long_diagnostic_arm_trains_factor_times_the_steps():
    cfg = dict(single_stage=dict(dim=8, heads=2, mlp=16, blocks=1), multi_stages=STAGES, head_dim=4, patch_size=2,
               lr_single=1e-3, lr_multi=2e-3, steps=2, warmup_steps=1, long_single_factor=3, batch_size=4,
               weight_decay=0.0, label_smoothing=0.0, grad_clip=None)
    g = torch.Generator().manual_seed(0)
    split = (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    data = {"train": split, "val": split, "test": split}
    model, curve = V.train_arm("single_long", data, cfg, seed=0)
    assert len(curve) == 6 and len(model.stages) == 1 and V.arm_lr("single_long", cfg) == 1e-3
    assert len(V.train_arm("single", data, cfg, seed=0)[1]) == 2
