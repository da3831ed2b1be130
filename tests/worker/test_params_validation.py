"""No second validation of a job's params (issue 20): params that the Batches API (or
``budgeter submit``) validated are stored with the tag of that validation, and the worker
does not validate them again; params written untagged, as a producer writing Redis
directly does, are validated by the worker as before. Real Redis, the real mock upstream,
the worker in-process."""

from __future__ import annotations

from typing import Any, ClassVar

import aiohttp
import pytest
from redis.asyncio import Redis

import budgeter.worker.worker as worker_module
from budgeter.domain.job_params import parse_params
from budgeter.domain.messages import MessageParams
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStore
from budgeter.queue.jobqueue import NewJob
from budgeter.store.keys import batch_index_key
from budgeter.tenants.store import TenantStore
from tests.helpers import requests_for, wait_ended
from tests.worker.test_worker import results_of, running_worker


class CountingParams:
    """Stands in for MessageParams in the worker: counts the validations asked for."""

    calls: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def model_validate(cls, value: dict[str, Any]) -> MessageParams:
        cls.calls.append(value)
        return MessageParams.model_validate(value)


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    CountingParams.calls = []
    monkeypatch.setattr(worker_module, "MessageParams", CountingParams)
    return CountingParams.calls


async def mock_counts(url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/mock/stats") as resp:
        return dict((await resp.json())["requests"])


async def test_params_validated_at_submission_are_not_validated_again(
    redis: Redis, validations: list[dict[str, Any]]
) -> None:
    await TenantStore(redis).put("tagged", TenantPolicy())
    store = BatchStore(redis)
    async with running_worker(redis) as _:
        batch_id = await store.create("tagged", requests_for("t", 5))
        raw = await redis.hget("budgeter:{t:tagged}:jobs", f"{batch_id}:t-0")
        assert raw is not None and parse_params(raw).validated  # stored with the tag
        await wait_ended(store, [batch_id])
    lines = await results_of(store, batch_id)
    assert [line["result"]["type"] for line in lines] == ["succeeded"] * 5
    assert validations == []


async def test_tagged_params_go_upstream_unchecked_even_if_they_would_fail(
    redis: Redis, validations: list[dict[str, Any]]
) -> None:
    # a BatchRequest changed after validation: the tag still says "validated", and the
    # worker trusts it; the upstream (the strict mock) is the one that refuses it
    await TenantStore(redis).put("trusted", TenantPolicy())
    store = BatchStore(redis)
    bad = requests_for("bad", 1)[0].model_copy(deep=True)
    bad.params.model = ""  # MessageParams refuses it (at least one character)
    async with running_worker(redis) as (_, url):
        before = await mock_counts(url)
        batch_id = await store.create("trusted", [bad])
        await wait_ended(store, [batch_id])
        after = await mock_counts(url)
    [line] = await results_of(store, batch_id)
    assert line["result"]["type"] == "errored"
    assert validations == []
    assert after["count_tokens"] > before["count_tokens"]  # it reached the upstream
    with pytest.raises(ValueError):
        MessageParams.model_validate(bad.params_dict())


async def test_untagged_params_are_validated_and_invalid_ones_errored_as_before(
    redis: Redis, validations: list[dict[str, Any]]
) -> None:
    await TenantStore(redis).put("foreign", TenantPolicy())
    store = BatchStore(redis)
    good = requests_for("ok", 1)[0].params_dict()
    jobs = [
        NewJob("ok", good),  # untagged: what a producer writing Redis directly stores
        NewJob("no-max", {"model": "claude-test", "messages": good["messages"]}),
        NewJob("bad-content", {**good, "messages": [{"role": "user", "content": 5}]}),
    ]
    async with running_worker(redis) as (_, url):
        before = await mock_counts(url)
        await redis.hset(batch_index_key("budgeter"), "fb1", "foreign")
        await store.queue.submit("foreign", "fb1", jobs)
        await store.queue.activate("foreign", wake=1)
        await wait_ended(store, ["fb1"])
        after = await mock_counts(url)
    results = {line["custom_id"]: line["result"] for line in await results_of(store, "fb1")}
    assert results["ok"]["type"] == "succeeded"
    for cid, field in (("no-max", "max_tokens"), ("bad-content", "messages.0.content")):
        assert results[cid]["type"] == "errored"
        error = results[cid]["error"]["error"]
        assert error["type"] == "invalid_request_error" and error["message"].startswith(field)
    assert len(validations) == 3  # each untagged job validated once, by the worker
    assert after["count_tokens"] - before["count_tokens"] == 1  # only the valid one went up
