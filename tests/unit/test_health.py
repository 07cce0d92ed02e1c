"""grpc.health.v1 follows Serve's view of the deployments: NOT_SERVING until all are up, and again when
one is lost or the controller cannot be asked."""

from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from patchscope.serve.health import API_SERVICE, mark_ready, watch
from patchscope.wire import pb

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_status_follows_the_probe_and_a_failing_probe_is_not_serving():
    states = [False, True, RuntimeError("controller away"), True]
    seen: list[tuple[int, int]] = []

    def probe() -> bool:
        state = states[min(len(seen), len(states) - 1)]
        if isinstance(state, Exception):
            raise state
        return state

    async def scenario():
        health = HealthServicer()
        task = asyncio.ensure_future(watch(health, probe, poll_s=0.01, serving_poll_s=0.01))
        for _ in range(len(states)):
            await asyncio.sleep(0.05)
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""), None)
            api = await health.Check(health_pb2.HealthCheckRequest(service=API_SERVICE), None)
            seen.append((overall.status, api.status))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [s for s, _ in seen] == [NOT_SERVING, SERVING, NOT_SERVING, SERVING]
    assert all(a == b for a, b in seen)


def test_the_controller_is_asked_less_often_while_serving():
    def calls(answer: bool) -> int:
        count = 0

        def probe() -> bool:
            nonlocal count
            count += 1
            return answer

        async def scenario() -> None:
            task = asyncio.ensure_future(watch(HealthServicer(), probe, poll_s=0.01, serving_poll_s=0.25))
            await asyncio.sleep(0.4)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(scenario())
        return count

    assert calls(True) <= 2 < 10 <= calls(False)


def test_list_models_ready_means_every_deployment_hosting_the_model_answers():
    models = [
        pb.ModelInfo(id="both", source=True, target=True, ready=True),
        pb.ModelInfo(id="target-only", source=False, target=True, ready=True),
    ]
    mark_ready(models, ({"both"}, {"target-only"}))  # the target replica of "both" did not answer
    assert [m.ready for m in models] == [False, True]
    mark_ready(models, None)  # no deployments to ask: left as they are
    assert [m.ready for m in models] == [False, True]
