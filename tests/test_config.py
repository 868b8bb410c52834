import pytest

from flexlora import FlexLoRAConfig


def test_defaults_follow_the_paper_budget():
    config = FlexLoRAConfig(target_modules=["q_proj"], r=8)
    assert config.max_rank == 12  # ceil(1.5 * r)
    assert FlexLoRAConfig(target_modules=["q_proj"], r=5).max_rank == 8


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"target_modules": []}, "target_modules is empty"),
        ({"r": 0}, "r must be"),
        ({"max_rank": 4}, "max_rank must be"),
        ({"min_rank": 9}, "min_rank must be"),
        ({"importance": "magic"}, "importance must be one of"),
        ({"mode": "grow"}, "mode must be one of"),
        ({"expand_init": "ones"}, "expand_init must be one of"),
        ({"delta_t": 0}, "delta_t must be"),
        ({"total_steps": 10, "t_final": 10}, "t_final"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
    ],
)
def test_invalid_values_are_named(changes, message):
    values = {"target_modules": ["q_proj"], "r": 8, **changes}
    with pytest.raises(ValueError, match=message):
        FlexLoRAConfig(**values)


def test_from_yaml_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("target_modules: [q_proj, v_proj]\nr: 4\nimportance: nuclear\n")
    config = FlexLoRAConfig.from_yaml(path)
    assert config.r == 4 and config.max_rank == 6 and config.importance == "nuclear"
    assert FlexLoRAConfig.from_dict(config.to_dict()) == config
    path.write_text("target_modules: [q_proj]\nrank: 4\n")
    with pytest.raises(ValueError, match="unknown FlexLoRAConfig field.*rank"):
        FlexLoRAConfig.from_yaml(path)
