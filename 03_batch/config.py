"""Settings for the API and the job: read from the environment once, at start-up, in one place."""

import os
from dataclasses import dataclass
from pathlib import Path

# Without Docker the models sit next to the chapter; compose mounts them at /models instead.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Settings:
    mysql_host: str = "127.0.0.1"
    mysql_port: int = 3306
    mysql_user: str = "root"
    mysql_password: str = ""
    mysql_database: str = "sample_db"
    model_filepath: str = str(MODELS_DIR / "iris_svc.onnx")
    label_filepath: str = str(MODELS_DIR / "label.json")
    host: str = "0.0.0.0"  # API
    port: int = 8000  # API
    interval: float = 60.0  # job: seconds between runs (the first run waits one interval too)
    chunk_size: int = 5000  # job: rows claimed, predicted and written per transaction
    threads: int = 4  # job: chunks in flight at once in one process

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        d = cls()
        return cls(
            mysql_host=env.get("MYSQL_HOST", d.mysql_host),
            mysql_port=int(env.get("MYSQL_PORT", d.mysql_port)),
            mysql_user=env.get("MYSQL_USER", d.mysql_user),
            mysql_password=env.get("MYSQL_PASSWORD", d.mysql_password),
            mysql_database=env.get("MYSQL_DATABASE", d.mysql_database),
            model_filepath=env.get("MODEL_FILEPATH", d.model_filepath),
            label_filepath=env.get("LABEL_FILEPATH", d.label_filepath),
            host=env.get("HOST", d.host),
            port=int(env.get("PORT", d.port)),
            interval=float(env.get("INTERVAL", d.interval)),
            chunk_size=int(env.get("CHUNK_SIZE", d.chunk_size)),
            threads=int(env.get("THREADS", d.threads)),
        )
