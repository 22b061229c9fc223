"""VARiant: Progressive Supernet Training for Efficient Visual Autoregressive Modeling (Chen et al., 2025,
https://arxiv.org/abs/2511.16546), in miniature on the real sklearn digits.

VARiant's own code (github.com/Nola-chen/VARiant, announced in the abstract) could not be obtained here; the method
follows the paper's text as summarised in its abstract and public reviews, on top of the official VAR code
(github.com/FoundationVision/VAR), which is followed for next-scale prediction:

* **multi-scale residual quantisation** with ONE shared codebook (``VectorQuantizer2.f_to_idxBl_or_fhat``,
  models/quant.py:135-166): at scale k the residual ``f_rest`` is area-downsampled to pn x pn (not at the last scale),
  each vector is replaced by its nearest code, the code map is bicubic-upsampled to H x W (not at the last scale) and
  added to ``f_hat`` / subtracted from ``f_rest``. Here the "feature map" is the image itself (p x p pixel patches,
  ``C = p * p`` channels; no VQ-VAE) and the codebook is fitted by k-means on the quantiser's inputs at every scale
  (:func:`fit_codebook`; alternating k-means / re-encoding); no ``Phi`` residual convolution (``quant_resi``);
* **teacher-forcing input** (``idxBl_to_var_input``, quant.py:169-184): the token map of scale k + 1 is fed the
  area-downsampled running reconstruction ``f_hat`` after scales 1..k; the first position is the class token
  (``sos = class_emb(label) + pos_start``, models/var.py:201-206), plus a level (scale) embedding and absolute positions
  (var.py:207); the model predicts all tokens of scale k in parallel. VAR also conditions every block on the class
  (AdaLN); here ``class_cond="all"`` adds the class embedding to every token's input instead (``"sos"``: first token only);
* **block-causal attention** (var.py:107-112): a token attends to every token of its own and earlier scales
  (``d >= dT``), never to a later scale (:func:`block_causal_mask`);
* **loss**: cross-entropy averaged over all L tokens (trainer.py:41, 112-120, ``loss_weight = 1 / L``).

VARiant (the paper): the ``D`` layers of the trained network define subnets by **equidistant layer selection**
``I_d = {floor(i (D - 1) / (d - 1)), i = 0..d-1}`` (first and last layer kept; :func:`subnet_layers`); the **early scales
run through the full network, the late scales through the subnet only**, with the SAME weights (:class:`VARNet`'s
``forward(..., sub_layers, n_full_scales)``). In a subnet layer, a late-scale token attends to the early tokens' keys
and values of THAT layer (which the full pass of the early scales computed and cached) and to the late tokens; the
layers outside the subnet process only the early tokens. The late scales' KV cache is thus ``d / D`` of the full
one (:func:`kv_cache_entries`). Training mixes full-network passes and subnet passes; VARiant's **progressive**
training shifts the full : subnet ratio in three stages from 2 : 8 to 10 : 0 (:func:`full_pass_schedule`); the
ablation uses a **fixed** ratio.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tiny import Block, TFConfig, TinyTransformer

SCALES = (1, 2, 4, 8)
ARMS = ("full_only", "progressive", "fixed", "half")  # half: a standalone sub_depth-layer VAR (premise reference)


# ------------------------------------------------------------------------------------------------------- data
def load_digits_split(dataset: str = "digits", split=(0.6, 0.2, 0.2), split_seed: int = 0) -> dict:
    """Real images in [0, 1] (N, 1, H, W) with the shared stratified split (same indices as
    ``nas.groundtruth.load_split``), NOT standardised: the quantiser works on pixel intensities."""
    from sklearn.model_selection import train_test_split

    from ..data.images import load_image_set

    X, y = load_image_set(dataset)
    X = np.asarray(X, dtype=np.float32)
    X = X / max(float(X.max()), 1e-8)
    side = int(round(math.sqrt(X.shape[1])))
    X = X.reshape(-1, 1, side, side)
    y = np.asarray(y, dtype=np.int64)
    idx = np.arange(len(y))
    n_val, n_test = int(round(split[1] * len(y))), int(round(split[2] * len(y)))
    tr, rest = train_test_split(idx, test_size=n_val + n_test, stratify=y, random_state=split_seed)
    va, te = train_test_split(rest, test_size=n_test, stratify=y[rest], random_state=split_seed)
    return {k: (torch.from_numpy(X[i]), torch.from_numpy(y[i])) for k, i in (("train", tr), ("val", va), ("test", te))}


def image_to_features(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 1, H, W) image -> (B, p*p, H/p, W/p) feature map (the stand-in for VAR's VQ-VAE latent)."""
    return F.pixel_unshuffle(x, patch)


