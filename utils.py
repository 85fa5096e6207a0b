"""Small helpers shared by every script: the user-error type, safe checkpoint loading, devices, ranks and
printing on rank 0, fingerprints. Crash safety (atomic writes, locks, interrupts, joining the process group,
rank-0 errors) is safety.py's; the flags' domains are flags.py's."""
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


def rank_world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def say(*line):
    """Print on rank 0 (every rank runs the same code; one of them speaks)."""
    if rank_world()[0] == 0:
        print(*line)


def file_sha256(path):
    """sha256 of a file's bytes (identifies a checkpoint in fingerprints)."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
