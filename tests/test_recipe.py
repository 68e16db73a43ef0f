"""Recipe schema, validation, precedence and recipe files.

Expected values are written out by hand from recipes/*.yaml and the documented rules, not
recomputed with the code under test.
"""

from __future__ import annotations

import math
import re

import pytest

from distillkit.errors import UsageError
from distillkit.recipe import (
    Recipe,
    find_recipe,
    list_recipes,
    parse_set,
    read_yaml,
    recipes_dir,
    resolve_recipe,
)


def usage_error(call, *args, **kwargs) -> str:
    """Run `call` expecting a UsageError; return its message."""
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- the default recipe


def test_default_recipe_matches_default_yaml():
    recipe = resolve_recipe()
    assert isinstance(recipe, Recipe)
    # values written in recipes/default.yaml
    assert recipe.teacher.name == "efficientnet-lite0"
    assert recipe.teacher.input_size == 64
    assert recipe.student.name == "mobilenetv3-small-minimal"
    assert recipe.student.input_size == 32
    assert recipe.data.source == "builtin:fashion-mnist"
    assert recipe.data.limit is None
    assert recipe.data.crop_scale == (0.3, 1.0)
    assert recipe.data.view_slots == "auto" and recipe.data.teacher_cache == "auto"
    assert recipe.train.images == 384000
    assert recipe.train.batch_size == 128
    assert recipe.train.optimizer == "sgd"
    assert recipe.train.lr == 0.15
    assert recipe.train.weight_decay == 0.0001
    assert recipe.eval.max_train == 10000
    assert recipe.eval.max_test == 10000
    assert list(recipe.strategy) == ["seed"]
    seed = recipe.strategy["seed"]
    assert seed.queue_size == 2048
    assert seed.tau_student == 0.2
    assert seed.tau_teacher == 0.05
    # a strategy section is completed with the strategy's own defaults
    assert seed.weight == 1.0
    assert seed.teacher_embed == "auto"
    # keys the YAML does not set keep the schema defaults
    assert recipe.train.precision == "auto"  # accelerate launch's mixed precision, else fp32
    assert recipe.train.grad_accum is None  # accelerate launch's, else 1
    assert recipe.data.flip == 0.5
    assert recipe.out is None


def test_default_by_name_and_by_path_agree():
    by_default = resolve_recipe().to_dict()
    assert resolve_recipe("default").to_dict() == by_default
    assert resolve_recipe(recipes_dir() / "default.yaml").to_dict() == by_default
    assert resolve_recipe(str(recipes_dir() / "default.yaml")).to_dict() == by_default


def test_to_dict_is_plain_and_round_trips():
    recipe = resolve_recipe()
    data = recipe.to_dict()
    assert data["data"]["crop_scale"] == [0.3, 1.0]  # tuples become lists
    assert resolve_recipe(data).to_dict() == data
    assert resolve_recipe(recipe).to_dict() == data


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    recipe = resolve_recipe(name)
    assert recipe.strategy, name
    assert recipe.train.epochs >= 1


def test_list_recipes_names_the_shipped_files():
    assert "default" in list_recipes()
    assert "seed-vit" in list_recipes()
    assert list_recipes() == sorted(list_recipes())


def test_seed_vit_recipe_values():
    recipe = resolve_recipe("seed-vit")
    assert recipe.teacher.name == "timm:vit_small_patch16_224.dino"
    assert recipe.teacher.input_size == 224
    assert recipe.train.lr == 0.06
    assert recipe.strategy["seed"].queue_size == 65536


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key():
    message = usage_error(resolve_recipe, {"traim": {"lr": 0.1}})
    assert "'traim'" in message
    assert "did you mean" in message
    assert "'train'" in message


def test_unknown_nested_key_names_dotted_path_and_suggests():
    message = usage_error(resolve_recipe, overrides=["train.lrr=0.1"])
    assert "'train.lrr'" in message
    assert "did you mean" in message
    assert "lr" in message.split("did you mean", 1)[1]


