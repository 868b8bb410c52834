"""Padding-free packed micro-batches next to padded ones on the commonsense data (issue 13, item 2).

The micro-batches are the commonsense recipe's own: rows loaded, subset and tokenised by the recipe kit's functions
with a recipe config's data section, in the order of the recipe's sampler (epoch 0), ``train.micro_batch_size``
rows each. Each is collated twice, by the recipe's padded collator (``DataCollatorForSeq2Seq``, right padding to a
multiple of 8) and by ``PackedCollator`` (``data.packing``), and a training step (collate + forward + backward) is
timed on each layout in turn, padded and packed on the same micro-batch with the order alternating, so the load of a
shared machine hits both alike. Reported per setting:

1. the padding fraction: pad tokens / tokens of the padded batches, over every micro-batch of the epoch (the packed
   batches have none), and what removing it can give at most when a step costs in proportion to its tokens;
2. real (non-pad) tokens per second of process CPU time for both layouts (wall time too), and the per-step ratio
   packed / padded tokens/s with its median and 25-75 % range;
3. that the layouts agree on the model used: loss of the first micro-batch, padded and packed, in eval mode.

Settings: ``quickstart`` (recipes/configs/quickstart.yaml: its row subset, micro-batch and cutoff) and
``llm_adapters`` (recipes/configs/llama3_8b_cr_r8.yaml: every row of the LLM-Adapters train files, its micro-batch
and cutoff). The model is the quickstart's: SmolLM2-135M-Instruct in fp32 under sdpa with the quickstart's adapter
(method and adapter section) attached through the recipe kit's ``build_method``.

    python -m bench.packing --cpu                   # SmolLM2 on this CPU, writes bench/results/packing.{md,json}
    python -m bench.packing --smoke --out /tmp/x    # seconds: tiny random Llama on generated rows
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, PreTrainedTokenizerFast

from bench.common import CLOCKS, load_model, smollm2_fp32_dir, tiny_llama
from bench.reporting import load_averages, markdown_table, provenance
from flexlora.recipe_kit.data.commonsense import load_rows, select_rows, tokenize_rows, training_prompt
from flexlora.recipe_kit.data.packing import PackedCollator
from flexlora.recipe_kit.data.synthetic import write_synthetic_dataset
from flexlora.recipe_kit.loop import EpochPermutation
from flexlora.recipe_kit.methods import build_method
from flexlora.recipe_kit.models import ensure_pad_token
from flexlora.recipe_kit.run_config import load_config
from recipes.llama3_cr import RecipeConfig

SETTINGS = {
    "quickstart": "recipes/configs/quickstart.yaml",
    "llm_adapters": "recipes/configs/llama3_8b_cr_r8.yaml",
}
TARGET_RATIO = 1.3  # issue 13: packing >= 1.3x tokens/s on the commonsense data
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)  # for the padding-by-micro-batch table (the recipe's own size is measured)
PAD_MULTIPLE = 8  # the recipe's DataCollatorForSeq2Seq(pad_to_multiple_of=8)
PROFILES = {
    "smoke": dict(model="tiny", steps=2, warmup=1, threads=1),
    # One intra-op thread: on a shared 2-core machine a descheduled second thread stalls every parallel region at its
    # barrier, which adds the neighbours' load to the timings instead of this process's own work.
    "cpu": dict(model="smollm2", steps=48, warmup=2, threads=1),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument(
        "--smoke", action="store_true", help="tiny random Llama on generated rows, seconds (for tests)"
    )
    profile.add_argument("--cpu", action="store_true", help="the CPU measurement (default)")
    parser.add_argument(
        "--model", choices=("tiny", "smollm2"), help="tiny (random; a tokenizer trained on the rows) or smollm2 (fp32)"
    )
    parser.add_argument("--steps", type=int, help="timed micro-batches per setting, each stepped padded and packed")
    parser.add_argument("--warmup", type=int, help="untimed padded + packed steps before each setting's timed ones")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    for key, value in PROFILES["smoke" if args.smoke else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


# ---- model and tokenizer -------------------------------------------------------------------------------
def trained_tokenizer(data_path: str):
    """A byte-level BPE tokenizer (vocabulary 500, an EOS token) trained offline on the rows' prompts: the --smoke
    model's tokenizer, which makes rows of about the real ones' token counts."""

    eos = "<|end_of_text|>"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator((training_prompt(row) for row in load_rows(data_path)[0]), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)


def load_model_and_tokenizer(name: str, data_path: str):
    """(model, tokenizer) as the recipe prepares them: pad token set, right padding, no KV cache, sdpa."""

    if name == "tiny":
        tokenizer = trained_tokenizer(data_path)
        model = tiny_llama()
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_fp32_dir())
        model = load_model("smollm2", "cpu", torch.float32)
    ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    return model, tokenizer


# ---- the recipe's micro-batches ------------------------------------------------------------------------
@dataclass
class Setting:
    name: str
    config_path: str
    data_path: str
    micro_batch_size: int
    cutoff_len: int
    train_on_inputs: bool
    rows: int  # rows after the config's subset, before tokenisation
    micro_batches: list[list[dict[str, list[int]]]]  # epoch 0, in the recipe sampler's order


def load_recipe_config(path: str):

    return load_config(RecipeConfig, path)


def build_setting(name: str, config, tokenizer, data_path: str) -> Setting:
    """The micro-batches the recipe's loader yields in epoch 0 for ``config``, its rows read from ``data_path``."""

    data = config.data
    rows, _ = load_rows(data_path, data.split)
    rows = select_rows(rows, data.max_samples, data.seed)
    examples = tokenize_rows(
        rows, tokenizer, data.cutoff_len, data.train_on_inputs, data.add_eos_token, source=data_path
    )
    order = list(EpochPermutation(len(examples), config.train.seed))
    size = config.train.micro_batch_size
    batches = [[examples[i] for i in order[start : start + size]] for start in range(0, len(order), size)]
    return Setting(name, SETTINGS[name], data_path, size, data.cutoff_len, data.train_on_inputs, len(rows), batches)


