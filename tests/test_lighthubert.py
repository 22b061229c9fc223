"""LightHuBERT (tf.lighthubert): span masking, loss, sampling rule, subnet extraction, parameter accounting, probe."""
import random

import numpy as np
import pytest
import torch

from reprolab.tf import lighthubert as LH



@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = {"embed_dim": 24, "heads": 3, "head_dim": 4, "layers": 3, "ffn_ratios": [3.5, 4.0],
       "embed_fracs": [0.6667, 0.8333, 1.0], "heads_fracs": [0.6667, 1.0], "depths": [2, 3], "max_len": 40,
       "max_frames": 30, "crop": "random", "batching": "random", "mask_prob": 0.65, "mask_length": 10, "unmasked_weight": 0.0, "lr": 1e-3,
       "weight_decay": 0.01, "batch_size": 4, "grad_clip": 10.0, "warmup_frac": 0.1,
       "subnet": {"embed_frac": 0.8333, "heads_frac": 0.6667, "ffn_ratio": 4.0, "depth": 3}}


def _naive_mask(shape, p, L, rng, min_masks):
    """The official algorithm written as plain loops (lighthubert.py:63-162, static, no padding, overlapping)."""
    bsz, sz = shape
    num = max(min_masks, int(p * sz / float(L) + rng.random()))
    rows = []
    for _ in range(bsz):
        min_len = L if sz - L > num else sz - num - 1
        starts = rng.choice(sz - min_len, num, replace=False)
        idc = []
        for s in starts:
            for off in range(L):
                idc.append(s + off)
        idc = np.array(idc)
        rows.append(np.unique(idc[idc < sz]))
    keep = min(len(r) for r in rows)
    mask = np.zeros((bsz, sz), bool)
    for i, r in enumerate(rows):
        if len(r) > keep:
            r = rng.choice(r, keep, replace=False)
        mask[i, r] = True
    return mask


@pytest.mark.parametrize("shape,L", [((5, 100), 10), ((3, 37), 10), ((4, 12), 5)])
def test_span_mask_equals_a_naive_loop_of_the_official_algorithm(shape, L):
    for seed in range(5):
        got = LH.compute_mask_indices(shape, 0.65, L, np.random.default_rng(seed), min_masks=2)
        ref = _naive_mask(shape, 0.65, L, np.random.default_rng(seed), 2)
        np.testing.assert_array_equal(got, ref)
        counts = got.sum(1)
        assert (counts == counts[0]).all() and counts[0] > 0  # require_same_masks


def test_span_mask_is_spans_of_mask_length_and_covers_about_half_at_the_official_setting():
    rng = np.random.default_rng(0)
    fr = []
    for _ in range(200):
        m = LH.compute_mask_indices((1, 100), 0.65, 10, rng, min_masks=2)[0]
        fr.append(m.mean())
        # every run of masked frames is a union of length-10 spans: at least 10 long
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, m.astype(int), 0])))[::2]
        assert runs.min() >= 10
    # 6-7 overlapping spans of 10 over 100 frames: expected coverage 1 - (1 - 10/91)^6.5 ~ 0.53
    assert 0.45 < np.mean(fr) < 0.58


def test_distill_loss_is_the_mean_squared_error_over_masked_frames_only():
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    sq, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                for d in range(3):
                    sq += float(pred[b, t, d] - tgt[b, t, d]) ** 2
                    n += 1
    assert float(LH.distill_loss(pred, tgt, mask)) == pytest.approx(sq / n, rel=1e-6)
    un = float(((pred - tgt) ** 2)[~mask].mean())
    assert float(LH.distill_loss(pred, tgt, mask, 0.5)) == pytest.approx(sq / n + 0.5 * un, rel=1e-6)
    tgt2 = tgt.clone()
    tgt2[~mask] += 100.0  # unmasked frames do not count at weight 0
    assert float(LH.distill_loss(pred, tgt2, mask)) == pytest.approx(sq / n, rel=1e-6)


def test_heldout_loss_of_a_constant_is_its_masked_mse():
    g = np.random.default_rng(0)
    clips = [{"x": g.standard_normal((n, 160)).astype(np.float32),
              "t": g.standard_normal((n, 4)).astype(np.float32)} for n in (15, 22)]
    cfg = {"max_frames": 20, "mask_prob": 0.65, "mask_length": 5}
    mu = np.full(4, 0.3, np.float32)
    rng = np.random.default_rng(12345)
    sq, n = 0.0, 0
    for c in clips:
        t = c["t"][:20]
        m = LH.compute_mask_indices((1, len(t)), 0.65, 5, rng, min_masks=2)[0]
        sq += float(((t[m] - mu) ** 2).sum())
        n += int(m.sum()) * 4
    assert LH.heldout_loss(mu, clips, cfg) == pytest.approx(sq / n, rel=1e-5)