def features_to_image(f: torch.Tensor, patch: int) -> torch.Tensor:
    return F.pixel_shuffle(f, patch)


# ------------------------------------------------------------------------------------------------------- quantiser
def _upsample(h: torch.Tensor, H: int) -> torch.Tensor:
    return h if h.shape[-1] == H else F.interpolate(h, size=(H, H), mode="bicubic")


def _downsample(f: torch.Tensor, pn: int) -> torch.Tensor:
    return f if f.shape[-1] == pn else F.interpolate(f, size=(pn, pn), mode="area")


class ResidualQuantizer:
    """VAR's multi-scale residual quantiser with one shared codebook ``(K, C)``; scales ``(pn_1, ..., pn_S = H)``."""

    def __init__(self, codebook: torch.Tensor, scales=SCALES):
        self.codebook = codebook.float()
        self.scales = tuple(int(s) for s in scales)

    @property
    def K(self) -> int:
        return self.codebook.shape[0]

    @property
    def C(self) -> int:
        return self.codebook.shape[1]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N,) index of the nearest code (squared distance, as quant.py:155-157)."""
        return torch.cdist(z, self.codebook).argmin(1)

    def embed(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn*pn) indices -> (B, C, pn, pn) code map."""
        return self.codebook[idx].transpose(1, 2).reshape(idx.shape[0], self.C, pn, pn)

    def encode(self, f: torch.Tensor, return_inputs: bool = False):
        """f (B, C, H, W) -> [idx (B, pn*pn) per scale] (``f_to_idxBl_or_fhat`` with to_fhat=False); with
        ``return_inputs`` also the quantiser's inputs z (B*pn*pn, C) per scale."""
        B, C, H, W = f.shape
        if self.scales[-1] != H:
            raise ValueError(f"last scale {self.scales[-1]} != feature map size {H}")
        f_rest, idx_list, zs = f.clone(), [], []
        for pn in self.scales:
            z = _downsample(f_rest, pn).permute(0, 2, 3, 1).reshape(-1, C)  # (B*pn*pn, C)
            idx = self.nearest(z).view(B, pn * pn)
            h = _upsample(self.embed(idx, pn), H)
            f_rest = f_rest - h
            idx_list.append(idx)
            zs.append(z)
        return (idx_list, zs) if return_inputs else idx_list

    def decode(self, idx_list) -> torch.Tensor:
        """[idx per scale] -> f_hat (B, C, H, W) = sum over scales of the upsampled code maps."""
        H = self.scales[-1]
        return sum(_upsample(self.embed(idx, pn), H) for idx, pn in zip(idx_list, self.scales))

    def teacher_input(self, idx_list) -> torch.Tensor:
        """``idxBl_to_var_input``: (B, L - 1, C): for scale k + 1, the area-downsampled f_hat of scales 1..k."""
        H, B = self.scales[-1], idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.C, H, H)
        out = []
        for si in range(len(self.scales) - 1):
            f_hat = f_hat + _upsample(self.embed(idx_list[si], self.scales[si]), H)
            nxt = self.scales[si + 1]
            out.append(_downsample(f_hat, nxt).reshape(B, self.C, -1).transpose(1, 2))
        return torch.cat(out, 1)

    def tokens(self, x: torch.Tensor, patch: int) -> torch.Tensor:
        """Images (B, 1, H, W) -> all token indices (B, L), scales concatenated (coarse to fine)."""
        return torch.cat(self.encode(image_to_features(x, patch)), 1)

    def split(self, tokens: torch.Tensor) -> list:
        return list(torch.split(tokens, [pn * pn for pn in self.scales], 1))


