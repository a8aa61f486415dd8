"""The one factory of the product's I/O resources: the lake and the source, chosen from the settings.

Workers, `main.py` and the tools ask here instead of building a store or a source themselves, so
"which lake, which source" is decided in one place (STYLE: I/O behind small interfaces with a
local twin, chosen once from the settings). The S3 and Drive modules are imported only when the
settings name them, so the embedded default never loads boto3 or the Google client.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from src.utils.object_store import LocalObjectStore, ObjectStore
from src.utils.sources import LocalInboxSource, Source

if TYPE_CHECKING:
    from config.config import Settings


def open_lake(settings: Settings, *, stop: threading.Event | None = None) -> ObjectStore:
    """The lake the settings name: the S3 bucket when S3_BUCKET_NAME is set, else LOCAL_LAKE_DIR.

    `stop` (the worker's stop event) ends a wait for a lake outage when the worker is asked to stop.
    """
    if settings.s3_bucket_name:
        from src.utils.s3_utils import S3ObjectStore

        return S3ObjectStore(settings, stop=stop)
    return LocalObjectStore(settings.local_lake_dir, stop=stop)


def open_source(settings: Settings, db: Any, *, stop: threading.Event | None = None, check: bool = True) -> Source:
    """The source the settings name: the Drive folder when GDRIVE_FOLDER_ID is set, else LOCAL_INBOX_DIR.

    With `check` the Drive key and folder are verified first (a one-line SettingsError/SourceError when
    they cannot work; a Drive outage is waited out). `db` keeps the Drive Changes token.
    """
    if settings.gdrive_folder_id:
        from src.utils.gdrive_source import GoogleDriveSource

        source = GoogleDriveSource(settings, db, stop=stop)
        if check:
            try:
                source.check()
            except BaseException:
                source.close()
                raise
        return source
    return LocalInboxSource(settings.local_inbox_dir)


__all__ = ["open_lake", "open_source"]
