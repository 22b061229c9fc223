"""Parameter validation: bad input stops before any work, with a message naming the key and the allowed values."""
import copy

import pytest

from reprolab.config import PROFILES, ParamError, load_params, read_params, validate_all

TOY = {
    "profile": "quick",
    "models": {"tiny-lm": {}, "org/online-lm": {}},
    "datasets": {"toy": {}, "other": {}},
    "papers": {"toy_paper": {"title": "T", "arxiv": "0000.00000", "family": "x", "datasets": ["toy"],
                             "models": ["tiny-lm"], "claims": {"c": {"text": "t", "baseline": "b", "paper": "p"}}}},
    "toy_paper": {"seed": 0, "model": "tiny-lm", "dataset": "toy", "lr": 0.1, "steps": 10, "alpha": 0.5,
                  "scheme": "a", "flag": True,
                  "profiles": {"smoke": {"steps": 1}, "quick": {}, "full": {"steps": 100, "model": "org/online-lm"}},
                  "bounds": {"alpha": [0, 1], "steps": [1, None]}, "choices": {"scheme": ["a", "b"]}},
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
     r"toy_paper.profiles.smoke.steps: expected int"),
    (toy(toy_paper__profiles={"smoke": {"steps": 1.5}}), "toy_paper", "smoke", r"steps: expected int"),
    (toy(toy_paper__profiles={"smoke": {"flag": 1}}), "toy_paper", "smoke", r"flag: expected bool"),
    (toy(toy_paper__alpha=1.5), "toy_paper", "quick", r"toy_paper.alpha=1.5 is out of range; allowed: \[0, 1\]"),
    (toy(toy_paper__profiles={"smoke": {"steps": 0}}), "toy_paper", "smoke", r"steps=0 is out of range"),
    (toy(toy_paper__scheme="c"), "toy_paper", "quick", r"toy_paper.scheme='c' is not allowed; allowed: a, b"),
    (toy(toy_paper__model="gpt-9"), "toy_paper", "quick", r"toy_paper.model: unknown model 'gpt-9'; allowed: org/online-lm, tiny-lm"),
    (toy(toy_paper__dataset="cora"), "toy_paper", "quick", r"unknown dataset 'cora'; allowed: other, toy"),
    (toy(toy_paper__profiles={"tiny": {}}), "toy_paper", "quick", r"toy_paper.profiles: unknown profile"),
])
def test_bad_params_are_named(params, paper, profile, pattern):
    with pytest.raises(ParamError, match=pattern):
        load_params(paper, profile, params)


def test_registry_fields_checked():
    bad = toy(papers__toy_paper={"title": "T"})
    with pytest.raises(ParamError, match=r"papers.toy_paper: missing field\(s\)"):
        validate_all(bad)
    bad = toy(papers__toy_paper__claims={"c": {"text": "t"}})
    with pytest.raises(ParamError, match=r"claims.c: missing \['baseline', 'paper'\]"):
        validate_all(bad)
    bad = toy(papers__toy_paper__datasets=["cora"])
    with pytest.raises(ParamError, match="unknown dataset 'cora'"):
        validate_all(bad)
    bad = toy()
    del bad["toy_paper"]
    with pytest.raises(ParamError, match="no 'toy_paper:' section"):
        validate_all(bad)


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

