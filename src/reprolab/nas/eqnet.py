"""EQ-Net: Elastic Quantization Neural Networks (Xu et al., ICCV 2023, https://arxiv.org/abs/2308.07650).

One weight-sharing *quantization supernet*: every quantized layer can run at any weight / activation bit width
(2..8), per-tensor or per-channel weight scales, symmetric or asymmetric grids, with ONE set of weights and a table
of learnable LSQ+ (scale, offset) pairs per (bit width, granularity, symmetry). Two losses:

* **WDR-Loss** (weight distribution regularization): the skewness of every layer's weights is pulled to 0 and the
  kurtosis to 1.8 (a uniform distribution's), so that one weight tensor suits every grid;
* **GPG-Loss** (group progressive guidance): within one step the sub-networks are trained from high to low bit
  width, each distilled (KL, with the labels) from the logits of the PREVIOUS (higher-precision) one.

Follows the official code github.com/xuke225/EQ-Net:
``module/base_lsq.py`` (LSQQuantizer / ForACT / ForWeight: signed integer range [-2^(b-1), 2^(b-1)-1] for weights
and unsigned [0, 2^b-1] for non-negative activations, ``grad_scale`` (which returns |x|), ``round_ste`` after the
clamp, ``s + 1e-6``, the MSE (L_2.4) initialisation over 80 shrunk ranges, 5 for symmetric per-channel),
``module/qat_layer.py`` (QATQuantModule: activation quantizer on the layer INPUT), ``module/qat_model.py``
(set_biggest_subnet / set_smallest_subnet / set_random_subnet: random granularity and symmetry per layer, first and
last layer at 8 bits), ``runner/criterion.py`` (KurtosisLoss / SkewnessLoss: unbiased std, first layer excluded,
mean over layers; KLLossSoft alpha 0.5), ``runner/trainer.py`` (QuantSuperNetTrainer.train_epoch: WDR backward,
biggest on the labels, then random ... smallest each on KLLossSoft to the previous sub-network's detached logits,
gradient clipping by value 1.0, one optimizer step), ``configs/train-supernet.yaml`` (Adam lr 1e-3, cosine, no
weight decay, kurt_rate 0.015, skew_rate 1.0, num_subnet 3) and ``runner/evaluator.py`` (uniform configs evaluated
after BN re-estimation).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bn import set_running_statistics

BITS = tuple(range(2, 9))  # the official table: one column per bit width 2..8 (index bit - 2)
CONFIG_RE = re.compile(r"^([2-8])-(pc|pt)-(sym|asym)$")


# ------------------------------------------------------------------------------------ LSQ+ pieces (module/base_lsq.py)
def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Official ``grad_scale``: value |x|, gradient scale * sign(x) (LSQ's step-size gradient scaling)."""
    y = x.abs()
    y_grad = x.abs() * scale
    return (y - y_grad).detach() + y_grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (x.round() - x).detach() + x


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor, p: float = 2.4, reduction: str = "all") -> torch.Tensor:
    if reduction == "all":
        return (pred - tgt).abs().pow(p).mean()
    return torch.mean((pred - tgt).abs().pow(p), dim=1, keepdim=True)  # per row ("other")


def int_range(n_bits: int, all_positive: bool) -> tuple[int, int]:
    """(neg_thd, pos_thd): signed [-2^(b-1), 2^(b-1)-1], or [0, 2^b-1] for non-negative inputs (official)."""
    if all_positive:
        return 0, 2 ** n_bits - 1
    return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1


def lsq_plus(x: torch.Tensor, s: torch.Tensor, beta, neg: int, pos: int) -> torch.Tensor:
    """Official forward: clamp((x - beta) / (s + 1e-6), neg, pos), round (STE), * (s + 1e-6) + beta."""
    v = torch.clamp((x - beta) / (s + 1e-6), neg, pos)
    return round_ste(v) * (s + 1e-6) + beta