def padded_width(lengths: list[int]) -> int:
    """Width of the recipe's padded batch: the longest row, rounded up to a multiple of 8."""
    return -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE


def padding_summary(setting: Setting, padded_collator) -> dict:
    """Tokens of the padded batches over the whole epoch, counted on the collator's own output."""
    real = padded = 0
    for batch in setting.micro_batches:
        mask = padded_collator([dict(row) for row in batch])["attention_mask"]
        if mask.shape[1] != padded_width([len(row["input_ids"]) for row in batch]):  # the by-size table relies on it
            raise AssertionError(f"padded_width gives another width than the collator's {tuple(mask.shape)}")
        real += int(mask.sum())
        padded += mask.numel()
    lengths = [len(row["input_ids"]) for batch in setting.micro_batches for row in batch]
    fraction = (padded - real) / padded
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_fraction": fraction,
        "ceiling": 1 / (1 - fraction),
        "mean_length": statistics.mean(lengths),
        "max_length": max(lengths),
    }


def padding_by_micro_batch(setting: Setting) -> dict[int, float]:
    """Padding fraction had the same rows in the same order come in micro-batches of other sizes."""
    lengths = [len(row["input_ids"]) for batch in setting.micro_batches for row in batch]
    fractions = {}
    for size in MICRO_BATCH_SIZES:
        padded = sum(
            padded_width(lengths[i : i + size]) * len(lengths[i : i + size]) for i in range(0, len(lengths), size)
        )
        fractions[size] = 1 - sum(lengths) / padded
    return fractions


