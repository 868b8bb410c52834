import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

# The GLUE tsv files live beside the checkout (../shared/data/glue); a clone elsewhere skips what needs them.
GLUE_DIR = Path(os.environ.get("FLEXLORA_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
needs_glue_data = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE tsv files not found at {GLUE_DIR}")


def make_tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tokens():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 12), generator=generator)
