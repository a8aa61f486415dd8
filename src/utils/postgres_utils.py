"""Former home of the PostgreSQL helpers, kept so older imports work: everything lives in `src.utils.db`."""

from src.utils.db import (  # noqa: F401
    CHUNK_CHANNEL,
    DSN_ENV,
    Database,
    Listener,
    connection_kwargs,
    copy_csv,
    copy_rows,
    describe_target,
    start_embedded,
)
from src.utils.embedded_postgres import embedded_pgdata  # noqa: F401
