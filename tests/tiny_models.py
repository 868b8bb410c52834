"""A tiny random Llama with an offline-trained tokenizer, saved like a hub model (shared by several test files)."""

from __future__ import annotations

from pathlib import Path


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (500 tokens) trained on template-like text. Like Llama-3's tokenizer it adds a BOS
    token and has no pad token. recipes/configs/models/tiny-tokenizer is this tokenizer, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from flexlora.recipe_kit.data.commonsense import training_prompt
    from flexlora.recipe_kit.data.synthetic import synthetic_rows

    corpus = [
        training_prompt(r) for task in ("synthetic_truefalse", "synthetic_choice") for r in synthetic_rows(task, 50, 0)
    ]
    corpus += ["Please choose the correct solution ending option answer true false question sentence"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def build_tiny_model_dir(directory: Path) -> Path:
    """A 2-layer Llama and the tiny tokenizer (build_tiny_tokenizer), saved like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    bos = tokenizer.bos_token_id
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