def _q_range(x, hi, lo, neg, pos, asym):
    scale = (hi - lo) / (pos - neg)
    beta = lo - scale * neg if asym else 0.0
    return torch.round(torch.clamp((x - beta) / scale, neg, pos)) * scale + beta


def _shrink(n: int) -> torch.Tensor:
    """Official candidate ranges: max * (1 - 0.01 i), i = 0..n-1."""
    return 1.0 - 0.01 * torch.arange(n, dtype=torch.float32)


class LSQPlusQuantizer(nn.Module):
    """EQ-Net's elastic LSQ+ quantizer. ``kind="weight"``: tables (C_out, 7) per channel and (1, 7) per tensor, for
    symmetric (offset fixed 0) and asymmetric (learnable offset); ``kind="act"``: (1, 7) per tensor only.
    Initialised on the first forward (MSE search, official ``init_quantization_param``)."""

    def __init__(self, kind: str, channels: int = 1):
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(kind)
        self.kind = kind
        self.n_bits, self.sym, self.channel_wise = 8, True, False
        self.all_positive = False
        self.inited = False
        rows = {"layer": 1, "channel": channels} if kind == "weight" else {"layer": 1}
        for g, r in rows.items():
            for sy in ("sym", "asym"):
                self.register_parameter(f"scale_{sy}_{g}", nn.Parameter(torch.ones(r, 7)))
                self.register_parameter(f"beta_{sy}_{g}", nn.Parameter(torch.zeros(r, 7), requires_grad=sy == "asym"))

    def set_params(self, bit: int, symmetric: bool, channel_wise: bool = False) -> None:
        if bit not in BITS:
            raise ValueError(f"bit={bit}; allowed 2..8")
        self.n_bits, self.sym = int(bit), bool(symmetric)
        self.channel_wise = bool(channel_wise) and self.kind == "weight"

    @property
    def thd(self) -> tuple[int, int]:
        return int_range(self.n_bits, self.all_positive)

    # ---- initialisation (official: symmetric_init / asymmetric_init / *_for_per_channel, L_2.4 over shrunk ranges)
    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.kind == "act" and float(x.min()) >= -1e-9:
            self.all_positive = True
        for bit in BITS:
            neg, pos = int_range(bit, self.all_positive)
            j = bit - 2
            s, _ = self._sym_init(x, neg, pos)
            self.scale_sym_layer[0, j] = s
            s, b = self._asym_init(x, neg, pos)
            self.scale_asym_layer[0, j], self.beta_asym_layer[0, j] = s, b
            if self.kind == "weight":
                w = x.reshape(x.size(0), -1)
                s = self._sym_init_channel(w, neg, pos)
                self.scale_sym_channel[:, j] = s
                s, b = self._asym_init_channel(w, neg, pos)
                self.scale_asym_channel[:, j], self.beta_asym_channel[:, j] = s, b
        self.inited = True

    # The official loops over candidates i (keeping the FIRST strict minimum) are evaluated here for all candidates
    # at once; argmin returns the first minimum, the same pick.
    def _sym_init(self, x, neg, pos):
        xs = x.reshape(1, -1)
        m = x.abs().max() * _shrink(80)[:, None]  # (80, 1)
        lo = torch.zeros_like(m) if self.all_positive else -m
        score = (_q_range(xs, m, lo, neg, pos, False) - xs).abs().pow(2.4).mean(1)  # (80,)
        i = int(torch.argmin(score))
        return float((m[i] - lo[i]) / (pos - neg)), 0.0

    def _asym_init(self, x, neg, pos):
        xs = x.reshape(1, -1)
        hi, lo = x.max() * _shrink(80)[:, None], x.min() * _shrink(80)[:, None]  # (80, 1)
        score = (_q_range(xs, hi, lo, neg, pos, True) - xs).abs().pow(2.4).mean(1)
        i = int(torch.argmin(score))
        scale = float((hi[i] - lo[i]) / (pos - neg))
        return scale, (-1e-9 if self.all_positive else float(lo[i] - scale * neg))

    @staticmethod
    def _sym_init_channel(w, neg, pos):  # official: 5 candidates only
        m = w.abs().amax(1, keepdim=True)[None] * _shrink(5)[:, None, None]  # (5, C, 1)
        score = (_q_range(w[None], m, -m, neg, pos, False) - w[None]).abs().pow(2.4).mean(2)  # (5, C)
        i = torch.argmin(score, 0)  # (C,)
        return (2 * m / (pos - neg))[i, torch.arange(w.size(0)), 0]

    @staticmethod
    def _asym_init_channel(w, neg, pos):
        f = _shrink(80)[:, None, None]
        hi, lo = w.amax(1, keepdim=True)[None] * f, w.amin(1, keepdim=True)[None] * f  # (80, C, 1)
        score = (_q_range(w[None], hi, lo, neg, pos, True) - w[None]).abs().pow(2.4).mean(2)  # (80, C)
        i, c = torch.argmin(score, 0), torch.arange(w.size(0))
        s = (hi - lo) / (pos - neg)
        return s[i, c, 0], (lo - s * neg)[i, c, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inited:
            self.init_from(x)
        neg, pos = self.thd
        j = self.n_bits - 2
        g = "channel" if self.channel_wise else "layer"
        if self.channel_wise:
            gs = 2.0 / math.sqrt(pos * x.numel() / x.size(1))  # official (weights per channel)
        else:
            gs = 1.0 / math.sqrt(pos * x.numel())
        sy = "sym" if self.sym else "asym"
        s = grad_scale(getattr(self, f"scale_{sy}_{g}")[:, j], gs)
        beta_t = getattr(self, f"beta_{sy}_{g}")[:, j]
        beta = beta_t if self.sym else grad_scale(beta_t, gs)  # official: |beta| for asymmetric (grad_scale)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return lsq_plus(x, s.view(shape), beta.view(shape), neg, pos)


class QATLayer(nn.Module):
    """Official QATQuantModule: fake-quantized weight (its quantizer) and fake-quantized INPUT activation."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.wq = LSQPlusQuantizer("weight", layer.weight.size(0))
        self.aq = LSQPlusQuantizer("act")
        self.quant = False

    @property
    def weight(self):
        return self.layer.weight

    def set_params(self, w_bit, a_bit, channel_wise, w_sym, a_sym):
        self.wq.set_params(w_bit, w_sym, channel_wise)
        self.aq.set_params(a_bit, a_sym)

    def set_bits(self, w_bit, a_bit):  # official set_quantization_bit (granularity/symmetry kept)
        self.wq.n_bits, self.aq.n_bits = int(w_bit), int(a_bit)

    def forward(self, x):
        w = self.layer.weight
        if self.quant:
            w = self.wq(w)
            x = self.aq(x)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


class EQCNN(nn.Module):
    """Small plain CNN (conv-BN-ReLU x4, global average pool, linear); every conv/linear is a QATLayer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 32, 64), strides=(1, 1, 2, 2)):
        super().__init__()
        blocks, c = [], in_channels
        for w, s in zip(widths, strides):
            blocks += [QATLayer(nn.Conv2d(c, w, 3, s, 1, bias=False)), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*blocks)
        self.fc = QATLayer(nn.Linear(c, num_classes))

    def forward(self, x):  # x (B, C, H, W)
        return self.fc(self.features(x).mean((2, 3)))

    def qlayers(self) -> list[QATLayer]:
        return [m for m in self.modules() if isinstance(m, QATLayer)]

    def set_quant_state(self, on: bool) -> None:
        for m in self.qlayers():
            m.quant = bool(on)

    def set_config(self, config: list[dict]) -> None:
        """config: one dict per QATLayer {w_bit, a_bit, channel_wise, w_sym, a_sym}."""
        ql = self.qlayers()
        if len(config) != len(ql):
            raise ValueError(f"{len(config)} layer configs for {len(ql)} layers")
        for m, c in zip(ql, config):
            m.set_params(c["w_bit"], c["a_bit"], c["channel_wise"], c["w_sym"], c["a_sym"])


