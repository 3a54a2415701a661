"""Specification tests for the typed configuration (biflow/config.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from biflow.config import (
    FORWARD_SIZES,
    ConfigError,
    ExperimentConfig,
    ReverseLossConfig,
    TrainConfig,
    ForwardConfig,
    apply_overrides,
    commented_yaml,
    flatten,
    load_yaml,
    unflatten,
    validate,
)
from biflow.pipeline.spec import EvaluateSection, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "pipelines" / "digits.yaml"
BIFLOW = Path(sys.executable).with_name("biflow")  # the console script of this environment


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path, load=load_yaml, **kw) -> str:
    """Load `path`, expect a ConfigError, and return its message (checked to be one line)."""
    with pytest.raises(ConfigError) as info:
        load(path, **kw)
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


# ============================================================== where a bad setting came from
def test_a_misspelt_set_key_is_blamed_on_the_set_with_the_closest_key(tmp_path):
    """A typo in --set names the --set item, not the file, and suggests the key it most likely meant."""
    message = config_error(write(tmp_path, "reverse_loss:\n  align: 1.0\n"), overrides=["reverse_loss.algn=0.5"])
    assert message == "--set reverse_loss.algn=0.5: unknown key 'algn' (did you mean 'align'?)"


def test_a_misspelt_set_section_is_blamed_on_the_set_with_the_closest_section(tmp_path):
    message = config_error(write(tmp_path, ""), overrides=["revers.depth=3"])
    assert message == "--set revers.depth=3: unknown section 'revers' (did you mean 'reverse'?)"


def test_an_unknown_key_with_nothing_close_gets_no_suggestion(tmp_path):
    assert config_error(write(tmp_path, ""), overrides=["forward.zzz=1"]) == "--set forward.zzz=1: unknown key 'zzz'"


def test_a_misspelt_key_in_the_file_names_the_file_and_the_closest_key(tmp_path):
    path = write(tmp_path, "forward:\n  widht: 32\n")
    assert config_error(path) == f"{path}: forward.widht: unknown key 'widht' (did you mean 'width'?)"


def test_a_bad_set_value_is_blamed_on_the_set_not_the_file(tmp_path):
    """The file is fine; the value given on the command line is not."""
    path = write(tmp_path, "forward:\n  width: 64\n")
    message = config_error(path, overrides=["forward.width=4"])
    assert message == "--set forward.width=4: Input should be greater than or equal to 8"


def test_a_bad_value_in_the_file_names_the_file_even_with_overrides_beside_it(tmp_path):
    path = write(tmp_path, "forward:\n  width: 4\n")
    message = config_error(path, overrides=["reverse.depth=8", "forward.heads=2"])
    assert message.startswith(f"{path}: forward.width: Input should be greater than or equal to 8")


def test_a_set_that_breaks_a_rule_of_its_section_is_blamed_on_the_set(tmp_path):
    message = config_error(write(tmp_path, ""), overrides=["forward.heads=5"])
    assert message == "--set forward.heads=5: width 64 is not divisible by heads 5"


def test_the_last_set_of_a_key_is_the_one_in_effect_and_the_one_blamed(tmp_path):
    path = write(tmp_path, "")
    assert load_yaml(path, overrides=["forward.width=4", "forward.width=32"]).forward.width == 32
    assert config_error(path, overrides=["forward.width=32", "forward.width=4"]).startswith("--set forward.width=4: ")


def test_a_set_value_that_is_not_yaml_is_a_one_line_error(tmp_path):
    message = config_error(write(tmp_path, ""), overrides=["forward.width=[1,"])
    assert message == "--set forward.width=[1,: the value is not valid YAML"


def test_a_set_below_a_plain_setting_is_refused(tmp_path):
    message = config_error(write(tmp_path, "forward:\n  width: 64\n"), overrides=["forward.width.x=1"])
    assert message == "--set forward.width.x=1: forward.width is a setting, not a section"


@pytest.mark.parametrize("item, message", [
    ("pipeline.evaluate.num_sample=5",
     "--set pipeline.evaluate.num_sample=5: unknown key 'num_sample' (did you mean 'num_samples'?)"),
    ("pipeline.evalute.guidance=1", "--set pipeline.evalute.guidance=1: unknown section 'evalute' (did you mean 'evaluate'?)"),
    ("pipeline.latent.vaee=runs/vae", "--set pipeline.latent.vaee=runs/vae: unknown key 'vaee' (did you mean 'vae'?)"),
    ("reverse_loss.algn=0.5", "--set reverse_loss.algn=0.5: unknown key 'algn' (did you mean 'align'?)"),
    ("pipeline.evaluate.num_samples=1", "--set pipeline.evaluate.num_samples=1: Input should be greater than or equal to 2"),
])
def test_pipeline_files_blame_a_bad_set_the_same_way(item, message):
    """The `pipeline:` section and its nested sections get the same treatment as the experiment sections."""
    assert config_error(DIGITS, load=load_pipeline, overrides=[item]) == message


def test_a_misspelt_key_in_a_pipeline_file_names_the_file(tmp_path):
    path = write(tmp_path, "pipeline:\n  evaluate:\n    gudance: 1.0\n", "pipe.yaml")
    message = config_error(path, load=load_pipeline)
    assert message == f"{path}: pipeline.evaluate.gudance: unknown key 'gudance' (did you mean 'guidance'?)"


def test_apply_overrides_sets_dotted_keys_from_strings_or_a_mapping():
    """The one way settings are layered: `--set` strings (YAML values) and a sweep's {key: value} alike."""
    data = {"forward": {"width": 64}, "reverse": None}
    apply_overrides(data, ["forward.width=32", "reverse.depth=8", "forward.clip=null"])
    apply_overrides(data, {"pipeline.evaluate.guidance": 1.5}, "trial")
    assert data == {"forward": {"width": 32, "clip": None}, "reverse": {"depth": 8},
                    "pipeline": {"evaluate": {"guidance": 1.5}}}


