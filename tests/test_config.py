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
        # types before arithmetic, and bool is not an integer
        ({"r": True}, "r must be an integer"),
        ({"r": "eight"}, "r must be an integer"),
        ({"lora_alpha": "16"}, "lora_alpha must be"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"max_rank": 2.5}, "max_rank must be"),
        ({"b0": True}, "b0 must be an integer"),
        # finite and in range
        ({"init_std": float("inf")}, "init_std must be a finite number"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"small_init_value": -5}, "small_init_value must be a finite number > 0"),
        ({"orth_reg_weight": float("inf")}, "orth_reg_weight must be a finite number"),
        ({"entropy_eps": float("nan")}, "entropy_eps must be a finite number"),
        # lists of module names, and a regex that compiles
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),
        ({"modules_to_save": [""]}, "modules_to_save entries"),
        ({"target_modules": "["}, r"target_modules '\[' is not a valid regular expression"),
        ({"target_modules": ["q_proj", ""]}, "target_modules entries"),
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


def test_from_yaml_names_the_file_of_a_broken_or_non_utf8_yaml(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("target_modules: [q_proj\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid yaml") as error:
        FlexLoRAConfig.from_yaml(broken)
    assert "<unicode string>" not in str(error.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\ntarget_modules: [q_proj]\n")
    with pytest.raises(ValueError, match="latin.yaml: not UTF-8"):
        FlexLoRAConfig.from_yaml(latin)


def test_a_bad_r_is_reported_not_a_type_error_from_the_default_capacity():
    with pytest.raises(ValueError) as error:
        FlexLoRAConfig(target_modules=["q_proj"], r="8")
    assert error.value.problems == ["r must be an integer >= 1, got '8'"]  # one problem: max_rank is not guessed


def test_warmup_after_the_last_allocation_step_is_refused_unless_allocation_is_frozen():
    values = {"target_modules": ["q_proj"], "r": 8, "b0": 4, "t_warmup": 95, "t_final": 10}
    with pytest.raises(ValueError) as error:
        FlexLoRAConfig(**values, total_steps=100)
    message = str(error.value)
    assert all(word in message for word in ("t_warmup (95)", "t_final", "total_steps", "lower t_warmup", "b0=0"))
    FlexLoRAConfig(**{**values, "b0": 0}, total_steps=100)  # allocation frozen on purpose: legal
    FlexLoRAConfig(**{**values, "t_warmup": 90}, total_steps=100)  # one allocation step, at t = T - t_final: legal
    # total_steps filled in later (the Trainer callback): validate() applies the same rule
    config = FlexLoRAConfig(**values)
    config.total_steps = 100
    with pytest.raises(ValueError, match=r"t_warmup \(95\) is after total_steps - t_final"):
        config.validate()


def _linears(*shapes: tuple[int, int]):
    from torch import nn

    return nn.ModuleDict({f"m{i}": nn.Linear(d_in, d_out) for i, (d_in, d_out) in enumerate(shapes)})


def test_inject_refuses_a_capacity_above_the_matrix_rank():
    import flexlora

    config = FlexLoRAConfig(target_modules=r"m\d", r=4)  # capacity ceil(1.5 r) = 6
    with pytest.raises(ValueError) as error:
        flexlora.inject(_linears((32, 32), (32, 5)), config)
    message = str(error.value)
    assert "m1 [d_out=5, d_in=32]" in message and "max_rank=6" in message and "r=4" in message
    assert "m0 [" not in message  # only the matrix too small is named
    flexlora.inject(_linears((32, 32), (32, 6)), config)  # max_rank == min(d_out, d_in): fine


def test_inject_checks_a_target_regex_changed_after_construction():
    import flexlora

    config = FlexLoRAConfig(target_modules=["m0"], r=2)
    config.target_modules = "m[0"
    with pytest.raises(ValueError, match="target_modules 'm\\[0' is not a valid regular expression"):
        flexlora.inject(_linears((8, 8)), config)


@pytest.mark.parametrize(
    "mode, b0, matrices, allowed",
    [
        ("flex", 2, 4, True),
        ("flex", 3, 4, False),
        ("flex", 1, 1, False),
        ("flex", 0, 1, True),
        ("prune_only", 3, 3, True),
        ("expand_only", 4, 3, False),
    ],
)
def test_allocator_refuses_a_b0_no_step_can_honour(mode, b0, matrices, allowed):
    import flexlora

    config = FlexLoRAConfig(target_modules=r"m\d", r=2, b0=b0, mode=mode, total_steps=10)
    adapters = flexlora.inject(_linears(*[(8, 8)] * matrices), config)
    if allowed:
        flexlora.RankAllocator(adapters)
        return
    with pytest.raises(ValueError) as error:
        flexlora.RankAllocator(adapters)
    assert f"b0={b0}" in str(error.value) and f"N={matrices}" in str(error.value)
