"""Latent trajectories: agreement with the forward pass and adaptive exit, the classifier, the trace command."""

import json

import pytest
import torch

from modeling_recurrent.cli import main
from modeling_recurrent.generation_recurrent_depth import EXIT_CRITERIA
from modeling_recurrent.trace import CRITERION_FIRES, classify, exit_steps, record_trajectory, trajectory_features

from .conftest import tiny_model


def ids(length=7, seed=0):
    return torch.randint(1, 64, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("core_output_norm", [True, False])
def test_last_state_and_logit_lens_match_forward(core_output_norm):
    model = tiny_model(core_output_norm=core_output_norm)
    x = ids()
    traj = record_trajectory(model, x, 5, init_scale=0.0)
    with torch.no_grad():
        out = model(x, num_steps=5, init_scale=0.0, use_cache=False)
        last = model.transformer.ln_f(traj.states[-1]) if core_output_norm else traj.states[-1]
    assert traj.steps.tolist() == list(range(6))
    assert traj.states.shape == (6, 7, 32)
    torch.testing.assert_close(last, out.latent_states[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.logits, out.logits[0], rtol=1e-5, atol=1e-5)
    probs = out.logits[0].softmax(-1)
    assert torch.equal(traj.top_token[-1], probs.argmax(-1))
    torch.testing.assert_close(traj.top_prob[-1], probs.max(-1).values)
    assert traj.distance_to_final[-1].abs().max() == 0
    for name in ("relative_change", "cosine_distance", "kl", "minp_kl", "entropy", "top_prob"):
        assert getattr(traj, name).shape == (5, 7), name


def test_every_and_positions_keep_a_subset():
    model = tiny_model()
    x = ids()
    full = record_trajectory(model, x, 5, init_scale=0.0)
    part = record_trajectory(model, x, 5, every=2, positions=[1, -1], init_scale=0.0)
    assert part.steps.tolist() == [0, 2, 4, 5]
    assert part.positions.tolist() == [1, 6]
    torch.testing.assert_close(part.states, full.states[[0, 2, 4, 5]][:, [1, 6]])
    torch.testing.assert_close(part.token_states(6), full.token_states(6)[[0, 2, 4, 5]])
    torch.testing.assert_close(part.relative_change, full.relative_change)  # measures stay per step
    with pytest.raises(ValueError, match="not recorded"):
        part.token_states(3)


def test_invalid_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="num_steps"):
        record_trajectory(model, ids(), 0)
    with pytest.raises(ValueError, match="every"):
        record_trajectory(model, ids(), 3, every=0)
    with pytest.raises(ValueError, match="out of range"):
        record_trajectory(model, ids(), 3, positions=[7])
    with pytest.raises(ValueError, match="one non-empty sequence"):
        record_trajectory(model, torch.ones(2, 3, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="causal LM"):
        record_trajectory(model.transformer, ids(), 3)


def _threshold_firing_at(traj, name, token, step):
    """A threshold at which `name` fires for `token` by `step` (1-based) at the latest."""
    if name == "argmax-stability":
        return 1  # the random tiny model's last top token changes often
    measure = {
        "kl": traj.kl,
        "minp-kl": traj.minp_kl,
        "latent-diff": traj.relative_change,
        "cosine": traj.cosine_distance,
        "entropy-diff": (traj.entropy[1:] - traj.entropy[:-1]).abs(),
    }[name][:, token]
    index = step - 1 if name != "entropy-diff" else step - 2
    return float(measure[index]) * 1.001 + 1e-12


@pytest.mark.parametrize("name", sorted(EXIT_CRITERIA))
def test_exit_steps_match_adaptive_forward(name):
    """The last token under a logit criterion, and a one-token sequence under any, exit as the forward's rows."""
    assert set(CRITERION_FIRES) == set(EXIT_CRITERIA)
    model = tiny_model()
    x = ids(1 if not EXIT_CRITERIA[name].needs_logits else 5)
    traj = record_trajectory(model, x, 12, init_scale=0.0)
    threshold = _threshold_firing_at(traj, name, -1, 6)
    steps, exited = exit_steps(traj, {name: threshold})
    assert exited[name][-1]
    with torch.no_grad():
        out = model(x, num_steps=12, init_scale=0.0, use_cache=False, exit_criterion=name, exit_threshold=threshold)
    assert int(steps[name][-1]) == int(out.steps_used[0])
    assert traj.exit_steps[name].shape == (x.shape[1],)


def test_exit_steps_defaults_and_min_steps():
    traj = record_trajectory(tiny_model(), ids(), 6, init_scale=0.0)
    steps, exited = exit_steps(traj, min_steps=4)
    assert set(steps) == set(EXIT_CRITERIA)
    for name in steps:
        assert torch.all((steps[name] >= 4) | ~exited[name]), name
        assert torch.all(steps[name][~exited[name]] == 6), name
    with pytest.raises(ValueError, match="unknown exit criteria"):
        exit_steps(traj, {"nope": 1.0})


def _plane(dim, seed):
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=torch.Generator().manual_seed(seed)))
    return q.T  # (2, D) orthonormal


