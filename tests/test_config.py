"""Parameter validation: bad input stops before any work, with a message naming the key and the allowed values."""
import copy
from pathlib import Path

import pytest
import yaml

from reprolab import registry
from reprolab.config import PROFILES, ParamError, load_params, read_params, validate_all

SCHEMA = {"seed": {"type": "integer", "minimum": 0}, "model": {"type": "string"}, "dataset": {"type": "string"},
          "lr": {"type": "number", "exclusiveMinimum": 0}, "steps": {"type": "integer", "minimum": 1},
          "alpha": {"type": "number", "minimum": 0, "maximum": 1}, "scheme": {"type": "string", "enum": ["a", "b"]},
          "flag": {"type": "boolean"}, "widths": {"type": "array", "items": {"type": "integer", "minimum": 1}},
          "seeds": {"type": "array", "items": {"type": "integer"}}, "th": {"type": "number"}}

TOY = {
    "profile": "quick",
    "models": {"tiny-lm": {}, "org/online-lm": {}},
    "datasets": {"toy": {}, "other": {}},
    "papers": {"toy_paper": {"title": "T", "arxiv": "0000.00000", "family": "x", "datasets": ["toy"],
                             "models": ["tiny-lm"], "file": "src/reprolab/x/toy_paper.paper.yaml", "params": SCHEMA,
                             "claims": {"c": {"kind": "empirical", "statistic": "value", "op": ">", "threshold": "th",
                                              "text": "t", "baseline": "b", "paper": "p"}}, "gates": {}}},
    "toy_paper": {"seed": 0, "model": "tiny-lm", "dataset": "toy", "lr": 0.1, "steps": 10, "alpha": 0.5,
                  "scheme": "a", "flag": True, "widths": [4, 8], "seeds": [0, 1, 2], "th": 0.5,
                  "profiles": {"smoke": {"steps": 1}, "quick": {}, "full": {"steps": 100, "model": "org/online-lm"}}},
}


def toy(**edits):
    p = copy.deepcopy(TOY)
    for path, value in edits.items():
        node = p
        *head, last = path.split("__")
        for k in head:
            node = node[k]
        node[last] = value
    return p


def test_profiles_merge_defaults():
    assert load_params("toy_paper", "smoke", TOY)["steps"] == 1
    assert load_params("toy_paper", "quick", TOY)["steps"] == 10
    full = load_params("toy_paper", "full", TOY)
    assert (full["steps"], full["model"], full["profile"], full["paper"]) == (100, "org/online-lm", "full", "toy_paper")
    assert load_params("toy_paper", None, TOY)["profile"] == "quick"  # params.yaml's profile is the default


@pytest.mark.parametrize("params,paper,profile,pattern", [
    (TOY, "nope", "quick", r"paper: unknown slug 'nope'; allowed: toy_paper"),
    (TOY, "toy_paper", "huge", r"profile: unknown profile 'huge'; allowed: smoke, quick, full"),
    (toy(toy_paper__profiles={"smoke": {"stepz": 1}}), "toy_paper", "smoke",
     r"toy_paper.profiles.smoke.stepz: unknown parameter; allowed: .*steps"),
    (toy(toy_paper__profiles={"smoke": {"steps": "many"}}), "toy_paper", "smoke",
     r"toy_paper.profiles.smoke.steps='many' is not allowed .*; allowed: an integer >= 1"),
    (toy(toy_paper__profiles={"smoke": {"steps": 1.5}}), "toy_paper", "smoke", r"steps=1.5 .*allowed: an integer"),
    (toy(toy_paper__profiles={"smoke": {"flag": 1}}), "toy_paper", "smoke", r"flag=1 .*allowed: true or false"),
    (toy(toy_paper__alpha=1.5), "toy_paper", "quick", r"toy_paper.alpha=1.5 is not allowed .*allowed: a number >= 0 and <= 1"),
    (toy(toy_paper__profiles={"smoke": {"steps": 0}}), "toy_paper", "smoke", r"steps=0 is not allowed"),
    (toy(toy_paper__scheme="c"), "toy_paper", "quick", r"toy_paper.scheme='c' is not allowed .*allowed: one of 'a', 'b'"),
    (toy(toy_paper__model="gpt-9"), "toy_paper", "quick", r"toy_paper.profiles.smoke.model: unknown model 'gpt-9'; allowed: org/online-lm, tiny-lm"),
    (toy(toy_paper__dataset="cora"), "toy_paper", "quick", r"unknown dataset 'cora'; allowed: other, toy"),
    (toy(toy_paper__profiles={"tiny": {}}), "toy_paper", "quick", r"toy_paper.profiles: unknown profile"),
    # the defaults themselves are checked (they used to define the types, so a wrong default passed)
    (toy(toy_paper__seed="zero"), "toy_paper", "quick", r"toy_paper.seed='zero' is not allowed .*allowed: an integer >= 0"),
    (toy(toy_paper__steps=-5), "toy_paper", "quick", r"toy_paper.steps=-5 is not allowed .*allowed: an integer >= 1"),
    (toy(toy_paper__widths=[4, 0]), "toy_paper", "quick", r"toy_paper.widths\[1\]=0 is not allowed"),
    # every profile is checked, not only the one that runs
    (toy(toy_paper__profiles={"full": {"lr": 0.0}}), "toy_paper", "smoke", r"toy_paper.profiles.full.lr=0.0 is not allowed"),
    (toy(toy_paper__seeds=[0, 1, 1]), "toy_paper", "quick", r"seeds=\[0, 1, 1\]: seeds must be distinct"),
    (toy(toy_paper__profiles={"full": {"th": 0.9}}), "toy_paper", "quick", r"toy_paper.profiles.full.th: a claim's threshold"),
    (toy(toy_paper__extra=1), "toy_paper", "quick", r"toy_paper.extra: unknown parameter \(not declared in .*toy_paper.paper.yaml\)"),
])
def test_bad_params_are_named(params, paper, profile, pattern):
    with pytest.raises(ParamError, match=pattern):
        load_params(paper, profile, params)


