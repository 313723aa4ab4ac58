"""Reinforcement (GRPO with graders) on the live service: the grader's mean reward goes up
between the first and the last steps on the default model, the evaluation compares base and
adapter by mean reward, reward models serve as graders, the SDK creates and reads reinforcement
jobs, and bad graders or rows are refused naming the field or the line."""

from __future__ import annotations

from typing import Any

import pytest
from openai import OpenAI

from tests.corpus import jsonl
from tests.fixtures.service import Service, local_key_headers
from tests.integration.test_preference_tuning import DPO, preference_rows

QUESTIONS = [
    "is the sky blue?",
    "is 5 larger than 3?",
    "do birds have wings?",
    "is water wet?",
    "is Paris in France?",
    "do fish swim?",
    "is ice cold?",
    "is the sun hot?",
    "is grass green?",
    "do dogs bark?",
    "is snow white?",
    "is 10 more than 2?",
]
# Rewards an answer that says yes: the default model says "No." to most of these at first.
SAYS_YES = {
    "type": "string_check",
    "name": "says_yes",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "ilike",
}
GRPO = {"n_epochs": 2, "batch_size": 2, "learning_rate": 5e-4, "max_seq_length": 64}


def prompt_rows(questions: list[str]) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": f"Answer yes or no: {q}"}], "answer": "yes"}
        for q in questions
    ]


def reinforcement(grader: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {
        "type": "reinforcement",
        "reinforcement": {
            "grader": grader,
            "num_generations": 4,
            "max_completion_length": 8,
            **settings,
        },
    }


@pytest.fixture(scope="module")
def prompts(service: Service) -> dict[str, str]:
    return {
        "train": service.upload("yes-no.jsonl", jsonl(prompt_rows(QUESTIONS[:8]))),
        "held_out": service.upload("yes-no-val.jsonl", jsonl(prompt_rows(QUESTIONS[8:]))),
    }


@pytest.mark.real_model
def test_grpo_mean_reward_goes_up_with_a_string_check_grader(
    service: Service, prompts: dict[str, str]
) -> None:
    body = {
        "dataset_url": prompts["train"],
        "validation_url": prompts["held_out"],
        "method": reinforcement(SAYS_YES),
        "hyperparameters": GRPO,
    }
    plan = service.client.post("/jobs/plan", json=body)
    assert plan.status_code == 200, plan.text
    assert plan.json()["dataset"]["format"] == "prompt"
    # Each prompt is read with room for the answer the model writes to it.
    assert plan.json()["dataset"]["max_row_tokens"] > 8

    created = service.create_job(**body)
    assert created["method"]["reinforcement"]["grader"] == SAYS_YES
    job = service.wait_for(created["id"], timeout=900)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["total_steps"] == plan.json()["steps"] == 8

    points = service.client.get(f"/jobs/{job['id']}/metrics").json()["data"]
    rewards = [p["reward_mean"] for p in points if p.get("reward_mean") is not None]
    assert len(rewards) == 8
    assert all(0.0 <= reward <= 1.0 for reward in rewards)
    # The grader's mean reward goes up between the first and the last steps.
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2
    assert all(p.get("reward_std") is not None for p in points if p.get("reward_mean") is not None)

    evaluation = job["evaluation"]
    assert evaluation["split"] == "validation" and evaluation["rows"] == 4
    assert evaluation["adapter_mean_reward"] > evaluation["base_mean_reward"]
    assert "base_eval_loss" not in evaluation
    assert len(evaluation["samples"]) >= 1 and evaluation["samples"][0]["reference"] is None
    evaluated = next(e for e in service.events(job["id"]) if e["type"] == "job.evaluated")
    assert evaluated["message"].startswith("Mean reward on 4 validation rows: base")

    card = service.adapter_files(job["adapter"]["id"])["README.md"].decode()
    assert "grpo (TRL GRPOTrainer, 4 answers per prompt)" in card
    assert "grader's mean reward" in card


def test_a_reward_model_job_grades_a_reinforcement_job(service: Service, tiny_model: str) -> None:
    pairs = service.upload("prefer-for-grader.jsonl", jsonl(preference_rows(1, 4)))
    judge = service.wait_for(
        service.create_job(
            base_model=tiny_model,
            dataset_url=pairs,
            method={"type": "reward_model"},
            hyperparameters=DPO,
        )["id"]
    )
    assert judge["status"] == "succeeded", judge["error"]
    grader = {
        "type": "multi",
        "name": "judged",
        "graders": {
            "judge": {"type": "reward_model", "name": "judge", "model": judge["adapter"]["name"]},
            "brief": {"type": "regex", "name": "brief", "pattern": "^.{0,40}$"},
        },
        "calculate_output": "judge + 0.5 * brief",
    }
    rows = service.upload("sums.jsonl", jsonl(prompt_rows(QUESTIONS[:4])))
    job = service.wait_for(
        service.create_job(
            base_model=tiny_model,
            dataset_url=rows,
            method=reinforcement(grader),
            hyperparameters={**GRPO, "n_epochs": 1},
        )["id"]
    )
    assert job["status"] == "succeeded", job["error"]
    points = service.client.get(f"/jobs/{job['id']}/metrics").json()["data"]
    # A reward model's scores are not bounded to [0, 1] as a string check's are.
    assert [p["reward_mean"] for p in points if p.get("reward_mean") is not None]
    assert job["evaluation"]["adapter_mean_reward"] is not None

    generating = service.trained_job(tiny_model)
    refused = service.client.post(
        "/jobs",
        json={
            "base_model": tiny_model,
            "dataset_url": rows,
            "method": reinforcement(
                {"type": "reward_model", "name": "judge", "model": generating["id"]}
            ),
        },
    )
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "grader_model_not_reward_model"
    assert error["detail"]["field"] == "method.reinforcement.grader"


def test_the_sdk_creates_and_reads_reinforcement_jobs(service: Service, tiny_model: str) -> None:
    key = local_key_headers()["Authorization"].removeprefix("Bearer ")
    client = OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0)
    uploaded = client.files.create(
        file=("yes-no.jsonl", jsonl(prompt_rows(QUESTIONS[:4]))), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=tiny_model,
        training_file=uploaded.id,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": SAYS_YES,
                "hyperparameters": {"n_epochs": 1, "batch_size": 2},
            },
        },
    )
    assert job.method.type == "reinforcement"
    assert job.method.reinforcement.grader.type == "string_check"
    done = service.wait_for(job.id)
    assert done["status"] == "succeeded", done["error"]
    read = client.fine_tuning.jobs.retrieve(job.id)
    assert read.method.type == "reinforcement"
    assert read.method.reinforcement.grader.name == "says_yes"
    assert read.method.reinforcement.hyperparameters.n_epochs == 1


