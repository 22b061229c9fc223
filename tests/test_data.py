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
