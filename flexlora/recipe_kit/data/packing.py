"""Padding-free micro-batches for causal LMs: the rows of a micro-batch as one sequence, kept from attending to each
other (``data.packing`` in the commonsense recipe)."""

from __future__ import annotations

import torch

from ..run_config import ConfigError

PACKING_ATTENTION = ("sdpa", "flash_attention_2")


def packing_problem(packing: object) -> str | None:
    """What is wrong with a ``data.packing`` value, or None when it is one of true, false, auto."""
    if isinstance(packing, bool) or packing == "auto":  # (1 == True: a number must not pass as a bool)
        return None
    return f"packing must be true, false or auto, got {packing!r}"


def packed_collator_for(packing: bool | str, attn_implementation: str | None) -> PackedCollator | None:
    """The collator ``data.packing`` asks for under the model's attention implementation; None = padded batches.

    ``auto`` packs where packed rows provably stay apart (``PACKING_ATTENTION``) and pads under anything else, so the
    default never fails on an eager model; ``true`` packs and refuses the others (PackedCollator's error); ``false``
    pads.
    """
    if problem := packing_problem(packing):
        raise ConfigError(f"data.{problem}", ["data.packing"])
    if packing == "auto":
        packing = attn_implementation in PACKING_ATTENTION
    return PackedCollator(attn_implementation) if packing else None


class PackedCollator:
    """Padding-free micro-batches (``data.packing``): the rows of a micro-batch concatenated into one sequence.

    Returns ``input_ids``, ``labels`` and ``position_ids`` of shape ``[1, total tokens]``: positions restart at 0 with
    every row, and the label of each row's first token is -100, so the last token of one row never learns to predict
    the first of the next (the unpacked run has no target there either: a row's first token has no previous token).
    The set of target tokens is that of the padded batch, and transformers' causal-LM loss is the mean over the
    batch's target tokens, so the loss (and its gradient) is the padded batch's.

    Rows must not see each other in attention, and position ids alone do not ensure that in transformers 5.24, so:

    - ``sdpa``: an explicit block-diagonal causal mask, bool ``[1, 1, T, T]`` (True = attend), which transformers
      passes to ``scaled_dot_product_attention`` unchanged (a 4-D mask is taken as prepared). Its memory and the
      attention work grow with the square of the packed length: it saves the padded tokens, not attention work
      (bench/results/packing.md measures the trade on the commonsense data).
    - ``flash_attention_2``: no mask; transformers' flash path reads row boundaries from ``position_ids`` and runs
      the variable-length kernel (as with ``transformers.DataCollatorWithFlattening``). Untested here (no GPU).
    - anything else (eager, flex_attention, ...) is refused: rows were not shown to stay apart there.
    """

    def __init__(self, attn_implementation: str | None):
        if attn_implementation not in PACKING_ATTENTION:
            raise ConfigError(
                f"data.packing=true is not supported with attn_implementation={attn_implementation!r}: packed rows are "
                f"only kept from attending to each other under {' or '.join(PACKING_ATTENTION)}; use "
                "model.attn_implementation=sdpa, or data.packing=auto (padded batches there) or false",
                ["data.packing", "model.attn_implementation"],
            )
        self.attn_implementation = attn_implementation

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PackedCollator: an empty micro-batch")
        input_ids, labels, positions, lengths = [], [], [], []
        for row in features:
            ids, row_labels = list(row["input_ids"]), list(row["labels"])
            if not ids or len(ids) != len(row_labels):
                raise ValueError(f"PackedCollator: a row with {len(ids)} input ids and {len(row_labels)} labels")
            input_ids += ids
            labels += [-100] + row_labels[1:]  # no target across the boundary (nor at a row's start, as unpacked)
            positions += range(len(ids))
            lengths.append(len(ids))
        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }
        if self.attn_implementation == "sdpa":
            batch["attention_mask"] = block_causal_mask(lengths)[None, None]
        return batch


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """Bool ``[T, T]``, True where query ``i`` may attend to key ``j``: same row and ``j <= i``."""
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    total = int(row.numel())
    causal = torch.ones(total, total, dtype=torch.bool).tril_()
    return causal & (row[:, None] == row[None, :])
