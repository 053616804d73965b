"""Config checks: every preset passes, every meaningless value is refused naming its key."""
import importlib
import math

import pytest

from train import config as config_lib
from train.errors import ConfigError

EXPERIMENTS = ("gpt", "bert", "bert_classify", "bert_squad", "transformer", "gpt_sft", "llama")


def _presets():
    for name in EXPERIMENTS:
        module = importlib.import_module(f"experiments.{name}")
        presets = getattr(module, "PRESETS", None) or importlib.import_module(
            "experiments.bert").PRESETS
        for preset in presets:
            yield name, preset


@pytest.mark.parametrize("name, preset", list(_presets()))
def test_every_preset_passes_the_checks(name, preset):
    config_lib.validate(importlib.import_module(f"experiments.{name}").get_config(preset))


def _bad_value(check_text, value):
    """A value the rule's own description says is out of range."""
    if check_text.startswith("an integer >= "):
        return int(check_text.rsplit(" ", 1)[1]) - 1
    if check_text.startswith("one of") or isinstance(value, str):
        return "no_such_choice"
    if check_text.startswith("a device count"):
        return 0
    return math.nan if isinstance(value, float) else -1


def _configs_with_key(key):
    for name, preset in _presets():
        config = importlib.import_module(f"experiments.{name}").get_config(preset)
        present, value = config_lib._lookup(config, key)
        if present:
            return config, value
    return None, None


@pytest.mark.parametrize("key", sorted(config_lib.RULES))
def test_each_rule_refuses_an_out_of_range_value_naming_key_and_range(key):
    config, value = _configs_with_key(key)
    if config is None:
        pytest.skip(f"no experiment has {key} yet")
    _, text, *_ = config_lib.RULES[key]
    bad = _bad_value(text, value)
    section, _, leaf = key.rpartition(".")
    target = config if not section else config_lib._lookup(config, section)[1]
    target[leaf] = bad
    with pytest.raises(ConfigError) as e:
        config_lib.validate(config)
    assert f"config.{key}=" in str(e.value) and text in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    ({"model.num_heads": 3}, "not divisible by config.model.num_heads=3"),
    ({"batch_size": 8, "opt.grad_accum_steps": 3}, "grad_accum_steps=3"),
    ({"average_checkpoints": 5, "keep_checkpoints": 2}, "keep_checkpoints >= 5"),
    ({"opt.learning_rate": math.inf}, "opt.learning_rate=inf"),
    ({"opt.b2": 1.0}, "opt.b2=1.0"),
    ({"model.dropout_rate": 1.0}, "model.dropout_rate=1.0"),
    ({"model.lora_rank": 8, "average_checkpoints": 3, "keep_checkpoints": 3},
     "average A and B separately"),
    ({"model.lora_rank": 8, "model.lora_targets": ""}, "needs config.model.lora_targets"),
    ({"model.lora_rank": 8, "model.lora_targets": "query,gate"},
     "names gate, which a gpt model does not have"),
])
def test_values_that_cannot_work_together_are_refused(overrides, needle):
    from experiments import gpt
    config = gpt.get_config("smoke")
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_lib.validate(config)


def test_bert_masking_and_query_lengths_must_fit_the_row():
    from experiments import bert, bert_squad
    config = bert.get_config("smoke")
    config.data.max_predictions = config.data.max_len + 1
    with pytest.raises(ConfigError, match="max_predictions"):
        config_lib.validate(config)
    config = bert_squad.get_config("smoke")
    config.data.max_query_len = config.data.max_len
    with pytest.raises(ConfigError, match="max_query_len"):
        config_lib.validate(config)


def test_kv_heads_that_do_not_divide_the_heads_are_refused():
    from experiments import llama
    config = llama.get_config("smoke")
    config.model.num_kv_heads = 3
    with pytest.raises(ConfigError, match="num_heads=4 is not a multiple of config.model."
                                          "num_kv_heads=3"):
        config_lib.validate(config)
    config.model.num_kv_heads, config.model.head_dim, config.model.num_heads = 1, 16, 3
    config_lib.validate(config)  # an explicit head_dim: d_model need not divide by the heads
    config.model.lora_rank, config.model.lora_targets = 4, "query,wi"
    with pytest.raises(ConfigError, match="names wi, which a llama model does not have"):
        config_lib.validate(config)
    config.model.lora_rank = 0
    config.model.rope_type, config.model.rope_high_freq_factor = "llama3", 1.0
    with pytest.raises(ConfigError, match="rope_high_freq_factor=1.0 must exceed"):
        config_lib.validate(config)
