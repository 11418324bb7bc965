"""CacheConfig: defaults, validation messages, TOML, and Hyrax compatibility (no Ray)."""

import pytest

from raycache import CacheConfig, ConfigError
from raycache.config import DATA_SET_KEYS, RAYCACHE_KEYS


def test_defaults_cover_every_key():
    cfg = CacheConfig.from_dict(None)
    for key, spec in {**DATA_SET_KEYS, **RAYCACHE_KEYS}.items():
        assert getattr(cfg, key) == spec.default, key
        assert spec.doc


def test_stock_hyrax_config_is_accepted():
    hyrax = {
        "general": {"dev_mode": False},
        "data_set": {
            "use_cache": True,
            "preload_cache": True,
            "preload_threads": 16,
            "crop_to": False,
            "filters": ["g", "r"],
        },
        "train": {"epochs": 3},
    }
    cfg = CacheConfig.from_dict(hyrax)
    assert (cfg.use_cache, cfg.preload_cache, cfg.preload_threads) == (True, True, 16)
    assert cfg.name is None


def test_unknown_raycache_key_names_key_and_accepted_keys():
    with pytest.raises(ConfigError) as err:
        CacheConfig.from_dict({"raycache": {"chunk_sise": 10}})
    assert "chunk_sise" in str(err.value)
    assert "chunk_size" in str(err.value)


@pytest.mark.parametrize(
    "table,key,value,fragment",
    [
        ("data_set", "use_cache", "yes", "bool"),
        ("data_set", "preload_threads", 0, ">= 1"),
        ("data_set", "preload_threads", True, "bool"),
        ("raycache", "chunk_size", 2.5, "int"),
        ("raycache", "max_bytes", -1, ">= 1"),
        ("raycache", "name", "  ", "non-empty"),
        ("raycache", "detached", 1, "bool"),
        ("raycache", "namespace", None, "may not be None"),
    ],
)
def test_bad_values_name_the_key(table, key, value, fragment):
    with pytest.raises(ConfigError) as err:
        CacheConfig.from_dict({table: {key: value}})
    assert f"{table}.{key}" in str(err.value)
    assert fragment in str(err.value)


def test_table_must_be_a_table():
    with pytest.raises(ConfigError, match="raycache"):
        CacheConfig.from_dict({"raycache": 3})
    with pytest.raises(ConfigError):
        CacheConfig.from_dict(["not", "a", "dict"])


def test_toml_round_trip(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(
        "[data_set]\nuse_cache = true\npreload_cache = true\n\n"
        '[raycache]\nname = "from-toml"\nchunk_size = 128\nlinger_s = 5\n'
    )
    cfg = CacheConfig.from_toml(path)
    assert (cfg.name, cfg.chunk_size, cfg.linger_s, cfg.preload_cache) == (
        "from-toml",
        128,
        5,
        True,
    )
    assert CacheConfig.coerce(str(path)) == cfg
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg


def test_replace_validates():
    cfg = CacheConfig().replace(name="x", chunk_size=7)
    assert (cfg.name, cfg.chunk_size) == ("x", 7)
    with pytest.raises(ConfigError):
        CacheConfig().replace(chunk_size=0)
    with pytest.raises(ConfigError, match="bogus"):
        CacheConfig().replace(bogus=1)


def test_identity_and_on_mismatch_keys():
    cfg = CacheConfig.from_dict({"raycache": {"identity": "gaia-dr3", "on_mismatch": "rebuild"}})
    assert (cfg.identity, cfg.on_mismatch) == ("gaia-dr3", "rebuild")
    assert CacheConfig.from_dict(None).on_mismatch == "error"
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="'error', 'rebuild'.*'drop'"):
        CacheConfig.from_dict({"raycache": {"on_mismatch": "drop"}})
    with pytest.raises(ConfigError, match="non-empty"):
        CacheConfig.from_dict({"raycache": {"identity": " "}})


@pytest.mark.parametrize(
    "key,meant",
    [
        ("preload_cahce", "data_set.preload_cache"),
        ("use_cach", "data_set.use_cache"),
        ("preload_thread", "data_set.preload_threads"),
        ("chunk_sizes", "raycache.chunk_size"),
    ],
)
def test_misspelt_data_set_key_warns_with_nearest_key(key, meant):
    with pytest.warns(UserWarning, match=f"data_set.{key} .*did you mean {meant}"):
        cfg = CacheConfig.from_dict({"data_set": {key: True}})
    assert cfg.preload_cache is False  # the misspelt key was not taken for the real one


def test_raycache_key_in_data_set_warns_where_it_belongs():
    with pytest.warns(UserWarning, match=r"data_set.max_bytes is not read.*\[raycache\]"):
        CacheConfig.from_dict({"data_set": {"max_bytes": 10}})


def test_hyrax_data_set_keys_do_not_warn(recwarn):
    CacheConfig.from_dict(
        {
            "data_set": {
                "crop_to": False,
                "filters": False,
                "seed": 3,
                "nan_mode": "zero",
                "train_size": 0.6,
                "transform": False,
                "HyraxRandomDataset": {"size": 10},
            }
        }
    )
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_flat_config_is_an_error_showing_the_shape():
    with pytest.raises(ConfigError) as err:
        CacheConfig.from_dict({"use_cache": True, "name": "imgs"})
    text = str(err.value)
    assert "['name', 'use_cache']" in text
    assert "'data_set': {" in text and "'raycache': {" in text and "[raycache]" in text
