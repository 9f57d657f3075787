from pathlib import Path

import pytest

from shipyard import Config, ConfigError, apply_overrides, load_config
from shipyard.config import parse_overrides, valid_keys
from shipyard.config_yaml import load as _yaml_load
from shipyard.tune.search import check_space

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    needs_path = {"tabular": "x.csv", "regression": "x.csv", "images": "pictures"}  # they name no built-in set
    extra = {"data.path": needs_path[path.stem]} if path.stem in needs_path else {}
    cfg = load_config(path, extra)
    assert isinstance(cfg, Config)
    check_space(cfg)


def test_cli_overrides_are_typed_and_applied():
    cfg = load_config(
        ROOT / "pipelines/configs/digits.yaml", ["train.lr=0.01", "tune.num_samples=4", "tune.enabled=false"]
    )
    assert cfg.train.lr == 0.01 and cfg.tune.num_samples == 4 and cfg.tune.enabled is False


def test_unknown_override_suggests_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate'.*did you mean 'train.lr'"):
        load_config(None, ["train.lerning_rate=0.1"])


def test_unknown_yaml_key_names_key_and_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"'train.epocs'.*did you mean 'train.epochs'"):
        load_config(f)


def test_unknown_section_is_reported():
    with pytest.raises(ConfigError, match=r"'trian.lr'.*did you mean 'train.lr'"):
        load_config(None, ["trian.lr=0.1"])


def test_mistyped_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"train.lr: Input should be greater than 0"):
        load_config(None, ["train.lr=-1"])


def test_data_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of data.builtin"):
        load_config(ROOT / "pipelines/configs/digits.yaml", ["data.path=x.csv"])  # digits.yaml sets builtin
    with pytest.raises(ConfigError, match="exactly one of data.builtin"):
        load_config(ROOT / "pipelines/configs/tabular.yaml")  # no data.path given
    assert load_config(None, ["data.path=x.csv"]).data.path == "x.csv"


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.lr"])


def test_flat_params_use_cli_spelling():
    flat = Config().flat()
    assert flat["train.lr"] == Config().train.lr
    assert set(valid_keys()) <= set(flat)


def test_apply_overrides_returns_new_validated_config():
    base = Config()
    cfg = apply_overrides(base, {"model.hidden": 32})
    assert cfg.model.hidden == 32 and base.model.hidden != 32


@pytest.mark.parametrize(
    "space, match",
    [
        (
            {"train.lrr": {"loguniform": [1e-4, 1e-2]}},
            r"^unknown key 'train.lrr' in tune.space; did you mean 'train.lr'",
        ),
        ({"train.lr": {"gaussian": [0, 1]}}, r"tune.space.train.lr.gaussian"),
        ({"train.lr": {"loguniform": [1e-2, 1e-4]}}, r"tune.space.train.lr.loguniform: low 0.01 must be below high"),
        ({"model.hidden": {"choice": [32, -1]}}, r"model.hidden"),
    ],
)
def test_bad_search_space_fails_before_ray_naming_the_key(space, match):
    with pytest.raises(ConfigError, match=match):
        check_space(load_config(None, {"tune.space": space}))


def test_model_is_named_after_the_data_file_unless_set():
    assert load_config(None, ["name=tabular", "data.path=/x/My Data.csv"]).model_name == "tabular-My-Data"
    assert load_config(None, ["data.path=a.csv", "tracking.model_name=m"]).model_name == "m"
    assert load_config(ROOT / "pipelines/configs/digits.yaml").model_name == "digits"


def test_yaml_reads_scientific_notation_as_floats_and_nothing_else_changes():
    assert parse_overrides(["x=5e-4", "y=1e5", "z=1_000", "v=1.2.3", "w=e5", "n=7"]) == {
        "x": 5e-4,
        "y": 1e5,
        "z": 1000,
        "v": "1.2.3",
        "w": "e5",
        "n": 7,
    }
    assert _yaml_load("space: {loguniform: [1e-5, 1e-2]}") == {"space": {"loguniform": [1e-5, 1e-2]}}


def test_config_yaml_round_trips_strings_that_look_like_floats():
    cfg = load_config(None, ["data.path=x.csv", "data.label='1e5'"])
    assert cfg.data.label == "1e5"
    assert Config.model_validate(_yaml_load(cfg.to_yaml())) == cfg


def test_empty_section_means_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  # epochs: 3\n")
    assert load_config(f).train == Config().train


def test_infinite_values_are_rejected():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=1e999"])


def test_scientific_notation_is_a_float_in_yaml_and_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\ntune:\n  space:\n    train.lr: {loguniform: [1e-5, 1e-2]}\n")
    cfg = load_config(f, ["train.weight_decay=5e-4"])
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 5e-4
    check_space(cfg)


def test_section_given_a_scalar_is_explained(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="'train' must be a section of keys"):
        load_config(f)


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["tracking.uri=sqlite:///rel/m.db"]).tracking_uri == f"sqlite:///{tmp_path}/rel/m.db"


def test_grid_is_refused_with_optuna_and_pbt():
    for extra in ({"tune.search": "optuna"}, {"tune.scheduler": "pbt"}):
        with pytest.raises(ConfigError, match="tune.space.train.lr: grid is not supported"):
            check_space(load_config(None, {"tune.space": {"train.lr": {"grid": [0.1, 0.2]}}, **extra}))


def test_num_workers_is_a_count_or_an_elastic_range_with_one_clear_error():
    elastic = load_config(None, ["scaling.num_workers=[1,4]"]).scaling
    assert elastic.num_workers == (1, 4) and elastic.max_workers == 4 and elastic.workers_text == "1-4 (elastic)"
    assert load_config(None, ["scaling.num_workers=3"]).scaling.max_workers == 3
    for bad in ("[4,1]", "[2]", "0", "true"):
        with pytest.raises(ConfigError, match=r"scaling.num_workers: .*\[min, max\] with 1 <= min <= max"):
            load_config(None, [f"scaling.num_workers={bad}"])
