"""Deep supervision: the per-step states and losses equal what the model's own forward gives at each depth."""

import pytest
import torch

from modeling_recurrent.deep_supervision import StepwiseLoss, column_states

from .conftest import tiny_model


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 64, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def zeros(model, input_ids):
    return torch.zeros(*input_ids.shape, model.config.hidden_size)


def test_column_states_are_the_forward_states_at_every_depth(batch):
    model = tiny_model()
    input_ids, mask, _ = batch
    states, _ = column_states(model.transformer, input_ids[..., None], mask, zeros(model, input_ids), (1, 2))
    assert len(states) == 3 and [s.requires_grad for s in states] == [False, True, True]
    with torch.no_grad():
        for depth, state in enumerate(states, start=1):
            out = model(input_ids, attention_mask=mask, num_steps=depth, init_scale=0.0)
            assert (model.transformer.ln_f(state) - out.latent_states).abs().max() <= 1e-5


def test_repeated_columns_change_nothing(batch):
    """Per-step inputs that are all the prompt itself give the states of the prompt."""
    model = tiny_model()
    input_ids, mask, _ = batch
    start = zeros(model, input_ids)
    with torch.no_grad():
        one, _ = column_states(model.transformer, input_ids[..., None], mask, start, (0, 3))
        three, _ = column_states(model.transformer, input_ids[..., None].expand(-1, -1, 3), mask, start, (0, 3))
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(one, three, strict=True))


def test_a_different_column_changes_only_the_steps_that_inject_it(batch):
    model = tiny_model()
    input_ids, mask, _ = batch
    other = input_ids.flip(-1)
    columns = torch.stack([input_ids, other], dim=-1)  # step 1 sees the prompt, steps 2+ the other text
    start = zeros(model, input_ids)
    with torch.no_grad():
        plain, _ = column_states(model.transformer, input_ids[..., None], mask, start, (0, 2))
        mixed, _ = column_states(model.transformer, columns, mask, start, (0, 2))
    assert (plain[0] - mixed[0]).abs().max() <= 1e-6
    assert (plain[1] - mixed[1]).abs().max() > 1e-3


def forward_loss(model, input_ids, mask, labels, depth):
    with torch.no_grad():
        return model(input_ids, attention_mask=mask, labels=labels, num_steps=depth, init_scale=0.0).loss


@pytest.mark.parametrize("direct_weight", [0.0, 0.5])
def test_stepwise_loss_is_the_mean_of_each_depths_loss(batch, direct_weight):
    model = tiny_model()
    input_ids, mask, labels = batch
    count = (labels[:, 1:] != -100).sum().float()
    loss = StepwiseLoss(model, direct_weight)(
        input_ids, mask, labels, (1, 2), zeros(model, input_ids), num_items_in_batch=count
    )
    expected = [forward_loss(model, input_ids, mask, labels, depth) for depth in (2, 3)]
    if direct_weight:
        base = model.transformer
        with torch.no_grad():
            states, _ = column_states(base, input_ids[..., None], mask, zeros(model, input_ids), (1, 2))
            for i, state in enumerate(states[1:]):
                logits = model.lm_head(base.ln_f(state)).float()
                direct = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
                expected[i] = expected[i] + direct_weight * direct
    assert abs(float(loss.detach()) - float(torch.stack(expected).mean())) <= 1e-5
    loss.backward()
    assert model.transformer.core_block[0].mlp.fc.weight.grad is not None


def test_stepwise_loss_labels_each_step_for_its_depth(batch):
    """With chase labels (B, T, L), step r is scored against the label paced for depth r."""
    model = tiny_model()
    input_ids, mask, labels = batch
    only_last = torch.full_like(labels, -100)
    only_last[:, -1] = labels[:, -1]
    chase = torch.full((*labels.shape, 2), -100)
    chase[:, -1, 0], chase[:, -1, 1] = 5, 6  # depth 1 -> token 5, depth 2 -> token 6, then the answer
    count = torch.tensor(2.0)
    loss = StepwiseLoss(model)(
        input_ids, mask, only_last, (0, 3), zeros(model, input_ids), num_items_in_batch=count, chase_labels=chase
    )
    expected = []
    for depth, target in ((1, 5), (2, 6), (3, None)):
        step_labels = only_last.clone()
        if target is not None:
            step_labels[:, -1] = target
        expected.append(forward_loss(model, input_ids, mask, step_labels, depth))
    assert abs(float(loss.detach()) - float(torch.stack(expected).mean())) <= 1e-5
