"""Quiet logs for the command line: what `python -m tfopt` shows is tfopt's output only.

Imported by `tfopt/__init__.py` before TensorFlow when the process is `python -m tfopt`
(TensorFlow logs while it loads, before `tfopt/__main__.py` runs), and by nothing else:
a library must not redirect its user's stderr. Imports nothing heavy.
"""

import atexit
import contextlib
import logging
import os
import re
import sys
import threading


def is_cli():
    """True while Python is starting the `tfopt` console script, `python -m tfopt`
    or `python -m tfopt.<module>`.

    During `-m`, `sys.argv[0]` is "-m" until the module is found, so a script that
    merely imports tfopt never matches; the console script is the file `tfopt`
    (`tfopt.exe` on Windows) that pip writes.
    """
    if os.path.basename(sys.argv[0]) in ("tfopt", "tfopt.exe", "tfopt-script.py"):
        return True
    if sys.argv[:1] != ["-m"]:
        return False
    orig = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(orig):
        module = orig[i + 1] if arg == "-m" and i + 1 < len(orig) else arg[2:] if arg.startswith("-m") else None
        if module is not None:
            return module.split(".")[0] == "tfopt"
    return False


# Routine lines TensorFlow's C++ runtime, the LiteRT converter and interpreter write to file
# descriptor 2 whatever TF_CPP_MIN_LOG_LEVEL says (checked with TensorFlow 2.21, LiteRT 2.3).
_NATIVE_NOISE = re.compile(
    r"[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "  # absl INFO/WARNING/ERROR (FATAL passes)
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions: "  # cpu_feature_guard's second line
    r"|INFO: Created TensorFlow Lite "  # the interpreter's XNNPACK delegate
    r"|fully_quantize: \d"  # the converter's calibrator
)


def quiet_logs():
    """For a command-line process: TensorFlow's and gRPC's native log levels (unless
    the user set them), the absl and tensorflow Python loggers at ERROR, and
    `filter_native_stderr()`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    filter_native_stderr()


_FILTER = {}  # the running filter: {"real": the terminal's fd, "thread": the pump}


def filter_native_stderr():
    """Until the process exits, drops the routine log lines that native code
    (TensorFlow, the LiteRT converter and interpreter) writes to file descriptor 2;
    every other line (tfopt's messages, warnings, tracebacks) reaches stderr unchanged.

    Python's `sys.stderr` writes to the same descriptor, so its lines go through the
    same pipe, in order. Does nothing when already running, when the user set
    TF_CPP_MIN_LOG_LEVEL below 3 (they asked for TensorFlow's logs), or when
    descriptor 2 cannot be redirected.
    """
    if _FILTER or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "3":
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):
        return
    out = os.fdopen(os.dup(real), "wb")
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb") as pipe, out:
            for line in pipe:
                if not _NATIVE_NOISE.match(line.decode("utf-8", "replace")):
                    out.write(line)
                    out.flush()

    thread = threading.Thread(target=pump, name="tfopt-stderr-filter", daemon=True)
    thread.start()
    _FILTER.update(real=real, thread=thread)
    atexit.register(_stop_filter)


def _stop_filter():
    """Puts the terminal back on descriptor 2 and lets the pump print what it still holds."""
    if not _FILTER:
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(_FILTER["real"], 2)  # closes the pipe's last write end: the pump reads to the end
    os.close(_FILTER["real"])
    _FILTER.pop("thread").join(timeout=10)
    _FILTER.clear()


