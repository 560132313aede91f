"""schemathesis against the proxy's own /openapi.json, over HTTP to the real process.

For every documented operation, MAX_EXAMPLES generated requests, valid and invalid ones: no
response may be a 5xx or contradict the documented status codes, content types and schemas.
The number of requests sent is printed at the end (run with -s to see it).
"""

from collections import Counter

import redis
import schemathesis
from conftest import Processes, base_url
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok

MAX_EXAMPLES = 100  # per operation; a GET without parameters stops after one


def test_the_proxy_answers_as_documented(db: redis.Redis, procs: Processes, env: dict) -> None:
    procs.proxy(env)
    schema = schemathesis.openapi.from_url(base_url(env) + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the proxy's own schema must be valid
        operations.append(result.ok())
    assert len(operations) == 8
    counts: Counter[str] = Counter()
    for operation in operations:
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,  # a shared, loaded machine: speed is bench.py's business
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: Case) -> None:
            counts[case.operation.label] += 1
            case.call_and_validate(timeout=30)

        check()
    print(f"\nschemathesis requests per operation: {dict(counts)}; total {counts.total()}")
