"""Model card: the template ships with the package, lm-eval JSON becomes model-index entries."""

import configparser

from huggingface_hub import ModelCard

from modeling_recurrent.convert import lm_eval_to_eval_results, render_model_card
from modeling_recurrent.convert.card import TEMPLATE

from ..conftest import ROOT, tiny_config
from .test_upload import LM_EVAL


def test_packaged_template_is_the_top_level_template():
    assert TEMPLATE.read_bytes() == (ROOT / "model_card.md").read_bytes()
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "*.md" in setup["options.package_data"]["modeling_recurrent.convert"]
    assert setup["options"]["package_dir"].split().count("modeling_recurrent.convert") == 1


def test_lm_eval_results_become_eval_results():
    results = lm_eval_to_eval_results(LM_EVAL)
    arc = next(r for r in results if r.dataset_name == "arc_easy" and r.metric_type == "acc")
    assert (arc.dataset_type, arc.dataset_config, arc.dataset_split) == ("allenai/ai2_arc", "ARC-Easy", "test")
    assert arc.metric_value == 0.6991 and arc.dataset_args == {"num_few_shot": 0}
    assert not any("stderr" in r.metric_type for r in results) and len(results) == 3


def test_rendered_card_round_trips_through_model_card_load(tmp_path):
    config = tiny_config().to_dict()
    card = render_model_card(config, "someone/tiny", eval_results=LM_EVAL, tags=["extra"])
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.model_name == "tiny" and "extra" in loaded.data.tags
    assert len(loaded.data.eval_results) == 3
    assert "| arc_easy | acc | 0.6991 |" in loaded.text and "num_steps=4" in loaded.text
    plain = render_model_card(config, "someone/tiny")
    assert "Evaluation" not in plain.text and plain.data.eval_results is None