def test_unknown_nested_key_suggests_dotted_path():
    message = usage_error(resolve_recipe, overrides=["train.lrr=0.1"])
    assert "did you mean 'train.lr'" in message


def test_unknown_nested_key_in_dict_recipe():
    message = usage_error(resolve_recipe, {"data": {"sorce": "builtin:fashion-mnist"}})
    assert "'data.sorce'" in message
    assert "source" in message


def test_unknown_key_without_close_match_lists_choices():
    message = usage_error(resolve_recipe, overrides=["eval.zzzzzz=1"])
    assert "'eval.zzzzzz'" in message
    assert "choose one of" in message
    for key in ("enabled", "knn_k", "max_test"):
        assert key in message


# ----------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "epochs", "two"),
        ("train", "batch_size", 1.5),
        ("train", "epochs", True),  # a bool is not a whole number
        ("eval", "enabled", "yes"),  # a string, not YAML's yes
        ("eval", "enabled", 1),
        ("train", "lr", "fast"),
        ("train", "lr", True),
        ("teacher", "name", 3),
        ("data", "crop_scale", 0.5),
        ("data", "crop_scale", [0.1, 0.5, 1.0]),
        ("data", "limit", "many"),
    ],
)
def test_wrong_type_names_the_key(section, key, value):
    message = usage_error(resolve_recipe, {section: {key: value}})
    assert f"{section}.{key}" in message


def test_wrong_type_messages_say_what_is_expected():
    assert "whole number" in usage_error(resolve_recipe, options={"epochs": "two"})
    assert "true or false" in usage_error(resolve_recipe, {"eval": {"enabled": "yes"}})
    assert "2 values" in usage_error(resolve_recipe, overrides=["data.crop_scale=0.5"])


def test_section_that_is_not_a_mapping():
    message = usage_error(resolve_recipe, {"train": 3})
    assert "train" in message and "mapping" in message


def test_setting_below_a_scalar_is_rejected():
    message = usage_error(resolve_recipe, {"train": {"lr": 0.1}}, overrides=["train.lr.x=1"])
    assert "train.lr" in message


def test_recipe_that_is_not_a_mapping_in_dict_form():
    message = usage_error(resolve_recipe, {"strategy": "seed"})
    assert "strategy" in message and "mapping" in message


# ----------------------------------------------------------------------------- bad values


def test_precision_lists_allowed_values():
    message = usage_error(resolve_recipe, overrides=["train.precision=fp8"])
    assert "train.precision" in message
    assert "'fp8'" in message
    for allowed in ("fp32", "bf16", "fp16"):
        assert allowed in message


def test_optimizer_lists_allowed_values():
    message = usage_error(resolve_recipe, overrides=["train.optimizer=adam"])
    assert "train.optimizer" in message and "sgd" in message and "adamw" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("data.crop_scale=[0.9, 0.1]", "data.crop_scale"),
        ("data.crop_scale=[0.0, 1.0]", "data.crop_scale"),
        ("data.crop_scale=[0.5, 1.5]", "data.crop_scale"),
        ("data.crop_ratio=[2.0, 1.0]", "data.crop_ratio"),
        ("data.flip=2", "data.flip"),
        ("data.flip=-0.1", "data.flip"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-4", "train.batch_size"),
        ("train.max_steps=0", "train.max_steps"),
        ("data.limit=0", "data.limit"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("train.warmup_fraction=1.0", "train.warmup_fraction"),
        ("train.clip_grad=0", "train.clip_grad"),
        ("eval.knn_k=0", "eval.knn_k"),
        ("student.input_size=0", "student.input_size"),
    ],
)
def test_bad_value_names_the_key(override, key):
    message = usage_error(resolve_recipe, overrides=[override])
    assert key in message


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("data.flip=0", ("data", "flip"), 0.0),
        ("data.flip=1", ("data", "flip"), 1.0),
        ("data.crop_scale=[1.0, 1.0]", ("data", "crop_scale"), (1.0, 1.0)),
        ("train.max_steps=null", ("train", "max_steps"), None),
        ("train.clip_grad=1.5", ("train", "clip_grad"), 1.5),
        ("train.warmup_fraction=0", ("train", "warmup_fraction"), 0.0),
    ],
)
def test_boundary_values_are_accepted(override, attr, expected):
    recipe = resolve_recipe(overrides=[override])
    assert getattr(getattr(recipe, attr[0]), attr[1]) == expected


