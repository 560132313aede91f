"""schemathesis against the proxy's own /openapi.json, over HTTP to the real process.

For every documented operation, up to MAX_EXAMPLES generated requests, valid and invalid ones:
no response may be a 5xx or contradict the documented status codes, content types and schemas.
The number of requests sent is printed at the end (run with -s to see it).
"""

from collections import Counter

import redis
import schemathesis
from conftest import Started, start_proxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

MAX_EXAMPLES = 200  # per operation; a GET without parameters stops after one


def test_the_proxy_answers_as_documented(start: Started, db: redis.Redis) -> None:
    _, base = start_proxy(start)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the document names an unusable operation
        operations.append(result.ok())
    assert len(operations) == 6
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
        def check(case: schemathesis.Case) -> None:
            counts[case.operation.label] += 1
            # A schema cannot say "base64 of a real image", so a schema-valid body is usually a
            # 400, rightly: that one check is left out, every other one applies.
            case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=30)

        check()
    print(f"\nschemathesis requests per operation: {dict(counts)}; total {counts.total()}")
