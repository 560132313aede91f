"""The command line both clients share: which server, which model, which rows."""

import argparse
import json
import os

SAMPLE_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]


def client_parser(
    description: str, port_variable: str, default_port: int
) -> argparse.ArgumentParser:
    """Options for `status | metadata | predict`; host and port default to the environment."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("command", choices=["status", "metadata", "predict"])
    parser.add_argument("--host", default=os.environ.get("TF_SERVING_HOST", "localhost"))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get(port_variable, str(default_port)))
    )
    parser.add_argument("--model", default="iris")
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--rows", type=json.loads, default=SAMPLE_ROWS, help="JSON list of rows")
    return parser
