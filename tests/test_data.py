"""Offline data loaders read the materialized files correctly."""


def test_mnist5k_loader_reads_label_from_last_column():
    from reprolab.data import load_mnist5k

    X, y = load_mnist5k()
    assert X.shape == (5000, 784) and float(X.min()) == 0.0 and float(X.max()) <= 1.0
    assert sorted(set(y.tolist())) == list(range(10)) and (y == 0).sum() == 500


def test_german_credit_loader_maps_categories():
    from reprolab.data import load_german_credit

    df = load_german_credit()
    assert df.shape == (1000, 21) and df["credit"].sum() == 700
    assert set(df["personal_status"]) <= {"male : divorced/separated", "female : divorced/separated/married",
                                          "male : single", "male : married/widowed", "female : single"}


def test_ml100k_loader():
    from reprolab.data import load_ml100k

    ratings, users, items = load_ml100k()
    assert ratings.shape == (100000, 4) and len(users) == 943 and len(items) == 1682
    assert ratings["rating"].between(1, 5).all() and not ratings.duplicated(["user_id", "item_id"]).any()
    assert set(ratings["user_id"]) <= set(users["user_id"]) and set(ratings["item_id"]) <= set(items["item_id"])


def test_adult_loader():
    from reprolab.data import load_adult

    df = load_adult()
    assert len(df) == 48842 and set(df["income"].unique()) == {0, 1}
    assert len(load_adult("train")) == 32561 and len(load_adult("test")) == 16281  # UCI's documented split
    assert abs(df["income"].mean() - 0.239) < 0.005  # UCI: 23.9% earn > 50K


def test_kg_triples_loader():
    from reprolab.data import load_kg_triples

    kin = load_kg_triples("kinships")
    assert {k: len(v) for k, v in kin.items()} == {"train": 8544, "valid": 1068, "test": 1074}  # ENVIRONMENT.md
    ents = {h for h, _, t in kin["train"]} | {t for h, _, t in kin["train"]}
    assert len({r for _, r, _ in kin["train"]}) == 25 and len(ents) == 104


def test_pbmc_loader():
    from reprolab.data import load_pbmc

    d = load_pbmc()
    assert d["X"].shape == (700, 765) and len(d["genes"]) == 765 and len(d["cell_type"]) == 700
    assert d["X"].min() >= 0 and d["neighbors"].shape == (700, 700)
    assert len(set(d["cell_type"])) == 10


def test_load_image_set_scales_to_unit_range_and_names_the_allowed_sets():
    import numpy as np
    import pytest
    from sklearn.datasets import load_digits

    from reprolab.data.images import load_image_set

    X, y = load_image_set("digits")
    d = load_digits()
    assert X.dtype == np.float32 and y.dtype == np.int64 and X.shape == (1797, 64)
    np.testing.assert_array_equal(X, (d.data / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y, d.target)
    X64, _ = load_image_set("digits", dtype=np.float64)
    assert X64.dtype == np.float64 and X64.max() == 1.0 and X64.min() == 0.0
    with pytest.raises(ValueError, match="mnist5k, digits, mnist"):
        load_image_set("cifar10")
