"""The model card: lm-eval results as `model-index` entries and the rendered `model_card.md` template.

The template is the repository's top-level `model_card.md`; an identical copy ships in this folder as package
data (a test keeps them equal).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_recurrent import RecurrentDepthConfig

from .keymap import expected_state

TEMPLATE = Path(__file__).resolve().with_name("model_card.md")
LM_EVAL = "lm-evaluation-harness"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
DEFAULT_TAGS = ("recurrent-depth", "latent-reasoning", "test-time-compute", "custom_code")


def load_lm_eval(results: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Evaluation results (path or parsed): lm-eval's JSON, with a `results` mapping, or a `recurrent-depth eval`
    sweep, with a `settings` list of such results (one per num_steps / exit setting)."""
    data = json.loads(Path(results).read_text()) if isinstance(results, (str, Path)) else dict(results)
    settings = data.get("settings")
    if isinstance(settings, list):
        if not settings or not all(isinstance(s, Mapping) and isinstance(s.get("results"), Mapping) for s in settings):
            raise ValueError("a `recurrent-depth eval` results file needs settings, each with a 'results' mapping")
    elif not isinstance(data.get("results"), Mapping):
        raise ValueError(
            "not evaluation results: an lm-eval results file has a 'results' mapping, a `recurrent-depth eval` "
            "results file a 'settings' list"
        )
    return data


def eval_num_steps(data: Mapping[str, Any]) -> int | None:
    """The `num_steps` (or `mean_recurrence`) one lm-eval run used, read from its model_args (None for a sweep,
    whose entries name their setting)."""
    args = (data.get("config") or {}).get("model_args") or ""
    if isinstance(args, Mapping):
        value = args.get("num_steps", args.get("mean_recurrence"))
        return int(value) if value is not None else None
    match = re.search(r"(?:num_steps|mean_recurrence)=(\d+)", str(args))
    return int(match.group(1)) if match else None


def lm_eval_to_eval_results(results: str | Path | Mapping[str, Any]) -> list[EvalResult]:
    """model-index entries: one per task and metric ("metric,filter" keys, standard errors skipped) of an lm-eval
    results JSON; for a `recurrent-depth eval` sweep one per setting, task and metric, the setting in the metric name
    (e.g. 'acc, num_steps=32') and its steps and FLOPs per token in `metric_args`."""
    data = load_lm_eval(results)
    if "settings" not in data:
        return _entries(data)
    out = []
    for setting in data["settings"]:
        metric_args = {
            "num_steps": setting["num_steps"],
            "avg_steps_per_token": round(setting["avg_steps_per_token"], 3),
            "flops_per_token": round(setting["flops_per_token"]),
        }
        if setting.get("exit_criterion") is not None:
            metric_args["exit_criterion"] = setting["exit_criterion"]
        out += _entries(setting, f", {setting['label']}", metric_args)
    return out


def metric_items(metrics: Mapping[str, Any]) -> list[tuple[str, float]]:
    """('metric,filter', value) pairs of one lm-eval task result: lm-eval names metrics "metric,filter", so keys
    without a comma (alias, name, sample_len) and standard errors are left out."""
    return [
        (key, float(value))
        for key, value in metrics.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def _entries(data: Mapping[str, Any], suffix: str = "", metric_args: dict | None = None) -> list[EvalResult]:
    configs, shots = data.get("configs") or {}, data.get("n-shot") or {}
    out = []
    for task, metrics in data["results"].items():
        cfg = configs.get(task) or {}
        num_fewshot = shots.get(task, cfg.get("num_fewshot"))
        for key, value in metric_items(metrics):
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            out.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=str(metrics.get("alias", task)).strip(" -") or task,
                    dataset_type=cfg.get("dataset_path") or task,
                    dataset_name=task,
                    dataset_config=cfg.get("dataset_name"),
                    dataset_split=cfg.get("test_split") or cfg.get("validation_split"),
                    dataset_args={"num_few_shot": num_fewshot} if num_fewshot is not None else None,
                    metric_type=metric,
                    metric_name=name + suffix,
                    metric_value=round(value, 4),
                    metric_args=metric_args,
                    source_name=LM_EVAL,
                    source_url=LM_EVAL_URL,
                )
            )
    return out


def render_model_card(
    config: Mapping[str, Any],
    repo_id: str,
    *,
    eval_results: str | Path | Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = "apache-2.0",
    tags: Sequence[str] = (),
    template: str | Path = TEMPLATE,
) -> ModelCard:
    """Render the card of a model folder's config.json for `repo_id`."""
    our_config = RecurrentDepthConfig.from_dict(dict(config))
    data = load_lm_eval(eval_results) if eval_results is not None else None  # read once, used twice
    results = lm_eval_to_eval_results(data) if data is not None else []
    model_name = repo_id.rsplit("/", 1)[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        base_model=base_model,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        eval_results=results or None,
    )
    num_parameters = sum(t.numel() for t in expected_state(our_config).values())
    rows = [{"task": r.task_name, "metric": r.metric_name, "value": r.metric_value} for r in results]
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id,
        model_name=model_name,
        base_model=base_model,
        num_parameters=f"{num_parameters:,}",
        hidden_size=our_config.hidden_size,
        n_prelude=our_config.n_prelude,
        n_core=our_config.n_core,
        n_coda=our_config.n_coda,
        mean_recurrence=our_config.mean_recurrence,
        vocab_size=our_config.vocab_size,
        max_position_embeddings=our_config.max_position_embeddings,
        eval_rows=rows,
        eval_num_steps=eval_num_steps(data) if data is not None else None,
    )
