"""Upload: the dry-run folder (code, config, card) and the real huggingface_hub client over a recording transport.

Only huggingface_hub's HTTP transport is replaced (`set_client_factory` with an httpx2.MockTransport that plays a
minimal Hub and records every request); HfApi, its commit logic and our code run unchanged.
"""

import base64
import hashlib
import json
import subprocess
import sys
import textwrap

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http

from modeling_recurrent.convert import upload, upload_files
from modeling_recurrent.convert.remote_code import remote_code_files

from ..conftest import tiny_model
from .conftest import tiny_tokenizer

ENDPOINT = "https://hub.test"
REPO = "someone/tiny-recurrent"
LM_EVAL = {
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.6991, "acc_stderr,none": 0.0094, "acc_norm,none": 0.6612},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.348, "exact_match_stderr,strict-match": 0.013},
    },
    "configs": {
        "arc_easy": {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", "test_split": "test"},
        "gsm8k": {"dataset_path": "openai/gsm8k", "dataset_name": "main", "test_split": "test"},
    },
    "n-shot": {"arc_easy": 0, "gsm8k": 8},
    "config": {"model_args": "pretrained=someone/tiny-recurrent,trust_remote_code=True,num_steps=32"},
}


@pytest.fixture
def model_folder(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "stale_code.py").write_text("raise RuntimeError('old code')\n")
    (tmp_path / "results.json").write_text(json.dumps(LM_EVAL))
    return tmp_path / "model"


def test_upload_files(model_folder, tmp_path):
    files = upload_files(model_folder, REPO, eval_results=tmp_path / "results.json", base_model="org/base")
    code = {p.name: p.read_bytes() for p in remote_code_files()}
    assert {"modeling_recurrent_depth.py", "configuration_recurrent_depth.py", "cache_recurrent_depth.py"} <= set(code)
    assert {k: v for k, v in files.items() if k.endswith(".py")} == code  # the package's current code, nothing else
    assert {"config.json", "README.md", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_recurrent_depth.RecurrentDepthForCausalLM"


@pytest.mark.slow  # a fresh interpreter importing transformers and the remote code takes ~6 s here
def test_dry_run_folder_loads_without_the_package_and_its_card_parses(model_folder, tmp_path):
    out = upload(model_folder, REPO, dry_run=True, eval_results=tmp_path / "results.json", base_model="org/base")
    assert out == tmp_path / "model-upload"
    assert sorted(p.name for p in out.iterdir()) == sorted(upload_files(model_folder, REPO, eval_results=LM_EVAL))

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.base_model == "org/base" and data.license == "apache-2.0" and "recurrent-depth" in data.tags
    results = {(r.dataset_name, r.metric_name): r.metric_value for r in data.eval_results}
    assert results == {
        ("arc_easy", "acc"): 0.6991,
        ("arc_easy", "acc_norm"): 0.6612,
        ("gsm8k", "exact_match (strict-match)"): 0.348,
    }
    assert "num_steps=32" in card.text and "trust_remote_code=True" in card.text and REPO in card.text

    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        expected = tiny_model()(x, num_steps=3, init_scale=0.0).logits
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_recurrent"] = None  # the package cannot be imported here
        import torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        with torch.no_grad():
            got = m(io["x"], num_steps=3, init_scale=0.0).logits
        assert torch.equal(got, io["expected"]), (got - io["expected"]).abs().max()
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_dry_run_refuses_existing_output(model_folder, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        upload(model_folder, REPO, dry_run=True, output=tmp_path / "taken")


def test_upload_refuses_a_published_format_folder(tmp_path):
    from .conftest import PUBLISHED

    with pytest.raises(ValueError, match="convert it to 'recurrent_depth' first"):
        upload(PUBLISHED, REPO, dry_run=True, output=tmp_path / "x")


class FakeHub:
    """Just enough of the Hub's HTTP API for create_repo + create_commit; records every request."""

    def __init__(self):
        self.requests: list[httpx2.Request] = []
        self.lfs: dict[str, bytes] = {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if (method, path) == ("POST", "/api/repos/create"):
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"{ENDPOINT}/{body['organization']}/{body['name']}"})
        if (method, path) == ("POST", "/api/validate-yaml"):
            return httpx2.Response(200, json={})
        if method == "POST" and path == f"/api/models/{REPO}/preupload/main":
            files = json.loads(request.content)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return httpx2.Response(200, json={"files": modes})
        if method == "POST" and path == f"/{REPO}.git/info/lfs/objects/batch":
            objects = json.loads(request.content)["objects"]
            actions = {"upload": {"href": f"{ENDPOINT}/lfs-upload/"}}
            return httpx2.Response(
                200,
                json={
                    "transfer": "basic",
                    "objects": [
                        {**o, "actions": {"upload": {"href": actions["upload"]["href"] + o["oid"]}}} for o in objects
                    ],
                },
            )
        if method == "PUT" and path.startswith("/lfs-upload/"):
            self.lfs[path.rsplit("/", 1)[-1]] = request.read()
            return httpx2.Response(200)
        if method == "POST" and path == f"/api/models/{REPO}/commit/main":
            return httpx2.Response(200, json={"commitUrl": f"{ENDPOINT}/{REPO}/commit/abc123", "commitOid": "abc123"})
        return httpx2.Response(404, json={"error": f"fake hub: no route for {method} {path}"})

    def api_requests(self) -> list[httpx2.Request]:
        """Requests of the upload (without huggingface_hub's own agent-registry lookup for its user agent)."""
        return [r for r in self.requests if r.url.path != "/api/agent-harnesses"]


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # plain LFS over HTTP
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def test_upload_through_the_real_client(model_folder, tmp_path, fake_hub):
    info = upload(
        model_folder, REPO, private=True, eval_results=tmp_path / "results.json", token="hf_fake", endpoint=ENDPOINT
    )
    assert info.oid == "abc123"
    requests = fake_hub.api_requests()
    assert (requests[0].method, requests[0].url.path) == ("POST", "/api/repos/create")
    create = json.loads(requests[0].content)
    assert create["name"] == "tiny-recurrent" and create["organization"] == "someone"
    assert create.get("visibility") == "private" or create.get("private") is True
    commits = [r for r in requests if r.url.path.endswith("/commit/main")]
    assert len(commits) == 1
    assert all(r.headers["authorization"] == "Bearer hf_fake" for r in requests if "lfs-upload" not in str(r.url))

    lines = [json.loads(line) for line in commits[0].content.decode().splitlines()]
    assert lines[0]["key"] == "header"
    regular = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in lines if e["key"] == "file"}
    lfs = {e["value"]["path"]: e["value"]["oid"] for e in lines if e["key"] == "lfsFile"}
    expected = upload_files(model_folder, REPO, eval_results=tmp_path / "results.json")
    assert set(regular) | set(lfs) == set(expected)
    assert set(lfs) == {"model.safetensors"}
    weights = (model_folder / "model.safetensors").read_bytes()
    assert (
        lfs["model.safetensors"] == hashlib.sha256(weights).hexdigest()
        and fake_hub.lfs[lfs["model.safetensors"]] == weights
    )
    for name, content in regular.items():
        want = expected[name]
        assert content == (want if isinstance(want, bytes) else want.read_bytes()), name
    assert "stale_code.py" not in regular
