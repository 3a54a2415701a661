"""Specification tests for the typed configuration (biflow/config.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from biflow.config import (
    FORWARD_SIZES,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    ForwardConfig,
    flatten,
    load_yaml,
    unflatten,
    validate,
)


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path, **kw) -> str:
    """Load `path`, expect a ConfigError, and return its message (checked to be one line)."""
    with pytest.raises(ConfigError) as info:
        load_yaml(path, **kw)
    message = str(info.value)
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message


# ============================================================== defaults and sizes
def test_defaults_validate():
    """An empty experiment config is valid and equals the defaults of every section."""
    cfg = validate(ExperimentConfig, {})
    assert cfg == ExperimentConfig()
    assert cfg.forward.width == 64 and cfg.forward.num_classes == 10


def test_empty_yaml_file_gives_defaults(tmp_path):
    """An empty YAML file loads as the default config."""
    assert load_yaml(write(tmp_path, "")) == ExperimentConfig()


def test_default_forward_fields_agree_with_default_size():
    """The field defaults are the 'digits' size, which is also the default size name."""
    cfg = ForwardConfig()
    assert cfg.size == "digits"
    assert all(getattr(cfg, k) == v for k, v in FORWARD_SIZES["digits"].items())


@pytest.mark.parametrize("name", list(FORWARD_SIZES))
def test_size_name_fills_architecture_fields(name):
    """`size: NAME` sets width, layers_per_block, num_blocks and heads from FORWARD_SIZES."""
    cfg = ForwardConfig(size=name)
    for key, value in FORWARD_SIZES[name].items():
        assert getattr(cfg, key) == value


def test_size_from_yaml_fills_width(tmp_path):
    """`forward: {size: B}` in a file gives the B architecture."""
    cfg = load_yaml(write(tmp_path, "forward:\n  size: B\n"))
    assert (cfg.forward.width, cfg.forward.layers_per_block, cfg.forward.num_blocks, cfg.forward.heads) == (768, 2, 8, 12)


def test_explicit_fields_override_the_size(tmp_path):
    """Fields given next to `size` win over the size's values; the others still come from the size."""
    cfg = load_yaml(write(tmp_path, "forward:\n  size: B\n  width: 96\n  num_blocks: 3\n"))
    assert cfg.forward.width == 96 and cfg.forward.num_blocks == 3
    assert cfg.forward.heads == 12 and cfg.forward.layers_per_block == 2


def test_unknown_size_name_is_a_clear_error(tmp_path):
    """An unknown size names the bad value and lists the valid choices."""
    message = config_error(write(tmp_path, "forward:\n  size: GIANT\n"))
    assert "forward" in message and "GIANT" in message and "unknown size" in message
    assert all(name in message for name in FORWARD_SIZES)


def test_unknown_size_name_in_code_is_a_clear_error():
    """validate() turns an unknown size into a one-line ConfigError too."""
    with pytest.raises(ConfigError, match="unknown size 'GIANT'"):
        validate(ForwardConfig, {"size": "GIANT"})


# ============================================================== errors from files
def test_unknown_key_names_the_key_and_the_file(tmp_path):
    """A typo in a key is rejected with the dotted key and the file path on one line."""
    path = write(tmp_path, "forward:\n  widht: 32\n")
    message = config_error(path)
    assert "forward.widht" in message and str(path) in message


def test_unknown_section_names_the_key_and_the_file(tmp_path):
    """An unknown top-level section is rejected too."""
    path = write(tmp_path, "reverse_model:\n  width: 32\n")
    message = config_error(path)
    assert "reverse_model" in message and str(path) in message


def test_wrong_type_names_the_key_and_the_file(tmp_path):
    """A non-integer width is a ConfigError naming forward.width and the file."""
    path = write(tmp_path, "forward:\n  width: wide\n")
    message = config_error(path)
    assert "forward.width" in message and str(path) in message


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("forward:\n  width: 4\n", "forward.width"),  # ge=8
        ("data:\n  test_fraction: 1.5\n", "data.test_fraction"),  # lt=1
        ("train_forward:\n  beta2: 1.0\n", "train_forward.beta2"),  # lt=1
        ("forward:\n  clip: 0\n", "forward.clip"),  # gt=0
    ],
)
def test_out_of_range_value_names_the_key_and_the_file(tmp_path, yaml_text, key):
    """Values outside their declared range are ConfigErrors naming the key and the file."""
    path = write(tmp_path, yaml_text)
    message = config_error(path)
    assert key in message and str(path) in message