def test_classifier_fixed_point():
    g = torch.Generator().manual_seed(0)
    target, start = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    states = torch.stack([target + 0.8**i * (start - target) for i in range(65)])
    assert classify(states) == "converging"
    slow = torch.stack([target + 0.95**i * (start - target) for i in range(65)])  # still contracting
    assert classify(slow) == "converging"


@pytest.mark.parametrize("period", [8, 7.3, 13])
def test_classifier_rotation(period):
    plane = _plane(64, 1)
    center = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 2
    angles = torch.arange(65) * 2 * torch.pi / period
    states = center + torch.stack([angles.cos(), angles.sin()], dim=-1) @ plane
    features = trajectory_features(states)
    assert features["return_distance"] < 1
    assert classify(states) == "orbiting"


def test_classifier_linear_drift():
    g = torch.Generator().manual_seed(3)
    start, direction = torch.randn(64, generator=g), torch.randn(64, generator=g)
    direction = direction / direction.norm()
    states = start + torch.arange(65)[:, None] * direction + 0.02 * torch.randn(65, 64, generator=g)
    features = trajectory_features(states)
    assert features["straightness"] > 0.9
    assert classify(states) == "sliding"


def test_classifier_needs_three_points():
    with pytest.raises(ValueError, match="steps >= 3"):
        classify(torch.zeros(2, 8))
    assert classify(torch.ones(3, 8)) == "converging"


def test_trace_command_writes_files(chain_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    model, prompt = ["--model", str(chain_model_dir)], ["--prompt", "a=3;b=a+1;?b="]
    options = ["--num-steps", "8", "--out", str(out), "--tokens", "2,-1", "--every", "2", "--init-scale", "0"]
    code = main(["trace", *model, *prompt, *options])
    assert code == 0
    for name in ("convergence_heatmap.png", "pca_trajectories.png", "exit_steps_histogram.png", "trace.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "trace.json").read_text())
    assert report["plotted_tokens"] == [2, 12]
    assert report["recorded_steps"] == [0, 2, 4, 6, 8]
    assert len(report["tokens"]) == 13
    assert {t["class"] for t in report["tokens"]} <= {"converging", "orbiting", "sliding"}
    assert set(report["tokens"][0]["exit_steps"]) == set(EXIT_CRITERIA)
    table = capsys.readouterr().out
    assert "latent-d" in table and "'?'" in table


def test_trace_command_default_tokens(chain_model_dir, tmp_path):
    out = tmp_path / "out"
    options = ["--prompt", "a=3;?a=", "--num-steps", "3", "--out", str(out)]
    assert main(["trace", "--model", str(chain_model_dir), *options]) == 0
    report = json.loads((out / "trace.json").read_text())
    assert report["plotted_tokens"] == [2, 3, 4, 5, 6]  # the digit and the last four tokens


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-steps", "1"], "--num-steps must be more than --every (1) and >= 2"),
        (["--num-steps", "4", "--every", "4"], "--num-steps must be more than --every (4)"),
        (["--tokens", "0,40"], "out of range"),
        (["--tokens", "x"], "comma-separated integers"),
    ],
)
def test_trace_command_errors(chain_model_dir, tmp_path, capsys, args, message):
    base = ["trace", "--model", str(chain_model_dir), "--prompt", "a=3;?a=", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as error:
        main(base + ["--num-steps", "3", *args] if "--num-steps" not in args else base + args)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_trace_command_missing_model_or_tokenizer(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["trace", "--model", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "o")])
    assert "no such model folder" in capsys.readouterr().err
    tiny_model(vocab_size=44).save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit):
        main(["trace", "--model", str(tmp_path / "bare"), "--prompt", "a", "--out", str(tmp_path / "o")])
    assert "no tokenizer" in capsys.readouterr().err