def test_bad_graders_and_prompt_rows_are_refused_by_field_and_line(
    service: Service, tiny_model: str
) -> None:
    rows = prompt_rows(QUESTIONS[:3])
    del rows[1]["answer"]
    rows[2]["messages"].append({"role": "assistant", "content": "Yes."})
    broken = service.upload("yes-no-broken.jsonl", jsonl(rows))
    job = service.wait_for(
        service.create_job(
            base_model=tiny_model, dataset_url=broken, method=reinforcement(SAYS_YES)
        )["id"]
    )
    assert job["status"] == "failed"
    assert job["error"]["code"] == "dataset_invalid"
    message = job["error"]["message"]
    assert "line 2, field answer: missing: grader 'says_yes' reads {{item.answer}}" in message
    assert "line 3, field messages[1].role: is 'assistant'" in message

    good = service.upload("yes-no-good.jsonl", jsonl(prompt_rows(QUESTIONS[:2])))
    for grader, expected in (
        ({**SAYS_YES, "operation": "like_ish"}, "operation"),
        ({**SAYS_YES, "reference": "{{answer}}"}, "reference"),
        (
            {
                "type": "text_similarity",
                "name": "m",
                "reference": "x",
                "evaluation_metric": "meteor",
            },
            "evaluation_metric",
        ),
        ({"type": "regex", "name": "r", "pattern": "(unclosed"}, "pattern"),
        (
            {"type": "multi", "name": "m", "graders": {"a": SAYS_YES}, "calculate_output": "a + b"},
            "calculate_output",
        ),
    ):
        refused = service.client.post(
            "/jobs", json={"dataset_url": good, "method": reinforcement(grader)}
        )
        assert refused.status_code == 422, (grader, refused.text)
        assert expected in refused.text

    missing = service.client.post(
        "/jobs", json={"dataset_url": good, "method": {"type": "reinforcement"}}
    )
    assert missing.status_code == 422 and "needs its settings with a grader" in missing.text
    chat = service.upload("chat-for-grpo.jsonl", jsonl(preference_rows(1, 2)))
    job = service.wait_for(
        service.create_job(base_model=tiny_model, dataset_url=chat, method=reinforcement(SAYS_YES))[
            "id"
        ]
    )
    assert job["status"] == "failed" and job["error"]["code"] == "dataset_invalid"


def test_sft_then_grpo_is_one_chain(service: Service, tiny_model: str) -> None:
    sft = service.trained_job(tiny_model)
    rows = service.upload("yes-no-chain.jsonl", jsonl(prompt_rows(QUESTIONS[:4])))
    created = service.create_job(
        dataset_url=rows,
        adapter=sft["id"],
        method=reinforcement(SAYS_YES),
        hyperparameters={**GRPO, "n_epochs": 1},
    )
    assert created["parent"]["reference"] == sft["id"] and created["base_model"] == tiny_model
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    card = service.adapter_files(job["adapter"]["id"])["README.md"].decode()
    assert f"trained on from adapter `{sft['id']}`" in card
