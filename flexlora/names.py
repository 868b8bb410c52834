"""The closed sets of names: every choice a config field offers and the adapter tensors each FlexLoRA layer holds.

The config's validation, the engine checks in ``flexlora.distributed``, the implementations (``importance``,
``regulariser``, the recipe kit's methods) and the README's option lists all read these; tests/test_config_source.py
checks that each implementation and the README cover exactly these names. Imports nothing, so any module may use it.
"""

from __future__ import annotations

# FlexLoRAConfig.importance: the paper's eqs. 3, 5-7, 10, 11
IMPORTANCE_METRICS = ("entropy", "nuclear", "frobenius", "sensitivity", "elem", "mat")
# the metrics that read each adapter parameter's gradient after the optimizer step (the others read only lambda)
GRADIENT_METRICS = ("sensitivity",)
# FlexLoRAConfig.orth_reg: flexlora.regulariser says what each form computes
ORTH_REG_FORMS = ("mean_norm", "eq2_sum")
MODES = ("flex", "prune_only", "expand_only")
EXPAND_INITS = ("zero_impact", "small", "zero", "orthogonal")
# the expand_init values that orthogonalise a new direction against the whole active P and Q, which a sharded engine
# spreads over processes
GLOBAL_EXPAND_INITS = ("small", "orthogonal")
FACTOR_INITS = ("gaussian", "orthonormal")
SCHEDULES = ("paper", "constant")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")

# A recipe's ``method``: FlexLoRA, or PEFT's LoRA / AdaLoRA under the same budget (flexlora.recipe_kit.methods)
METHODS = ("flexlora", "lora", "adalora")
METHOD_LABELS = {"flexlora": "FlexLoRA", "lora": "LoRA", "adalora": "AdaLoRA"}  # as tables print them

# The trainable tensors of a FlexLoRA layer (Delta W = P diag(lambda) Q) and, with its rank mask, what a saved
# adapter holds per layer
FACTOR_TENSORS = ("lora_P", "lora_lambda", "lora_Q")
ADAPTER_TENSORS = (*FACTOR_TENSORS, "rank_mask")
