"""Deep supervision for `recurrent-depth train --deep-supervision`: the loss after every recurrence step.

`column_states` runs the core and keeps the state after each step, optionally injecting a different prelude output per
step (`chain_training.carry_inputs`); `StepwiseLoss` reads each state of a step with gradient out through the coda (and
optionally directly) and averages the losses, labelling step r for depth r when the chain batches carry paced labels.
"""

from __future__ import annotations

from functools import partial
from typing import cast

import torch

from .chain_training import paced_labels
from .layers_recurrent_depth import BlockContext
from .modeling_recurrent_depth import RecurrentDepthForCausalLM, RecurrentDepthModel


def causal_lm(model: torch.nn.Module) -> RecurrentDepthForCausalLM:
    """The recurrent-depth causal LM inside `model` (a peft wrapper when training LoRA adapters, else itself)."""
    get_base_model = getattr(model, "get_base_model", None)  # a peft wrapper's
    lm = get_base_model() if get_base_model is not None else model
    return cast(RecurrentDepthForCausalLM, lm)  # the trainer builds only recurrent-depth models


def column_states(
    base: RecurrentDepthModel,
    columns: torch.Tensor,
    attention_mask: torch.Tensor,
    input_states: torch.Tensor,
    num_steps: tuple[int, int],
) -> tuple[list[torch.Tensor], BlockContext]:
    """The core states (B, T, D) after each of the sum(`num_steps`) recurrence steps (the first num_steps[0] without
    gradient) when step r injects the prelude output of column min(r, S) - 1 of `columns` (B, T, S), as
    `carry_inputs` lays them out; and the block context the readout needs. `base` is a model's `transformer`,
    `input_states` (B, T, D) the initial state. The prelude runs once over all columns, whose context is the same."""
    batch, width, count = columns.shape
    xs, ctx = base.encode(columns.permute(2, 0, 1).reshape(-1, width), attention_mask.repeat(count, 1))
    xs, ctx = xs.view(count, batch, width, -1), ctx.select(torch.arange(batch, device=columns.device))
    state = base.initial_state(xs[0], input_states, False, None, 0.0)
    states: list[torch.Tensor] = []
    for step in range(sum(num_steps)):
        split = (1, 0) if step < num_steps[0] else (0, 1)
        state = base.iterate(state, xs[min(step, count - 1)], ctx, split, states.append, first_step=step)
    return states, ctx


class StepwiseLoss(torch.nn.Module):
    """Deep supervision (`--deep-supervision`): the loss read out through the coda after every recurrence step that
    has gradient, averaged over those steps, so that each step's state is trained to say what it knows by then.
    With `--chain-paced` step r is labelled for depth r (`paced_labels`), which makes every step of a chain's walk
    a target in every batch instead of only the one depth drawn. A module of its own so that DDP wraps one forward.

    `direct_weight` adds each step's loss read from the state directly (`ln_f` and the head, without the coda):
    the coda attends to every position, so it can answer by re-reading the prompt, while the direct readout counts
    only what the state at the answering position holds.
    """

    def __init__(self, model: torch.nn.Module, direct_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.direct_weight = direct_weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        num_steps: tuple[int, int],
        input_states: torch.Tensor,
        num_items_in_batch: torch.Tensor,
        chase_labels: torch.Tensor | None = None,
        step_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the steps with gradient of the causal-LM loss (labels (B, T), chase_labels (B, T, L)). With
        `step_input_ids` (B, T, S) step r injects the prelude output of column min(r, S) - 1 (`carry_inputs`)."""
        lm = causal_lm(self.model)
        base = lm.transformer
        # Without per-step inputs the text itself is the one column. Columns no step reaches are dropped.
        columns = input_ids[..., None] if step_input_ids is None else step_input_ids[..., : sum(num_steps)]
        states, ctx = column_states(base, columns, attention_mask, input_states, num_steps)
        losses = []
        for depth, state in enumerate(states[num_steps[0] :], start=num_steps[0] + 1):
            step_labels = labels if chase_labels is None else paced_labels(labels, chase_labels, depth)
            loss = partial(
                lm.loss_function,
                labels=step_labels,
                vocab_size=lm.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
            step_loss = loss(logits=base.readout(state, ctx, lm.lm_head))
            if self.direct_weight:
                step_loss = step_loss + self.direct_weight * loss(logits=lm.lm_head(base.ln_f(state)).float())
            losses.append(step_loss)
        return torch.stack(losses).mean()
