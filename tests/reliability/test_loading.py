"""Robust loading and saving: broken files raise errors naming the file; weights that do not fit config.json are
refused instead of being replaced by random ones; a save that fails midway leaves no checkpoint that loads (a new
folder does not appear, an existing one is unchanged).

Missing folders, config.json or tokenizer files in the CLI commands: tests/test_trace.py
(test_trace_command_missing_model_or_tokenizer) and tests/test_evaluate.py (test_bad_input). A published config
with other shapes than its weights: tests/test_huginn_parity.py (test_mismatched_weights_are_refused).
"""

import json
import shutil

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from transformers import AutoModelForCausalLM

from modeling_recurrent.chain_task import build_tokenizer
from modeling_recurrent.demo import load

from ..conftest import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model (vocabulary of the chain tokenizer) with its tokenizer; tests work on copies."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    tiny_model(vocab_size=44).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


CORRUPTIONS = {
    "truncated to half": lambda data: data[: len(data) // 2],
    "truncated header": lambda data: data[:20],
    "zeroed": lambda data: bytes(len(data)),
    "empty": lambda data: b"",
    "huge header length": lambda data: (10**12).to_bytes(8, "little") + data[8:],
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_weights_name_the_file(copy, corrupt):
    weights = copy / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(OSError, match="truncated or corrupt file .*model.safetensors"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_corrupt_shard_or_index_names_the_file(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model().save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(OSError, match=f"truncated or corrupt file .*{shard.name}"):
        AutoModelForCausalLM.from_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(OSError, match=f"{shard.name} .*; .*model.safetensors.index.json"):  # every broken file
        AutoModelForCausalLM.from_pretrained(folder)


def test_missing_weights_and_broken_config_name_the_file(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):  # Transformers' own message is clear here
        AutoModelForCausalLM.from_pretrained(copy)
    (copy / "config.json").write_text('{"model_type": "recurrent_depth", "hidden')
    with pytest.raises(OSError, match="config.json"):
        AutoModelForCausalLM.from_pretrained(copy)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(intermediate_size=40), r"mlp.fc.weight has shape \(96, 32\) in the checkpoint, \(80, 32\) in the model"),
        (dict(n_core=3), r"transformer.core_block.2.attn.Wqkv.weight is missing"),  # used to load random weights
        (dict(n_core=1), r"transformer.core_block.1.attn.Wqkv.weight is unexpected"),  # used to drop them silently
        (dict(injection="add"), r"transformer.adapter.weight is unexpected"),
        (dict(qk_bias=False), r"attn.qk_bias is unexpected"),
    ],
    ids=["shapes", "more blocks", "fewer blocks", "no adapter", "no qk_bias"],
)
def test_config_that_does_not_match_the_weights_is_refused(copy, changes, message):
    edit_config(copy, **changes)
    with pytest.raises(ValueError, match=message) as error:
        AutoModelForCausalLM.from_pretrained(copy)
    assert "model.safetensors do not match" in str(error.value) and "config.json" in str(error.value)


def test_mismatch_is_allowed_when_asked_for(copy):
    edit_config(copy, intermediate_size=40)
    model = AutoModelForCausalLM.from_pretrained(copy, ignore_mismatched_sizes=True)
    assert model.transformer.core_block[0].mlp.fc.weight.shape == (80, 32)
    model, info = AutoModelForCausalLM.from_pretrained(copy.parent / "copy", ignore_mismatched_sizes=True,
                                                       output_loading_info=True)  # fmt: skip
    assert info["mismatched_keys"]


def test_base_model_from_an_untied_causal_lm_checkpoint_loads(tmp_path):
    """lm_head.weight is unexpected for the base model and must not count as a mismatch."""
    from transformers import AutoModel

    tiny_model(tie_word_embeddings=False).save_pretrained(tmp_path)
    AutoModel.from_pretrained(tmp_path)


def test_tokenizer_files_missing_or_corrupt_name_the_file(copy):
    tokenizer_json = (copy / "tokenizer.json").read_text()
    (copy / "tokenizer.json").unlink()  # tokenizer_config.json alone: Transformers says "Couldn't instantiate ..."
    with pytest.raises(ValueError, match="cannot load the tokenizer: no .*tokenizer.json"):
        load(str(copy))
    (copy / "tokenizer.json").write_text(tokenizer_json[: len(tokenizer_json) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt file .*tokenizer.json"):
        load(str(copy))
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load(str(copy))


# ----- atomic save ----------------------------------------------------------------------------------------------------


class InjectedFailure(RuntimeError):
    pass


@pytest.fixture
def failing_save(monkeypatch):
    """Make the n-th weight file written by save_pretrained fail after writing part of it."""

    def install(fail_at: int = 1):
        calls = []
        real = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == fail_at:
                with open(filename, "wb") as f:
                    f.write(b"half a file")
                raise InjectedFailure("disk full")
            return real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)

    return install


def test_failed_save_to_a_new_folder_leaves_nothing(tmp_path, failing_save):
    failing_save()
    with pytest.raises(InjectedFailure):
        tiny_model().save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_failed_save_over_an_existing_checkpoint_leaves_it_unchanged(saved, copy, tmp_path, failing_save):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    failing_save()
    with pytest.raises(InjectedFailure):
        tiny_model(seed=1, vocab_size=44).save_pretrained(copy)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    loaded = AutoModelForCausalLM.from_pretrained(copy)
    assert torch.equal(loaded.lm_head.weight, AutoModelForCausalLM.from_pretrained(saved).lm_head.weight)


def test_failed_sharded_save_midway_leaves_the_old_checkpoint(copy, failing_save):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    failing_save(fail_at=3)  # two shards written, the third fails
    with pytest.raises(InjectedFailure):
        tiny_model(seed=1, vocab_size=44).save_pretrained(copy, max_shard_size="20KB")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_save_over_an_existing_folder_replaces_weights_and_keeps_other_files(tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder, max_shard_size="20KB")  # sharded: an index and ten shards
    build_tokenizer().save_pretrained(folder)  # saved before the model this time: must survive
    (folder / "notes").mkdir()
    (folder / "notes" / "run.txt").write_text("keep me")
    new = tiny_model(seed=3)
    new.save_pretrained(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")]  # stale shards and index gone
    assert {"model.safetensors", "config.json", "tokenizer.json", "modeling_recurrent_depth.py", "notes"} <= set(names)
    assert (folder / "notes" / "run.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in new.state_dict().items())


def test_loaded_model_saved_back_into_its_own_folder(copy):
    """The usual fine-tune-and-save-back: the new files replace the old ones the model was loaded from."""
    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(copy)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(copy).lm_head.weight, model.lm_head.weight)


def test_relative_paths_the_working_directory_and_folder_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference").mkdir()
    model = tiny_model()
    model.save_pretrained("relative/model")
    assert (tmp_path / "relative" / "model" / "model.safetensors").is_file()
    mode = (tmp_path / "relative" / "model").stat().st_mode & 0o777
    assert mode == (tmp_path / "reference").stat().st_mode & 0o777  # the umask's mode, not mkdtemp's 0700
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    model.save_pretrained(".")  # the working directory cannot be swapped: saved in place
    assert (tmp_path / "cwd" / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "cwd")
