"""Where moechat keeps its per-user data (conversations database, exports)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_DIR = "MOECHAT_DATA_DIR"
DB_FILENAME = "conversations.sqlite3"


def data_dir() -> Path:
    """The user data directory: ``$MOECHAT_DATA_DIR`` when set, else the platform default.

    The directory is not created here; callers that write create it.
    """
    override = os.environ.get(ENV_DATA_DIR, "").strip()
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("moechat", appauthor=False))


def database_path(directory: Path | None = None) -> Path:
    """The conversations database inside ``directory`` (default: :func:`data_dir`)."""
    return (directory if directory is not None else data_dir()) / DB_FILENAME
