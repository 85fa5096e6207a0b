"""Crash safety, behind a few named calls: what keeps a run's files whole through a kill, a full disk,
a preemption or a failing rank. The method's modules call these and hold none of their mechanics.

    atomic_torch_save(obj, path) / atomic_write_text(path, text)   # whole file or the old one, never half
    append_line(path, line)            # a log line whole or not at all
    allocate_npy([(path, dtype, shape)], way_out)   # memory-mapped arrays: their disk space first
    with run_lock(folder, flag): ...   # one run per folder (rank 0 holds it)
    with interrupts_deferred(): ...    # SIGINT/SIGTERM wait until the block's writes are done
    on_rank0(fn, ...)                  # fn on rank 0, its result or its error on every rank
    cli_main(main)                     # one line for bad input, a full disk or an interrupt

A full disk is OutOfSpace naming the file (exit 1); the same command, rerun after space is freed,
continues from the files already whole.
"""
import contextlib
import errno
import fcntl
import functools
import os
import sys
import tempfile

import numpy as np
import torch

from utils import InputError, rank_world


class OutOfSpace(Exception):
    """A write failed, or would fail, for lack of disk space. Scripts print it as one line and exit 1;
    finished work stays on disk and the same command, rerun after space is freed, continues."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TEMP_PREFIX = ".tmp-"   # the temp file of an atomic write, beside its target; a kill may leave one


def _no_space_error(e):
    """The OSError for lack of space behind `e` (torch.save wraps it in a RuntimeError), else None."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def writing(path):
    """A failure for lack of space inside the block becomes one OutOfSpace naming `path`."""
    try:
        yield
    except OutOfSpace:
        raise
    except Exception as e:
        err = _no_space_error(e)
        if err is None:
            raise
        raise OutOfSpace(f"cannot write {path}: {err.strerror}; free space there and run the same "
                         "command again to continue") from None


# ---- disk space for memory-mapped files --------------------------------------------------------

def free_bytes(folder):
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def reserve_space(path, nbytes, what, way_out):
    """Allocate the `nbytes` of file `path` on disk now. A file written through a memory map (the image
    cache, the score arrays) would otherwise end the process with SIGBUS, and no message, on the first
    page the filesystem cannot back. Too little room: OutOfSpace naming the folder, the bytes needed
    and free, and `way_out`. Filesystems without fallocate: compared with the free space instead."""
    folder = os.path.dirname(os.path.abspath(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        need = nbytes - os.fstat(fd).st_blocks * 512   # less what is allocated already (a resumed file)
        free = free_bytes(folder)
        if need <= 0:
            return
        if need <= free:   # compared first: a failed fallocate may keep what it allocated
            try:
                os.posix_fallocate(fd, 0, nbytes)
                return
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    return   # no fallocate here: the free space, compared above, is all we can check
                if e.errno not in NO_SPACE_ERRNOS:
                    raise
    finally:
        os.close(fd)
    raise OutOfSpace(f"not enough space in {folder} for {what}: needs {need:,} bytes ({need / 2**30:.2f} GiB), "
                     f"{free:,} bytes free; {way_out}")


def allocate_npy(arrays, way_out, create=True):
    """.npy files [(path, dtype, shape)] to be written row by row through memory maps (write_npy_rows), with
    their disk space reserved now: created as zeros, or with create=False a resumed pass's files kept. A full
    disk: OutOfSpace, and the files this call created are removed (no zeros left to be taken for results)."""
    try:
        if create:
            for path, dtype, shape in arrays:
                with writing(path):
                    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
        for path, _, _ in arrays:
            reserve_space(path, os.path.getsize(path), os.path.basename(path), way_out)
    except OutOfSpace:
        for path, _, _ in arrays if create else ():
            if os.path.exists(path):
                os.unlink(path)
        raise


def allocate_file(path, nbytes, what, way_out):
    """A file of `nbytes` zeros, its disk space reserved now, to be written through a memory map. A full disk:
    OutOfSpace naming `what`, the file removed, and its folder too when that leaves it empty."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(nbytes)   # sparse: no blocks yet
    try:
        reserve_space(path, nbytes, what, way_out)
    except OutOfSpace:
        os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(os.path.abspath(path)))   # only when empty
        raise


def write_npy_rows(path, index, rows):
    """rows (K, ...) into the .npy file at `path`, at the row numbers `index` (K,)."""
    memmap = np.load(path, mmap_mode="r+")
    memmap[index.numpy()] = rows.numpy()
    memmap.flush()   # a chunk file written after this marks these rows as written
    del memmap


# ---- atomic writes -----------------------------------------------------------------------------

def _umask_mode(fd):
    # mkstemp makes 0600 files; a shared score cache or checkpoint should get the usual umask mode
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


@contextlib.contextmanager
def _temp_beside(path):
    """A temp file in `path`'s folder that replaces `path` when the block ends without error."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
    try:
        _umask_mode(fd)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _atomic_file(path, sync=True):
    """A binary file object whose content replaces `path` whole, synced unless sync=False, when the block
    ends; a full disk inside it is one OutOfSpace naming `path`."""
    with writing(path), _temp_beside(os.fspath(path)) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        if sync:
            os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes, sync=True):
    """Write `data` to `path` through a temp file in the same folder, then rename. sync=False skips the
    fsync (≈0.7 ms a file): for many small files that a rerun would write again (converted images)."""
    with _atomic_file(path, sync) as f:
        f.write(data)


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path):
    """torch.save that never leaves a half-written file at `path`."""
    # through a file object: torch's own writer turns a full disk into "unexpected pos", the
    # file object's OSError names the cause
    with _atomic_file(path) as f:
        torch.save(obj, f)


