"""TrainConfig: typed loading from TOML/JSON and key=value, semantic hashing and diffs."""

import json

import pytest

from functrain.shell.config import TrainConfig, semantic, semantic_diff, semantic_hash


def test_key_value_overrides_are_typed():
    c = TrainConfig.from_args(["steps=500", "score=val,acc,max", "patience=none", "async_checkpoint=yes",
                               "checkpoint_dir=runs/x", "width=64", "hparams.lr=0.5"],
                              hparams={"width": 8, "lr": 0.1}, patience=3)
    assert c.steps == 500 and isinstance(c.steps, int)
    assert c.score == ("val", "acc", "max") and c.patience is None and c.async_checkpoint is True
    assert c.checkpoint_dir == "runs/x" and c.hparams == {"width": 64, "lr": 0.5}


def test_unknown_key_lists_valid_keys_and_bad_values_are_named():
    with pytest.raises(KeyError, match="unknown config key 'stepz'.*steps"):
        TrainConfig.from_args(["stepz=3"])
    with pytest.raises(ValueError, match="steps='many'"):
        TrainConfig.from_args(["steps=many"])
    with pytest.raises(ValueError, match="true or false"):
        TrainConfig.from_args(["progress=maybe"])
    with pytest.raises(ValueError, match="set it in Python"):
        TrainConfig.from_args(["data=foo"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.from_args(["steps"])


def test_toml_and_json_files_then_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 20\nscore = ["val", "loss", "min"]\n[hparams]\nlr = 0.3\n')
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 2, "log_every": 5}))
    c = TrainConfig.from_args([f"config={tmp_path / 'c.toml'}", "steps=30"], hparams={"lr": 0.1})
    assert (c.steps, c.score, c.hparams["lr"]) == (30, ("val", "loss", "min"), 0.3)
    j = TrainConfig.from_file(tmp_path / "c.json")
    assert (j.epochs, j.log_every) == (2, 5)
    with pytest.raises(KeyError, match="bogus"):
        (tmp_path / "bad.toml").write_text("bogus = 1\n")
        TrainConfig.from_file(tmp_path / "bad.toml")


def test_semantic_hash_ignores_cadence_but_not_math():
    base = TrainConfig(steps=10, hparams={"lr": 0.1})
    assert semantic_hash(semantic(base)) == semantic_hash(semantic(base.replace(steps=99, log_every=1,
                                                                                 checkpoint_every=7)))
    changed = base.replace(hparams={"lr": 0.2}, seed=4)
    assert semantic_hash(semantic(base)) != semantic_hash(semantic(changed))
    assert semantic_diff(semantic(base), semantic(changed)) == ["  hparams.lr: 0.1 -> 0.2", "  seed: 0 -> 4"]


def test_to_dict_is_json_and_skips_functions():
    d = TrainConfig(steps=3, step=lambda s, b: s, score=("val", "loss", "min")).to_dict()
    assert "step" not in d and d["score"] == ["val", "loss", "min"]
    json.dumps(d)