# ------------------------------------------------------------------------------------ configurations (qat_model.py)
def parse_config(name: str) -> tuple[int, bool, bool]:
    """'4-pc-sym' -> (4 bits, channel_wise True, symmetric True)."""
    m = CONFIG_RE.match(name)
    if not m:
        raise ValueError(f"config {name!r}: want <bits 2..8>-<pc|pt>-<sym|asym>")
    return int(m.group(1)), m.group(2) == "pc", m.group(3) == "sym"


def uniform_config(n_layers: int, bit: int, channel_wise: bool, sym: bool, first_last_8: bool = True) -> list[dict]:
    """Official set_quantization_params(channel_wise, w_sym, a_sym, bit, bit): every layer at ``bit``, the first and
    last layer at 8 bits."""
    cfg = [dict(w_bit=bit, a_bit=bit, channel_wise=channel_wise, w_sym=sym, a_sym=sym) for _ in range(n_layers)]
    if first_last_8:
        for i in (0, -1):
            cfg[i] = dict(cfg[i], w_bit=8, a_bit=8)
    return cfg


def named_config(n_layers: int, name: str) -> list[dict]:
    return uniform_config(n_layers, *parse_config(name))


def sample_config(n_layers: int, rng: np.random.Generator, which: str, bits=BITS, granularities=(True, False),
                  syms=(True, False)) -> list[dict]:
    """Official set_biggest_subnet / set_smallest_subnet / set_random_subnet: granularity and weight / activation
    symmetry drawn per layer; bit widths max / min / drawn per layer (weights and activations separately); the
    first and last layer at 8 bits for 'smallest' and 'random' (and 8 anyway for 'biggest')."""
    cfg = []
    for _ in range(n_layers):
        if which == "biggest":
            wb = ab = max(bits)
        elif which == "smallest":
            wb = ab = min(bits)
        elif which == "random":
            wb, ab = int(rng.choice(bits)), int(rng.choice(bits))
        else:
            raise ValueError(which)
        # official order of draws: w bit, channel_wise, w_sym, a bit, a_sym (random); channel_wise, w_sym, a_sym else
        cw, ws, as_ = bool(rng.choice(granularities)), bool(rng.choice(syms)), bool(rng.choice(syms))
        cfg.append(dict(w_bit=int(wb), a_bit=int(ab), channel_wise=cw, w_sym=ws, a_sym=as_))
    if which != "biggest":
        for i in (0, -1):
            cfg[i] = dict(cfg[i], w_bit=8, a_bit=8)
    return cfg


