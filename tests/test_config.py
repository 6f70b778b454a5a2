import pathlib

import pytest
import yaml

from omnimoe.model import config as model_config
from omnimoe.model.attention import IMPLEMENTATIONS
from omnimoe.model.config import MoEConfig
from omnimoe.model.expert_parallel import DISPATCH_MODES
from omnimoe.model.grouped_matmul import BACKENDS
from omnimoe.model.moe import ROUTERS
from omnimoe.model.router import LONE_EXPERT
from omnimoe.train import config as config_lib
from omnimoe.train import config_files
from omnimoe.train.config import Config, ConfigError

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
  assert CONFIGS, "no shipped configs found"


def leaves(tree: dict, prefix: str = "") -> dict:
  """{'model': {'moe': {'top_k': 2}}} -> {'model.moe.top_k': 2}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_holds_what_its_file_says(path):
  """Each shipped file loads and validates, and every key it sets reached the config."""
  cfg = leaves(config_lib.to_dict(config_lib.load(path)))
  written = leaves(yaml.safe_load(path.read_text()))
  assert written
  for key, value in written.items():
    got = cfg[key]
    assert got == (float(value) if isinstance(got, float) else value), key


def test_every_shipped_config_is_found_by_name():
  assert sorted(config_files.shipped()) == [p.stem for p in CONFIGS]


def test_tiny_yaml_spells_out_the_defaults():
  assert config_lib.load(pathlib.Path(__file__).parent.parent / "configs/tiny.yaml") == Config()


def test_overrides_reach_nested_keys_and_convert_types():
  cfg = config_lib.load(None, ["train.steps=50", "model.num_layers=2", "model.moe.top_k=1",
                               "train.learning_rate=1", "model.rope_sections=[4,6,6]",
                               "train.weight_decay=1e-4"])
  assert cfg.train.weight_decay == 1e-4
  assert cfg.train.steps == 50 and cfg.model.num_layers == 2 and cfg.model.moe.top_k == 1
  assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
  assert cfg.model.rope_sections == (4, 6, 6)


@pytest.mark.parametrize("override, needle", [
    ("model.num_layer=2", "unknown config key 'model.num_layer' (did you mean 'model.num_layers'?)"),
    ("train.stepz=5", "did you mean 'train.steps'"),
    ("train.steps=ten", "config key 'train.steps' expects an integer, got 'ten'"),
    ("train.steps=1.5", "config key 'train.steps' expects an integer"),
    ("train.learning_rate=fast", "config key 'train.learning_rate' expects a number, got 'fast'"),
    ("model.qk_norm=3", "config key 'model.qk_norm' expects true/false"),
    ("train.steps=0", "config key 'train.steps' must be positive"),
    ("model.moe.top_k=9", "config key 'model.moe.top_k' must be at most"),
    ("model.moe.backend=fast", "config key 'model.moe.backend' must be one of"),
    ("model.num_layers.x=1", "config key 'model.num_layers' is a value, not a section"),
    ("model.moe.router=expert_choice", "config key 'model.moe.router' must be topk or dynamic"),
    ("model.moe.dispatch=alltoall", "config key 'model.moe.dispatch' must be one of auto, local"),
    ("model.moe.capacity_factor=0", "config key 'model.moe.capacity_factor' must be positive"),
    ("model.moe.num_groups=3", "config key 'model.moe.num_groups' must divide model.moe.num_experts=8"),
    ("model.moe.max_groups=2", "config key 'model.moe.max_groups' must lie in 0..model.moe.num_groups=1"),
    ("model.moe.threshold_init=0", "config key 'model.moe.threshold_init' must lie in (0, 1]"),
    ("train", "is not of the form key.sub=value"),
])
def test_bad_overrides_name_the_key(override, needle):
  with pytest.raises(ConfigError) as e:
    config_lib.load(None, [override])
  assert needle in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_yaml_file(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model:\n  d_modle: 64\n")
  with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle' \(did you mean 'model.d_model'\?\)"):
    config_lib.load(bad)
  with pytest.raises(ConfigError, match="does not exist"):
    config_lib.load(tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path):
  cfg = config_lib.load(None, ["train.steps=7", "model.rope_sections=[4,6,6]"])
  path = tmp_path / "c.yaml"
  path.write_text(config_lib.dump(cfg))
  assert config_lib.load(path) == cfg


def test_max_groups_must_leave_room_for_top_k():
  with pytest.raises(ConfigError) as e:
    config_lib.load(None, ["model.moe.num_groups=8", "model.moe.max_groups=1"])
  assert ("config key 'model.moe.max_groups' must leave the 2 experts a token may take in reach, "
          "but 1 of 8 groups hold 1") in str(e.value)
  config_lib.load(None, ["model.moe.num_groups=4", "model.moe.max_groups=1"])


@pytest.mark.parametrize("overrides, needle", [
    (["model.moe.k_max=9"], "config key 'model.moe.k_max' must be at most model.moe.num_experts=8"),
    (["model.moe.k_min=3", "model.moe.k_max=2"], "config key 'model.moe.k_min' must lie in 1..model.moe.k_max=2"),
    (["model.moe.target_active_fraction=0.9"], "config key 'model.moe.target_active_fraction' must lie in [k_min/num_experts"),
])
def test_dynamic_router_keys_are_checked(overrides, needle):
  with pytest.raises(ConfigError) as e:
    config_lib.load(None, ["model.moe.router=dynamic", *overrides])
  assert needle in str(e.value)
  config_lib.load(None, overrides)     # the top-k router ignores these keys


def test_data_sources_override_parses_to_typed_records(tmp_path):
  from omnimoe.data.config import Source
  cfg = config_lib.load(None, ["data.sources=[{path: runs/prep, weight: 1.0}, {path: default, weight: 2}, other]"])
  assert cfg.data.sources == (Source("runs/prep", 1.0), Source("default", 2.0), Source("other", 1.0))
  assert isinstance(cfg.data.sources[1].weight, float)
  assert config_lib.load(None, ["data.sources=[]"]).data.sources == ()
  path = tmp_path / "c.yaml"
  path.write_text(config_lib.dump(cfg))
  assert config_lib.load(path) == cfg
  path.write_text("data:\n  sources:\n    - path: a\n      weight: 0.5\n")
  assert config_lib.load(path).data.sources == (Source("a", 0.5),)


@pytest.mark.parametrize("override, needle", [
    ("data.sources=[{pth: x}]", "unknown config key 'data.sources[0].pth' (did you mean 'data.sources[0].path'?)"),
    ("data.sources=[{weight: 2}]", "config key 'data.sources[0]' needs 'path'"),
    ("data.sources=[a, {path: b, weight: heavy}]", "config key 'data.sources[1].weight' expects a number, got 'heavy'"),
    ("data.sources=runs/prep", "config key 'data.sources' expects a list of {path: a string, weight: a number}"),
    ("data.sources=[{path: x, weight: -1}]", "config key 'data.sources[0].weight' must be a number >= 0"),
    ("data.sources=[{path: x, weight: 0}]", "config key 'data.sources' needs a source with a positive weight"),
    ("data.sources=[{path: ' '}]", "config key 'data.sources[0].path' must not be empty"),
])
def test_bad_data_sources_name_the_key(override, needle):
  with pytest.raises(ConfigError) as e:
    config_lib.load(None, [override])
  assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, choices", [
    ("model.moe.backend", BACKENDS), ("model.moe.dispatch", DISPATCH_MODES),
    ("model.moe.router", ROUTERS), ("model.attention", IMPLEMENTATIONS),
    ("model.dtype", ("float32", "bfloat16")), ("model.param_dtype", ("float32",)),
    ("model.moe.lone_expert", LONE_EXPERT)])
def test_every_choice_the_code_offers_is_accepted_and_others_are_listed(key, choices):
  """The lists live beside the code that runs them; the config accepts exactly those names."""
  for value in choices:
    cfg = config_lib.load(None, [f"{key}={value}"])
    section = cfg
    for part in key.split("."):
      section = getattr(section, part)
    assert section == value
  with pytest.raises(ConfigError) as e:
    config_lib.load(None, [f"{key}=nonsense"])
  message = str(e.value)
  assert message.startswith(f"config key '{key}' must be ") and "'nonsense'" in message
  assert all(value in message for value in choices) and "\n" not in message


def test_the_layers_share_the_model_checks():
  """model/config.py's checks are what validate() reports; a layer gets the same ValueError."""
  with pytest.raises(ValueError, match=r"^config key 'model.moe.num_groups' must divide "
                                       r"model.moe.num_experts=8, got 3$"):
    model_config.check_moe(MoEConfig(num_experts=8, num_groups=3))
  with pytest.raises(ValueError, match=r"^config key 'model.rope_sections' must sum to "
                                       r"model.head_dim/2=16, got \[8, 4, 2\]$"):
    model_config.check_rope(32, (8, 4, 2))
  with pytest.raises(ValueError, match=r"^config key 'model.num_kv_heads' must divide "
                                       r"model.num_heads=4, got 3$"):
    model_config.check_heads(4, 3)
  with pytest.raises(ValueError, match=r"^config key 'model.num_dense_layers' must lie in "
                                       r"0..model.num_layers-1=3, got 4$"):
    model_config.check_dense_layers(4, 4)
  model_config.check(config_lib.load(None).model)


# Config files by name: `omnimoe train tiny` or `configs/tiny.yaml` from any folder.
SHIPPED = CONFIGS[0].parent


def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  expected = config_lib.load(SHIPPED / "dynamic16.yaml")
  assert expected != Config()
  for name in ("dynamic16", "dynamic16.yaml", "configs/dynamic16.yaml"):
    assert config_lib.load(name) == expected, name


def test_a_missing_config_lists_the_shipped_names_on_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name in ("nosuch", "configs/nosuch.yaml", "elsewhere/tiny.yaml"):
    with pytest.raises(ConfigError) as e:
      config_lib.load(name)
    names = ", ".join(p.stem for p in CONFIGS)
    assert str(e.value) == f"config file '{name}' does not exist (shipped configs: {names})"


def test_a_real_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.yaml").write_text("train:\n  steps: 7\n")
  (tmp_path / "tiny").write_text("train:\n  steps: 9\n")
  assert config_lib.load("configs/tiny.yaml").train.steps == 7
  assert config_lib.load("tiny").train.steps == 9
  assert config_lib.load("tiny.yaml") == config_lib.load(SHIPPED / "tiny.yaml")  # none here