def fit_codebook(f: torch.Tensor, K: int, scales=SCALES, rounds: int = 3, seed: int = 0) -> torch.Tensor:
    """A shared k-means codebook (K, C) for the residual quantiser (stand-in for VAR's learned VQ-VAE codebook):
    k-means on the (area-downsampled) features at every scale, then ``rounds`` times: encode with the current codebook,
    refit k-means on the quantiser's actual inputs of all scales (the residuals), warm-started."""
    from sklearn.cluster import KMeans

    C = f.shape[1]
    z0 = torch.cat([_downsample(f, pn).permute(0, 2, 3, 1).reshape(-1, C) for pn in scales]).numpy()
    km = KMeans(K, n_init=1, random_state=seed).fit(z0.astype(np.float64))
    cb = torch.from_numpy(km.cluster_centers_).float()
    for _ in range(rounds):
        _, zs = ResidualQuantizer(cb, scales).encode(f, return_inputs=True)
        z = torch.cat(zs).numpy().astype(np.float64)
        km = KMeans(K, n_init=1, init=cb.numpy().astype(np.float64), random_state=seed).fit(z)
        cb = torch.from_numpy(km.cluster_centers_).float()
    order = torch.argsort(cb.norm(dim=1))  # a canonical order (smallest code first) for readable plots
    return cb[order].contiguous()


# ------------------------------------------------------------------------------------------------------- structure
def scale_levels(scales=SCALES) -> torch.Tensor:
    """(L,) the scale index of every position (the first position, the class token, predicts scale 0)."""
    return torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(scales)])


def block_causal_mask(scales=SCALES) -> torch.Tensor:
    """(L, L) bool, True = query i may attend to key j: j's scale <= i's scale (var.py:107-111)."""
    d = scale_levels(scales)
    return d[:, None] >= d[None, :]


def subnet_layers(D: int, d: int) -> list:
    """Equidistant layer selection I_d = {floor(i (D - 1) / (d - 1)) : i = 0..d-1} (first and last layer kept)."""
    if not 1 <= d <= D:
        raise ValueError(f"subnet depth {d} outside 1..{D}")
    if d == 1:
        return [0]
    return [int(math.floor(i * (D - 1) / (d - 1))) for i in range(d)]


def kv_cache_entries(D: int, sub: list | None, scales=SCALES, n_full_scales: int = 0, kv_width: int = 1) -> int:
    """Key + value entries cached when generating all scales (VAR caches every processed token in every layer it
    passes, var.py kv_caching): early scales (the first ``n_full_scales``) in all ``D`` layers, late scales in the
    ``len(sub)`` subnet layers (``sub=None``: the full network for every scale). x 2 (K and V) x ``kv_width``."""
    n = [pn * pn for pn in scales]
    early, late = sum(n[:n_full_scales]), sum(n[n_full_scales:])
    layers_late = D if sub is None else len(sub)
    return 2 * kv_width * (D * early + layers_late * late)


def full_pass_schedule(steps: int, stages) -> list:
    """Per training step, True = a full-network pass, False = a subnet pass. ``stages`` = [[weight, p_full], ...]:
    consecutive stages with lengths proportional to ``weight``; inside a stage the full passes are spread evenly
    (step t is full iff floor((t + 1) p) > floor(t p)), so each stage has exactly round-down(p * length) full passes."""
    w = np.asarray([s[0] for s in stages], dtype=float)
    bounds = np.round(np.cumsum(w) / w.sum() * steps).astype(int)
    out, start = [], 0
    for (_, p), end in zip(stages, bounds):
        for t in range(end - start):
            out.append(math.floor((t + 1) * p + 1e-9) > math.floor(t * p + 1e-9))
        start = end
    return out