def test_missing_section_and_top_level_profile():
    bad = toy()
    del bad["toy_paper"]
    with pytest.raises(ParamError, match="no 'toy_paper:' section"):
        validate_all(bad)
    with pytest.raises(ParamError, match=r"profile: unknown profile 'huge'; allowed: smoke, quick, full"):
        validate_all(toy(profile="huge"))
    with pytest.raises(ParamError, match="neither a top-level key"):
        validate_all(toy(toy_papr={"seed": 0}))
    with pytest.raises(ParamError, match="unknown dataset 'cora'"):
        validate_all(toy(papers__toy_paper__datasets=["cora"]))


def _write(tmp_path, entry, name="toy_paper", family="x"):
    d = tmp_path / family
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.paper.yaml").write_text(yaml.safe_dump(entry))
    return tmp_path


GOOD = {"slug": "toy_paper", "title": "T", "arxiv": "1", "family": "x", "datasets": [], "models": [],
        "claims": {"c": {"kind": "empirical", "statistic": "difference", "op": ">", "threshold": "th",
                         "requires": ["g"], "text": "t", "baseline": "b", "paper": "p"}},
        "gates": {"g": {"statistic": "difference", "op": ">", "threshold": 0.0, "text": "beats chance"}},
        "deviations": [{"what": "w", "official": "o (file.py:1)", "ours": "u", "why": "y"}],
        "params": {"seed": {"type": "integer"}, "th": {"type": "number"}}}


@pytest.mark.parametrize("edit,pattern", [
    (lambda e: e["claims"]["c"].update(statistic="mean"), r"claims.c.statistic: 'mean' is not one of"),
    (lambda e: e["claims"]["c"].pop("kind"), r"'kind' is a required property"),
    (lambda e: e["claims"]["c"].update(requires=["nope"]), r"requires names unknown gate\(s\) \['nope'\]"),
    (lambda e: e["claims"]["c"].update(threshold="th_missing"), r"names 'th_missing', which is not a key"),
    (lambda e: e["claims"]["c"].update(kind="accounting"), r"an accounting check has statistic 'value'"),
    (lambda e: e["deviations"][0].pop("official"), r"'official' is a required property"),
    (lambda e: e["params"].update(lr={"type": "number", "minimum": "1e-6"}), r"params.lr: not a valid JSON Schema"),
    (lambda e: e.update(slug="other"), r"differs from the file name"),
])
def test_registry_files_are_checked(tmp_path, edit, pattern):
    assert registry._load(str(_write(tmp_path / "ok", copy.deepcopy(GOOD))))["toy_paper"]["title"] == "T"
    bad = copy.deepcopy(GOOD)
    edit(bad)
    with pytest.raises(registry.RegistryError, match=pattern):
        registry._load(str(_write(tmp_path / "bad", bad)))


def test_real_params_are_valid_in_every_profile():
    params = read_params()
    assert params["profile"] in PROFILES
    assert validate_all(params), "the registry is empty"


def test_cli_rejects_bad_slug_before_work(capsys):
    from reprolab.stage import main

    assert main(["no_such_paper", "--profile", "smoke"]) == 1
    assert "unknown slug 'no_such_paper'" in capsys.readouterr().err
    assert main([next(iter(read_params()["papers"])), "--profile", "huge"]) == 1
    assert "allowed: smoke, quick, full" in capsys.readouterr().err

