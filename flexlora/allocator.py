"""The rank allocator: at allocation steps, move directions from the least to the most important matrices.

Maths lives in pure functions (``importance``, ``schedule``, ``selection``, ``expansion``); this class only
gathers lambda, asks those functions for a decision, and applies it to the tensors (and optimizer state)
this process holds. Every process computes the same decision from the same gathered data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed
from .config import FlexLoRAConfig
from .errors import ModelMismatchError
from .expansion import direction_seed, new_direction
from .importance import matrix_importance
from .layer import FlexLoRALayer
from .model import Adapters
from .names import FACTOR_TENSORS
from .optim_state import reset_slot_state
from .schedule import ranks_to_move
from .selection import first_free_slot, select_matrices, weakest_active_slot


@dataclass(frozen=True)
class RankChange:
    step: int
    module: str
    action: str  # "prune" or "expand"
    slot: int
    rank_before: int
    rank_after: int
    score: float
    budget: int


def choose_changes(
    config: FlexLoRAConfig, scores: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor, budget: int
) -> list[tuple[str, int, int, float]]:
    """The last part of ``RankAllocator.decide``: which matrices prune and expand at budget b(t), and the slot each
    one changes, as (action, module index, slot, score)."""
    ranks = mask.sum(dim=1).long().tolist()
    prune, expand = select_matrices(scores.tolist(), ranks, budget, config.min_rank, config.max_rank, config.mode)
    decision = [("prune", i, weakest_active_slot(lam[i], mask[i]), float(scores[i])) for i in prune]
    decision += [("expand", i, first_free_slot(mask[i]), float(scores[i])) for i in expand]
    return decision


class _SensitivityTracker:
    """AdaLoRA's smoothed sensitivity x uncertainty (paper eqs. 5-6), kept per element of P, lambda, Q."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.avg_ipt: dict[int, torch.Tensor] = {}
        self.avg_unc: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], names: list[str]) -> None:
        for param, name in zip(params, names):
            if param.grad is None:
                raise RuntimeError(
                    f"importance='sensitivity' found no gradient on {name}: call allocator.step(...) after "
                    "optimizer.step() and before optimizer.zero_grad()"
                )
            local, _, _ = distributed.local_rows(param)
            grad, _, _ = distributed.local_rows(param.grad)
            ipt = (local * grad).abs().float()
            key = id(param)
            if key not in self.avg_ipt:
                self.avg_ipt[key] = torch.zeros_like(ipt)
                self.avg_unc[key] = torch.zeros_like(ipt)
            avg = self.avg_ipt[key]
            avg.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
            self.avg_unc[key].mul_(self.beta2).add_((ipt - avg).abs(), alpha=1 - self.beta2)

    def score(self, param: torch.Tensor) -> torch.Tensor | None:
        key = id(param)
        return self.avg_ipt[key] * self.avg_unc[key] if key in self.avg_ipt else None

    def reset_slot(self, param: torch.Tensor, slot: int, slot_dim: int, start: int, stop: int) -> None:
        for store in (self.avg_ipt, self.avg_unc):
            tensor = store.get(id(param))
            if tensor is None:
                continue
            if slot_dim == 1:
                tensor[:, slot] = 0
            elif start <= slot < stop:
                tensor[slot - start] = 0