def remove_temp_files(folder, targets=None):
    """Temp files of atomic writes a kill cut off: all in `folder` (the caller holds its lock), or only
    those of the files named in `targets` (a folder shared with other runs)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX) and (targets is None or name.endswith(tuple(targets))):
            os.unlink(os.path.join(folder, name))


def append_line(path, line):
    """Append one line; a write cut short (full disk) is taken back, so no torn line stays."""
    with writing(path), open(path, "a") as f:
        size = f.tell()
        try:
            f.write(line + "\n")
            f.flush()
        except OSError:
            f.truncate(size)
            raise


# ---- interrupts ----------------------------------------------------------------------------------

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM arriving inside the block act when it ends: a checkpoint and its log line
    are written whole before a preempted run stops."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    saved = {s: signal.signal(s, lambda signum, frame: caught.append((signum, frame))) for s in sigs}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if caught:
            signum, frame = caught[0]
            if callable(saved[signum]):
                saved[signum](signum, frame)
            elif saved[signum] == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


# ---- the scripts' one-line endings ---------------------------------------------------------------

def _close_progress_bars():
    try:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:
        pass


def _tell_once(line):
    """Print a closing line to stderr from one process: under torchrun every rank ends the same way
    (errors found on rank 0 are shared, see on_rank0), so rank 0 speaks for all of them."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)


def cli_main(main):
    """Wrap a script's main(args): an InputError becomes one 'error: ...' line and exit code 2, a full
    disk one 'error: ...' line and exit code 1; SIGINT/SIGTERM end the run at a safe point (work saved
    so far is kept) with exit code 130. Under torchrun rank 0 alone prints an InputError's or an
    interrupt's line (every rank has the same); a full disk is told by the rank that met it."""

    @functools.wraps(main)
    def wrapper(*a, **kw):
        import signal
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGTERM, _raise_interrupt)
        # a job started in the background by a non-interactive shell inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return main(*a, **kw)
        except InputError as e:
            _tell_once(f"error: {e}")
            sys.exit(2)
        except Exception as e:
            _exit_if_out_of_space(e)
            raise
        except KeyboardInterrupt:
            _close_progress_bars()  # else they redraw at exit, after our message
            _tell_once("interrupted: finished work is saved; run the same command again to continue")
            sys.exit(130)
        finally:
            _leave_process_group()
            for s, handler in before.items():  # main() called in-process (tests, notebooks) leaves none
                if handler is not None:
                    signal.signal(s, handler)

    return wrapper