# ------------------------------------------------------------------------------------ losses (runner/criterion.py)
def standardized_moment(w: torch.Tensor, k: int) -> torch.Tensor:
    """Official: mean(((w - mean) / std) ** k) with torch.std (UNBIASED, n-1)."""
    return torch.mean(((w - w.mean()) / w.std()) ** k)


def wdr_loss(model: EQCNN, kurt_rate: float = 0.015, skew_rate: float = 1.0, kurt_target: float = 1.8,
             skew_target: float = 0.0) -> torch.Tensor:
    """WDR-Loss: kurt_rate * mean_l (kurt(W_l) - 1.8)^2 + skew_rate * mean_l (skew(W_l) - 0)^2 over every
    quantized layer but the first (official KurtosisLoss / SkewnessLoss: ``del List[0]``)."""
    ws = [m.weight for m in model.qlayers()][1:]
    kurt = torch.stack([(standardized_moment(w, 4) - kurt_target) ** 2 for w in ws]).mean()
    skew = torch.stack([(standardized_moment(w, 3) - skew_target) ** 2 for w in ws]).mean()
    return kurt_rate * kurt + skew_rate * skew


def gpg_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float = 0.5,
             T: float = 1.0) -> torch.Tensor:
    """GPG step (official KLLossSoft): alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) (batchmean) +
    (1 - alpha) * CE(student, y); ``teacher`` = the previous (higher-bit) sub-network's DETACHED logits."""
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / T, 1), F.softmax(teacher.detach() / T, 1))
    return alpha * T ** 2 * kl + (1 - alpha) * F.cross_entropy(student, y)


