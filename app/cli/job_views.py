"""How jobs, plans and loss curves read in a terminal (the api's JSON in, rich renderables out)."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from app.cli.common import facts_table, human_bytes, human_seconds, list_table, number, plural, when

STATUS_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "queued": "cyan",
    "validating": "cyan",
}


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def loss_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def job_line(job: dict[str, Any]) -> str:
    line = f"{job['id']}  {job['status']}"
    progress = job.get("progress") or {}
    if progress.get("total_steps"):
        line += f"  step {progress.get('step', 0)}/{progress['total_steps']}"
    if progress.get("train_loss") is not None:
        line += f"  loss {progress['train_loss']:.4f}"
    return line


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = list_table("id", "status", "base model", "progress", "loss", "created")
    for job in jobs:
        progress = job.get("progress") or {}
        table.add_row(
            job["id"],
            status_text(job["status"]),
            job["base_model"],
            f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}",
            loss_text(progress.get("train_loss")),
            when(job["created_at"]),
        )
    return table


def _pairs(values: dict[str, Any], auto: list[str] | None = None) -> str:
    """`name value, …` of the plain values (nested ones left to --json)."""
    shown = []
    for name, value in values.items():
        if isinstance(value, dict | list) or value is None:
            continue
        mark = " (auto)" if auto and name in auto else ""
        shown.append(f"{name} {value}{mark}")
    return ", ".join(shown) or "-"


def _facts(job: dict[str, Any]) -> Table:
    facts = facts_table()
    status = status_text(job["status"])
    if job.get("cancel_requested") and job["status"] not in ("succeeded", "failed", "cancelled"):
        status.append(" (cancel requested)", style="yellow")
    facts.add_row("status", status)
    facts.add_row("base model", job["base_model"])
    facts.add_row("dataset", _dataset(job["dataset_url"], job.get("dataset")))
    if job.get("validation_url"):
        validation = (job.get("dataset") or {}).get("validation")
        facts.add_row("validation", _dataset(job["validation_url"], validation))
    facts.add_row(
        "hyperparameters", _pairs(job["hyperparameters"], job.get("auto_hyperparameters"))
    )
    facts.add_row("lora", _pairs(job["lora"]))
    levers = {key: job.get(key) for key in ("quantization", "distributed") if job.get(key)}
    if levers:
        facts.add_row("memory levers", _pairs(levers))
    method = job.get("method") or {"type": "supervised"}
    if method["type"] != "supervised":
        facts.add_row("method", f"{method['type']} " + _pairs(method.get(method["type"]) or {}))
    if job.get("parent"):
        facts.add_row("trained on from", f"{job['parent']['kind']} {job['parent']['reference']}")
    progress = job.get("progress")
    if progress:
        step = f"step {progress.get('step', 0)}/{progress.get('total_steps') or '?'}"
        parts = [step, f"epoch {number(progress.get('epoch'), 3)}"]
        if progress.get("reward_mean") is None:  # a reinforcement job's loss says little
            parts.append(f"train loss {loss_text(progress.get('train_loss'))}")
        if progress.get("eval_loss") is not None:
            parts.append(f"eval loss {loss_text(progress['eval_loss'])}")
        if progress.get("reward_mean") is not None:
            parts.append(f"mean reward {progress['reward_mean']:.3f}")
        if progress.get("tokens_per_second") is not None:
            parts.append(f"{progress['tokens_per_second']:.0f} tokens/s")
        if progress.get("eta_seconds") is not None and job["status"] == "running":
            parts.append(f"ETA {human_seconds(progress['eta_seconds'])}")
        facts.add_row("progress", ", ".join(parts))
    if job.get("adapter"):
        facts.add_row("adapter", f"{job['adapter']['id']}  {job['adapter']['name']}")
    error = job.get("error")
    if error:
        facts.add_row("error", Text(f"{error['code']}: {error['message']}", style="red"))
    if job.get("metadata"):
        facts.add_row("metadata", ", ".join(f"{k}={v}" for k, v in job["metadata"].items()))
    webhook = job.get("webhook")
    if webhook:
        deliveries = ", ".join(
            f"{d['event']} {d['status']} ({d['attempts']} attempts)"
            for d in webhook.get("deliveries") or []
        )
        facts.add_row("webhook", f"{webhook['url']}  {deliveries or 'no deliveries yet'}")
    facts.add_row("queue", f"{job['queue']} (attempt {job['attempt']})")
    if job.get("worker"):
        facts.add_row("worker", f"{job['worker']}{_device(job.get('device'))}")
    times = f"created {when(job['created_at'])}"
    if job.get("started_at"):
        times += f", started {when(job['started_at'])}"
    if job.get("finished_at"):
        times += f", finished {when(job['finished_at'])}"
    facts.add_row("times", times)
    if job.get("evaluation"):
        facts.add_row("evaluation", _evaluation(job["evaluation"]))
    return facts


def _dataset(url: str, facts: dict[str, Any] | None) -> str:
    if not facts:
        return url
    shown = f"{url}  ({facts['rows']} rows, format {facts['format']}, {facts['tokens']} tokens"
    if facts.get("max_row_tokens"):
        shown += f", longest row {facts['max_row_tokens']}"
    if facts.get("held_out_rows"):
        shown += f", {facts['held_out_rows']} held out for the evaluation"
    return shown + ")"


def _device(device: dict[str, Any] | None) -> str:
    if not device:
        return ""
    shown = f" on {device.get('kind', '?')}"
    if device.get("name"):
        shown += f": {device['name']}"
    if (device.get("count") or 1) > 1:
        shown += f" x{device['count']}"
    if device.get("memory_bytes"):
        shown += f" ({human_bytes(device['memory_bytes'])})"
    return shown


SPLITS = {
    "validation": "validation rows",
    "held_out": "held-out rows",
    "training_rows": "training rows (too few rows to hold any out)",
}


def _evaluation(evaluation: dict[str, Any]) -> Text:
    """Base against adapter: eval loss, or a reinforcement job's mean reward; the samples
    follow the summary."""
    split = SPLITS.get(evaluation["split"], evaluation["split"])
    where = f", on {evaluation['rows']} {split}, {human_seconds(evaluation['seconds'])}"
    if evaluation.get("adapter_mean_reward") is not None:
        base, adapter = evaluation["base_mean_reward"], evaluation["adapter_mean_reward"]
        return Text.assemble(
            f"mean reward base {base:.3f} -> adapter ",
            (f"{adapter:.3f}", "green" if adapter > base else "red"),
            where,
        )
    base, adapter = evaluation["base_eval_loss"], evaluation["adapter_eval_loss"]
    improvement = evaluation["improvement"]
    change = f"{abs(improvement):.1%} {'lower' if improvement >= 0 else 'higher'}"
    summary = Text.assemble(
        f"eval loss base {base:.4f} -> adapter ",
        (f"{adapter:.4f}", "green" if improvement > 0 else "red"),
        f" ({change}){where}",
    )
    if evaluation.get("adapter_preference_accuracy") is not None:
        summary.append(
            f"; preference accuracy base {evaluation['base_preference_accuracy']:.0%} -> "
            f"adapter {evaluation['adapter_preference_accuracy']:.0%}"
        )
    return summary


def _samples(samples: list[dict[str, Any]]) -> Table:
    table = Table(
        "prompt", "reference", "base", "adapter", title="evaluation samples", show_lines=True
    )
    for sample in samples:
        table.add_row(
            sample["prompt"], sample.get("reference") or "-", sample["base"], sample["adapter"]
        )
    return table


def job_summary(job: dict[str, Any]) -> Group:
    """`jobs get`: what a person asks of a job, one fact a line; the rest is in --json."""
    shown: list[RenderableType] = [Text(job["id"], style="bold"), _facts(job)]
    if (job.get("evaluation") or {}).get("samples"):
        shown.append(_samples(job["evaluation"]["samples"]))
    return Group(*shown)


def metrics_table(points: list[dict[str, Any]]) -> Table:
    """The curve: losses, or for a reinforcement job the grader's mean reward and spread."""
    rewarded = any(point.get("reward_mean") is not None for point in points)
    scores = ("mean reward", "reward std") if rewarded else ("train loss", "eval loss")
    table = list_table("step", "epoch", *scores, "lr", "tokens/s")
    for point in points:
        speed = point.get("tokens_per_second")
        shown = (
            (number(point.get("reward_mean"), 3), number(point.get("reward_std"), 3))
            if rewarded
            else (loss_text(point.get("train_loss")), loss_text(point.get("eval_loss")))
        )
        table.add_row(
            str(point["step"]),
            number(point.get("epoch"), 3),
            *shown,
            number(point.get("lr"), 3),
            "-" if speed is None else f"{speed:.0f}",
        )
    return table


