"""Server-side batching, as configured by batching.config (the stand-in and compose alike)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import Iris
from rest_client import RestClient, ServingError


def test_concurrent_requests_each_get_their_own_rows(
    rest: RestClient, iris: Iris, expected: np.ndarray
) -> None:
    rows = iris[0]

    def one(i: int) -> np.ndarray:  # 1 to 3 rows per request, so batches mix sizes
        return np.array(rest.predict(rows[i : i + 1 + i % 3].tolist()))

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(100)))
    for i, got in enumerate(answers):
        np.testing.assert_allclose(got, expected[i : i + 1 + i % 3], atol=1e-5)


def test_request_larger_than_max_batch_size_is_400(rest: RestClient, iris: Iris) -> None:
    rows = np.concatenate([iris[0], iris[0]])[:257].tolist()  # batching.config: 256
    with pytest.raises(ServingError) as info:
        rest.predict(rows)
    assert info.value.status == 400
    assert "larger than maximum input batch size 256" in info.value.message
