"""Generation speed of this package against the published implementation (issue 3), same weights, same machine.

The published code (seal-rg/recurrent-pretraining, `recpre/raven_modeling_minimal.py`) needs transformers 4.x, so
it runs in its own Python environment. This driver makes one random published-format checkpoint of the issue-3 shape
(width 256, 4 heads, MLP 704, vocab 4096, blocks 2/4/2) with the published code, then alternates, round after round,
a worker process in each environment that times a whole greedy `generate` (batch 1, init_scale 0, num_steps 8)
on that same checkpoint. Ours loads it natively (`model_type: huginn_raven`). It prints medians and their ratio.

    python benchmarks/published_speed.py --ref-python /work/refenv/bin/python \\
        --mirror /work/.mirror/seal-rg+recurrent-pretraining/repo --prompt 512 --new 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_huginn_fixtures import TINY, hub_config, import_reference  # noqa: E402  (the fixture maker's helpers)

SHAPE = TINY | dict(  # the published tiny fixture's config at the issue-3 size
    n_embd=256,
    n_layers=8,
    block_size=4096,
    vocab_size=4096,
    intermediate_size=704,
    n_layers_in_recurrent_block=4,
    mean_recurrence=8,
    mean_backprop_depth=8,
)


def make_checkpoint(mirror: str, folder: Path) -> None:
    """Published-format folder with random weights (run in the reference environment)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_mod, mod = import_reference(mirror, Path(tmp))
        cfg = cfg_mod.RavenConfig(**SHAPE)
        model = mod.RavenForCausalLM(cfg).float().eval()
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(hub_config(cfg, cfg_mod.RavenConfig), indent=2) + "\n")


def load(impl: str, mirror: str, folder: Path):
    import torch

    if impl == "ours":
        from transformers import AutoModelForCausalLM

        import modeling_recurrent  # noqa: F401  (registers huginn_raven)

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tmp = tempfile.mkdtemp()
    cfg_mod, mod = import_reference(mirror, Path(tmp))
    return mod.RavenForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def measure(impl: str, mirror: str, folder: Path, prompt: int, new: int, threads: int) -> dict[str, float]:
    """Tokens/s of a whole greedy generate (prefill included) and of its decode alone (the time of `new` tokens
    minus that of 1 token), after one warm-up call (run in the implementation's environment)."""
    import torch

    torch.set_num_threads(threads)
    model = load(impl, mirror, folder)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0))

    def run(tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                num_steps=8,
                init_scale=0.0,
            )
        assert out.shape[1] == prompt + tokens, out.shape
        return tokens / (time.perf_counter() - start)

    run(2)
    whole = new / run(new)
    first = 1 / run(1)
    return {"generate": new / whole, "decode": (new - 1) / (whole - first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", help="python of an environment with transformers 4.57")
    ap.add_argument("--mirror", required=True, help="git dir of seal-rg/recurrent-pretraining")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", choices=["ours", "published", "make"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "make":
        make_checkpoint(args.mirror, Path(args.folder))
        return
    if args.worker:
        print(json.dumps(measure(args.worker, args.mirror, Path(args.folder), args.prompt, args.new, args.threads)))
        return

    if not args.ref_python:
        ap.error("--ref-python is required (the python of the published implementation's environment)")
    common = ["--mirror", args.mirror, "--prompt", str(args.prompt), "--new", str(args.new)]
    common += ["--threads", str(args.threads)]
    pythons = {"published": args.ref_python, "ours": sys.executable}
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([args.ref_python, __file__, "--worker", "make", "--folder", folder, *common], check=True)
        results: dict[str, list[dict[str, float]]] = {"published": [], "ours": []}
        for round_ in range(args.rounds):
            for impl, python in pythons.items():
                done = subprocess.run(
                    [python, __file__, "--worker", impl, "--folder", folder, *common],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results[impl].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {json.dumps({k: v[-1] for k, v in results.items()})}", flush=True)
    report = {"prompt": args.prompt, "new_tokens": args.new, "rounds": results}
    for metric in ("generate", "decode"):
        medians = {k: statistics.median(r[metric] for r in v) for k, v in results.items()}
        report[f"{metric}_tokens_per_s_median"] = medians
        report[f"{metric}_ratio_ours_over_published"] = medians["ours"] / medians["published"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
