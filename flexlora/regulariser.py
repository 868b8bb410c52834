"""The orthogonality regulariser on the active directions of P and Q, its gradient injected in the layer's backward.

Two forms (``FlexLoRAConfig.orth_reg``, ``flexlora.names.ORTH_REG_FORMS``), with G_P = P_a^T P_a - I and
G_Q = Q_a Q_a^T - I per adapted matrix:

- ``mean_norm`` (default): w / (2N) * sum over the N adapted matrices of (||G_P||_F + ||G_Q||_F), i.e. w times the mean
  over all 2N factor matrices of the plain Frobenius norm. This is what PEFT's AdaLoRA and the FlexLoRA authors' code
  train with, so it is what the paper's numbers come from; dividing by N keeps its pull on each matrix independent of
  how many matrices are adapted.
- ``eq2_sum``: w * sum over matrices of (||G_P||_F^2 + ||G_Q||_F^2), eq. 2 as the paper prints it. Its gradient on each
  matrix is 4 N ||G||_F times mean_norm's, so on a large model it can swamp the task gradient early on; kept for the
  ablation.

The gradient goes in through ``OrthogonalityRegulariser`` on the layer's output instead of a term added to the loss:
built inside the layer's forward, where FSDP2 / ZeRO-3 hold the full P and Q, its backward runs exactly when the layer's
own does (sharded parameters are materialised, activation checkpointing works), and it costs six small ops per layer.

A term added to the loss would be scaled with the loss: divided by k under gradient accumulation, multiplied by S under
fp16 loss scaling. To scale the injected gradient the same way, the model's loss carries a zero-valued anchor
(``LossScaleTracker.mark``) whose gradient is exactly that factor: the autograd engine runs a leaf's gradient hook as
soon as it is ready (AccumulateGrad has the highest priority), before any layer's backward reads it.
"""

from __future__ import annotations

import warnings

import torch


def gram_residuals(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G_P = P_a^T P_a - I and G_Q = Q_a Q_a^T - I at full capacity, zero in the rows and columns of inactive slots.

    Masking P's columns (Q's rows) first gives the same matrices: (P m)^T (P m) = (P^T P) * m m^T; keeping the shapes
    static is what lets the allocator switch slots on and off in place.
    """
    m = mask.to(p.dtype)
    active_pairs = torch.outer(m, m)
    minus_eye = torch.diag(-m)
    return torch.addcmul(minus_eye, p.T @ p, active_pairs), torch.addcmul(minus_eye, q @ q.T, active_pairs)


def penalty_from_residuals(gram_p: torch.Tensor, gram_q: torch.Tensor, form: str) -> torch.Tensor:
    """One matrix's term of the regulariser, before the weight and (for mean_norm) the 1 / (2N)."""
    if form == "eq2_sum":
        return gram_p.square().sum() + gram_q.square().sum()
    return torch.linalg.matrix_norm(gram_p) + torch.linalg.matrix_norm(gram_q)


def orthogonality_penalty(
    p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, form: str = "mean_norm"
) -> torch.Tensor:
    """One matrix's term, differentiable (a reference for tests and for loops that add it to the loss themselves)."""
    return penalty_from_residuals(*gram_residuals(p, q, mask), form)


class _LossScale:
    """The factor the backward applies to one forward's loss, captured from its anchor's gradient (None until then)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def capture(self, grad: torch.Tensor) -> None:
        self.value = grad.detach()


class LossScaleTracker:
    """Tells the regulariser's backward how the loss it belongs to is scaled (see the module docstring).

    ``begin_forward`` starts a new record for each training forward; ``mark(loss)`` returns ``loss`` plus a zero-valued
    anchor whose gradient fills that record. ``flexlora.inject`` does both for a model whose output carries a loss.
    """

    def __init__(self) -> None:
        self.current = _LossScale()

    def begin_forward(self) -> None:
        self.current = _LossScale()

    def mark(self, loss: torch.Tensor) -> torch.Tensor:
        anchor = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
        anchor.register_hook(self.current.capture)
        return loss + anchor


class OrthogonalityRegulariser(torch.autograd.Function):
    """Pass ``output`` through unchanged and return the Gram residuals (for logging); in backward add the gradient of
    ``coefficient * f(G_P) + coefficient * f(G_Q)`` to P and Q, times the loss scale, where f is ||.||_F^2 (``squared``,
    eq2_sum: gradient 4 c P G_P) or ||.||_F (mean_norm: gradient 2 c P G_P / ||G_P||_F, 0 where G_P = 0)."""

    @staticmethod
    def forward(ctx, output, p, q, mask, coefficient: float, squared: bool, loss_scale: _LossScale):
        gram_p, gram_q = gram_residuals(p, q, mask)
        ctx.save_for_backward(p, q, gram_p, gram_q)
        ctx.coefficient, ctx.squared, ctx.loss_scale = coefficient, squared, loss_scale
        ctx.mark_non_differentiable(gram_p, gram_q)
        return output.view_as(output), gram_p, gram_q

    @staticmethod
    def backward(ctx, grad_output, _grad_gram_p, _grad_gram_q):
        p, q, gram_p, gram_q = ctx.saved_tensors
        scale = ctx.loss_scale.value
        if scale is None:
            warnings.warn(
                "FlexLoRA: backward of a loss that was not marked; the orthogonality regulariser's gradient assumes "
                "the loss is neither scaled nor divided for gradient accumulation. A model whose output has a .loss is "
                "marked automatically; otherwise call loss = adapters.mark_loss(loss) before scaling it.",
                stacklevel=2,
            )
            scale = 1.0

        def factor(gram: torch.Tensor) -> torch.Tensor:
            if ctx.squared:
                return gram * (4 * ctx.coefficient * scale)
            norm = torch.linalg.matrix_norm(gram)
            return gram * (torch.where(norm > 0, 2 * ctx.coefficient / norm, 0.0) * scale)

        # gram_* are zero in the rows and columns of inactive slots, so those slots get no gradient, as with a mask.
        grad_p = p @ factor(gram_p) if ctx.needs_input_grad[1] else None
        grad_q = factor(gram_q) @ q if ctx.needs_input_grad[2] else None
        return grad_output, grad_p, grad_q, None, None, None, None
