"""Config loading: YAML presets, key=value overrides, and errors that name the key."""

import pytest

from launch.config import CONFIG_DIR, ConfigError, load_config


def test_default_preset_and_overrides():
    cfg = load_config(None, ["train.epochs=5", "model.name=pimm", "seed=7", "train.lr=0.002",
                             "model.tower_dims=[16, 8]", "wandb.mode=disabled", "data.path=/tmp/x"])
    assert cfg.train.epochs == 5 and cfg.seed == 7 and cfg.train.lr == 0.002
    assert cfg.model.tower_dims == [16, 8] and cfg.wandb.mode == "disabled" and cfg.data.path == "/tmp/x"
    assert cfg.data.synthetic.tasks == ["click", "conversion", "core_conversion"]


def test_int_is_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("preset, emb, towers, alpha, speed, beta, tasks", [
    ("aliccp.yaml", 5, [128, 64, 32], 0.5, 0.25, 0.25, ["click", "purchase"]),
    ("industrial.yaml", 24, [256, 128, 64], 2 / 3, 1 / 3, 0.0, ["click", "conversion", "core_conversion"]),
])
def test_paper_presets(preset, emb, towers, alpha, speed, beta, tasks):
    cfg = load_config(f"{CONFIG_DIR}/{preset}")
    assert cfg.model.embedding_dim == emb and cfg.model.tower_dims == towers
    assert (cfg.curriculum.alpha, cfg.curriculum.speed, cfg.curriculum.beta) == pytest.approx((alpha, speed, beta))
    assert cfg.data.synthetic.tasks == tasks


@pytest.mark.parametrize("override, named", [
    ("train.epoch=3", "train.epoch"),                 # unknown key (typo)
    ("nosuch.key=1", "nosuch"),                       # unknown section
    ("train.epochs=abc", "train.epochs"),             # wrong type
    ("train.use_gpu=3", "train.use_gpu"),             # not a bool
    ("train.epochs=0", "train.epochs"),               # out of range
    ("curriculum.beta=0.9", "curriculum.beta"),       # alpha < beta
    ("wandb.mode=sometimes", "wandb.mode"),
    ("train.early_stop_metric=loss", "train.early_stop_metric"),
])
def test_bad_config_is_rejected_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_preset_replaces_mappings_but_merges_sections(tmp_path):
    from launch.config import CONFIG_DIR

    preset = tmp_path / "p.yaml"
    preset.write_text(f"base: {CONFIG_DIR}/default.yaml\ndata:\n  synthetic:\n    fields: {{user: 10, item: 5}}\n"
                      "train:\n  epochs: 7\n")
    cfg = load_config(str(preset))
    assert cfg.data.synthetic.fields == {"user": 10, "item": 5}  # exactly the preset's fields, not a union
    assert cfg.train.epochs == 7 and cfg.train.batch_size == load_config(None).train.batch_size  # sections merge
