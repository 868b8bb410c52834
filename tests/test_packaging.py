"""Two floors: the method library (flexlora) works without the recipe kit's dependencies and imports nothing above
it; recipes import only the library and the kit, never each other."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT_ONLY = ["datasets", "tensorboard", "matplotlib", "scipy", "sklearn", "lm_eval", "gguf", "sentencepiece", "PIL"]
ABSENT = KIT_ONLY + ["bitsandbytes"]  # and the optional 4-bit backend (model.quantization=nf4)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_flexlora_trains_with_the_kit_dependencies_absent(tmp_path):
    """A user's own loop: inject, train with allocation, export, in a process where the kit's extra packages and
    bitsandbytes are not findable (as if not installed)."""
    script = textwrap.dedent(f"""
        import importlib.machinery, sys
        BLOCKED = set({ABSENT!r})

        class Absent(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                return None if name.split(".")[0] in BLOCKED else super().find_spec(name, path, target)

        sys.meta_path[:] = [Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
        import torch, flexlora, flexlora.accelerate_setup, flexlora.trainer
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
        config = flexlora.FlexLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, b0=1, t_warmup=1, t_final=1,
                                         delta_t=1, total_steps=6)
        adapters = flexlora.inject(model, config)
        allocator = flexlora.RankAllocator(adapters)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tokens = torch.randint(0, 64, (2, 8))
        for step in range(1, 7):
            model(tokens, labels=tokens).loss.backward()
            optimizer.step()
            allocator.step(step, optimizer)
            optimizer.zero_grad()
        flexlora.export_peft(adapters, sys.argv[1])
        loaded = sorted({{m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("flexlora.recipe_kit")}})
        print("moves", len(allocator.history), "loaded", loaded)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "peft")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("loaded []"), out.stdout
    assert int(out.stdout.split()[1]) > 0  # ranks moved


def test_the_library_imports_nothing_above_it():
    for path in (ROOT / "flexlora").glob("*.py"):
        above = {
            m
            for m in imported_modules(path)
            if m.startswith("flexlora.recipe_kit") or m.split(".")[0] in ("recipes", "bench", "eval")
        }
        assert not above, f"{path.name} imports {above}"


def test_kit_and_recipes_import_only_downwards():
    for path in (ROOT / "flexlora" / "recipe_kit").rglob("*.py"):
        above = {m for m in imported_modules(path) if m.split(".")[0] in ("recipes", "bench", "eval")}
        assert not above, f"{path} imports {above}"
    for path in (ROOT / "recipes").glob("*.py"):
        others = {m for m in imported_modules(path) if m.split(".")[0] in ("recipes", "bench", "eval")}
        assert not others, f"{path.name} imports {others}"
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