def test_sample_subnet_follows_the_official_rule():
    space = LH.search_space(CFG)
    assert space == {"embed": [16, 20, 24], "heads": [2, 3], "ffn_ratio": [3.5, 4.0], "depth": [2, 3]}
    rng = random.Random(0)
    seen_embed, seen_mixed = set(), False
    for _ in range(300):
        c = LH.sample_subnet(space, rng)
        assert c["depth"] in (2, 3) and len(c["heads"]) == len(c["mlp"]) == c["depth"]
        assert all(m in (int(3.5 * c["embed"]), 4 * c["embed"]) for m in c["mlp"])  # ffn = int(ratio * embed)
        seen_embed.add(c["embed"])
        seen_mixed |= len(set(c["heads"])) > 1  # heads drawn per layer
    assert seen_embed == {16, 20, 24} and seen_mixed


def _net(seed=0):
    torch.manual_seed(seed)
    net = LH.LightStudent(LH.student_config(CFG), teacher_dim=8)
    with torch.no_grad():  # non-trivial LayerNorms, mask embedding and positions
        for name, p in net.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_extracted_subnet_equals_the_supernet_child_with_and_without_masks():
    net = _net()
    child = LH.subnet_child(CFG)
    assert child == {"embed": 20, "depth": 3, "heads": [2, 2, 2], "mlp": [80, 80, 80]}
    x = torch.randn(2, 17, 160)
    m = torch.from_numpy(LH.compute_mask_indices((2, 17), 0.65, 5, np.random.default_rng(1), min_masks=2))
    sub = LH.extract_subnet(net, child).eval()
    assert net.active_config() == net.max_config()  # extraction leaves the supernet at its max child
    net.set_active_subnet(child)
    for mask in (None, m):
        a, b = net(x, mask), sub(x, mask)
        torch.testing.assert_close(a["x"], b["x"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["pred"], b["pred"], rtol=1e-5, atol=1e-6)
    assert a["x"].shape == (2, 17, 20) and a["pred"].shape == (2, 17, 8)
    # masking changes the output (the mask embedding is used)
    assert not torch.allclose(sub(x)["x"], sub(x, m)["x"])


def test_parameter_count_equals_the_extracted_model_without_the_prediction_head():
    net = _net()
    for child in (LH.subnet_child(CFG), net.max_config(), LH.child_config(16, 2, 3.5, 2)):
        sub = LH.extract_subnet(net, child)
        used = sum(p.numel() for n, p in sub.named_parameters() if not n.startswith(("pred_head", "head.")))
        assert LH.n_params(net, child) == used
    # the claimed subnet of the quick profile is ~70 % of the max child (the paper's 29 % fewer)
    quick = {**CFG, "embed_dim": 72, "heads": 6, "head_dim": 12, "layers": 4, "max_len": 160,
             "subnet": {"embed_frac": 0.8333, "heads_frac": 0.8333, "ffn_ratio": 4.0, "depth": 4}}
    big = LH.LightStudent(LH.student_config(quick))
    r = LH.n_params(big, LH.subnet_child(quick)) / LH.n_params(big)
    assert 0.68 < r < 0.73


def test_training_lowers_the_masked_loss_and_stage_two_samples_subnets():
    g = np.random.default_rng(0)
    clips = [{"x": g.standard_normal((n, 160)).astype(np.float32)} for n in (20, 24, 30, 26)]
    W = g.standard_normal((160, 8)).astype(np.float32)
    for c in clips:  # a learnable teacher: a linear map of the clip's mean frame, at every frame (visible in context)
        c["t"] = np.repeat(c["x"].mean(0, keepdims=True) @ W, len(c["x"]), 0).astype(np.float32)
    net = LH.LightStudent(LH.student_config(CFG), teacher_dim=8)
    cfg = {**CFG, "lr": 1e-2}
    before = LH.heldout_loss(net, clips, cfg)
    curve = LH.train_student(net, clips, cfg, 30, seed=0, stream=1)
    after = LH.heldout_loss(net, clips, cfg)
    assert after < 0.5 * before and len(curve) == 30
    seen = []
    orig = net.set_active_subnet
    net.set_active_subnet = lambda c: (seen.append(c), orig(c))
    LH.train_student(net, clips, cfg, 5, seed=0, stream=2, space=LH.search_space(CFG))
    assert len(seen) == 6 and seen[-1] == net.max_config()  # one subnet per step, then back to the max child


def test_make_batch_crops_to_the_shortest_clip_and_keeps_teacher_alignment():
    clips = [{"x": np.arange(n * 160, dtype=np.float32).reshape(n, 160),
              "t": np.arange(n, dtype=np.float32)[:, None].repeat(3, 1)} for n in (12, 20, 15)]
    x, t = LH.make_batch(clips, [0, 1, 2], np.random.default_rng(0), max_frames=50, crop="random")
    assert x.shape == (3, 12, 160) and t.shape == (3, 12, 3)
    for b in range(3):  # row j of the crop is the same frame for student input and teacher target
        np.testing.assert_array_equal(x[b, :, 0].numpy() / 160, t[b, :, 0].numpy())
    assert t[:, 0, 0].tolist() != [0.0, 0.0, 0.0]  # random offsets (this seed)
    x, t = LH.make_batch(clips, [1, 2], np.random.default_rng(0), max_frames=10)  # default: from the start
    assert x.shape == (2, 10, 160)
    np.testing.assert_array_equal(t[:, :, 0].numpy(), np.tile(np.arange(10.0), (2, 1)))


def test_length_buckets_group_clips_of_similar_length_and_bucketed_training_runs():
    g = np.random.default_rng(0)
    lens = g.integers(15, 40, size=11)
    clips = [{"x": np.zeros((int(n), 160), np.float32), "t": np.zeros((int(n), 8), np.float32)} for n in lens]
    b = LH.length_buckets(clips, 4)
    assert [len(x) for x in b] == [4, 4, 3] and sorted(sum(b, [])) == list(range(11))
    flat = [len(clips[i]["x"]) for i in sum(b, [])]
    assert flat == sorted(lens.tolist())  # consecutive runs of the length order
    net = LH.LightStudent(LH.student_config(CFG), teacher_dim=8)
    seen = []
    orig = LH.make_batch
    LH.make_batch = lambda clips_, idx, *a: (seen.append(list(idx)), orig(clips_, idx, *a))[1]
    try:
        LH.train_student(net, clips, {**CFG, "batching": "bucket", "crop": "start"}, 3, seed=0, stream=1)
    finally:
        LH.make_batch = orig
    assert all(s in b for s in seen) and len(seen) == 3


def test_stack_frames_pairs_consecutive_frames():
    mel = np.arange(6 * 80, dtype=np.float32).reshape(6, 80)
    s = LH.stack_frames(mel)
    assert s.shape == (3, 160)
    np.testing.assert_array_equal(s[1], np.r_[mel[2], mel[3]])


def test_qbe_accuracy_against_a_brute_force_loop():
    g = np.random.default_rng(0)
    n = 12
    content = [g.standard_normal((int(g.integers(6, 15)), 5)) for _ in range(n)]
    a = [c + 0.3 * g.standard_normal(c.shape) for c in content]
    b = [c[::-1] * 0 + c + 0.9 * g.standard_normal(c.shape) + 1.0 for c in content]
    got = LH.qbe_accuracy(a, b)

    def pool(s):
        k = len(s)
        cuts = [0, (k + 2) // 3, (k + 2) // 3 + (k + 1) // 3, k]  # np.array_split sizes
        return np.concatenate([s[cuts[i]:cuts[i + 1]].mean(0) for i in range(3)])
    A, B = [pool(s) for s in a], [pool(s) for s in b]
    mu = sum(A + B) / (2 * n)
    A = [(x - mu) / np.linalg.norm(x - mu) for x in A]
    B = [(x - mu) / np.linalg.norm(x - mu) for x in B]
    hits_ab = sum(max(range(n), key=lambda j: A[i] @ B[j]) == i for i in range(n))
    hits_ba = sum(max(range(n), key=lambda i: A[i] @ B[j]) == j for j in range(n))
    assert got["a_to_b"] == hits_ab / n and got["b_to_a"] == hits_ba / n
    assert 0 < got["mean"] < 1
    assert LH.qbe_accuracy(a, a)["mean"] == 1.0
