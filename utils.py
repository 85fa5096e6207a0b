"""Small helpers shared by every script: the user-error type, safe checkpoint loading, devices and torchrun
ranks, fingerprints, and the parser of the machine's flags. Crash safety (atomic writes, locks, interrupts,
rank-0 errors) is safety.py's."""
import argparse
import functools
import json
import os
import subprocess
import warnings

import torch


class InputError(Exception):
    """Bad input from the user (a path, flag or file). Scripts print it as one line and exit 2."""


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
        if torch.device(name).index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def amp_dtype(flag, device):
    """The autocast dtype of every script: bf16 with --amp bf16, or with 'auto' on CUDA; else None (fp32)."""
    if flag == "bf16" or (flag == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# --dist_timeout's default: well under torch's (30 min gloo, 10 min NCCL), above a first compiled step and a
# checkpoint write; rank 0's long solo work (the pool cache) is waited for by heartbeat, not by this
DIST_TIMEOUT = 300


def init_distributed(device, timeout=DIST_TIMEOUT):
    """Join the torchrun process group when WORLD_SIZE > 1 -> (rank, world_size). Every collective and the
    joining itself wait at most `timeout` s (--dist_timeout); safety.watch_ranks then heartbeats this rank."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import datetime
    import torch.distributed as dist
    import safety
    if not dist.is_initialized():
        rank = int(os.environ["RANK"])
        wait = datetime.timedelta(seconds=timeout)
        safety.set_phase("joining the process group")
        try:
            store = group_store(rank, world, wait)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=world, timeout=wait)
        except Exception as e:   # a rank that never came: one line, not gloo's retries
            raise safety.RankLost(f"rank {rank}: the process group did not form within --dist_timeout {timeout:g} s "
                                  f"({safety.first_line(e)})") from None
        safety.watch_ranks(store, rank, world, timeout)
        safety.set_phase("the run")   # until the script names its phase
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


def rank_world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def file_sha256(path):
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


def git_sha():
    """The short commit of this checkout, for a run's first line ('' outside git; '+dirty' with changed files)."""
    record = provenance()
    return (record["git"] or "")[:7] + ("+dirty" if record["git_dirty"] else "")


def provenance():
    """The code that writes a record (args.json, every checkpoint, selection.pt): {'git': this checkout's commit,
    'git_dirty': whether tracked files differ from it (both None outside git), 'torch', 'timm', 'python'}. Kept out
    of the settings a resume compares: a commit between two runs of one command changes no result by itself."""
    return dict(_provenance())


@functools.lru_cache(maxsize=1)
def _provenance():
    # read once: the code a process runs is what it imported at its start, whatever the checkout does later
    import platform

    import timm

    def git(*argv):
        try:   # GIT_OPTIONAL_LOCKS=0: `git status` must not write the index of a checkout someone works in
            proc = subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10,
                                  cwd=os.path.dirname(os.path.abspath(__file__)),
                                  env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None
    sha = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    # str(): torch's version is a TorchVersion, which a weights_only load refuses
    return (("git", sha), ("git_dirty", None if status is None else status != ""),
            ("torch", str(torch.__version__)), ("timm", str(timm.__version__)), ("python", platform.python_version()))
