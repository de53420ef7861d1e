import pytest

from memtune.config import MemoryConfig, parse_layers
from memtune.errors import MemtuneError


def test_json_round_trip(tmp_path):
    cfg = MemoryConfig(layers=[2, 5], mode="replace", n_keys=32, heads=2, knn=8, k_dim=16, v_dim=24, share_values=False)
    cfg.save(tmp_path / "c.json")
    assert MemoryConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k_dim=7), "k_dim=7"),
        (dict(knn=65, n_keys=64), "knn=65"),
        (dict(heads=0), "heads=0"),
        (dict(mode="sideways"), "mode='sideways'"),
        (dict(layers=[1, 1]), "repeated"),
        (dict(layers=[-1]), "non-negative"),
        (dict(value_init="ones"), "value_init='ones'"),
        (dict(knn=True), "knn=True"),
        (dict(v_dim=2.5), "v_dim=2.5"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(MemtuneError, match=message):
        MemoryConfig(**kwargs)


def test_unknown_field_is_named():
    with pytest.raises(MemtuneError, match="knns"):
        MemoryConfig.from_dict({"knns": 3})


def test_parse_layers():
    assert parse_layers("8,16, 24") == [8, 16, 24]
    with pytest.raises(MemtuneError, match="comma-separated"):
        parse_layers("8;16")


def test_value_init_follows_mode():
    assert MemoryConfig(mode="parallel").resolved_value_init == "zeros"
    assert MemoryConfig(mode="replace").resolved_value_init == "normal"