# ------------------------------------------------------------------------------------------------------- model
class VARBlock(Block):
    """The kit's pre-LN block; ``mask`` is a (T, T) boolean attention mask (True = attend) instead of padding."""

    def attention(self, x: torch.Tensor, causal: bool, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        h, hd = self.active_heads, self.cfg.head_dim
        q, k, v = (p(x, h * hd).view(B, T, h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, h * hd)
        return self.o(y, C), q, k, v


class VARNet(TinyTransformer):
    """A tiny class-conditional VAR transformer (the kit's ``TinyTransformer(kind="causal")`` with VAR's inputs:
    class token, word embedding of the teacher-forcing feature maps, level and position embeddings; block-causal
    attention; a head over the K codes)."""

    def __init__(self, cfg: TFConfig, n_classes: int, c_vae: int, scales=SCALES, class_cond: str = "sos"):
        if class_cond not in ("sos", "all"):
            raise ValueError(f"class_cond={class_cond!r}; allowed: sos, all")
        self.class_cond = class_cond
        self.scales = tuple(int(s) for s in scales)
        L = sum(pn * pn for pn in self.scales)
        if cfg.kind != "causal" or cfg.max_len != L:
            raise ValueError(f"VARNet needs kind='causal' and max_len = L = {L}")
        super().__init__(cfg)
        d = cfg.d_model
        del self.tok
        self.blocks = nn.ModuleList(VARBlock(cfg, i, self.proj_factory) for i in range(cfg.n_layers))
        self.class_emb = nn.Embedding(n_classes, d)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, d))
        self.word_embed = nn.Linear(c_vae, d)
        self.lvl_embed = nn.Embedding(len(self.scales), d)
        self.register_buffer("lvl", scale_levels(self.scales), persistent=False)
        self.register_buffer("mask", block_causal_mask(self.scales), persistent=False)
        self.L = L
        self.reset_parameters()
        for p in (self.pos_start,):
            nn.init.normal_(p, std=0.02)

    def n_tokens(self, n_scales: int) -> int:
        return sum(pn * pn for pn in self.scales[:n_scales])

    def embed_inputs(self, labels: torch.Tensor, x_in: torch.Tensor | None) -> torch.Tensor:
        """labels (B,), x_in (B, T - 1, C) teacher-forcing features -> (B, T, d) (var.py:201-207)."""
        sos = self.class_emb(labels)[:, None] + self.pos_start  # (B, 1, d)
        h = sos if x_in is None or x_in.shape[1] == 0 else torch.cat([sos, self.word_embed(x_in)], 1)
        T = h.shape[1]
        if self.class_cond == "all" and T > 1:  # the class in every token (stand-in for VAR's per-block AdaLN)
            h = torch.cat([h[:, :1], h[:, 1:] + self.class_emb(labels)[:, None]], 1)
        return h + self.lvl_embed(self.lvl[:T])[None] + self.pos[:, :T]

    def forward(self, labels: torch.Tensor, x_in: torch.Tensor | None, sub_layers=None, n_full_scales: int = 0):
        """Logits (B, T, K). ``sub_layers=None``: every token through every layer (the full network). Otherwise the
        tokens of the first ``n_full_scales`` scales (E) go through all layers and the later tokens (S) through the
        ``sub_layers`` only: at a subnet layer E and S are processed together (S attends to E's keys / values of that
        layer, block-causally); at the other layers only E (which never attends to S)."""
        h = self.embed_inputs(labels, x_in)
        T = h.shape[1]
        mask = self.mask[:T, :T]
        if sub_layers is None:
            for blk in self.blocks:
                h, _ = blk(h, False, mask)
            return self.pool_head(h)
        nE = min(self.n_tokens(n_full_scales), T)
        sub = set(int(i) for i in sub_layers)
        hE, hS = h[:, :nE], h[:, nE:]
        for li, blk in enumerate(self.blocks):
            if li in sub and hS.shape[1] > 0:
                x, _ = blk(torch.cat([hE, hS], 1), False, mask)
                hE, hS = x[:, :nE], x[:, nE:]
            elif nE > 0:
                hE, _ = blk(hE, False, mask[:nE, :nE])
        return self.pool_head(torch.cat([hE, hS], 1))


