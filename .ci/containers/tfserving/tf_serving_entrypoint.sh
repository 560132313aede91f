#!/bin/bash
# As in the real image: the model from the environment, any further flags appended.
exec tensorflow_model_server --port="${GRPC_PORT}" --rest_api_port="${PORT}" \
  --model_name="${MODEL_NAME}" --model_base_path="${MODEL_BASE_PATH}/${MODEL_NAME}" "$@"
