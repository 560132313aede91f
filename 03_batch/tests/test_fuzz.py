"""schemathesis against the API (in process over ASGI, lifespan included) and a real database:
every operation of /openapi.json, with generated requests valid and invalid. No 5xx, nothing
contradicting the schema."""

import dataclasses
import secrets
from collections.abc import Iterator

import api
import db
import pytest
import schemathesis
from conftest import BASE, http
from hypothesis import HealthCheck, settings

EXAMPLES = 200  # per operation (8): about 1,500 requests in all, in well under a minute
REQUESTS: dict[str, int] = {}  # per operation, printed at the end of the run (conftest.py)

# A database of this module's own; the app's lifespan creates it, the fixture below drops it.
FUZZ = dataclasses.replace(BASE, mysql_database=f"batch_test_fuzz_{secrets.token_hex(4)}")
schema = schemathesis.openapi.from_asgi("/openapi.json", api.create_app(FUZZ))


@pytest.fixture(scope="module", autouse=True)
def fuzz_database() -> Iterator[None]:
    yield
    db.drop_database(FUZZ)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded machine is not a failure
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    declared = case.method.upper() == case.operation.method.upper()
    key = f"{case.method} {case.path}" if declared else "undeclared methods (405 expected)"
    REQUESTS[key] = REQUESTS.get(key, 0) + 1
    case.call_and_validate()


def test_openapi_lists_every_route(api: str) -> None:
    status, doc = http("GET", api + "/openapi.json")
    assert status == 200
    operations = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert operations == {
        ("POST", "/data"),
        ("POST", "/data/list"),
        ("GET", "/data/all"),
        ("GET", "/data/unpredicted"),
        ("GET", "/data/predicted"),
        ("GET", "/data/{item_id}"),
        ("GET", "/health"),
        ("GET", "/metadata"),
    }