def build_model(cfg: dict, K: int, c_vae: int, seed: int, n_layers: int | None = None) -> VARNet:
    torch.manual_seed(seed)
    L = sum(pn * pn for pn in cfg["scales"])
    tcfg = TFConfig(kind="causal", d_model=cfg["n_heads"] * cfg["head_dim"], n_layers=n_layers or cfg["n_layers"],
                    n_heads=cfg["n_heads"], head_dim=cfg["head_dim"], mlp_hidden=int(cfg["mlp_ratio"] * cfg["n_heads"] * cfg["head_dim"]),
                    vocab_size=K, max_len=L)
    return VARNet(tcfg, n_classes=10, c_vae=c_vae, scales=cfg["scales"], class_cond=cfg.get("class_cond", "sos"))


# ------------------------------------------------------------------------------------------------------- training
def token_nll(model: VARNet, q: ResidualQuantizer, tokens: torch.Tensor, labels: torch.Tensor, sub=None,
              n_full_scales: int = 0) -> torch.Tensor:
    """(B, L) per-token negative log-likelihood in nats, teacher forcing."""
    x_in = q.teacher_input(q.split(tokens))
    logits = model(labels, x_in, sub, n_full_scales)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens.reshape(-1), reduction="none").view(tokens.shape)


def arm_schedule(arm: str, cfg: dict, steps: int) -> list:
    if arm in ("full_only", "half"):
        return [True] * steps
    if arm == "progressive":
        return full_pass_schedule(steps, cfg["progressive_stages"])
    if arm == "fixed":
        return full_pass_schedule(steps, [[1, cfg["fixed_p_full"]]])
    raise ValueError(f"arm={arm!r}; allowed: {', '.join(ARMS)}")


def train_arm(arm: str, q: ResidualQuantizer, data_tok: dict, cfg: dict, seed: int):
    """Train one arm (same init seed, batches, optimiser and schedule for every arm); returns (model, losses,
    full-pass schedule). ``half``: a separate network of ``sub_depth`` layers trained at its full depth."""
    from ..nas.harness import train_model

    model = build_model(cfg, q.K, q.C, seed, cfg["sub_depth"] if arm == "half" else None)
    sched = arm_schedule(arm, cfg, cfg["steps"])
    sub = subnet_layers(cfg["n_layers"], cfg["sub_depth"])
    nf = cfg["n_full_scales"]

    def loss_fn(m, tok, y, step):
        return token_nll(m, q, tok, y, None if sched[step] else sub, nf).mean()

    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n in ("pos", "pos_start")]
    losses = train_model(model, {"train": data_tok["train"]}, cfg["steps"], loss_fn, lr=cfg["lr"], optimizer="adamw",
                         weight_decay=cfg["weight_decay"], batch_size=cfg["batch_size"], seed=seed,
                         warmup_steps=cfg["warmup_steps"], grad_clip=cfg["grad_clip"], no_decay=no_decay)
    model.eval()
    return model, losses, sched


@torch.no_grad()
def evaluate_nll(model: VARNet, q: ResidualQuantizer, tokens: torch.Tensor, labels: torch.Tensor, sub=None,
                 n_full_scales: int = 0, batch: int = 512, split_scales: int | None = None) -> dict:
    """Mean NLL in bits per token: per scale, early scales (the first ``split_scales``, default ``n_full_scales``),
    late scales, whole image; and bits per image."""
    model.eval()
    nll = torch.cat([token_nll(model, q, tokens[i:i + batch], labels[i:i + batch], sub, n_full_scales)
                     for i in range(0, len(tokens), batch)]) / math.log(2)
    return nll_summary(nll, q.scales, n_full_scales if split_scales is None else split_scales)


def nll_summary(nll_bits: torch.Tensor, scales, n_full_scales: int) -> dict:
    lv = scale_levels(scales)
    out = {f"scale_{pn}": float(nll_bits[:, lv == i].mean()) for i, pn in enumerate(scales)}
    out["early"] = float(nll_bits[:, lv < n_full_scales].mean()) if n_full_scales > 0 else float("nan")
    out["late"] = float(nll_bits[:, lv >= n_full_scales].mean())
    out["image"] = float(nll_bits.mean())
    out["bits_per_image"] = float(nll_bits.sum(1).mean())
    return out


