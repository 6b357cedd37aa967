"""Configs: loading by name, typed overrides, and clear errors for bad keys."""

import pytest

from jaxclip import config as config_lib


def test_every_named_config_loads():
    for name in config_lib.available_configs():
        cfg = config_lib.load_config(name)
        assert cfg.name == name


def test_override_parses_by_the_type_of_the_current_value():
    cfg = config_lib.load_config("demo")
    config_lib.apply_overrides(
        cfg,
        [
            ("data.batch_size", "64"),
            ("optim.lr", "3e-4"),
            ("model.remat", "true"),
            ("eval.tasks", "('retrieval',)"),
            ("model.logit_bias", "-10.0"),
        ],
    )
    assert cfg.data.batch_size == 64 and isinstance(cfg.data.batch_size, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.remat is True
    assert tuple(cfg.eval.tasks) == ("retrieval",)
    assert cfg.model.logit_bias == -10.0


def test_unknown_key_names_the_nearest_valid_keys():
    cfg = config_lib.load_config("demo")
    with pytest.raises(config_lib.ConfigError, match=r"data\.batch_size"):
        config_lib.override(cfg, "data.batch_sise", "8")
    with pytest.raises(config_lib.ConfigError, match=r"optim\.warmup_steps"):
        config_lib.override(cfg, "warmup_step", "8")


def test_bad_value_type_is_an_error():
    cfg = config_lib.load_config("demo")
    with pytest.raises(config_lib.ConfigError, match="integer"):
        config_lib.override(cfg, "data.batch_size", "many")


def test_unknown_config_name_lists_available():
    with pytest.raises(config_lib.ConfigError, match="demo"):
        config_lib.load_config("dmeo")


def test_loss_kind_and_impl_must_be_known_names():
    cfg = config_lib.load_config("demo")
    with pytest.raises(config_lib.ConfigError, match=r"loss\.impl=ring"):
        config_lib.override(cfg, "loss.impl", "rnig")
    with pytest.raises(config_lib.ConfigError, match="'contrastive', 'siglip', 'cosine'"):
        config_lib.override(cfg, "loss.kind", "infonce")
    config_lib.override(cfg, "loss.kind", "siglip")
    assert cfg.loss.kind == "siglip"


def test_config_choices_are_the_losses_names():
    from jaxclip import losses

    assert config_lib.CHOICES["loss.kind"] == ("", *losses.OBJECTIVE_KINDS)  # "": the kind's
    assert config_lib.CHOICES["loss.impl"] == losses.LOSS_IMPLS


def test_a_config_file_with_an_unknown_loss_kind_does_not_load(tmp_path):
    path = tmp_path / "bad_loss.py"
    path.write_text(
        "from jaxclip.config import base_config\n\n\n"
        "def get_config():\n    c = base_config()\n    c.loss.kind = 'sigmoid'\n    return c\n"
    )
    with pytest.raises(config_lib.ConfigError, match=r"loss\.kind='sigmoid' in config 'bad_loss'"):
        config_lib.load_config(str(path))