# ------------------------------------------------------------------------------------ training
@dataclass
class TrainCfg:
    steps: int
    lr: float = 1e-3
    batch_size: int = 128
    grad_clip: float = 1.0
    num_subnet: int = 3
    kurt_rate: float = 0.015
    skew_rate: float = 1.0
    alpha: float = 0.5
    bits: tuple = BITS


def batches(X: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled minibatches (full batches only), one permutation per epoch, from a seeded torch Generator."""
    from .harness import batches as _batches

    return _batches(X, y, batch_size, torch.Generator().manual_seed(seed), drop_last=True)


def _cosine(opt, lr, t, T):
    for gr in opt.param_groups:
        gr["lr"] = 0.5 * lr * (1 + math.cos(math.pi * t / T))


def pretrain_fp(model: EQCNN, data: dict, steps: int, seed: int, lr: float = 1e-3, batch_size: int = 128) -> list:
    """Full-precision training (the official code starts from a pretrained FP model): Adam, cosine, CE."""
    model.set_quant_state(False)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    it, losses = batches(*data["train"], batch_size, seed), []
    for t in range(steps):
        _cosine(opt, lr, t, steps)
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


@torch.no_grad()
def calibrate(model: EQCNN, x: torch.Tensor) -> None:
    """Official: set_quant_state(True, True) and one forward on calibration images (train mode) to initialise every
    quantizer's table."""
    model.set_quant_state(True)
    model.train()
    model(x)


def train_supernet(model: EQCNN, data: dict, tc: TrainCfg, seed: int, wdr: bool = True, gpg: bool = True) -> dict:
    """Official QuantSuperNetTrainer.train_epoch. ``wdr``: WDR-Loss backward each step; ``gpg``: each later
    sub-network on KLLossSoft to the previous one's logits (else CE on the labels, the official soft_criterion=None
    branch). Sub-networks per step: biggest, (num_subnet - 2) random, smallest."""
    model.set_quant_state(True)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    it = batches(*data["train"], tc.batch_size, seed)
    n = len(model.qlayers())
    hist = {"ce_biggest": [], "loss_smallest": [], "wdr": []}
    for t in range(tc.steps):
        _cosine(opt, tc.lr, t, tc.steps)
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        if wdr:
            loss = wdr_loss(model, tc.kurt_rate, tc.skew_rate)
            loss.backward()
            hist["wdr"].append(float(loss))
        model.set_config(sample_config(n, rng, "biggest", tc.bits))
        preds = model(x)
        loss = F.cross_entropy(preds, y)
        loss.backward()
        hist["ce_biggest"].append(float(loss))
        soft = preds.detach()
        for k in range(1, tc.num_subnet):
            which = "smallest" if k == tc.num_subnet - 1 else "random"
            model.set_config(sample_config(n, rng, which, tc.bits))
            preds = model(x)
            loss = gpg_loss(preds, soft, y, tc.alpha) if gpg else F.cross_entropy(preds, y)
            loss.backward()
            soft = preds.detach()
        hist["loss_smallest"].append(float(loss))
        nn.utils.clip_grad_value_(model.parameters(), tc.grad_clip)
        opt.step()
    return hist


def train_static(model: EQCNN, data: dict, tc: TrainCfg, seed: int, config: list[dict]) -> list:
    """Static LSQ+ QAT of one fixed configuration: same quantizer, optimizer, schedule, clipping, batches and
    number of steps as the supernet; CE on the labels."""
    model.set_quant_state(True)
    model.set_config(config)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=0.0)
    it, losses = batches(*data["train"], tc.batch_size, seed), []
    for t in range(tc.steps):
        _cosine(opt, tc.lr, t, tc.steps)
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        nn.utils.clip_grad_value_(model.parameters(), tc.grad_clip)
        opt.step()
        losses.append(float(loss))
    return losses


