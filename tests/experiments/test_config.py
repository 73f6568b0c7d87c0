"""Experiment configs: every bad input is one clear error that names the key."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from experiments.config import (ConfigError, ExistingPath, apply_overrides, build, dump_yaml, load_yaml,
                                parse_override)


@dataclass
class Optim:
    lr: float = field(default=3e-4, metadata={"range": (0.0, 1.0)})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Cfg:
    name: str = "x"
    steps: int = field(default=10, metadata={"range": (1, None)})
    backend: Literal["torch", "deepspeed"] = "torch"
    data: Optional[ExistingPath] = None
    optim: Optim = field(default_factory=Optim)


def test_valid_config_with_overrides():
    data = apply_overrides({"optim": {"lr": 1e-3}}, ["steps=5", "optim.betas=[0.8, 0.9]", "optim.lr=3e-4"])
    cfg = build(Cfg, data)
    assert cfg.steps == 5 and cfg.optim.betas == [0.8, 0.9] and cfg.optim.lr == 3e-4


def test_unknown_key_names_full_path_and_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"):
        build(Cfg, {"optim": {"lrr": 0.1}})


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"key 'steps': expected int, got 'ten' \(str\)"):
        build(Cfg, {"steps": "ten"})
    with pytest.raises(ConfigError, match=r"key 'optim.lr': expected float, got True"):
        build(Cfg, {"optim": {"lr": True}})


def test_out_of_range_and_bad_choice():
    with pytest.raises(ConfigError, match=r"key 'steps': 0 is out of range"):
        build(Cfg, {"steps": 0})
    with pytest.raises(ConfigError, match=r"key 'backend': 'jax' .* is not one of 'torch', 'deepspeed'"):
        build(Cfg, {"backend": "jax"})


def test_missing_path_names_key_and_path(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'data': path '.*nowhere' does not exist"):
        build(Cfg, {"data": str(tmp_path / "nowhere")})
    assert build(Cfg, {"data": str(tmp_path)}).data == str(tmp_path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(f)
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: line \d+, column \d+ is not valid YAML"):
        load_yaml(f)


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match=r"optim: expected a mapping for section Optim"):
        build(Cfg, {"optim": 3})
    with pytest.raises(ConfigError, match=r"'optim' is a value, not a section"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])


def test_override_syntax():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("x=3e-4")[1] in ("3e-4", 3e-4)  # YAML 1.1 reads 3e-4 as a string; float fields accept it
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("steps")


def test_resolved_config_round_trips():
    cfg = build(Cfg, {"steps": 7})
    import yaml
    assert build(Cfg, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_base_yaml_is_merged_recursively(tmp_path):
    from experiments.config import load_experiment
    (tmp_path / "parent.yaml").write_text("steps: 3\noptim: {lr: 0.1, betas: [0.5, 0.5]}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim: {lr: 0.2}\n")
    cfg = build(Cfg, load_experiment(tmp_path / "child.yaml"))
    assert cfg.steps == 3 and cfg.optim.lr == 0.2 and cfg.optim.betas == [0.5, 0.5]
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_experiment(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="key 'base': 'missing.yaml' not found"):
        load_experiment(tmp_path / "orphan.yaml")
