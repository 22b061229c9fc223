"""The owner's Offsite-Tuning emulator, distilled once with a real budget (the ``offsite_emulator`` model stage).

Offsite-Tuning: Transfer Learning without Full Model (Xiao, Lin and Han, 2023), https://arxiv.org/abs/2302.04870.

``python -m reprolab.lm.offsite_emulator`` builds the emulator of ``params.yaml: offsite_tuning`` (adapter = bottom
``l_pad`` + top ``r_pad`` blocks of ``model``, ``n_student`` middle blocks kept by the official uniform layer drop) and
distils its middle blocks with the official recipe of ``scripts/distill_emulator/opt.sh`` (mit-han-lab/offsite-tuning):
loss ``lm_weight * LM + kd_weight * KD`` (1 and 30), AdamW at peak lr 1e-4 without weight decay, linear warm-up then
cosine decay to 0 (``--lr_scheduler_type cosine``, transformers ``get_cosine_schedule_with_warmup``), gradient clipping
1.0 (``run_clm.py`` ``--max_grad_norm`` default), windows of ``seq_len`` tokens of the generic text (``distill_text``,
our stand-in for the Pile), only the emulated middle blocks trained. The budget is the ``emulator:`` block of the
section (steps x batch x seq_len tokens), far below the official one epoch of a Pile shard.

Every ``eval_every`` steps it records the emulator's own held-out loss on the generic text's tail (the last
``heldout_frac``, never trained on): its LM perplexity (the official run logs ``student_ppl`` every ``eval_steps``) and
the KD loss against the full model. It writes ``models/offsite-emulator/`` (via a ``.partial`` folder renamed at the
end): ``middle.safetensors`` (the distilled middle blocks; everything else is the owner's unchanged model) and
``emulator.json`` (the split, the parameters and the curves). :func:`load_emulator` rebuilds the emulator from the
owner's model and that folder.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from ..paths import MODELS_DIR
from .offsite import build_emulator, emulator_blocks, lm_batches, set_trainable, train_lm

EMULATOR_DIR = MODELS_DIR / "offsite-emulator"


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """lr multiplier of transformers' ``get_cosine_schedule_with_warmup`` (num_cycles 0.5) at optimizer step ``step``:
    ``step / warmup`` during the warm-up, then ``0.5 (1 + cos(pi * progress))`` with progress from 0 to 1."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_losses(emulator, teacher, windows: torch.Tensor) -> dict:
    """The emulator's held-out LM loss (token mean) and KD loss (official ``get_kd_loss``, mean over windows) on
    ``windows`` (N, L), teacher target = the output of the full model's last middle block."""
    from .offsite import _Capture, decoder_block_list, kd_loss

    info = emulator.offsite
    was = emulator.training
    emulator.eval()
    s_cap = _Capture(decoder_block_list(emulator)[info["l_pad"] + len(info["kept"]) - 1])
    t_cap = _Capture(decoder_block_list(teacher)[info["n_full"] - info["r_pad"] - 1])
    lm, kd = [], []
    try:
        for x in windows:
            x = x[None]  # (1, L)
            lm.append(emulator(input_ids=x, labels=x, use_cache=False).loss.item())
            teacher.model(input_ids=x, use_cache=False)
            kd.append(kd_loss(t_cap.out.float(), s_cap.out.float()).item())
    finally:
        s_cap.remove()
        t_cap.remove()
    emulator.train(was)
    lm_mean = sum(lm) / len(lm)
    return {"lm_loss": lm_mean, "ppl": math.exp(lm_mean), "kd_loss": sum(kd) / len(kd)}


def distill_emulator(model, train_ids: torch.Tensor, heldout_ids: torch.Tensor, *, l_pad: int, r_pad: int,
                     n_student: int, steps: int, batch_size: int, seq_len: int, lr: float, warmup: int,
                     lm_weight: float, kd_weight: float, seed: int, eval_every: int, eval_windows: int,
                     progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """Build the emulator of ``model`` and distil its middle blocks (official recipe, see the module docstring).

    ``train_ids`` / ``heldout_ids``: token streams (1, T) of the generic text's head / tail. Returns the emulator and
    a log with the per-step training losses and the held-out curve (step 0 = the layer-drop-only emulator)."""
    emu = build_emulator(model, l_pad, r_pad, n_student)
    batches = lm_batches(train_ids, seq_len, batch_size, steps, seed=seed + 1)
    n_win = min(eval_windows, heldout_ids.shape[1] // seq_len)
    windows = heldout_ids[0, :n_win * seq_len].reshape(n_win, seq_len)  # (N, L) non-overlapping
    curve = [{"step": 0, **heldout_losses(emu, model, windows)}]

    def on_step(step: int) -> None:
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, **heldout_losses(emu, model, windows)})
            if progress:
                print(f"step {step}: held-out ppl {curve[-1]['ppl']:.2f}, KD {curve[-1]['kd_loss']:.4f}", flush=True)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm
    log = train_lm(emu, batches, set_trainable(emu, emulator_blocks(emu)), lr, teacher=model, kd_weight=kd_weight,
                   lm_weight=lm_weight, progress=bar, lr_lambda=lambda s: cosine_with_warmup(s, warmup, steps),
                   on_step=on_step)
    for p in emu.parameters():
        p.requires_grad_(False)
        p.grad = None
    return emu, {"lm_loss": log["lm_loss"], "kd_loss": log["kd_loss"], "step_s": log["step_s"], "heldout": curve,
                 "heldout_windows": n_win}


