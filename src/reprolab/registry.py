"""The registry: one file per paper, ``src/reprolab/<family>/<slug>.paper.yaml``, beside the paper's method.

A paper's file holds everything about the paper that is not a DVC parameter, so that a paper is read and changed in one
place (its parameter *values* stay in its ``params.yaml`` section, which DVC tracks):

``slug, title, arxiv, family, datasets, models``
    identity; ``datasets``/``models`` must be in the catalogues of params.yaml.
``claims: {id: {...}}``
    what the paper claims, as checked here. Fields:

    - ``kind``: ``empirical`` (a measured effect: per-seed values, a 95% interval, one of four verdicts) or
      ``accounting`` (a byte/parameter/FLOP count, an identity or a formula evaluated from the configuration: it cannot
      come out otherwise, is shown apart and is never counted as a reproduced claim);
    - ``statistic``: ``difference`` (method - baseline, paired by seed), ``ratio`` (method / baseline, paired by seed;
      its interval is a t interval on log ratios), or ``value`` (the method's value per seed). Accounting checks use
      ``value``;
    - ``op`` (``>=``, ``>``, ``<=``, ``<``) and ``threshold``: the name of the params key that holds the threshold, fixed
      before the run (or a number);
    - ``requires``: the gates (below) the claim needs; a failed gate makes the claim ``not testable here``;
    - ``scale`` (optional): the unit of the normalised margin in the index's forest plot (default: |threshold|, or the
      baseline's magnitude when the threshold is 0);
    - ``interval`` (optional): ``t`` (default) or ``bootstrap`` (``scipy.stats.bootstrap``, for many units);
    - ``text``, ``baseline``, ``paper``: the claim in words, the baseline it beats, the paper's own number;
    - ``headline`` (optional): a few words for the index (default: the id).
``gates: {id: {...}}``
    preconditions measured in the same run (every trained arm beats its trivial reference; the method's premise is
    present). Same fields as a claim (``statistic``, ``op``, ``threshold``, ``text``); a gate passes when its whole
    interval is on the pass side.
``deviations: [{what, official, ours, why}]``
    every setting or formula where the implementation departs from the official code or the paper, with the official
    value and where it is (file:line or equation).
``params: {key: <JSON Schema>}``
    the type and range of every key of the paper's params.yaml section (see ``reprolab.config``).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import yaml

from .paths import REPO_ROOT

PKG_DIR = REPO_ROOT / "src" / "reprolab"
KINDS = ("empirical", "accounting")
STATISTICS = ("difference", "ratio", "value")
OPS = (">=", ">", "<=", "<")

_CHECK = {
    "type": "object",
    "required": ["statistic", "op", "threshold", "text"],
    "properties": {
        "kind": {"enum": list(KINDS)},
        "statistic": {"enum": list(STATISTICS)},
        "op": {"enum": list(OPS)},
        "threshold": {"type": ["string", "number"]},
        "requires": {"type": "array", "items": {"type": "string"}},
        "scale": {"type": "number", "exclusiveMinimum": 0},
        "interval": {"enum": ["t", "bootstrap"]},
        "text": {"type": "string", "minLength": 1},
        "baseline": {"type": "string"},
        "paper": {"type": "string"},
        "headline": {"type": "string"},
    },
    "additionalProperties": False,
}
FILE_SCHEMA = {
    "type": "object",
    "required": ["slug", "title", "arxiv", "family", "datasets", "models", "claims", "gates", "deviations", "params"],
    "properties": {
        "slug": {"type": "string", "pattern": "^[a-z0-9_]+$"},
        "title": {"type": "string"},
        "arxiv": {"type": "string"},
        "family": {"type": "string"},
        "datasets": {"type": "array", "items": {"type": "string"}},
        "models": {"type": "array", "items": {"type": "string"}},
        "claims": {"type": "object", "minProperties": 1,
                   "additionalProperties": {**_CHECK, "required": ["kind", *_CHECK["required"], "baseline", "paper"]}},
        "gates": {"type": "object", "additionalProperties": _CHECK},
        "deviations": {"type": "array", "items": {
            "type": "object", "required": ["what", "official", "ours", "why"], "additionalProperties": False,
            "properties": {k: {"type": "string"} for k in ("what", "official", "ours", "why")}}},
        "params": {"type": "object", "minProperties": 1, "required": ["seed"],
                   "additionalProperties": {"type": "object"}},
    },
    "additionalProperties": False,
}


class RegistryError(ValueError):
    """A paper's registry file is missing a field or has a wrong one."""


def paper_files(pkg_dir: Path = PKG_DIR) -> list[Path]:
    return sorted(pkg_dir.glob("*/*.paper.yaml"))


def _validate(path: Path, entry: dict) -> None:
    rel = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    errors = sorted(jsonschema.Draft202012Validator(FILE_SCHEMA).iter_errors(entry), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = ".".join(map(str, e.absolute_path)) or "(top level)"
        raise RegistryError(f"{rel}: {where}: {e.message}")
    if entry["slug"] != path.name[: -len(".paper.yaml")]:
        raise RegistryError(f"{rel}: slug {entry['slug']!r} differs from the file name")
    if path.parent.name != entry["family"]:
        raise RegistryError(f"{rel}: family {entry['family']!r} differs from its folder {path.parent.name!r}")
    for key, sch in entry["params"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(sch)
        except jsonschema.SchemaError as exc:
            raise RegistryError(f"{rel}: params.{key}: not a valid JSON Schema: {exc.message}") from None
    gates = set(entry["gates"])
    for cid, c in entry["claims"].items():
        unknown = sorted(set(c.get("requires", [])) - gates)
        if unknown:
            raise RegistryError(f"{rel}: claims.{cid}.requires names unknown gate(s) {unknown}; "
                                f"declared gates: {sorted(gates) or 'none'}")
        if c["kind"] == "accounting" and c["statistic"] != "value":
            raise RegistryError(f"{rel}: claims.{cid}: an accounting check has statistic 'value'")
    for cid, c in [*entry["claims"].items(), *entry["gates"].items()]:
        th = c["threshold"]
        if isinstance(th, str) and th not in entry["params"]:
            raise RegistryError(f"{rel}: {cid}.threshold names {th!r}, which is not a key of the params schema")


@functools.lru_cache(maxsize=4)
def _load(pkg_dir: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in paper_files(Path(pkg_dir)):
        try:
            entry = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RegistryError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(entry, dict):
            raise RegistryError(f"{path}: expected a mapping")
        _validate(path, entry)
        if entry["slug"] in out:
            raise RegistryError(f"{path}: slug {entry['slug']!r} is registered twice")
        entry["file"] = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
        out[entry["slug"]] = entry
    return dict(sorted(out.items(), key=lambda kv: (kv[1]["family"], kv[0])))


def load_registry(pkg_dir: Path = PKG_DIR) -> dict[str, dict]:
    """``{slug: entry}`` of every paper, ordered by family then slug. Raises RegistryError on a malformed file."""
    return _load(str(pkg_dir))


def paper_entry(slug: str) -> dict:
    reg = load_registry()
    if slug not in reg:
        raise RegistryError(f"paper: unknown slug {slug!r}; allowed: {', '.join(sorted(reg))}")
    return reg[slug]