def unigram_nll(train_tokens: torch.Tensor, test_tokens: torch.Tensor, K: int, scales, n_full_scales: int) -> dict:
    """Per-scale marginal code distribution from the training tokens (add-one smoothing), bits per test token."""
    lv = scale_levels(scales)
    nll = torch.zeros(test_tokens.shape, dtype=torch.float64)
    for i in range(len(scales)):
        cnt = torch.bincount(train_tokens[:, lv == i].reshape(-1), minlength=K).double() + 1.0
        logp = torch.log2(cnt / cnt.sum())
        nll[:, lv == i] = -logp[test_tokens[:, lv == i]]
    return nll_summary(nll, scales, n_full_scales)


@torch.no_grad()
def sample(model: VARNet, q: ResidualQuantizer, labels: torch.Tensor, seed: int, sub=None, n_full_scales: int = 0,
           patch: int = 1) -> torch.Tensor:
    """Class-conditional generation, scale by scale (``autoregressive_infer_cfg`` without CFG / top-k / top-p):
    sample all tokens of scale k from the softmax, add their upsampled code map to f_hat, feed the downsampled f_hat
    as the next scale's input. Recomputes the prefix each scale (identical to KV caching). -> images (B, 1, H, W)."""
    model.eval()
    g = torch.Generator().manual_seed(int(seed))
    B, H = len(labels), q.scales[-1]
    f_hat = torch.zeros(B, q.C, H, H)
    x_in = torch.zeros(B, 0, q.C)
    start = 0
    for si, pn in enumerate(q.scales):
        logits = model(labels, x_in, sub, n_full_scales)[:, start:start + pn * pn]  # (B, pn*pn, K)
        probs = logits.softmax(-1).reshape(-1, logits.size(-1))
        idx = torch.multinomial(probs, 1, generator=g).view(B, pn * pn)
        f_hat = f_hat + _upsample(q.embed(idx, pn), H)
        start += pn * pn
        if si + 1 < len(q.scales):
            nxt = q.scales[si + 1]
            x_in = torch.cat([x_in, _downsample(f_hat, nxt).reshape(B, q.C, -1).transpose(1, 2)], 1)
    return features_to_image(f_hat, patch)


# ------------------------------------------------------------------------------------------------------- Frechet
def fit_feature_classifier(X: torch.Tensor, y: torch.Tensor, hidden: int, seed: int):
    """A small MLP digit classifier (sklearn) whose hidden ReLU layer is the Frechet feature space."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=400, random_state=seed)
    clf.fit(X.reshape(len(X), -1).numpy(), y.numpy())
    return clf


def classifier_features(clf, X: torch.Tensor) -> np.ndarray:
    A = X.reshape(len(X), -1).numpy().astype(np.float64)
    return np.maximum(A @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (FID's formula, any feature space). The trace of the
    matrix square root is computed as sum(sqrt(eig(S_a^1/2 S_b S_a^1/2))) (the same eigenvalues as S_a S_b, but a
    symmetric PSD problem): stable when dead ReLU units make the covariances singular (scipy's sqrtm gave NaN)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, U = np.linalg.eigh(s1)
    r1 = (U * np.sqrt(np.clip(w, 0.0, None))) @ U.T  # S_a^(1/2)
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


__all__ = ["SCALES", "ARMS", "load_digits_split", "image_to_features", "features_to_image", "ResidualQuantizer",
           "fit_codebook", "scale_levels", "block_causal_mask", "subnet_layers", "kv_cache_entries",
           "full_pass_schedule", "VARBlock", "VARNet", "build_model", "token_nll", "arm_schedule", "train_arm",
           "evaluate_nll", "nll_summary", "unigram_nll", "sample", "fit_feature_classifier", "classifier_features",
           "frechet_distance"]
