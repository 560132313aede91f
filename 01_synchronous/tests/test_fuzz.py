"""schemathesis against the running stand-in's REST API, from its own OpenAPI description.

The description is what the app serves at /openapi.json (built in-process: it needs no model);
the requests go over HTTP to the server the other tests use (batching on).
Bounded: FUZZ_EXAMPLES examples per operation (six operations, plus schemathesis's
coverage cases), so the run stays well under a minute.
No answer may be a 5xx or contradict the schema (status codes, content type, body shape).
"""

import pytest
import schemathesis
from conftest import REAL_SERVER, Server
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance, unsupported_method

FUZZ_EXAMPLES = 150
calls: dict[str, int] = {}  # requests made per operation, printed at the end


def openapi_document() -> dict:
    from rest_api import ROUTES, openapi_schema

    return openapi_schema(ROUTES)


if REAL_SERVER:
    pytest.skip(
        "TensorFlow Serving has no /openapi.json: nothing to fuzz against TF_SERVING_HOST",
        allow_module_level=True,
    )
schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # a loaded machine: time is not what is tested here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_rest_api_fuzz(case: schemathesis.Case, server: Server) -> None:
    calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
    # TensorFlow Serving answers any other method under /v1 with 400 "Malformed request", not
    # 405; and a schema-valid predict body may still be refused: its shape is the model's.
    excluded = [unsupported_method] + ([positive_data_acceptance] if case.method == "POST" else [])
    case.call_and_validate(
        base_url=f"http://{server.host}:{server.rest_port}", timeout=30, excluded_checks=excluded
    )


def test_fuzz_request_count(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints how many requests the fuzz test made (run with -s to see it)."""
    with capsys.disabled():
        print(f"\nschemathesis requests per operation: {calls}; total {sum(calls.values())}")


def test_openapi_json_is_served(server: Server) -> None:
    import json
    import urllib.request

    url = f"http://{server.host}:{server.rest_port}/openapi.json"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert json.loads(response.read()) == json.loads(json.dumps(openapi_document()))
