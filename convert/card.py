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
    """An lm-eval results JSON (path or parsed); it must have a `results` mapping."""
    data = json.loads(Path(results).read_text()) if isinstance(results, (str, Path)) else dict(results)
    if not isinstance(data.get("results"), Mapping):
        raise ValueError("not an lm-eval results file: no 'results' mapping")
    return data


def eval_num_steps(data: Mapping[str, Any]) -> int | None:
    """The `num_steps` (or `mean_recurrence`) the evaluation ran with, read from its model_args."""
    args = (data.get("config") or {}).get("model_args") or ""
    if isinstance(args, Mapping):
        value = args.get("num_steps", args.get("mean_recurrence"))
        return int(value) if value is not None else None
    match = re.search(r"(?:num_steps|mean_recurrence)=(\d+)", str(args))
    return int(match.group(1)) if match else None


def lm_eval_to_eval_results(results: str | Path | Mapping[str, Any]) -> list[EvalResult]:
    """One EvalResult per task and metric of an lm-eval results JSON (standard errors and aliases skipped)."""
    data = load_lm_eval(results)
    configs, shots = data.get("configs") or {}, data.get("n-shot") or {}
    out = []
    for task, metrics in data["results"].items():
        cfg = configs.get(task) or {}
        num_fewshot = shots.get(task, cfg.get("num_fewshot"))
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
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
                    metric_name=metric if filter_name in ("", "none") else f"{metric} ({filter_name})",
                    metric_value=round(float(value), 4),
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
    results = lm_eval_to_eval_results(eval_results) if eval_results is not None else []
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
        eval_num_steps=eval_num_steps(load_lm_eval(eval_results)) if eval_results is not None else None,
    )
