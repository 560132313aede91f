"""One specialised model service: "how likely is this flower to be <MODE>?"

The same app runs three times, selected by MODE=setosa|versicolor|virginica. Each instance loads
its own one-vs-rest model, iris_svc_0_<MODE>.onnx, whose column 0 is P(that class) and column 1
is P(not that class). The proxy (proxy.py) asks all of them at once and keeps the most likely.

    MODE=setosa PORT=8000 python service.py
"""

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from payload import INPUT_SCHEMA, SAMPLE, one_or_many, parse_rows
from prometheus_client import CollectorRegistry, Histogram
from serving import ServerSettings, read_body, serve, web_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("service")

# The model call with its conversions: from tens of microseconds (one row, idle core) to ms.
INFERENCE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1)


@dataclass(frozen=True)
class Settings:
    mode: str
    model_dir: Path
    # Tests only: every prediction waits this long first, so that "the proxy calls the services
    # in parallel" shows up as one delay rather than three. Leave at 0 anywhere else.
    test_delay_s: float
    server: ServerSettings

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            mode=os.environ.get("MODE", "setosa"),
            model_dir=Path(os.environ.get("MODEL_DIR", "../models")),
            test_delay_s=float(os.environ.get("TEST_DELAY_MS", "0")) / 1000,
            server=ServerSettings.from_env(default_port=8000),
        )

    @property
    def model_path(self) -> Path:
        return self.model_dir / f"iris_svc_0_{self.mode}.onnx"


class BinaryClassifier:
    """The ONNX model of one class: rows of 4 features -> [P(class), P(not class)] per row."""

    def __init__(self, path: Path):
        options = ort.SessionOptions()
        # A tiny SVC runs in about 10 microseconds: extra threads would only add wake-up latency
        # and compete with the other services for the same cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def predict(self, rows: list[list[float]]) -> list[list[float]]:
        (proba,) = self.session.run(["probabilities"], {"input": np.asarray(rows, np.float32)})
        pairs: list[list[float]] = np.round(proba.astype(np.float64), 6).tolist()
        return pairs


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    registry = CollectorRegistry()
    inference = Histogram(
        "service_inference_duration_seconds",
        "Time the ONNX model takes for one call (all its rows)",
        registry=registry,
        buckets=INFERENCE_BUCKETS,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        labels = json.loads((settings.model_dir / "label.json").read_text()).values()
        if settings.mode not in labels:
            raise RuntimeError(f"MODE={settings.mode!r} is not one of {sorted(labels)}")
        app.state.model = BinaryClassifier(settings.model_path)
        log.info("loaded %s for MODE=%s", settings.model_path, settings.mode)
        yield

    async def answer(request: Request, rows: list[list[float]]) -> JSONResponse:
        if settings.test_delay_s:
            await asyncio.sleep(settings.test_delay_s)
        # Inline on the event loop: ~10 microseconds per call is cheaper than a thread hop.
        with inference.time():
            proba = request.app.state.model.predict(rows)
        return JSONResponse({"prediction": one_or_many(proba)})

    async def metadata(request: Request) -> JSONResponse:
        """Which class this service answers for, its model, input and output.
        ---
        responses:
          "200":
            description: mode, model file name, input schema, output meaning
            content:
              application/json:
                schema:
                  type: object
                  required: [mode, model, input, output]
                  properties:
                    mode: {type: string}
                    model: {type: string}
                    input: {type: object}
                    output: {type: object}
          "401": {$ref: "#/components/responses/Unauthorized"}
        """
        return JSONResponse(
            {
                "mode": settings.mode,
                "model": settings.model_path.name,
                "input": INPUT_SCHEMA,
                "output": {
                    "data_type": "float32",
                    "data_structure": "(2,) for one row, (rows, 2) for several",
                    "meaning": [f"P({settings.mode})", f"P(not {settings.mode})"],
                },
            }
        )

    async def predict(request: Request) -> JSONResponse:
        """[P(MODE), P(not MODE)] for one row, a list of them for several.
        ---
        requestBody:
          required: true
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Rows"}
        responses:
          "200": {$ref: "#/components/responses/Prediction"}
          "401": {$ref: "#/components/responses/Unauthorized"}
          "413": {$ref: "#/components/responses/TooLarge"}
          "422": {$ref: "#/components/responses/BadInput"}
        """
        return await answer(request, parse_rows(await read_body(request)))

    async def predict_test(request: Request) -> JSONResponse:
        """The prediction for a fixed sample row (a setosa flower).
        ---
        responses:
          "200": {$ref: "#/components/responses/Prediction"}
          "401": {$ref: "#/components/responses/Unauthorized"}
        """
        return await answer(request, SAMPLE)

    routes = [
        Route("/metadata", metadata),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/test", predict_test),
    ]
    info = {"title": f"04_horizontal service ({settings.mode})", "version": "1"}
    return web_app(routes, lifespan, settings.server, info, OPENAPI_COMPONENTS, registry)


OPENAPI_COMPONENTS = {
    "responses": {
        "Prediction": {
            "description": "[P(MODE), P(not MODE)] for one row, a list of them for several",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["prediction"],
                        "properties": {"prediction": {"$ref": "#/components/schemas/Prediction"}},
                    }
                }
            },
        }
    }
}


if __name__ == "__main__":
    serve(create_app, Settings.from_env())