class RankAllocator:
    def __init__(self, adapters: Adapters, config: FlexLoRAConfig | None = None):
        self.adapters = adapters
        self.config = config or adapters.config
        self.names = adapters.names
        self.layers: list[FlexLoRALayer] = list(adapters.layers.values())
        self._check_budget()
        self.history: list[RankChange] = []
        self.collectives_last_step = 0
        self.sensitivity = (
            _SensitivityTracker(self.config.sensitivity_beta1, self.config.sensitivity_beta2)
            if self.config.importance == "sensitivity"
            else None
        )
        # Checked again at the first step: the allocator may be built before accelerator.prepare shards the model.
        distributed.check_allocation_support(adapters.model, self.layers, self.config)
        self._support_checked_after_prepare = False

    def _check_budget(self) -> None:
        """Refuse a b0 no allocation step can honour, instead of quietly moving fewer ranks than asked at every step.
        flex prunes b matrices and expands b others (2 b0 <= N); prune_only / expand_only touch b matrices (b0 <= N)."""
        n, b0 = len(self.layers), self.config.b0
        if self.config.mode == "flex" and 2 * b0 > n:
            raise ModelMismatchError(
                f"b0={b0} is more than half the N={n} adapted matrices: each allocation step prunes b(t) <= b0 "
                f"matrices and expands b(t) others, so 2 * b0 <= N; lower b0 to at most {n // 2} (b0=0 trains with "
                "allocation frozen) or adapt more modules",
                ("b0",),
            )
        if b0 > n:
            raise ModelMismatchError(
                f"b0={b0} is more than the N={n} adapted matrices (mode={self.config.mode}); lower b0 to at most {n}",
                ("b0",),
            )

    # ---- decision -------------------------------------------------------------------------------------
    def _slot_sensitivity(self) -> torch.Tensor:
        """Per-slot triplet scores [N, R]: s(lambda_i) + mean_rows s(P[:, i]) + mean_cols s(Q[i, :])."""
        rows = []
        for layer in self.layers:
            partial = torch.zeros(layer.capacity, dtype=torch.float64)
            lam_s, p_s, q_s = (self.sensitivity.score(t) for t in (layer.lora_lambda, layer.lora_P, layer.lora_Q))
            if lam_s is None:
                raise RuntimeError("importance='sensitivity': no gradient statistics yet")
            _, start, stop = distributed.local_rows(layer.lora_lambda)
            partial[start:stop] += lam_s.double().cpu()
            partial += p_s.double().sum(dim=0).cpu() / layer.d_out
            _, start, stop = distributed.local_rows(layer.lora_Q)
            partial[start:stop] += q_s.double().sum(dim=1).cpu() / layer.d_in
            rows.append(partial)
        # Each process scored the rows it holds; the shard group's partial sums make the whole (replicas not counted).
        scores, collectives = distributed.sum_over_shards(torch.stack(rows), self.layers[0].lora_P)
        self.collectives_last_step += collectives
        return scores

    def _validate(self, lam: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(lam).all(dim=1)
        if bad.any():
            names = [self.names[i] for i in torch.nonzero(bad).flatten().tolist()]
            raise FloatingPointError(
                f"step {step}: lambda of {names} contains NaN or inf; lower the learning rate or check the data"
            )

    def gather_spectra(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """lambda [N, R] of every adapted matrix, whole on every process, and the rank masks [N, R]; lambda checked
        finite. The first part of ``decide``, public so that bench/ can time it."""
        lam, collectives = distributed.gather_lambda_matrix([layer.lora_lambda for layer in self.layers])
        self.collectives_last_step += collectives
        mask = torch.stack([layer.rank_mask.detach().double().cpu() for layer in self.layers])
        self._validate(lam, step)
        return lam, mask

    def matrix_scores(self, lam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each matrix's importance under ``config.importance`` (the second part of ``decide``)."""
        slot_sensitivity = self._slot_sensitivity() if self.sensitivity is not None else None
        return matrix_importance(self.config.importance, lam, mask, self.config.entropy_eps, slot_sensitivity)

    def decide(self, step: int) -> tuple[int, list[tuple[str, int, int, float]]]:
        """The budget b(t) and the changes (action, module index, slot, score); none outside allocation steps."""
        budget = ranks_to_move(step, self.config)
        if budget == 0:
            return 0, []
        lam, mask = self.gather_spectra(step)
        return budget, choose_changes(self.config, self.matrix_scores(lam, mask), lam, mask, budget)

    # ---- applying it to the tensors this process holds ------------------------------------------------
    @torch.no_grad()
    def _prune(self, layer: FlexLoRALayer, slot: int, optimizer) -> None:
        distributed.write_param_slot(layer.lora_lambda, slot, 0, 0.0)
        layer.rank_mask[slot] = 0
        self._reset_state(layer, slot, optimizer)

    @torch.no_grad()
    def _expand(self, layer: FlexLoRALayer, index: int, slot: int, step: int, optimizer) -> None:
        active_p = active_q = None
        if self.config.expand_init in ("orthogonal", "small"):
            active = layer.rank_mask > 0
            active_p, active_q = layer.lora_P[:, active], layer.lora_Q[active]
        value, p_full, q_full = new_direction(
            self.config.expand_init,
            layer.d_out,
            layer.d_in,
            self.config.init_std,
            direction_seed(self.config.seed, step, index, slot),
            self.config.small_init_value,
            active_p,
            active_q,
            unit_length=self.config.factor_init == "orthonormal",
        )
        distributed.write_param_slot(layer.lora_P, slot, 1, p_full)
        distributed.write_param_slot(layer.lora_Q, slot, 0, q_full)
        distributed.write_param_slot(layer.lora_lambda, slot, 0, value)
        layer.rank_mask[slot] = 1
        self._reset_state(layer, slot, optimizer)

    def _reset_state(self, layer: FlexLoRALayer, slot: int, optimizer) -> None:
        for param, slot_dim in ((layer.lora_P, 1), (layer.lora_lambda, 0), (layer.lora_Q, 0)):
            if optimizer is not None:
                reset_slot_state(optimizer, param, slot, slot_dim)
            if self.sensitivity is not None:
                _, start, stop = distributed.local_rows(param)
                self.sensitivity.reset_slot(param, slot, slot_dim, start, stop)

    # ---- the training-loop entry point ----------------------------------------------------------------
    def step(self, global_step: int, optimizer=None) -> list[RankChange]:
        """Call once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``.

        ``global_step`` counts optimizer steps done (1 after the first). Returns the changes made.
        """
        self.collectives_last_step = 0
        if not self._support_checked_after_prepare:
            distributed.check_allocation_support(self.adapters.model, self.layers, self.config)
            self._support_checked_after_prepare = True
        if self.sensitivity is not None:
            params, names = [], []
            for name, layer in zip(self.names, self.layers):
                for attr in FACTOR_TENSORS:
                    params.append(getattr(layer, attr))
                    names.append(f"{name}.{attr}")
            self.sensitivity.update(params, names)
        budget, decision = self.decide(global_step)
        if not decision:
            return []
        touched = [self.layers[i] for i in dict.fromkeys(i for _, i, _, _ in decision)]
        finite = all(
            bool(torch.isfinite(piece.values).all())
            for layer in touched
            for t in (layer.lora_P, layer.lora_Q)
            for piece in distributed.value_pieces(t)
        )
        distributed.assert_same_decision(
            [(a, i, s) for a, i, s, _ in decision], self.layers[0].rank_mask.device, global_step, finite
        )
        self.collectives_last_step += int(distributed.is_distributed())
        changes = []
        for action, index, slot, score in decision:
            layer = self.layers[index]
            before = layer.active_rank()
            if action == "prune":
                self._prune(layer, slot, optimizer)
            else:
                self._expand(layer, index, slot, global_step, optimizer)
            changes.append(
                RankChange(global_step, self.names[index], action, slot, before, layer.active_rank(), score, budget)
            )
        self.history.extend(changes)
        return changes

    # ---- records --------------------------------------------------------------------------------------
    def write_history(self, path: str | Path) -> None:
        """The whole allocation history as JSON lines (one change a line)."""
        with open(path, "w") as f:
            for change in self.history:
                f.write(json.dumps(asdict(change)) + "\n")

    def state_dict(self) -> dict:
        return {"history": [asdict(c) for c in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [RankChange(**c) for c in state["history"]]
