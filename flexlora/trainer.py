"""transformers.Trainer integration: the allocator runs inside ``Trainer.train()`` with no extra code.

(PEFT's AdaLoRA needs the user to call ``update_and_allocate`` themselves, which Trainer never does; here the
callback does it at every optimizer step.)
"""

from __future__ import annotations

from transformers import TrainerCallback

from .allocator import RankAllocator
from .export import save_adapters


class FlexLoRACallback(TrainerCallback):
    def __init__(self, allocator: RankAllocator):
        self.allocator = allocator

    def on_train_begin(self, args, state, control, **kwargs):
        config = self.allocator.config
        if config.total_steps is None:
            config.total_steps = state.max_steps
            config.validate()
        elif config.total_steps != state.max_steps:
            raise ValueError(
                f"FlexLoRAConfig.total_steps={config.total_steps} but the Trainer will run {state.max_steps} optimizer "
                "steps; leave total_steps unset to take the Trainer's"
            )

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Gradients are still present here (zero_grad comes later), which the sensitivity metric needs.
        self.allocator.step(state.global_step + 1, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Callbacks listed after this one (e.g. a TensorBoard one passed later) see the added values too.
        if logs is not None and "loss" in logs:
            extra = {
                "orth_penalty": self.allocator.adapters.orth_penalty(),
                "active_rank_total": self.allocator.adapters.total_active_rank(),
            }
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = f"{args.output_dir}/checkpoint-{state.global_step}/flexlora"
        save_adapters(self.allocator.adapters, checkpoint, self.allocator.state_dict())
