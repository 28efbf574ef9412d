"""save_pretrained / from_pretrained round trips, and saved folders that work without the package installed."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import modeling_recurrent
from modeling_recurrent.convert.remote_code import remote_code_files

from .conftest import ROOT, tiny_model

PACKAGE = Path(modeling_recurrent.__file__).resolve().parent


def test_round_trip_is_bit_exact_and_outputs_equal(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (k, v), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items()), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(x, num_steps=3, init_scale=0.0).logits, loaded(x, num_steps=3, init_scale=0.0).logits)


def test_tied_weights_stored_once(tmp_path):
    from safetensors import safe_open

    tiny_model().save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys


def test_saved_code_is_the_package_code(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_recurrent_depth.RecurrentDepthForCausalLM"
    saved = sorted(p.name for p in tmp_path.glob("*.py"))
    assert saved == sorted(p.name for p in remote_code_files())
    assert all((tmp_path / name).read_bytes() == (PACKAGE / name).read_bytes() for name in saved)
    assert {"modeling_recurrent_depth.py", "layers_recurrent_depth.py", "cache_recurrent_depth.py"} <= set(saved)


def test_num_steps_and_init_scale_at_load_time(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, num_steps=7).config.mean_recurrence == 7
    assert AutoModelForCausalLM.from_pretrained(tmp_path, mean_recurrence=5).config.num_steps == 5
    assert AutoModelForCausalLM.from_pretrained(tmp_path, init_scale=0.0).config.init_scale == 0.0


def test_trust_remote_code_without_the_package(tmp_path):
    """A subprocess in which `import modeling_recurrent` fails loads the folder through its own code."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        expected = model(x, num_steps=3, init_scale=0.0).logits
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_recurrent"] = None  # the package cannot be imported here
        import torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert "modeling_recurrent." not in type(m).__module__, type(m).__module__
        with torch.no_grad():
            got = m(io["x"], num_steps=3, init_scale=0.0).logits
        assert torch.equal(got, io["expected"]), (got - io["expected"]).abs().max()
        out = m.generate(io["x"], num_steps=2, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 8)
        print("OK", type(m).__module__)
    """)
    env_cwd = tmp_path  # not the project root, so the source tree is not importable either
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=env_cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK transformers_modules" in result.stdout


def test_presets_load(tmp_path):
    from transformers import AutoConfig

    from modeling_recurrent.configuration import preset_path

    assert AutoConfig.from_pretrained(preset_path("tiny")).model_type == "recurrent_depth"
    assert (ROOT / "configuration" / "huginn-0125" / "config.json").is_file()


def test_shipped_model_carries_the_current_code():
    shipped = PACKAGE / "checkpoints" / "chain-tiny"
    names = sorted(p.name for p in shipped.glob("*.py"))
    assert names == sorted(p.name for p in remote_code_files()), "the shipped chain model carries its remote code"
    for name in names:
        assert (shipped / name).read_bytes() == (PACKAGE / name).read_bytes(), name