def test_int_given_for_float_field_becomes_float():
    recipe = resolve_recipe(overrides=["train.lr=1"])
    assert recipe.train.lr == 1.0
    assert isinstance(recipe.train.lr, float)


def test_nan_learning_rate_is_rejected():
    with pytest.raises(UsageError, match="train.lr"):
        resolve_recipe(overrides=["train.lr=.nan"])


@pytest.mark.parametrize("role", ["train", "forward", "_hidden"])
def test_a_role_named_like_a_module_attribute_is_refused(role):
    """The strategies keep one nn.Module per role (a ModuleDict): `train` would fail there with a KeyError."""
    message = usage_error(resolve_recipe, overrides=[f"teachers.{role}.name=efficientnet-lite0"])
    assert f"teachers.{role}" in message and "reserved" in message and "name the role otherwise" in message


def test_strategy_ranges_are_checked_before_loading():
    with pytest.raises(UsageError, match="queue_size"):
        resolve_recipe(overrides=["strategy.seed.queue_size=0"])


# ----------------------------------------------------------------------------- strategies


def test_unknown_strategy_name_did_you_mean():
    message = usage_error(resolve_recipe, strategy="sed")
    assert "'sed'" in message
    assert "did you mean 'seed'" in message


def test_unknown_strategy_name_in_recipe_section():
    message = usage_error(resolve_recipe, {"strategy": {"sed": {}}})
    assert "did you mean 'seed'" in message


def test_unknown_strategy_option_is_rejected():
    message = usage_error(resolve_recipe, overrides=["strategy.seed.queue_sizes=1024"])
    assert "strategy.seed.queue_sizes" in message
    assert "queue_size" in message.split("did you mean", 1)[1]


def test_strategy_option_wrong_type():
    message = usage_error(resolve_recipe, overrides=["strategy.seed.queue_size=big"])
    assert "strategy.seed.queue_size" in message


def test_empty_strategy_section_is_rejected():
    message = usage_error(resolve_recipe, {"strategy": {}})
    assert "seed" in message


def test_strategy_names_no_strategy():
    message = usage_error(resolve_recipe, strategy="+")
    assert "strategy" in message


def test_strategy_seed_keeps_recipe_settings():
    recipe = resolve_recipe("default", strategy="seed")
    assert list(recipe.strategy) == ["seed"]
    assert recipe.strategy["seed"].queue_size == 2048  # from default.yaml, not the 65536 schema default
    assert recipe.strategy["seed"].tau_teacher == 0.05


def test_strategy_then_set_override():
    recipe = resolve_recipe("default", strategy="seed", overrides=["strategy.seed.queue_size=128"])
    assert recipe.strategy["seed"].queue_size == 128
    assert recipe.strategy["seed"].tau_student == 0.2


def test_strategy_none_in_section_means_defaults():
    recipe = resolve_recipe({"strategy": {"seed": None}})
    assert recipe.strategy["seed"].queue_size == 65536
    assert recipe.strategy["seed"].tau_student == 0.2


def test_strategy_dict_recipe_gets_schema_defaults():
    recipe = resolve_recipe({})
    assert list(recipe.strategy) == ["seed"]
    assert recipe.train.lr == 0.05  # schema default (no YAML involved)
    assert recipe.teacher.input_size is None


# ----------------------------------------------------------------------------- precedence


