"""Config loading, overrides and the one-sentence errors for bad input."""

from __future__ import annotations

import pytest
from support import REPO, TINY

from raypod.cli import main
from raypod.config import ConfigError, load_config


def test_shipped_configs_load():
    for name in ("tiny", "small", "350m"):
        cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml")
        assert cfg.train.max_steps > 0
    assert load_config(TINY).scaling.max_workers == 2


def test_overrides_parse_yaml_values():
    cfg = load_config(TINY, ["train.max_steps=7", "checkpoint.storage=/tmp/x",
                             "fault.inject=[{step: 3, rank: 1, kind: kill}]", "mlflow.tracking_uri=null"])
    assert cfg.train.max_steps == 7
    assert cfg.job_dir == "/tmp/x/tiny-gpt"
    assert cfg.fault.inject[0].kind == "kill" and cfg.fault.inject[0].step == 3
    assert cfg.flat()["train.max_steps"] == 7


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.max_stepz=5"], "config key 'train.max_stepz' is not known"),
        (["bogus.key=1"], "config key 'bogus' is not known"),
        (["train.max_steps=ten"], "config key 'train.max_steps'"),
        (["scaling.min_workers=3"], "scaling.min_workers (3) is larger than scaling.max_workers (2)"),
        (["recipe.target=nowhere.module:Thing"], "recipe.target 'nowhere.module:Thing' cannot be imported"),
        (["recipe.target=raypod.config:JobConfig"], "is not a raypod.Recipe subclass"),
        (["recipe.args.n_layerz=3"], "recipe.args do not fit GPTRecipe"),
        (["fault.inject=[{step: 3, rank: 5, kind: kill}]"], "fault.inject[0].rank (5)"),
        (["fault.inject=[{step: 3, rank: 1, kind: explode}]"], "fault.inject[0].kind"),
        (["train.max_steps"], "is not of the form key.path=value"),
    ],
)
def test_bad_config_is_one_sentence(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lr=fast"], "train.lr"),
        (["scaling.min_workers=3"], "scaling.min_workers"),
        (["recipe.target=nowhere:Thing"], "recipe.target"),
    ],
)
def test_cli_refuses_bad_config_before_anything_starts(tmp_path, capsys, overrides, needle):
    storage = tmp_path / "store"
    args = ["run", str(TINY), f"--set=checkpoint.storage={storage}"] + [f"--set={o}" for o in overrides]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raypod: error:") and needle in err[0]
    assert not storage.exists()  # nothing half-written


def test_cli_refuses_missing_data(tmp_path, capsys):
    storage = tmp_path / "store"
    args = ["run", str(TINY), f"--set=checkpoint.storage={storage}",
            f"--set=data.path={tmp_path}/missing.parquet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    # Refused, not replaced by the demo corpus that tiny.yaml builds at its own data.path.
    assert f"data.path '{tmp_path}/missing.parquet' does not exist" in err
    assert not storage.exists() and not (tmp_path / "missing.parquet").exists()


@pytest.mark.parametrize("name", [".", ".."])
def test_name_cannot_leave_the_storage(tmp_path, capsys, name):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"name={name}", f"checkpoint.storage={tmp_path}"])
    assert str(e.value).startswith(f"name '{name}' is not a folder of its own")
    assert "\n" not in str(e.value)
    assert main(["run", str(TINY), f"--set=name={name}", f"--set=checkpoint.storage={tmp_path}/s"]) == 2
    assert "raypod: error: name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert load_config(TINY, ["name=.hidden..job"]).job_dir.endswith("/.hidden..job")  # still a name


def test_cli_check_prints_resolved_config(capsys):
    assert main(["check", str(TINY), "--set=train.max_steps=9"]) == 0
    assert "max_steps: 9" in capsys.readouterr().out


def test_help_describes_every_command(capsys):
    for argv in (["--help"], ["run", "--help"], ["check", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "RAY_ADDRESS" in out and "startup" in out


BOOM = '''
from raypod.recipes.mlp import MLPRecipe


class Boom(MLPRecipe):
    def __init__(self, width: int = 4) -> None:
        raise ValueError(f"width {width} is not a power of two")
'''


def test_recipe_constructor_error_is_one_sentence(tmp_path, monkeypatch, capsys):
    (tmp_path / "boomrecipe_unit.py").write_text(BOOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    storage = tmp_path / "store"
    sets = ["--set=recipe.target=boomrecipe_unit:Boom", "--set=recipe.args={width: 3}",
            f"--set=checkpoint.storage={storage}"]
    for command in ("check", "run"):
        assert main([command, str(REPO / "jobs" / "configs" / "mlp.yaml"), *sets]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == ("raypod: error: recipe.target 'boomrecipe_unit:Boom' could not be built "
                                        "with recipe.args: ValueError: width 3 is not a power of two"), command
        assert captured.out == "" and not storage.exists()