# ============================================================== biflow config show
def test_every_setting_has_a_description():
    """The descriptions are what `biflow config show` prints beside each value."""
    for model in (ExperimentConfig, ForwardConfig, ReverseLossConfig, TrainConfig, EvaluateSection):
        assert all(field.description for field in model.model_fields.values()), model


def test_the_commented_config_is_a_pipeline_file_that_loads_back_to_the_same_config(tmp_path):
    cfg = load_pipeline(DIGITS, ["forward.size=tiny", "train_reverse.lr=1e-7"])
    text = commented_yaml(cfg)
    assert "  width: 32" in text.split("train_forward:")[0]  # size expanded: tiny's width is shown
    path = write(tmp_path, text, "resolved.yaml")
    assert load_pipeline(path) == cfg


def run_biflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIFLOW), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_config_show_prints_each_resolved_value_beside_its_description():
    shown = run_biflow("config", "show", "pipelines/digits.yaml", "--set", "reverse_loss.align=0.5")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    align = next(ln for ln in lines if ln.lstrip().startswith("align:"))
    value, description = (part.strip() for part in align.split("#", 1))
    assert value == "align: 0.5" and description == ReverseLossConfig.model_fields["align"].description
    assert {"data:", "forward:", "train_forward:", "reverse:", "reverse_loss:", "train_reverse:", "pipeline:"} <= \
        {ln.split("#")[0].strip() for ln in lines if not ln.startswith(" ")}  # every section, at the top level
    assert "    guidance: 0.0" in shown.stdout  # a nested section's default (pipeline.evaluate.guidance)


def test_config_show_with_a_misspelt_key_exits_2_with_one_line():
    shown = run_biflow("config", "show", "pipelines/digits.yaml", "--set", "reverse_loss.algn=0.5")
    assert shown.returncode == 2 and shown.stdout == ""
    assert shown.stderr == "biflow config: error: --set reverse_loss.algn=0.5: unknown key 'algn' (did you mean 'align'?)\n"


def test_config_help_names_show_and_show_help_names_its_arguments():
    group, show = run_biflow("config", "--help"), run_biflow("config", "show", "--help")
    assert group.returncode == show.returncode == 0
    assert "show" in group.stdout and "description" in group.stdout
    assert "PIPELINE" in show.stdout.upper() and "--set KEY=VALUE" in show.stdout
