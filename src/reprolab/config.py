"""Load and validate ``params.yaml`` before any expensive work starts.

Layout of ``params.yaml``::

    profile: quick                 # smoke | quick | full: the profile `dvc repro` uses
    models:   {name: {...}}        # catalogue of models a paper may name
    datasets: {name: {...}}        # catalogue of datasets a paper may name
    papers:   {slug: {title, arxiv, family, datasets, models, claims}}   # the registry
    <slug>:                        # one section per paper
      seed: 0
      ...                          # defaults, shared by all profiles
      profiles: {smoke: {...}, quick: {...}, full: {...}}   # overrides of the defaults
      bounds:  {key: [low, high]}  # inclusive numeric range (null = open)
      choices: {key: [allowed, values]}

``load_params(slug, profile)`` returns the defaults merged with the profile's overrides, after checking that the
slug and profile exist, that overrides only name known keys with the default's type, that every value named
``model``/``dataset`` (or ``models``/``datasets``) is in its catalogue, and that bounds and choices hold.
Every error names the key and the allowed values.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .paths import PARAMS_FILE

PROFILES = ("smoke", "quick", "full")
RESERVED = ("profiles", "bounds", "choices")
REGISTRY_FIELDS = ("title", "arxiv", "family", "datasets", "models", "claims")
CLAIM_FIELDS = ("text", "baseline", "paper")


class ParamError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


def read_params(path: str | Path | None = None) -> dict:
    path = Path(path) if path else PARAMS_FILE
    if not path.exists():
        raise ParamError(f"params file not found: {path}")
    with open(path) as fh:
        params = yaml.safe_load(fh)
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping at the top level")
    for key in ("papers", "models", "datasets"):
        if not isinstance(params.get(key), dict):
            raise ParamError(f"params.yaml: top-level key '{key}' must be a mapping")
    return params


def _typename(value: Any) -> str:
    return type(value).__name__


def _check_type(key: str, value: Any, default: Any) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif isinstance(default, int):
        ok = isinstance(value, int)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ParamError(f"{key}: expected {_typename(default)} (like the default {default!r}), got {value!r}")


def _check_catalogue(key: str, name: str, value: Any, params: dict) -> None:
    catalogue = {"model": "models", "models": "models", "dataset": "datasets", "datasets": "datasets"}.get(name)
    if catalogue is None:
        return
    allowed = sorted(params[catalogue])
    for v in value if isinstance(value, list) else [value]:
        if v not in params[catalogue]:
            raise ParamError(f"{key}: unknown {catalogue[:-1]} {v!r}; allowed: {', '.join(allowed)}")


def _check_bounds(slug: str, cfg: dict, bounds: dict, choices: dict) -> None:
    for name, rng in bounds.items():
        if name not in cfg:
            raise ParamError(f"{slug}.bounds.{name}: no such parameter; known: {', '.join(sorted(cfg))}")
        lo, hi = rng
        for v in cfg[name] if isinstance(cfg[name], list) else [cfg[name]]:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ParamError(f"{slug}.{name}: expected a number in [{lo}, {hi}], got {v!r}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ParamError(f"{slug}.{name}={v!r} is out of range; allowed: [{lo}, {hi}]")
    for name, allowed in choices.items():
        if name not in cfg:
            raise ParamError(f"{slug}.choices.{name}: no such parameter; known: {', '.join(sorted(cfg))}")
        for v in cfg[name] if isinstance(cfg[name], list) else [cfg[name]]:
            if v not in allowed:
                raise ParamError(f"{slug}.{name}={v!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def load_params(paper: str, profile: str | None = None, params: dict | None = None) -> dict:
    """Return the validated configuration of ``paper`` under ``profile`` (default: params.yaml's ``profile``)."""
    params = read_params() if params is None else params
    registry = params["papers"]
    if paper not in registry:
        raise ParamError(f"paper: unknown slug {paper!r}; allowed: {', '.join(sorted(registry))}")
    profile = profile or params.get("profile", "quick")
    if profile not in PROFILES:
        raise ParamError(f"profile: unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    section = params.get(paper)
    if not isinstance(section, dict):
        raise ParamError(f"params.yaml: the registry names {paper!r} but there is no '{paper}:' section")
    base = {k: v for k, v in section.items() if k not in RESERVED}
    if "seed" not in base:
        raise ParamError(f"{paper}.seed: every paper section needs an integer seed")
    profiles = section.get("profiles") or {}
    unknown_profiles = sorted(set(profiles) - set(PROFILES))
    if unknown_profiles:
        raise ParamError(f"{paper}.profiles: unknown profile(s) {unknown_profiles}; allowed: {', '.join(PROFILES)}")
    override = profiles.get(profile) or {}
    cfg = copy.deepcopy(base)
    for name, value in override.items():
        key = f"{paper}.profiles.{profile}.{name}"
        if name not in base:
            raise ParamError(f"{key}: unknown parameter; allowed: {', '.join(sorted(base))}")
        _check_type(key, value, base[name])
        cfg[name] = copy.deepcopy(value)
    for name, value in cfg.items():
        _check_type(f"{paper}.{name}", value, base[name])
        _check_catalogue(f"{paper}.{name}", name, value, params)
    _check_bounds(paper, cfg, section.get("bounds") or {}, section.get("choices") or {})
    cfg["paper"], cfg["profile"] = paper, profile
    return cfg


def validate_all(params: dict | None = None) -> list[str]:
    """Validate the registry and every paper under every profile; return the slugs. Raises ParamError."""
    params = read_params() if params is None else params
    for slug, entry in params["papers"].items():
        if not isinstance(entry, dict):
            raise ParamError(f"papers.{slug}: expected a mapping with {', '.join(REGISTRY_FIELDS)}")
        missing = [f for f in REGISTRY_FIELDS if f not in entry]
        if missing:
            raise ParamError(f"papers.{slug}: missing field(s) {missing}; required: {', '.join(REGISTRY_FIELDS)}")
        _check_catalogue(f"papers.{slug}.datasets", "datasets", entry["datasets"], params)
        _check_catalogue(f"papers.{slug}.models", "models", entry["models"], params)
        for cid, claim in (entry["claims"] or {}).items():
            absent = [f for f in CLAIM_FIELDS if f not in (claim or {})]
            if absent:
                raise ParamError(f"papers.{slug}.claims.{cid}: missing {absent}; required: {', '.join(CLAIM_FIELDS)}")
        for profile in PROFILES:
            load_params(slug, profile, params)
    return list(params["papers"])


def registry_entry(paper: str, params: dict | None = None) -> dict:
    params = read_params() if params is None else params
    if paper not in params["papers"]:
        raise ParamError(f"paper: unknown slug {paper!r}; allowed: {', '.join(sorted(params['papers']))}")
    return params["papers"][paper]


def main() -> int:
    """``python -m reprolab.config``: validate the whole params.yaml (every paper, every profile) and exit."""
    import sys

    try:
        slugs = validate_all()
    except ParamError as exc:
        print(f"params.yaml is invalid: {exc}", file=sys.stderr)
        return 1
    print(f"params.yaml: {len(slugs)} paper(s) valid in profiles {', '.join(PROFILES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
