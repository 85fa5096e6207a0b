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
import json
import os
import sys
import tempfile

import numpy as np
import torch

from utils import DIST_TIMEOUT, InputError, rank_world


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


def json_lines(lines):
    """[(line, its record)] of a JSON-lines log's lines (log.txt: one object per epoch); a line torn by a kill
    is left out."""
    parsed = []
    for line in lines:
        try:
            parsed.append((line, json.loads(line)))
        except ValueError:
            pass
    return parsed


def read_json_lines(path):
    """The records of a JSON-lines log file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [record for _, record in json_lines(f)]


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


def tell_once(line):
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
            tell_once(f"error: {e}")
            sys.exit(2)
        except Exception as e:
            _exit_if_out_of_space(e)
            _exit_if_rank_lost(e)
            raise
        except KeyboardInterrupt:
            _close_progress_bars()  # else they redraw at exit, after our message
            _exit_if_rank_lost(None)   # torchrun's agent stops the survivors of a lost rank with SIGTERM
            tell_once("interrupted: finished work is saved; run the same command again to continue")
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
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


# ---- ranks that die or hang: heartbeats, the phase, one line -------------------------------------

class RankLost(Exception):
    """A rank is gone or stopped answering, or the process group never formed. Scripts print it as one
    line from the rank that noticed and exit 1."""


_phase = ["starting", "the work saved so far"]   # what this rank does; what a restart resumes from


def set_phase(what, resumes=None):
    """Name what this rank is doing (and what a restart continues from), for the line a lost rank ends with."""
    _phase[0] = what
    if resumes:
        _phase[1] = resumes


def first_line(e):
    """An exception's first line without gloo's '[file.cc:123] ' prefix and its advice."""
    import re
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(e).__name__
    return line.split(". ")[0][:200]


_watch = None   # this rank's _Watch under torchrun


def watch_ranks(store, rank, world, timeout):
    """Start this rank's heartbeat in the process group's store (init_distributed calls it)."""
    global _watch
    _watch = _Watch(store, rank, world, timeout)


class _Watch:
    """A heartbeat per rank (a counter in the store, a thread adds to it): tells a rank that is gone or
    stopped (its counter still) from one that is only busy, and lets rank 0 work alone for longer than
    --dist_timeout while the others wait for it."""

    def __init__(self, store, rank, world, timeout):
        import threading
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.beat = max(0.2, min(2.0, timeout / 10))
        self.calls = 0
        self.lock = threading.Lock()   # one store request at a time from this process
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rank-heartbeat", daemon=True)
        self.thread.start()

    def _ask(self, fn, *args):
        with self.lock:
            return fn(*args)

    def _run(self):
        while not self.stopped.is_set():
            try:
                self._ask(self.store.add, f"hb/{self.rank}", 1)
            except Exception:
                return   # the store is gone: whoever waits on this rank learns it from there
            self.stopped.wait(self.beat)

    def stop(self):
        self.stopped.set()
        self.thread.join(timeout=5)

    def counts(self):
        return [int(self._ask(self.store.add, f"hb/{r}", 0)) for r in range(self.world)]

    def lost(self):
        """The other ranks whose heartbeat stood still for 3 beats; None when the store itself is gone
        (it lives in rank 0 when ranks are started by hand, else in torchrun's agent)."""
        import time
        try:
            before = self.counts()
            time.sleep(3 * self.beat)
            after = self.counts()
        except Exception:
            return None
        return [r for r in range(self.world) if r != self.rank and before[r] == after[r]]

    def next_call(self):
        self.calls += 1   # every rank calls on_rank0 in the same order: the same number names one call
        return self.calls

    def done(self, call):
        try:
            self._ask(self.store.set, f"rank0/{call}", "1")
        except Exception:
            pass   # the broadcast that follows fails alike on every rank

    def wait_for_rank0(self, call):
        """Return once rank 0 ends on_rank0 call `call`; RankLost when its heartbeat stops for --dist_timeout."""
        import time
        pause, last, since = 0.001, None, time.monotonic()
        try:
            while not self._ask(self.store.check, [f"rank0/{call}"]):
                count, now = self.counts()[0], time.monotonic()
                if count != last:
                    last, since = count, now
                elif now - since > self.timeout:
                    raise RankLost(_lost_line([0], self.timeout, f"no heartbeat for {self.timeout:g} s"))
                time.sleep(pause)
                pause = min(0.2, pause * 2)
        except RankLost:
            raise
        except Exception as e:
            raise RankLost(_lost_line(None, None, first_line(e))) from None


def _restart_hint():
    resumes = _phase[1]
    if "TORCHELASTIC_MAX_RESTARTS" in os.environ:
        left = int(os.environ["TORCHELASTIC_MAX_RESTARTS"]) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if left > 0:
            return f"torchrun restarts the group ({left} restart(s) left), which resumes from {resumes}"
        return f"torchrun has no restart left (--max_restarts): run the same command again to resume from {resumes}"
    return f"run the same command again to resume from {resumes}"


def _lost_line(lost, timeout, reason):
    """The one line of a run a rank left: who noticed, whom it lost (None: the store), in which phase."""
    rank = rank_world()[0] if _watch is None else _watch.rank
    who = ("rank 0 or torchrun's agent (the store they serve is gone)" if lost is None else
           "rank " + ", ".join(map(str, lost)) if lost else "another rank")
    what = (f"rank {rank}: {who} stopped answering" if timeout else f"rank {rank} lost {who}")
    why = f"no reply within --dist_timeout {timeout:g} s" if timeout and not reason else reason
    return f"{what} during {_phase[0]} ({why}); {_restart_hint()}"


def _is_collective_error(e):
    import torch.distributed as dist
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "Timed out waiting"))