@torch.no_grad()
def evaluate(model: EQCNN, data: dict, config: list[dict] | None, split: str = "test", calib: int = 256,
             batch_size: int = 256) -> float:
    """Accuracy of ``config`` (None = full precision) after BN re-estimation on the first ``calib`` training images
    (official evaluation_quant_model_2to8 re-estimates BN before every config; exact OFA statistics here)."""
    if config is None:
        model.set_quant_state(False)
    else:
        model.set_quant_state(True)
        model.set_config(config)
    Xtr = data["train"][0][:calib]
    set_running_statistics(model, [Xtr[i:i + batch_size] for i in range(0, len(Xtr), batch_size)])
    model.eval()
    X, y = data[split]
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(X[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(y)


def weight_moments(model: EQCNN) -> dict:
    """Per quantized layer (skewness, kurtosis) of the weights (official formulas) - to show what WDR does."""
    return {f"layer{i}": [float(standardized_moment(m.weight.detach(), 3)), float(standardized_moment(m.weight.detach(), 4))]
            for i, m in enumerate(model.qlayers())}


def load_data(dataset: str = "digits", size: int | None = None, split=(0.6, 0.2, 0.2), split_seed: int = 0) -> dict:
    """Standardised, stratified split (the NAS ground truth's split with the defaults) as torch tensors, through
    ``nas.harness.image_data``; ``size`` resizes the images (e.g. 14 for MNIST-5k 28x28 -> 14x14)."""
    from .harness import image_data

    return image_data(dataset, split, split_seed, size=size)


def run_seed(data: dict, seed: int, cfg: dict, log=print) -> dict:
    """Everything for one seed: FP pre-training (shared init), supernet with WDR+GPG, supernet without, one static
    LSQ+ QAT model per evaluated configuration; accuracies of every arm at every evaluated configuration."""
    import copy

    torch.manual_seed(seed)
    n_cls = int(data["train"][1].max()) + 1
    base = EQCNN(data["train"][0].size(1), n_cls, tuple(cfg["widths"]), tuple(cfg["strides"]))
    fp_losses = pretrain_fp(base, data, cfg["fp_steps"], seed, cfg["lr"], cfg["batch_size"])
    out = {"fp_acc": evaluate(base, data, None, calib=cfg["calib"]), "fp_final_loss": fp_losses[-1]}
    base.set_quant_state(False)
    base.train()
    calib_x = data["train"][0][:cfg["calib"]]
    calibrate(base, calib_x)
    n = len(base.qlayers())
    tc = TrainCfg(steps=cfg["steps"], lr=cfg["lr"], batch_size=cfg["batch_size"], grad_clip=cfg["grad_clip"],
                  num_subnet=cfg["num_subnet"], kurt_rate=cfg["kurt_rate"], skew_rate=cfg["skew_rate"],
                  alpha=cfg["alpha"], bits=tuple(cfg["bits"]))
    configs = {name: named_config(n, name) for name in cfg["eval_configs"]}
    out["ptq"] = {name: evaluate(copy.deepcopy(base), data, c, calib=cfg["calib"]) for name, c in configs.items()}
    for arm, (wdr, gpg) in (("eqnet", (True, True)), ("no_wdr_gpg", (False, False))):
        net = copy.deepcopy(base)
        hist = train_supernet(net, data, tc, seed, wdr=wdr, gpg=gpg)
        out[arm] = {name: evaluate(net, data, c, calib=cfg["calib"]) for name, c in configs.items()}
        out[arm + "_moments"] = weight_moments(net)
        out[arm + "_final_ce_biggest"] = float(np.mean(hist["ce_biggest"][-10:]))
        log(f"seed {seed} {arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[arm].items()))
    out["static"] = {}
    for name, c in configs.items():
        net = copy.deepcopy(base)
        train_static(net, data, tc, seed, c)
        out["static"][name] = evaluate(net, data, c, calib=cfg["calib"])
    log(f"seed {seed} static: " + ", ".join(f"{k} {v:.3f}" for k, v in out["static"].items()))
    return out
