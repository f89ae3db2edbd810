"""shoebox-worker: keep every OpenStack notification, safely, for years."""

from shoebox_worker.exceptions import CallbackError
from shoebox_worker.exceptions import ConfigError
from shoebox_worker.exceptions import CorruptRecord
from shoebox_worker.exceptions import EndOfFile
from shoebox_worker.exceptions import InvalidVersion
from shoebox_worker.exceptions import NoMoreFiles
from shoebox_worker.exceptions import OutOfSync
from shoebox_worker.exceptions import PluginError
from shoebox_worker.exceptions import RecordError
from shoebox_worker.exceptions import ShoeboxError
from shoebox_worker.exceptions import TornRecord
from shoebox_worker.exceptions import UploadError

__version__ = "0.1.0"

__all__ = [
    "CallbackError",
    "ConfigError",
    "CorruptRecord",
    "EndOfFile",
    "InvalidVersion",
    "NoMoreFiles",
    "OutOfSync",
    "PluginError",
    "RecordError",
    "ShoeboxError",
    "TornRecord",
    "UploadError",
    "__version__",
]