def _memory(memory: dict[str, Any]) -> Text:
    device = memory["device"]
    where = device["accelerator"] + (f" {device['name']}" if device.get("name") else "")
    usable = memory.get("usable_bytes")
    text = Text(
        f"{human_bytes(memory['estimated_bytes'])} at its peak "
        f"({plural(memory['batch'], 'row')} of {memory['seq']} tokens), "
        f"{human_bytes(usable)} usable on {where} ({device['source']}): "
    )
    fits = memory.get("fits")
    text.append(
        {True: "fits", False: "does not fit", None: "unknown (device memory unknown)"}[fits],
        style={True: "green", False: "red", None: "yellow"}[fits],
    )
    return text


def plan_summary(plan: dict[str, Any]) -> Group:
    """`jobs plan`: what the job would do and whether it can, before anything runs."""
    facts = facts_table()
    facts.add_row("base model", f"{plan['base_model']} (queue {plan['queue']})")
    dataset = plan["dataset"]
    rows = plural(dataset["rows"], "row")
    if dataset.get("held_out_rows"):
        rows += f" ({dataset['held_out_rows']} held out for evaluation)"
    facts.add_row(
        "dataset",
        f"{dataset['filename']}: {rows}, format {dataset['format']}, {dataset['tokens']} tokens "
        f"(longest row {dataset['max_row_tokens']}, p99 {dataset['p99_row_tokens']}, mean "
        f"{dataset['mean_row_tokens']:.0f})",
    )
    if dataset.get("too_long_count"):
        lines = ", ".join(str(row["line"]) for row in dataset["too_long"][:10])
        facts.add_row(
            "too long", Text(f"{dataset['too_long_count']} rows (lines {lines})", style="red")
        )
    facts.add_row(
        "hyperparameters", _pairs(plan["hyperparameters"], plan.get("auto_hyperparameters"))
    )
    facts.add_row("steps", str(plan["steps"]))
    time = plan["time"]
    if time.get("estimated_seconds") is not None:
        estimate = f"about {human_seconds(time['estimated_seconds'])}"
        if time.get("measured_jobs"):
            estimate += f" (from {plural(time['measured_jobs'], 'earlier job')})"
    else:
        estimate = f"no estimate: {time.get('reason') or 'no measurement yet'}"
    facts.add_row("time", estimate)
    facts.add_row("memory", _memory(plan["memory"]))
    suggestion = plan["memory"].get("suggestion")
    if suggestion:
        facts.add_row("suggestion", suggestion["message"])
    problems = plan.get("problems") or []
    for problem in problems:
        facts.add_row("problem", Text(f"{problem['code']}: {problem['message']}", style="red"))
    if not problems:
        facts.add_row("problems", Text("none", style="green"))
    shown: list[RenderableType] = [facts]
    previews = plan.get("loss_mask_preview") or []
    if previews:
        first = previews[0]
        shown.append(
            Text(
                f"first example (line {first['line']}, {first['trained_tokens']} of "
                f"{first['tokens']} tokens trained, in green):",
                style="bold",
            )
        )
        example = Text.assemble(
            *((s["text"], "green" if s["trained"] else "dim") for s in first["segments"])
        )
        example.rstrip()
        shown.append(example)
    return Group(*shown)
