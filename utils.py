"""Small helpers shared by every script: user-facing errors, atomic writes, CLI wrapper."""
import argparse
import contextlib
import errno
import fcntl
import functools
import json
import os
import sys
import tempfile
import warnings

import numpy as np
import torch


class InputError(Exception):
    """Bad input from the user (a path, flag or file). Scripts print it as one line and exit 2."""


class OutOfSpace(Exception):
    """A write failed, or would fail, for lack of disk space. Scripts print it as one line and exit 1;
    finished work stays on disk and the same command, rerun after space is freed, continues."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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
                    return
                if e.errno not in NO_SPACE_ERRNOS:
                    raise
    finally:
        os.close(fd)
    raise OutOfSpace(f"not enough space in {folder} for {what}: needs {need:,} bytes ({need / 2**30:.2f} GiB), "
                     f"{free:,} bytes free; {way_out}")


def free_bytes(folder):
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


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
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
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
def _atomic_file(path):
    """A binary file object whose content replaces `path` whole, synced, when the block ends; a full
    disk inside it is one OutOfSpace naming `path`."""
    with writing(path), _temp_beside(os.fspath(path)) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes):
    """Write `data` to `path` through a temp file in the same folder, then rename."""
    with _atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path):
    """torch.save that never leaves a half-written file at `path`."""
    # through a file object: torch's own writer turns a full disk into "unexpected pos", the
    # file object's OSError names the cause
    with _atomic_file(path) as f:
        torch.save(obj, f)


# Globals a checkpoint may hold besides tensors and plain containers. DeiT's main.py and timm's
# train.py pickle their argparse.Namespace into every checkpoint; a Namespace only holds the values
# it is given, so unpickling one runs no code. Every other global stays refused.
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def safe_torch_load(path, what="PyTorch checkpoint"):
    """torch.load with weights_only=True, which never runs code; any failure is one InputError."""
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: keep errors one line
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        if "Weights only load failed" in message:
            # a pickle with code in it and a damaged one fail alike: name the opcode or global refused
            reason = message.split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0][:120]
            raise InputError(f"{path} is not a readable {what}: refused by weights_only loading, which never "
                             f"runs pickled code ({reason})") from None
        first_line = message.splitlines()[0] if message else ""
        raise InputError(f"{path} is not a readable {what} ({type(e).__name__}"
                         + (f": {first_line})" if first_line else ")")) from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_deferred():
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


# ---- devices and torchrun ----------------------------------------------------------------

def cpu_cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(limit=8):
    """Image decoding processes per training process: the machine's cores shared by the processes torchrun
    starts on it, at most `limit` (the published loaders used 8)."""
    return max(0, min(limit, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def resolve_device(name=None):
    """'cuda' when available unless told otherwise; with torchrun, this rank's GPU."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def amp_dtype(flag, device):
    """The autocast dtype of every script: bf16 with --amp bf16, or with 'auto' on CUDA; else None (fp32)."""
    if flag == "bf16" or (flag == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def init_distributed(device):
    """Join the torchrun process group when WORLD_SIZE > 1 -> (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def rank_world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) run on rank 0 only; its result is returned on every rank. If it raises,
    every rank raises: an InputError or OutOfSpace as the same error, anything else as itself on rank 0
    and a RuntimeError naming it on the others. No rank
    is left waiting for a result that will never come."""
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


_SHARED_ERRORS = {"InputError": InputError, "OutOfSpace": OutOfSpace}


def file_sha256(path, limit=None):
    """sha256 of a file's bytes (identifies a checkpoint in fingerprints)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_fingerprint(path):
    """The JSON fingerprint stored at `path`, or None when it is missing or damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def changed_keys(saved, wanted):
    """Keys of `wanted` whose value `saved` (a stored fingerprint, or None) does not have.
    Keys only `saved` holds (what an earlier run stored besides) change nothing."""
    saved = saved if isinstance(saved, dict) else {}
    return [k for k in wanted if saved.get(k) != wanted[k]]


def write_memmap_rows(path, index, rows):
    """rows (K, ...) into the .npy memmap at `path`, at the row numbers `index` (K,)."""
    memmap = np.load(path, mmap_mode="r+")
    memmap[index.numpy()] = rows.numpy()
    memmap.flush()   # a chunk file written after this marks these rows as written
    del memmap


def system_parser():
    """The machine's flags, shared by every script's parser as DeiT shares its own: parents=[system_parser()]."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = parser.add_argument_group("system")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--workers", "--num_workers", "--num-workers", type=int, default=default_workers(),
                   help="image decoding processes (default: this machine's cores per process, at most 8)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="autocast (auto: bf16 on CUDA; off: fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model passes")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


# ---- run folders ---------------------------------------------------------------------------

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