def save_emulator(emu, info: dict, out: Path) -> None:
    """Write the middle blocks (safetensors) and ``emulator.json`` to ``out`` (a new folder)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in emulator_blocks(emu).state_dict().items()}
    save_file(state, str(out / "middle.safetensors"))
    (out / "emulator.json").write_text(json.dumps({**info, "offsite": emu.offsite}, indent=2, sort_keys=True) + "\n")


def load_emulator(model, path: Path | str = EMULATOR_DIR, *, l_pad: int, r_pad: int, n_student: int,
                  model_name: str | None = None):
    """The distilled emulator of ``model`` from the folder of the ``offsite_emulator`` stage, and its ``emulator.json``.

    Fails if the folder was made for another split (l_pad, r_pad, n_student) or another model."""
    from safetensors.torch import load_file

    path = Path(path)
    info = json.loads((path / "emulator.json").read_text())
    want = {"l_pad": l_pad, "r_pad": r_pad, "n_student": n_student}
    got = {k: info["params"][k] for k in want}
    if got != want or (model_name is not None and info["params"]["model"] != model_name):
        raise ValueError(f"{path}: emulator made for {got}, model {info['params']['model']!r}; asked for {want}, "
                         f"model {model_name!r}: rerun the offsite_emulator stage")
    emu = build_emulator(model, l_pad, r_pad, n_student)
    if emu.offsite["kept"] != info["offsite"]["kept"]:
        raise ValueError(f"{path}: kept blocks {info['offsite']['kept']} != {emu.offsite['kept']}")
    emulator_blocks(emu).load_state_dict(load_file(str(path / "middle.safetensors")))
    emu.eval()
    return emu, info


def main(argv=None) -> Path:
    from ..config import load_params
    from ..data import load_text
    from . import load_causal_lm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", default="offsite_tuning", help="params.yaml section (its `emulator:` key and split)")
    ap.add_argument("--profile", default="quick", help="only to read the section; the `emulator:` block is not "
                                                       "overridden by any profile")
    ap.add_argument("--out", default="", help="output folder (default models/offsite-emulator)")
    args = ap.parse_args(argv)
    cfg = load_params(args.paper, args.profile)
    e = dict(cfg["emulator"])
    torch.set_num_threads(e["threads"])  # fixed: the float summation order, hence the weights, depend on it
    torch.manual_seed(cfg["seed"])
    model, tok = load_causal_lm(cfg["model"])
    for p in model.parameters():
        p.requires_grad_(False)
    ids = tok(load_text(cfg["distill_text"]), add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    cut = int(ids.shape[1] * (1 - e["heldout_frac"]))
    t0 = time.perf_counter()
    emu, log = distill_emulator(model, ids[:, :cut], ids[:, cut:], l_pad=cfg["l_pad"], r_pad=cfg["r_pad"],
                                n_student=cfg["n_student"], steps=e["steps"], batch_size=e["batch_size"],
                                seq_len=e["seq_len"], lr=e["lr"], warmup=e["warmup"], lm_weight=cfg["lm_weight"],
                                kd_weight=cfg["kd_weight"], seed=cfg["seed"], eval_every=e["eval_every"],
                                eval_windows=e["eval_windows"], progress=True)
    wall = time.perf_counter() - t0
    windows = ids[0, cut:cut + log["heldout_windows"] * e["seq_len"]].reshape(log["heldout_windows"], e["seq_len"])
    with torch.no_grad():
        full_lm = sum(model(input_ids=x[None], labels=x[None], use_cache=False).loss.item() for x in windows) / len(windows)
    full = {"lm_loss": full_lm, "ppl": math.exp(full_lm)}
    k = max(1, e["steps"] // 100)
    info = {"params": {"model": cfg["model"], "distill_text": cfg["distill_text"], "l_pad": cfg["l_pad"],
                       "r_pad": cfg["r_pad"], "n_student": cfg["n_student"], "lm_weight": cfg["lm_weight"],
                       "kd_weight": cfg["kd_weight"], "seed": cfg["seed"], **e},
            "tokens": e["steps"] * e["batch_size"] * e["seq_len"],
            "heldout_curve": log["heldout"], "full_model_heldout": {"lm_loss": full["lm_loss"], "ppl": full["ppl"]},
            f"train_kd_loss_mean_every_{k}_steps": [sum(log["kd_loss"][i:i + k]) / len(log["kd_loss"][i:i + k])
                                                    for i in range(0, len(log["kd_loss"]), k)],
            f"train_lm_loss_mean_every_{k}_steps": [sum(log["lm_loss"][i:i + k]) / len(log["lm_loss"][i:i + k])
                                                    for i in range(0, len(log["lm_loss"]), k)]}
    out = Path(args.out) if args.out else EMULATOR_DIR
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_emulator(emu, info, staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"wrote {out}: {e['steps']} steps in {wall:.0f} s; held-out ppl {log['heldout'][0]['ppl']:.1f} (drop only) -> "
          f"{log['heldout'][-1]['ppl']:.1f} (full model {full['ppl']:.1f})")
    return out


if __name__ == "__main__":
    main()
