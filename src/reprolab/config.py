"""Load and validate ``params.yaml`` before any expensive work starts.

Layout of ``params.yaml`` (what DVC tracks as parameters)::

    profile: quick                 # smoke | quick | full: the profile `dvc repro` uses
    python: .venv/bin/python       # the interpreter the pipeline's stages run with
    models:   {name: {...}}        # catalogue of models a paper may name
    datasets: {name: {...}}        # catalogue of datasets a paper may name
    <slug>:                        # one section per paper
      seed: 0
      ...                          # defaults, shared by all profiles
      profiles: {smoke: {...}, quick: {...}, full: {...}}   # overrides of the defaults

The registry (claims, gates, deviations) and the *schema* of each section live in the paper's own file,
``src/reprolab/<family>/<slug>.paper.yaml`` (``reprolab.registry``); ``read_params()`` adds them as ``papers``.

``load_params(slug, profile)`` validates the defaults, then the defaults merged with the profile's overrides, against the
paper's JSON Schema (``jsonschema``, draft 2020-12: types, ranges, allowed values; no unknown or missing keys), and checks
that every value named ``model``/``dataset`` (or ``models``/``datasets``) is in its catalogue. Every error names the key
and the allowed values.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .paths import PARAMS_FILE

PROFILES = ("smoke", "quick", "full")
RESERVED = ("profiles",)
TOP_LEVEL = ("profile", "python", "models", "datasets")
# sections of upstream (non-paper) DVC stages, validated by their own module before any work (e.g.
# reprolab.nas.groundtruth.settings; tests/test_nas_bench.py checks every profile). Not imported here: every paper's
# stage depends on this file, and must not depend on the NAS ground truth.
STAGE_SECTIONS = ("nas_groundtruth",)


class ParamError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


def read_params(path: str | Path | None = None, registry_dir: str | Path | None = None) -> dict:
    """params.yaml as a dict, with the registry (``reprolab.registry``; ``registry_dir`` for tests) added as ``papers``."""
    from .registry import RegistryError, load_registry

    path = Path(path) if path else PARAMS_FILE
    if not path.exists():
        raise ParamError(f"params file not found: {path}")
    with open(path) as fh:
        params = yaml.safe_load(fh)
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping at the top level")
    for key in ("models", "datasets"):
        if not isinstance(params.get(key), dict):
            raise ParamError(f"params.yaml: top-level key '{key}' must be a mapping")
    if "papers" in params:
        raise ParamError("params.yaml: 'papers' is no longer a parameter; each paper's registry entry lives in "
                         "src/reprolab/<family>/<slug>.paper.yaml")
    try:
        params["papers"] = load_registry(Path(registry_dir)) if registry_dir else load_registry()
    except RegistryError as exc:
        raise ParamError(str(exc)) from exc
    return params


def check_profile(params: dict) -> str:
    profile = params.get("profile", "quick")
    if profile not in PROFILES:
        raise ParamError(f"profile: unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    return profile


def _describe(schema: dict) -> str:
    """The allowed values of a JSON Schema, in words."""
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    t = schema.get("type", "any value")
    words = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
             "array": "a list", "object": "a mapping"}
    out = " or ".join(words.get(x, x) for x in (t if isinstance(t, list) else [t]))
    rng = [f">= {schema['minimum']}"] if "minimum" in schema else []
    rng += [f"<= {schema['maximum']}"] if "maximum" in schema else []
    rng += [f"> {schema['exclusiveMinimum']}"] if "exclusiveMinimum" in schema else []
    rng += [f"< {schema['exclusiveMaximum']}"] if "exclusiveMaximum" in schema else []
    if rng:
        out += " " + " and ".join(rng)
    if t == "array" and isinstance(schema.get("items"), dict):
        out += " of " + _describe(schema["items"])
    return out


def _check_schema(where: str, cfg: dict, schema: dict, file: str) -> None:
    full = {"type": "object", "properties": schema, "required": list(schema), "additionalProperties": False}
    errors = sorted(jsonschema.Draft202012Validator(full).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    e = errors[0]
    path = [str(p) for p in e.absolute_path]
    if e.validator == "additionalProperties":
        extra = sorted(set(cfg) - set(schema))
        raise ParamError(f"{where}.{extra[0]}: unknown parameter (not declared in {file}); allowed: "
                         f"{', '.join(sorted(schema))}")
    if e.validator == "required":
        missing = sorted(set(schema) - set(cfg))
        raise ParamError(f"{where}: missing parameter(s) {missing} declared in {file}")
    key = path[0]
    sub = schema[key]
    for p in path[1:]:  # into array items / object properties
        sub = sub.get("items", sub) if p.isdigit() else sub.get("properties", {}).get(p, sub)
    shown = ".".join([where, key] + [f"[{p}]" if p.isdigit() else p for p in path[1:]]).replace(".[", "[")
    raise ParamError(f"{shown}={e.instance!r} is not allowed ({e.message}); allowed: {_describe(sub)}")


def _check_catalogue(key: str, name: str, value: Any, params: dict) -> None:
    catalogue = {"model": "models", "models": "models", "dataset": "datasets", "datasets": "datasets"}.get(name)
    if catalogue is None:
        return
    allowed = sorted(params[catalogue])
    for v in value if isinstance(value, list) else [value]:
        if v not in params[catalogue]:
            raise ParamError(f"{key}: unknown {catalogue[:-1]} {v!r}; allowed: {', '.join(allowed)}")


def load_params(paper: str, profile: str | None = None, params: dict | None = None) -> dict:
    """Return the validated configuration of ``paper`` under ``profile`` (default: params.yaml's ``profile``)."""
    params = read_params() if params is None else params
    registry = params["papers"]
    if paper not in registry:
        raise ParamError(f"paper: unknown slug {paper!r}; allowed: {', '.join(sorted(registry))}")
    if profile is None:
        profile = check_profile(params)
    elif profile not in PROFILES:
        raise ParamError(f"profile: unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    section = params.get(paper)
    if not isinstance(section, dict):
        raise ParamError(f"params.yaml: the registry names {paper!r} but there is no '{paper}:' section")
    schema, file = registry[paper]["params"], registry[paper]["file"]
    base = {k: v for k, v in section.items() if k not in RESERVED}
    _check_schema(paper, base, schema, file)
    profiles = section.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ParamError(f"{paper}.profiles: expected a mapping of {', '.join(PROFILES)}")
    unknown_profiles = sorted(set(profiles) - set(PROFILES))
    if unknown_profiles:
        raise ParamError(f"{paper}.profiles: unknown profile(s) {unknown_profiles}; allowed: {', '.join(PROFILES)}")
    cfg = copy.deepcopy(base)
    entry = registry[paper]
    thresholds = {c["threshold"] for c in [*entry["claims"].values(), *entry.get("gates", {}).values()]
                  if isinstance(c["threshold"], str)}
    for prof in PROFILES:  # every profile's overrides are checked, not only the one that runs
        override = profiles.get(prof) or {}
        merged = copy.deepcopy(base)
        for name, value in override.items():
            if name not in base:
                raise ParamError(f"{paper}.profiles.{prof}.{name}: unknown parameter; allowed: {', '.join(sorted(base))}")
            if name in thresholds:
                raise ParamError(f"{paper}.profiles.{prof}.{name}: a claim's threshold is the same in every profile "
                                 "(a profile changes the budget, not the criterion); set it in the defaults")
            merged[name] = copy.deepcopy(value)
        _check_schema(f"{paper}.profiles.{prof}", merged, schema, file)
        for name, value in merged.items():  # repeated seeds would give identical values and a zero-width interval
            if (name == "seeds" or name.endswith("_seeds")) and isinstance(value, list) and len(set(value)) < len(value):
                raise ParamError(f"{paper}.profiles.{prof}.{name}={value!r}: seeds must be distinct")
        for name, value in merged.items():
            _check_catalogue(f"{paper}.profiles.{prof}.{name}", name, value, params)
        if prof == profile:
            cfg = merged
    cfg["paper"], cfg["profile"] = paper, profile
    return cfg


def validate_all(params: dict | None = None) -> list[str]:
    """Validate the top level, the registry and every paper under every profile; return the slugs. Raises ParamError."""
    params = read_params() if params is None else params
    check_profile(params)
    unknown = sorted(k for k in params if k not in TOP_LEVEL + STAGE_SECTIONS and k != "papers"
                     and k not in params["papers"])
    if unknown:
        raise ParamError(f"params.yaml: {unknown[0]!r} is neither a top-level key ({', '.join(TOP_LEVEL)}) nor a "
                         f"registered paper; registered: {', '.join(sorted(params['papers']))}")
    for slug, entry in params["papers"].items():
        _check_catalogue(f"{entry['file']}: datasets", "datasets", entry["datasets"], params)
        _check_catalogue(f"{entry['file']}: models", "models", entry["models"], params)
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
