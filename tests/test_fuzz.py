"""schemathesis against the server's own /openapi.json, as an admin: no input may cause a server error.

Bounded and reproducible: 25 generated requests per operation (explicit examples and the generation
phase, derandomized so that CI sees the same inputs every run),
against a real server on a loopback socket with a fresh registry. A 500 (``INTERNAL_ERROR``) is a
bug in sqlinfer whatever the input; other 5xx must carry their own code (none is expected here:
no endpoint this run creates calls a model).
"""

from __future__ import annotations

import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

pytestmark = pytest.mark.fuzz

EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from serving.control.service import EndpointService
    from tests.rest_server import RunningServer

    service = EndpointService(tmp_path_factory.mktemp("fuzz-home"), deploy_gate=threading.Event())  # nothing deploys
    running = RunningServer(service)
    _, token = service.auth.create_token("fuzzer", is_admin=True)
    yield running, token
    running.stop()


def test_no_input_causes_a_server_error(fuzz_server):
    running, token = fuzz_server
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    seen: dict[str, int] = {}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]

    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None, derandomize=True)
        def check(case) -> None:
            response = case.call(base_url=running.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            seen[label] = seen.get(label, 0) + 1
            if response.status_code == 500 or (response.status_code > 500 and
                                               response.json().get("error_code") in (None, "INTERNAL_ERROR")):
                failures.append(f"{label} {case.body!r} -> {response.status_code} {response.text[:200]}")

        check()
    print(f"schemathesis: {len(operations)} operations, {sum(seen.values())} requests, {len(failures)} server errors")
    assert len(operations) >= 30 and set(seen) == {f"{o.method.upper()} {o.path}" for o in operations}
    assert failures == []
