"""Writing the exported file: the target check before converting, and the atomic write."""

import os
import tempfile


def atomic_write_bytes(path, data):
    """Writes `data` to `path` so that `path` is either the old file or the new one.

    The bytes go to a temporary file in the same directory, are flushed to
    disk, and replace `path` with one `os.replace`; if anything fails, the
    temporary file is removed and an existing `path` is untouched.

    Args:
        path: the file to write (missing parent directories are created).
        data: the bytes to write.

    Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out.bin")
    >>> atomic_write_bytes(path, b"new")
    >>> open(path, "rb").read()
    b'new'
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tfopt-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_target(path):
    """Raises before any conversion if `path` cannot be written (a missing parent is fine: it is created)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"tfopt.export: path {path!r} is a directory; `path` names the .tflite file to write. "
            f"Fix: path={os.path.join(path, 'model.tflite')!r}.")
    existing = os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f"tfopt.export: cannot write {path!r}: {existing!r} is a file, not a directory. "
            "Fix: choose a path under a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"tfopt.export: cannot write {path!r}: directory {existing!r} is not writable. "
            "Fix: choose a writable directory, or change its permissions.")