def test_precedence_yaml_then_options_then_set(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  lr: 0.01\n  epochs: 3\n  seed: 7\ndata:\n  limit: 100\n", encoding="utf-8")

    only_yaml = resolve_recipe(path)
    assert (only_yaml.train.lr, only_yaml.train.epochs, only_yaml.data.limit) == (0.01, 3, 100)
    assert only_yaml.train.seed == 7

    with_options = resolve_recipe(path, options={"lr": 0.02, "epochs": 4, "limit": None})
    assert with_options.train.lr == 0.02
    assert with_options.train.epochs == 4
    assert with_options.data.limit == 100  # None option = keep the recipe's value

    with_set = resolve_recipe(path, options={"lr": 0.02, "epochs": 4}, overrides=["train.lr=0.03", "data.limit=50"])
    assert with_set.train.lr == 0.03
    assert with_set.train.epochs == 4
    assert with_set.data.limit == 50
    assert with_set.train.seed == 7


def test_options_map_to_their_keys(tmp_path):
    recipe = resolve_recipe(
        options={
            "teacher": "timm:resnet18",
            "student": "resnet18",
            "data": tmp_path,
            "epochs": 5,
            "max_steps": 9,
            "limit": 11,
            "batch_size": 16,
            "lr": 0.5,
            "out": tmp_path / "run",
            "seed": 3,
            "precision": "bf16",
            "teacher_weights": tmp_path / "w.safetensors",
        }
    )
    assert recipe.teacher.name == "timm:resnet18"
    assert recipe.teacher.weights == str(tmp_path / "w.safetensors")
    assert recipe.student.name == "resnet18"
    assert recipe.data.source == str(tmp_path)  # Path -> str
    assert recipe.train.epochs == 5
    assert recipe.train.max_steps == 9
    assert recipe.data.limit == 11
    assert recipe.train.batch_size == 16
    assert recipe.train.lr == 0.5
    assert recipe.out == str(tmp_path / "run")
    assert recipe.train.seed == 3
    assert recipe.train.precision == "bf16"
    # untouched keys still come from default.yaml
    assert recipe.teacher.input_size == 64


def test_set_as_dict():
    recipe = resolve_recipe(overrides={"train.lr": 0.2, "eval.enabled": False})
    assert recipe.train.lr == 0.2
    assert recipe.eval.enabled is False


def test_later_set_wins():
    recipe = resolve_recipe(overrides=["train.lr=0.1", "train.lr=0.2"])
    assert recipe.train.lr == 0.2


def test_dict_recipe_is_not_mutated():
    source = {"train": {"lr": 0.01}, "strategy": {"seed": {"queue_size": 64}}}
    resolve_recipe(source, options={"lr": 0.5}, strategy="seed", overrides=["strategy.seed.queue_size=8"])
    assert source == {"train": {"lr": 0.01}, "strategy": {"seed": {"queue_size": 64}}}


# ----------------------------------------------------------------------------- parse_set


def test_parse_set_yaml_scalars():
    parsed = parse_set(
        [
            "train.lr=0.1",
            "eval.enabled=true",
            "train.max_steps=null",
            "data.crop_scale=[0.2, 1.0]",
            "train.epochs=3",
            "teacher.name=timm:resnet18",
            "out= runs/x ",
        ]
    )
    assert parsed["train.lr"] == 0.1 and isinstance(parsed["train.lr"], float)
    assert parsed["eval.enabled"] is True
    assert parsed["train.max_steps"] is None
    assert parsed["data.crop_scale"] == [0.2, 1.0]
    assert parsed["train.epochs"] == 3 and isinstance(parsed["train.epochs"], int)
    assert parsed["teacher.name"] == "timm:resnet18"
    assert parsed["out"] == "runs/x"


def test_parse_set_splits_on_first_equals_and_empty_is_null():
    parsed = parse_set(["out=a=b", "train.clip_grad="])
    assert parsed == {"out": "a=b", "train.clip_grad": None}


def test_parse_set_unparsable_yaml_stays_a_string():
    assert parse_set(["out=[unclosed"]) == {"out": "[unclosed"}


@pytest.mark.parametrize("item", ["novalue", "=0.1", " =1"])
def test_parse_set_rejects_items_without_key_and_value(item):
    message = usage_error(parse_set, [item])
    assert "key.path=value" in message


def test_parse_set_none_and_dict():
    assert parse_set(None) == {}
    assert parse_set({"a.b": 1}) == {"a.b": 1}


def test_float_given_as_string_is_accepted():
    # PyYAML reads 1e-4 (no dot) as a string; float fields accept it
    assert parse_set(["train.lr=1e-4"]) == {"train.lr": "1e-4"}
    recipe = resolve_recipe(overrides=["train.lr=1e-4", "strategy.seed.tau_teacher=1e-3"])
    assert recipe.train.lr == pytest.approx(0.0001)
    assert isinstance(recipe.train.lr, float)
    assert recipe.strategy["seed"].tau_teacher == pytest.approx(0.001)
    assert resolve_recipe({"train": {"clip_grad": "2.5"}}).train.clip_grad == 2.5
    assert resolve_recipe({"data": {"crop_scale": ["0.5", "1"]}}).data.crop_scale == (0.5, 1.0)


def test_float_string_not_accepted_for_int_fields():
    message = usage_error(resolve_recipe, overrides=["train.batch_size=1e2"])
    assert "train.batch_size" in message


def test_yaml_nan_literal_is_parsed_as_float():
    value = parse_set(["train.lr=.nan"])["train.lr"]
    assert isinstance(value, float) and math.isnan(value)


# ----------------------------------------------------------------------------- recipe files


def test_find_recipe_missing_name_did_you_mean():
    message = usage_error(find_recipe, "defualt")
    assert "'defualt'" in message
    assert "did you mean 'default'" in message


def test_find_recipe_without_close_match_lists_recipes():
    message = usage_error(find_recipe, "zzzzzzzz")
    assert "default" in message and "seed-vit" in message


def test_resolve_missing_recipe_is_usage_error():
    with pytest.raises(UsageError, match="did you mean 'seed-vit'"):
        resolve_recipe("seed_vit")


def test_find_recipe_accepts_a_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochs: 1\n", encoding="utf-8")
    assert find_recipe(path) == path
    assert find_recipe(str(path)) == path


def test_recipe_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- teacher\n- student\n", encoding="utf-8")
    message = usage_error(resolve_recipe, path)
    assert str(path) in message
    assert "mapping" in message


def test_recipe_file_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [0.1\n  epochs: 2\n", encoding="utf-8")
    message = usage_error(resolve_recipe, path)
    assert str(path) in message
    assert "YAML" in message


def test_recipe_file_with_unknown_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epochz: 2\n", encoding="utf-8")
    message = usage_error(resolve_recipe, path)
    assert "'train.epochz'" in message and "epochs" in message


def test_empty_recipe_file_gives_schema_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert read_yaml(path) == {}
    recipe = resolve_recipe(path)
    assert recipe.train.epochs == 1 and recipe.train.images is None  # schema defaults, not default.yaml's
    assert recipe.teacher.input_size is None


def test_recipe_file_not_utf8(tmp_path):
    path = tmp_path / "bad-encoding.yaml"
    path.write_bytes(b"train:\n  lr: \xff\xfe\n")
    message = usage_error(read_yaml, path)
    assert str(path) in message


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("eval.latency_runs=0", "eval.latency_runs must be a whole number >= 1"),
        ("eval.max_test=0", "eval.max_test must be a whole number >= 1"),
        ("eval.max_train=0", "eval.enabled=false turns evaluation off"),
        ("eval.knn_k=-3", "eval.knn_k must be a whole number >= 1"),
        ("eval.knn_temperature=0", "eval.knn_temperature must be > 0"),
        ("eval.online_images=-1", "eval.online_images must be 0"),
    ],
)
def test_eval_settings_out_of_range_are_refused_with_the_recipe(override, fragment):
    """Before anything trains: these used to crash in the evaluation after the whole run."""
    with pytest.raises(UsageError, match=re.escape(fragment)):
        resolve_recipe(None, {}, overrides=[override])