def test_several_errors_are_summarised_on_one_line(tmp_path):
    """Two problems still give one line, with a count of the rest."""
    message = config_error(write(tmp_path, "forward:\n  width: 4\n  heads: 0\n"))
    assert "(+1 more)" in message


def test_invalid_yaml_is_a_config_error(tmp_path):
    """Unparseable YAML is a one-line ConfigError naming the file."""
    path = write(tmp_path, "forward: [width: 3\n")
    assert str(path) in config_error(path)


def test_non_mapping_top_level_is_a_config_error(tmp_path):
    """A YAML list at top level is rejected."""
    path = write(tmp_path, "- 1\n- 2\n")
    assert "mapping" in config_error(path)


def test_missing_file_is_a_config_error(tmp_path):
    """A path that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.yaml"
    assert str(path) in config_error(path)


def test_image_size_not_divisible_by_patch_size(tmp_path):
    """image_size must be a multiple of patch_size."""
    message = config_error(write(tmp_path, "forward:\n  image_size: 10\n  patch_size: 4\n"))
    assert "not divisible by patch_size" in message


def test_width_not_divisible_by_heads(tmp_path):
    """width must be a multiple of heads."""
    message = config_error(write(tmp_path, "forward:\n  width: 36\n  heads: 8\n"))
    assert "not divisible by heads" in message


# ============================================================== flat form and overrides
def test_flatten_keys_are_dotted_section_fields():
    """flatten gives 'section.field' keys with plain values, e.g. 'forward.width'."""
    flat = flatten(ExperimentConfig())
    assert flat["forward.width"] == 64
    assert flat["train_forward.lr"] == TrainConfig().lr
    assert all(key.count(".") == 1 for key in flat)
    assert not any(isinstance(v, dict) for v in flat.values())


def test_flatten_unflatten_round_trip():
    """unflatten(flatten(cfg)) validates back to the same config (also with a size and overrides)."""
    cfg = validate(ExperimentConfig, {"forward": {"size": "B", "width": 96, "clip": None}, "data": {"name": "patches"}})
    nested = unflatten(flatten(cfg))
    assert nested == cfg.model_dump()
    assert validate(ExperimentConfig, nested) == cfg


def test_overrides_apply_on_top_of_the_file(tmp_path):
    """load_yaml(..., overrides=['forward.width=32']) sets the value (parsed as YAML)."""
    path = write(tmp_path, "forward:\n  width: 64\n")
    cfg = load_yaml(path, overrides=["forward.width=32", "forward.clip=null", "train_forward.lr=3e-4"])
    assert cfg.forward.width == 32
    assert cfg.forward.clip is None
    assert cfg.train_forward.lr == pytest.approx(3e-4)


def test_override_can_create_a_missing_section(tmp_path):
    """An override for a section absent from the file still applies."""
    cfg = load_yaml(write(tmp_path, ""), overrides=["forward.width=32"])
    assert cfg.forward.width == 32


def test_bad_override_is_a_config_error(tmp_path):
    """An override without '=' or with an invalid value is a ConfigError."""
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="key=value"):
        load_yaml(path, overrides=["forward.width"])
    assert "forward.width" in config_error(path, overrides=["forward.width=4"])


def test_size_of_wrong_type_is_a_config_error(tmp_path):
    """`size: [B]` is a wrong type and must be reported like any other bad value."""
    message = config_error(write(tmp_path, "forward:\n  size: [B]\n"))
    assert "forward" in message


def test_override_into_an_empty_section(tmp_path):
    """A section written as `forward:` with nothing under it accepts overrides."""
    cfg = load_yaml(write(tmp_path, "forward:\n"), overrides=["forward.width=32"])
    assert cfg.forward.width == 32
