"""schemathesis against both apps' own /openapi.json, over HTTP to the real processes.

For every documented operation, MAX_EXAMPLES generated requests, valid and invalid ones: no
response may be a 5xx or contradict the documented status codes, content types and schemas.
The number of requests sent to each app is printed at the end of the run.
"""

from collections import Counter

import schemathesis
from conftest import FUZZ_REQUESTS, Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

# Per operation and app. A GET without parameters has one possible request, so Hypothesis
# stops there; the POST operations get the full number.
MAX_EXAMPLES = 150


def fuzz(url: str, counts: Counter[str], app: str) -> None:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the document names an unusable operation
        operations.append(result.ok())
    assert operations
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
            counts[app] += 1
            case.call_and_validate()

        check()


def test_the_proxy_answers_as_documented(cluster: Cluster) -> None:
    fuzz(cluster.proxy.url, FUZZ_REQUESTS, "proxy")


def test_a_service_answers_as_documented(cluster: Cluster) -> None:
    fuzz(cluster.services["setosa"].url, FUZZ_REQUESTS, "service")
