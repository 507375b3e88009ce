"""Recipe loading: typos name their place and the nearest valid name, --set overrides, one-sentence errors."""

import pytest

from hybridize.config import RecipeConfig, StageConfig, TrainConfig, load_recipe, validate, validate_against_model
from hybridize.errors import UserError

RECIPE = """\
teacher: smollm2-135m
data:
  train:
    synthetic: {tasks: [arithmetic, variable_tracking], n: 200, knobs: {arithmetic: {steps: 4}}}
  eval:
    synthetic: {tasks: [arithmetic], n: 50, seed: 3}
seed: 11
stages:
  - name: h15
    count: 15
    select: loo
    loss: reverse_kl
    train: {steps: 100, lr: 3e-4}
  - name: h18
    count: 18
    select: mmr
    train: {tokens: 1000000, lr: 1e-4, freeze: non_mixers}
  - name: sft
    kind: sft
    train: {steps: 50, seed: 5}
"""


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def test_recipe_loads_with_defaults_and_seeds_flowing_down(recipe_file):
    recipe = load_recipe(recipe_file)
    first, second, sft = recipe.stages
    assert first.loss.weights == {"reverse_kl": 1.0} and first.select == "loo"
    assert second.loss.weights == {"reverse_kl": 1.0} and second.train.freeze == "non_mixers"
    assert sft.loss.weights == {"ce": 1.0} and sft.select is None
    assert first.train.lr == 3e-4  # YAML reads 3e-4 as a string; the field parses it
    assert (first.train.seed, second.train.seed, sft.train.seed) == (11, 11, 5)
    assert recipe.data.train.synthetic.seed == 11 and recipe.data.eval.synthetic.seed == 3
    assert recipe.eval.max_new_tokens == 512


def test_unknown_field_names_its_path_and_the_nearest_valid_name(recipe_file):
    recipe_file.write_text(RECIPE.replace("{tokens: 1000000, lr: 1e-4", "{tokens: 1000000, lerning_rate: 1e-4"))
    message = error_of(load_recipe, recipe_file)
    assert message == f"recipe {recipe_file}: unknown field 'lerning_rate' in stages[1].train; did you mean 'lr'?"


def test_unknown_field_without_a_near_name_lists_the_valid_ones(recipe_file):
    message = error_of(load_recipe, recipe_file, ["stages.0.zzz=1"])
    assert "unknown field 'zzz' in stages[0]; valid fields: name, kind, count" in message


def test_top_level_typo_is_suggested(recipe_file):
    recipe_file.write_text(RECIPE.replace("teacher:", "teachr:"))
    assert "unknown field 'teachr'; did you mean 'teacher'?" in error_of(load_recipe, recipe_file)


def test_set_overrides_nested_values_parsed_as_yaml(recipe_file):
    recipe = load_recipe(recipe_file, ["stages.1.train.lr=2e-5", "stages.0.loss=forward_kl", "seed=3",
                                       "stages.0.train.bf16=true"])
    assert recipe.stages[1].train.lr == 2e-5
    assert recipe.stages[0].loss.weights == {"forward_kl": 1.0}
    assert recipe.seed == 3 and recipe.stages[1].train.seed == 3
    assert recipe.stages[0].train.bf16 is True


def test_set_that_misses_the_recipe_says_where(recipe_file):
    assert "stages is a list of 3 entries; '7' is not an index in it" in error_of(
        load_recipe, recipe_file, ["stages.7.train.lr=1e-4"])
    assert "must look like key=value" in error_of(load_recipe, recipe_file, ["stages.0.train.lr"])
    assert "stages.0.loss holds the single value 'reverse_kl'; set stages.0.loss as a whole instead" in error_of(
        load_recipe, recipe_file, ["stages.0.loss.temperature=2"])


def test_bad_values_give_one_sentence_with_the_field_path(recipe_file):
    assert error_of(load_recipe, recipe_file, ["stages.0.train.lr=-1"]) == (
        f"recipe {recipe_file}: invalid stages[0].train.lr: Input should be greater than 0 (got -1)")
    message = error_of(load_recipe, recipe_file, ["stages.0.train.freeze=mixers"])
    assert message.startswith(f"recipe {recipe_file}: invalid stages[0].train.freeze:") and "\n" not in message
    assert "unknown loss ['revers_kl']" in error_of(load_recipe, recipe_file, ["stages.0.loss=revers_kl"])
    assert "unknown task 'arithmetc'; did you mean 'arithmetic'?" in error_of(
        load_recipe, recipe_file, ["data.train.synthetic.tasks=[arithmetc]"])


def test_stage_targets_must_fit_the_stage_kind():
    base = {"name": "s", "train": {"steps": 1}}
    assert "sft stage converts no layers" in error_of(validate, StageConfig, {**base, "kind": "sft", "count": 3})
    assert "select: explicit needs `layers`" in error_of(validate, StageConfig, {**base, "select": "explicit",
                                                                                 "count": 3})
    assert "needs exactly one of count or fraction" in error_of(validate, StageConfig, {**base, "count": 3,
                                                                                        "fraction": 0.5})
    assert validate(StageConfig, {**base, "layers": [1, 2]}).select == "explicit"
    assert "give exactly one of steps or tokens" in error_of(validate, TrainConfig, {"steps": 1, "tokens": 5})
    assert "missing required field 'train' in stages[0]" in error_of(
        validate, RecipeConfig, {"teacher": "t", "data": {"train": "x"}, "stages": [{"name": "a", "count": 1}]})


def test_targets_are_checked_against_the_teacher_layer_count(recipe_file):
    recipe = load_recipe(recipe_file)
    assert validate_against_model(recipe, 30) == [15, 18, None]
    assert "count 18 gives 18 mixer layers, outside 1..16" in error_of(validate_against_model, recipe, 16)
    falling = load_recipe(recipe_file, ["stages.1.count=12"])
    assert "target 12 mixer layers is below the 15 of stage h15" in error_of(validate_against_model, falling, 30)
    explicit = load_recipe(recipe_file, ["stages.0.select=explicit", "stages.0.count=null", "stages.0.layers=[3, 40]"])
    assert "stages[0] (h15): layer 40 is out of range; the teacher has layers 0..29" in error_of(
        validate_against_model, explicit, 30)


def test_missing_recipe_bad_yaml_and_missing_data_path_are_user_errors(tmp_path, recipe_file):
    assert "does not exist" in error_of(load_recipe, tmp_path / "nope.yaml")
    recipe_file.write_text("teacher: [unclosed\n")
    assert "is not valid YAML at line" in error_of(load_recipe, recipe_file)
    recipe_file.write_text(RECIPE)
    assert "data.train path rows.jsonl does not exist" in error_of(load_recipe, recipe_file, ["data.train=rows.jsonl"])
