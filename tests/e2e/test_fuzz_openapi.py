"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis):
whatever a client sends, no answer is a 5xx and none hangs. Slow suite.

The server is its own (fuzzing deletes and pins adapters with the admin key), with a small
max_new_tokens so that valid generation requests end quickly.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.e2e.conftest import ADMIN_KEY, start_server, stop_server, tiny_server_args

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 30  # a call that takes longer is a hang


@pytest.fixture(scope="module")
def fuzz_server(tiny_files, tmp_path_factory):
    args = tiny_server_args(tiny_files) + ["--max-new-tokens", "16", "--default-max-new-tokens", "8"]
    server = start_server(args, tmp_path_factory.mktemp("fuzz") / "server.log", admin_key=ADMIN_KEY)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def test_no_server_errors_and_no_hangs(api_schema, fuzz_server):
    """Each operation of the schema gets 40 generated cases (schemathesis' strategies, run by
    hypothesis here: its pytest plugin does not load with this pytest)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for operation in operations:

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            response = case.call(base_url=fuzz_server.url, headers=fuzz_server.headers(admin=True),
                                 timeout=CALL_TIMEOUT_S)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report
            failures.append(f"{operation.label}: {exc!r}"[:800])
        assert fuzz_server.process.poll() is None, fuzz_server.log()
    assert not failures, "\n".join(failures)
    print(f"{sum(statuses.values())} calls over {len(operations)} operations: {sorted(statuses.items())}")
    assert sum(statuses.values()) >= 10 * len(operations)