def _exit_if_out_of_space(e):
    """A run that ran out of disk space: one `error:` line naming the file, exit 1."""
    if isinstance(e, OutOfSpace):
        message = str(e)
    else:
        err = _no_space_error(e)
        if err is None:
            return
        message = f"cannot write {err.filename or 'a file'}: {err.strerror}"
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _leave_process_group():
    # a process group still alive at interpreter exit can abort the process ("terminate called
    # without an active exception") after its error line was printed: leave it first
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


# ---- ranks: rank 0 writes, every rank learns its result or its error ----------------------------

def all_gather_objects(obj):
    """A list with every rank's `obj` (just [obj] without torchrun)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_SHARED_ERRORS = {"InputError": InputError, "OutOfSpace": OutOfSpace}


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) run on rank 0 only; its result is returned on every rank. If it raises,
    every rank raises: an InputError or OutOfSpace as the same error, anything else as itself on rank 0
    and a RuntimeError naming it on the others. No rank is left waiting for a result that will never come."""
    rank, world = rank_world()
    if world == 1:
        return fn(*args, **kwargs)
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            shared = next((k for k in _SHARED_ERRORS if isinstance(e, _SHARED_ERRORS[k])), None)
            broadcast_object(("error", shared, str(e), type(e).__name__))
            raise
        broadcast_object(("ok", result))
        return result
    box = broadcast_object(None)
    if box[0] == "ok":
        return box[1]
    _, shared, message, kind = box
    if shared:
        raise _SHARED_ERRORS[shared](message)
    raise RuntimeError(f"rank 0 failed ({kind}: {message})")


# ---- run folders: one run at a time --------------------------------------------------------------

class RunLock:
    """An exclusive lock on `folder/.lock`: a second run on the same output folder is refused.

    Re-entrant within one process (e.g. --selected_file equal to --output_dir): a nested lock of
    a folder this process already holds is a no-op."""

    _held = {}  # realpath of the lock file -> nesting depth in this process

    def __init__(self, folder, flag="--output_dir"):
        self.path = os.path.join(folder, ".lock")
        self.flag = flag
        self.file = None
        self.key = None

    def __enter__(self):
        self.key = os.path.realpath(self.path)
        if RunLock._held.get(self.key):
            RunLock._held[self.key] += 1
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise InputError(f"{os.path.dirname(self.path)} is in use by another run ({owner}); "
                             f"wait for it or choose another {self.flag}")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        RunLock._held[self.key] = 1
        return self

    def __exit__(self, *exc):
        RunLock._held[self.key] -= 1
        if RunLock._held[self.key]:
            return
        del RunLock._held[self.key]
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


@contextlib.contextmanager
def run_lock(folder, flag="--output_dir"):
    """The one way scripts lock a run folder: a RunLock held by rank 0 (the rank that writes). A refusal
    ends every rank with the same error, before any of them starts work."""
    lock = RunLock(folder, flag)
    on_rank0(_enter, lock)
    try:
        yield
    finally:
        if rank_world()[0] == 0:
            lock.__exit__()


def _enter(lock):
    lock.__enter__()   # returns nothing: the lock (an open file) stays on rank 0


def check_writable(folder, flag="--output_dir"):
    """Create `folder` if needed and write a file in it: a folder that cannot take the run's files is one
    InputError (OutOfSpace when the disk is full) before any work."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise OutOfSpace(f"{flag} {folder}: {e.strerror}; free space there or choose another {flag}") from None
        raise InputError(f"{flag} {folder} cannot be written: {e.strerror or e}") from None