# ---- timing --------------------------------------------------------------------------------------------
def timed_step(model, collator, batch: list[dict]) -> tuple[dict[str, float], float, int]:
    """Seconds of collate + forward + backward on every clock, the loss, and the tokens the model ran on."""
    starts = {clock: read() for clock, read in CLOCKS.items()}
    inputs = collator([dict(row) for row in batch])
    loss = model(**inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {clock: read() - starts[clock] for clock, read in CLOCKS.items()}, loss.item(), inputs["input_ids"].numel()


@torch.no_grad()
def layout_agreement(model, collators: dict, batch: list[dict]) -> dict[str, float]:
    """Loss of one micro-batch padded and packed, in eval mode (dropout off), on the benchmarked model."""
    model.eval()
    losses = {name: model(**collator([dict(row) for row in batch])).loss.item() for name, collator in collators.items()}
    model.train()
    return {**losses, "abs_difference": abs(losses["padded"] - losses["packed"])}


def run_timing(model, collators: dict, setting: Setting, steps: int, warmup: int) -> list[dict]:
    """Padded and packed steps on the first ``steps`` micro-batches, alternating which layout goes first."""
    for _ in range(warmup):
        for collator in collators.values():
            timed_step(model, collator, setting.micro_batches[0])
    samples = []
    for index, batch in enumerate(setting.micro_batches[:steps]):
        names = list(collators) if index % 2 == 0 else list(reversed(collators))
        sample = {"real_tokens": sum(len(row["input_ids"]) for row in batch)}
        for name in names:
            times, loss, tokens = timed_step(model, collators[name], batch)
            sample.update(
                {f"{name}_{clock}_s": seconds for clock, seconds in times.items()},
                **{f"{name}_loss": loss, f"{name}_tokens": tokens},
            )
        samples.append(sample)
        print(
            f"{setting.name}: step {index + 1}/{min(steps, len(setting.micro_batches))}, "
            f"packed/padded {sample['padded_cpu_s'] / sample['packed_cpu_s']:.3f}, load {load_averages()}",
            file=sys.stderr,
        )
    return samples


def ratio_by_padding(samples: list[dict]) -> list[dict]:
    """Median cpu ratio of the micro-batches with less and with more padding than the timed ones' median: what
    packing gains depends on how much padding the micro-batch had."""
    ordered = sorted(samples, key=lambda s: 1 - s["real_tokens"] / s["padded_tokens"])
    halves = [ordered[: len(ordered) // 2], ordered[len(ordered) // 2 :]]
    rows = []
    for half in (h for h in halves if h):
        padding = [1 - s["real_tokens"] / s["padded_tokens"] for s in half]
        rows.append(
            {
                "micro_batches": len(half),
                "padding_min": min(padding),
                "padding_max": max(padding),
                "ratio_median": statistics.median(s["padded_cpu_s"] / s["packed_cpu_s"] for s in half),
            }
        )
    return rows


def timing_summary(samples: list[dict]) -> dict:
    summary = {}
    for clock in CLOCKS:
        ratios = [s[f"padded_{clock}_s"] / s[f"packed_{clock}_s"] for s in samples]  # = packed / padded tokens/s
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        tokens = sum(s["real_tokens"] for s in samples)
        summary[clock] = {
            "padded_tokens_per_s": tokens / sum(s[f"padded_{clock}_s"] for s in samples),
            "packed_tokens_per_s": tokens / sum(s[f"packed_{clock}_s"] for s in samples),
            "ratio_median": statistics.median(ratios),
            "ratio_q25": quartiles[0],
            "ratio_q75": quartiles[2],
        }
    return summary


# ---- report --------------------------------------------------------------------------------------------
def verdict(name: str, summary: dict) -> str:
    cpu = summary["cpu"]
    real = cpu["ratio_q25"] > 1
    target = "meets" if cpu["ratio_median"] >= TARGET_RATIO else "misses"
    gain = (
        "real (the whole 25-75 % range lies above 1)"
        if real
        else "not established (the 25-75 % range reaches 1 or below)"
    )
    return (
        f"- **{name}**: packed / padded tokens/s {cpu['ratio_median']:.3f}x (25-75 %: {cpu['ratio_q25']:.3f}-"
        f"{cpu['ratio_q75']:.3f}x); the gain is {gain}; it {target} the {TARGET_RATIO}x target."
    )


def report(args, command: str, model_label: str, results: dict, wall_s: float, loads: tuple[str, str]) -> str:
    paying = [name for name, r in results.items() if r["timing"]["cpu"]["ratio_q25"] > 1]
    lines = [
        "# Padding-free packed micro-batches vs padded (issue 13, item 2)",
        "",
        f"Model: {model_label}. Training step = collate + forward + backward (the optimizer step does not depend on "
        "the layout). Padded: `DataCollatorForSeq2Seq(padding=True, pad_to_multiple_of=8)`, right padding; packed: "
        "`PackedCollator('sdpa')`, every row of a micro-batch in one sequence with a block-diagonal causal mask. "
        "Tokens/s counts real (non-pad) tokens, the same for both layouts; the main clock is process CPU time with "
        f"{args.threads} intra-op thread(s), which counts this process's work and not the time it waits for a core "
        "on a loaded machine. Ratio = packed / padded tokens/s of one micro-batch (= padded / packed step time); "
        "median and 25-75 % range over the timed micro-batches.",
        "",
        provenance(command, "cpu", wall_s, loads),
        "",
        "## Padding (every micro-batch of epoch 0)",
        "",
        markdown_table(
            [
                "setting",
                "config",
                "rows",
                "micro-batch",
                "cutoff_len",
                "mean / max row tokens",
                "real tokens",
                "padded tokens",
                "padding fraction",
                "ceiling 1/(1-f)",
            ],
            [
                [
                    name,
                    f"`{r['config']}`",
                    r["rows"],
                    r["micro_batch_size"],
                    r["cutoff_len"],
                    f"{r['padding']['mean_length']:.1f} / {r['padding']['max_length']}",
                    r["padding"]["real_tokens"],
                    r["padding"]["padded_tokens"],
                    f"{100 * r['padding']['padding_fraction']:.1f} %",
                    f"{r['padding']['ceiling']:.3f}x",
                ]
                for name, r in results.items()
            ],
        ),
        "",
        "The ceiling is what removing the padding gives at most if a step costs in proportion to its tokens. The same "
        "rows in the same order, in micro-batches of other sizes (padding fraction):",
        "",
        markdown_table(
            ["setting", *(f"micro-batch {size}" for size in MICRO_BATCH_SIZES)],
            [
                [name, *(f"{100 * r['padding_by_micro_batch'][size]:.1f} %" for size in MICRO_BATCH_SIZES)]
                for name, r in results.items()
            ],
        ),
        "",
        "## Tokens per second (training step)",
        "",
        markdown_table(
            [
                "setting",
                "timed micro-batches",
                "clock",
                "padded tokens/s",
                "packed tokens/s",
                "ratio median",
                "ratio 25-75 %",
            ],
            [
                [
                    name,
                    len(r["samples"]),
                    clock,
                    f"{s['padded_tokens_per_s']:.1f}",
                    f"{s['packed_tokens_per_s']:.1f}",
                    f"{s['ratio_median']:.3f}x",
                    f"{s['ratio_q25']:.3f}-{s['ratio_q75']:.3f}x",
                ]
                for name, r in results.items()
                for clock, s in sorted(r["timing"].items())
            ],  # cpu first
        ),
        "",
        "Ratio (cpu) by the padding of the timed micro-batch itself, split at the median: packing saves the padded "
        "tokens but attends over the whole packed sequence (with micro-batches of 2 rows of equal length, twice the "
        "attention work of the padded batch), so its gain should follow the padding of each micro-batch; the split "
        "shows whether it does:",
        "",
        markdown_table(
            ["setting", "timed micro-batches", "their padding", "ratio median"],
            [
                [
                    name,
                    half["micro_batches"],
                    f"{100 * half['padding_min']:.1f}-{100 * half['padding_max']:.1f} %",
                    f"{half['ratio_median']:.3f}x",
                ]
                for name, r in results.items()
                for half in r["ratio_by_padding"]
            ],
        ),
        "",
        "Same loss either way (first micro-batch, eval mode, no dropout):",
        "",
        markdown_table(
            ["setting", "padded loss", "packed loss", "absolute difference"],
            [
                [
                    name,
                    f"{r['agreement']['padded']:.6f}",
                    f"{r['agreement']['packed']:.6f}",
                    f"{r['agreement']['abs_difference']:.2e}",
                ]
                for name, r in results.items()
            ],
        ),
        "",
        "## Verdict",
        "",
        *(verdict(name, r["timing"]) for name, r in results.items()),
        f"- Packing pays on this machine (25-75 % range above 1) in: {', '.join(paying) or 'none of the settings'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:

    args = parse_args(argv)
    command = "python -m bench.packing " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    loads_start, started = load_averages(), time.perf_counter()
    torch.set_num_threads(args.threads)

    configs = {name: load_recipe_config(path) for name, path in SETTINGS.items()}
    quickstart = configs["quickstart"]
    with tempfile.TemporaryDirectory() as generated:
        if args.smoke:  # seconds, and no dependence on ../shared: the recipe's generated data set for both settings
            data_paths = dict.fromkeys(
                configs, str(write_synthetic_dataset(Path(generated), 20, 1, quickstart.data.seed))
            )
        else:
            data_paths = {name: config.data.path for name, config in configs.items()}
            for name, path in data_paths.items():
                if not Path(path).exists():
                    raise FileNotFoundError(
                        f"{SETTINGS[name]}: data.path {path} does not exist; this benchmark measures "
                        "the real rows (run it from the repository root with ../shared present)"
                    )
        model, tokenizer = load_model_and_tokenizer(args.model, data_paths["quickstart"])
        settings = {name: build_setting(name, config, tokenizer, data_paths[name]) for name, config in configs.items()}

    # the quickstart's method and adapter section, as the recipe attaches them
    method = build_method(quickstart.method, model, quickstart.adapter, quickstart.train.max_steps)
    model = method.model.train()
    padded_collator = DataCollatorForSeq2Seq(
        tokenizer, padding=True, pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt"
    )
    collators = {"padded": padded_collator, "packed": PackedCollator(model.config._attn_implementation)}
    model_label = (
        "tiny random Llama (2 layers, hidden 32), BPE tokenizer trained on the generated rows"
        if args.model == "tiny"
        else "SmolLM2-135M-Instruct, fp32, sdpa"
    )
    model_label += f", {quickstart.method} r={quickstart.adapter.r} on {', '.join(quickstart.adapter.target_modules)}"

    results = {}
    for name, setting in settings.items():
        samples = run_timing(model, collators, setting, args.steps, args.warmup)
        results[name] = {
            "config": setting.config_path,
            "data_path": setting.data_path,
            "rows": setting.rows,
            "micro_batch_size": setting.micro_batch_size,
            "cutoff_len": setting.cutoff_len,
            "train_on_inputs": setting.train_on_inputs,
            "micro_batches": len(setting.micro_batches),
            "padding": padding_summary(setting, padded_collator),
            "padding_by_micro_batch": padding_by_micro_batch(setting),
            "agreement": layout_agreement(model, collators, setting.micro_batches[0]),
            "timing": timing_summary(samples),
            "ratio_by_padding": ratio_by_padding(samples),
            "samples": samples,
        }

    wall_s = time.perf_counter() - started
    text = report(args, command, model_label, results, wall_s, (loads_start, load_averages()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "packing.md").write_text(text)
    record = {
        "command": command,
        "model": model_label,
        "threads": args.threads,
        "wall_s": wall_s,
        "target_ratio": TARGET_RATIO,
        "settings": results,
    }
    (args.out / "packing.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
