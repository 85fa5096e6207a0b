"""Small helpers shared by every script: user-facing errors, atomic writes, CLI wrapper."""
import functools
import json
import os
import sys
import tempfile

import torch


class InputError(Exception):
    """Bad input from the user (a path, flag or file). Scripts print it as one line and exit 2."""


def atomic_write_bytes(path, data: bytes):
    """Write `data` to `path` through a temp file in the same folder, then rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path):
    """torch.save that never leaves a half-written file at `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_json_line(path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def cli_main(main):
    """Wrap a script's main(args): an InputError becomes one 'error: ...' line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*a, **kw):
        try:
            return main(*a, **kw)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