def _exit_if_rank_lost(e):
    """A rank left the run (e: the collective error that showed it, or RankLost; None: this rank was
    stopped by a signal, which torchrun's agent sends when another rank died): one `error:` line from
    the lowest rank still running, exit 1. Else return (an interrupt of the whole run, another error)."""
    import signal
    if isinstance(e, RankLost):
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if _watch is None or (e is not None and not _is_collective_error(e)):
        return
    for s in (signal.SIGTERM, signal.SIGINT):   # the agent's SIGTERM may follow its own: finish the line
        signal.signal(s, signal.SIG_IGN)
    lost = _watch.lost()
    if e is None and lost == []:
        return   # every rank alive: an interrupt of the run itself
    text = str(e or "")
    timeout = _watch.timeout if ("Timed out" in text or "timeout" in text.lower()) else None
    reason = "stopped by torchrun's agent" if e is None else None if timeout else first_line(e)
    _close_progress_bars()
    alive = [r for r in range(_watch.world) if r not in (lost or [])]
    if lost is None or _watch.rank == alive[0]:
        print(f"error: {_lost_line(lost, timeout, reason)}", file=sys.stderr)
    sys.exit(1)


# ---- joining the process group --------------------------------------------------------------------

def init_distributed(device, timeout=DIST_TIMEOUT):
    """Join the torchrun process group when WORLD_SIZE > 1 -> (rank, world_size). Every collective and the
    joining itself wait at most `timeout` s (--dist_timeout); watch_ranks then heartbeats this rank."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized():
        rank = int(os.environ["RANK"])
        wait = datetime.timedelta(seconds=timeout)
        set_phase("joining the process group")
        try:
            store = group_store(rank, world, wait)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=world, timeout=wait)
        except Exception as e:   # a rank that never came: one line, not gloo's retries
            raise RankLost(f"rank {rank}: the process group did not form within --dist_timeout {timeout:g} s "
                                  f"({first_line(e)})") from None
        watch_ranks(store, rank, world, timeout)
        set_phase("the run")   # until the script names its phase
    return dist.get_rank(), world


def group_store(rank, world, wait):
    """The store the process group meets in, under a prefix of its own generation. torchrun's agent keeps one
    store across restarts, and torch reads the gloo addresses there without one: a restarted group then
    meets the dead group's addresses (refused, or a wait of 30 min on a futex)."""
    import torch.distributed as dist
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":   # started by hand: rank 0 serves a fresh store
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=wait, multi_tenant=True)
        return dist.PrefixStore("attention_probe/0", store)
    store = dist.TCPStore(addr, port, world, is_master=False, timeout=wait)
    return dist.PrefixStore(f"attention_probe/{_generation(store, rank, world, wait)}", store)


def _generation(store, rank, world, wait):
    """A number every rank of this group agrees on and no earlier group used. Rank 0 opens generation g;
    the others join the newest one; g is ready once world - 1 ranks joined it. An older group's generation
    is full (a late joiner counts past world - 1) or never gets ready (its rank 0 is dead: torchrun starts
    workers only after the old ones ended), so nobody stays in it. TORCHELASTIC_RESTART_COUNT would not do:
    an agent restarts workers that were healthy without counting."""
    import time
    if rank == 0:
        g = store.add("generation", 1)
        while store.add(f"g{g}/joined", 0) < world - 1:
            time.sleep(0.01)
        store.set(f"g{g}/ready", "1")
        return g
    end, joined = time.monotonic() + wait.total_seconds(), set()
    while time.monotonic() < end:
        g = store.add("generation", 0)
        if g and g not in joined:
            joined.add(g)
            if store.add(f"g{g}/joined", 1) > world - 1:
                continue   # an older group's, full
        if g in joined and store.check([f"g{g}/ready"]) and store.add(f"g{g}/joined", 0) <= world - 1:
            return g
        time.sleep(0.01)
    raise TimeoutError("rank 0 did not open a generation in the store")


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
    call = _watch.next_call() if _watch else None
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            shared = next((k for k in _SHARED_ERRORS if isinstance(e, _SHARED_ERRORS[k])), None)
            _watch and _watch.done(call)
            broadcast_object(("error", shared, str(e), type(e).__name__))
            raise
        _watch and _watch.done(call)
        broadcast_object(("ok", result))
        return result
    if _watch:   # rank 0's work (a pool cache: hours) may outlast --dist_timeout; its heartbeat may not
        _watch.wait_for_rank0(call)
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
        _check_shared(folder, flag)
        yield
    finally:
        if rank_world()[0] == 0:
            lock.__exit__()


def _enter(lock):
    lock.__enter__()   # returns nothing: the lock (an open file) stays on rank 0


def _check_shared(folder, flag):
    """Every rank must see rank 0's files in `folder`: it reads them to resume (scored chunks, last.pth,
    the cache). A node-local folder (another disk on each node) is one InputError on every rank."""
    rank, world = rank_world()
    if world == 1:
        return
    import socket
    token = on_rank0(_write_token, folder)
    try:
        with open(os.path.join(folder, SHARED_TOKEN)) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    blind = [(r, host) for r, host, ok in all_gather_objects((rank, socket.gethostname(), seen)) if not ok]
    if rank == 0:   # every rank has looked (the gather waited for them): leave the folder as it was
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, SHARED_TOKEN))
    if blind:
        r, host = blind[0]
        raise InputError(f"{flag} {folder} is not shared by the ranks: rank {r} (on {host}) does not see rank 0's "
                         "files there (a node-local disk?); every rank reads them to resume, so put it on a file "
                         "system every node mounts at the same path")


SHARED_TOKEN = ".rank0"


def _write_token(folder):
    token = f"{os.getpid()} {os.urandom(8).hex()}"
    atomic_write_text(os.path.join(folder, SHARED_TOKEN), token)
    return token


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
