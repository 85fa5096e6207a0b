"""The wild image pool: listing (folders or tar shards), robust decoding, and a decode-once uint8 cache.

Pool order is fixed and shared by every stage: score files, selection indices and the cache are
all indexed by the position of an image in `PoolIndex.ids`.

Choices:
- Folder pools: ids are paths relative to the folder ('/' separators), in torchvision ImageFolder's
  order (class folder, then sub-folder, then file name, each sorted as strings), so published score
  files, which follow that order, line up; images directly in the folder come first (ImageFolder
  ignored them). Hidden files and folders (name starting with '.') are skipped, so caches/scores may
  live inside (ImageFolder kept them).
- Tar shards (WebDataset style): ids are '<shard file name>:<key>', e.g. '00000.tar:n0144_10026';
  shards sorted by name, samples in tar order; a sample is read with pread() at the member's
  data offset, never unpacked.
- Decoding follows the published loader (torchvision's pil_loader under the published scripts'
  ImageFile.LOAD_TRUNCATED_IMAGES = True): truncated files are decoded with the missing part filled as
  PIL fills it, then img.convert('RGB') (convert('L') for one-channel teachers: alpha dropped, 16-bit
  values clipped at 255, as PIL converts), no EXIF rotation, then torchvision's Resize((s, s)) on the
  PIL image (bilinear with PIL's antialiasing, aspect ratio ignored). `fast_decode=True`
  (--fast_decode) lets libjpeg decode large JPEGs at a reduced scale first (≈2x faster, slightly
  different pixels).
- Files PIL cannot load (the published run stopped on the first one) never stop a run: `PoolDataset`
  returns a 4-tuple (image, index, ok, reason) with zeros and the reason for a bad image; the cache
  keeps `ok.npy` and `skipped.txt`.
"""
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import time
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFile, UnidentifiedImageError

from safety import allocate_file, atomic_write_bytes, atomic_write_text, reserve_space, set_phase
from utils import InputError, changed_keys, cpu_cores, read_fingerprint


def check_channels(in_chans):
    """Every loader gives L (1 channel) or RGB (3) images."""
    if in_chans not in (1, 3):
        raise InputError(f"in_chans must be 1 or 3, got {in_chans}")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_EXT_SET = frozenset(IMG_EXTENSIONS)

# Images with more pixels are rejected from the header alone (no decode). Equal to PIL's own hard
# limit (2 * Image.MAX_IMAGE_PIXELS at its default), so both checks agree; tests lower it.
MAX_PIXELS = 178_956_970

CACHE_VERSION = 2  # 2: meta.json names the decoding (decode_mode); v1 caches were all reduced-scale
# a cache folder's files: its fingerprint and state, the uint8 images (N, C, H, W), which decoded, their ids
CACHE_META, CACHE_IMAGES, CACHE_OK, CACHE_IDS = "meta.json", "images.u8", "ok.npy", "ids.txt"


class BadImage(Exception):
    """An image PIL cannot load (empty, not an image, corrupt beyond its truncation, too large)."""


def is_image_file(name: str) -> bool:
    """An image file by its name: one of IMG_EXTENSIONS (any case), not hidden."""
    return os.path.splitext(name)[1].lower() in _EXT_SET and not name.startswith(".")


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


class PoolIndex:
    """The pool's fixed order. Build it with `list_pool`.

    kind == 'folder': `ids[i]` is a path relative to `root`.
    kind == 'tar':    `ids[i]` is '<shard name>:<key>'; bytes live at (shard, offset, size).
    """

    def __init__(self, kind, root, ids, sizes, mtimes=None, shards=None, shard_of=None,
                 offsets=None, shard_stats=None):
        self.kind = kind
        self.root = root
        self.ids = ids
        self._sizes = sizes  # int64 (N,): file or member sizes
        self._mtimes = mtimes  # int64 (N,) seconds, folder only
        self.shards = shards or []  # absolute shard paths, tar only
        self._shard_of = shard_of  # int32 (N,)
        self._offsets = offsets  # int64 (N,) member data offsets
        self._shard_stats = shard_stats or []  # [(name, size, mtime)]
        self._fingerprint = None
        self._fds = {}  # shard idx -> fd, valid only in the process that opened them
        self._fd_pid = None

    def __len__(self):
        return len(self.ids)

    # Open file descriptors must not travel to DataLoader / multiprocessing workers.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}
        state["_fd_pid"] = None
        return state

    def __del__(self):
        self._close()

    def _close(self):
        if getattr(self, "_fd_pid", None) == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = {}
        self._fd_pid = None

    def path(self, i: int) -> str:
        """Filesystem path of a folder-pool image (for tar pools: the shard path)."""
        if self.kind == "folder":
            return os.path.join(self.root, self.ids[i])
        return self.shards[int(self._shard_of[i])]

    def _shard_fd(self, s: int) -> int:
        if self._fd_pid != os.getpid():  # forked child: inherited fds are the parent's, drop them
            self._fds = {}
            self._fd_pid = os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            fd = os.open(self.shards[s], os.O_RDONLY)
            self._fds[s] = fd
        return fd

    def read_bytes(self, i: int) -> bytes:
        """Raw encoded bytes of image i (OSError if the file vanished)."""
        if self.kind == "folder":
            with open(os.path.join(self.root, self.ids[i]), "rb") as f:
                return f.read()
        fd = self._shard_fd(int(self._shard_of[i]))
        off, size = int(self._offsets[i]), int(self._sizes[i])
        chunks, got = [], 0
        while got < size:  # pread is atomic w.r.t. the fd offset, so shared fds are safe
            b = os.pread(fd, size - got, off + got)
            if not b:
                break  # shard truncated on disk: short bytes -> decode reports it
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def describe(self) -> str:
        if self.kind == "folder":
            return f"{len(self):,} images in folder {self.root}"
        return f"{len(self):,} samples in {len(self.shards)} tar shard(s) under {self.root}"


def image_folder_key(rel: str):
    """Sort key of a '/'-separated relative path in torchvision ImageFolder's order: class folder, then
    the folder (ImageFolder walks sorted(os.walk(class folder))), then the file name; top-level files first."""
    folder, _, name = rel.rpartition("/")
    return folder.split("/", 1)[0], folder, name


def _bad_name(name: str) -> bool:
    # ids go into one-line text files; names with tab/newline cannot be listed faithfully
    return "\n" in name or "\r" in name or "\t" in name


def _list_folder(root: str) -> PoolIndex:
    entries = []  # (id, size, mtime)
    skipped_names = 0
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in filenames:
            if not is_image_file(name):
                continue
            if _bad_name(prefix + name):
                skipped_names += 1
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
                size, mtime = st.st_size, int(st.st_mtime)
            except OSError:  # broken symlink: keep it, it becomes a skipped bad image
                size, mtime = -1, 0
            entries.append((prefix + name, size, mtime))
    if skipped_names:
        print(f"warning: {skipped_names} image file name(s) under {root} contain tab/newline "
              "characters and were left out of the pool", file=sys.stderr)
    if not entries:
        return None
    entries.sort(key=lambda e: image_folder_key(e[0]))
    ids = [e[0] for e in entries]
    sizes = np.fromiter((e[1] for e in entries), dtype=np.int64, count=len(entries))
    mtimes = np.fromiter((e[2] for e in entries), dtype=np.int64, count=len(entries))
    return PoolIndex("folder", root, ids, sizes, mtimes=mtimes)


def _list_tars(paths, root: str) -> PoolIndex:
    paths = sorted((os.path.abspath(p) for p in paths), key=lambda p: os.path.basename(p))
    names = [os.path.basename(p) for p in paths]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"tar shards with the same file name in different folders: {sorted(dup)} "
                         "(ids are '<shard name>:<key>' and must be unique)")
    ids, sizes, shard_of, offsets, stats = [], [], [], [], []
    for s, p in enumerate(paths):
        if not os.path.isfile(p):
            raise InputError(f"tar shard {p}: no such file")
        st = os.stat(p)
        stats.append((names[s], st.st_size, int(st.st_mtime)))
        seen = set()
        try:
            with tarfile.open(p, mode="r:") as tf:  # plain tar only: seeking needs no compression
                for m in tf:
                    if not m.isfile() or m.issparse():
                        continue
                    name = m.name
                    while name.startswith("./"):
                        name = name[2:]
                    parts = name.split("/")
                    if any(c.startswith(".") for c in parts) or not is_image_file(parts[-1]):
                        continue
                    # WebDataset convention: key = path up to the first '.' of the file name
                    key = "/".join(parts[:-1] + [parts[-1].split(".", 1)[0]])
                    if key in seen or _bad_name(key):
                        continue  # first image member of a key is the sample
                    seen.add(key)
                    ids.append(f"{names[s]}:{key}")
                    sizes.append(m.size)
                    shard_of.append(s)
                    offsets.append(m.offset_data)
        except (tarfile.TarError, EOFError) as e:
            raise InputError(f"tar shard {p}: cannot read it as an uncompressed tar ({e})") from None
    if not ids:
        raise InputError(f"tar shard(s) {', '.join(paths)}: no image members found "
                         f"(looked for {' '.join(IMG_EXTENSIONS)}; hidden members skipped)")
    return PoolIndex("tar", root, ids, np.asarray(sizes, dtype=np.int64), shards=paths,
                     shard_of=np.asarray(shard_of, dtype=np.int32),
                     offsets=np.asarray(offsets, dtype=np.int64), shard_stats=stats)


def expand_braces(path):
    """A path with brace groups as webdataset writes shard lists, expanded as bash would:
    'pool-{000000..000002}.tar' -> pool-000000.tar, pool-000001.tar, pool-000002.tar; '{a,b}' -> a, b.
    A path without braces comes back alone."""
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        return [path]   # a literal brace in a file name
    head, tail = path[:match.start()], path[match.end():]
    return [out for part in parts for out in expand_braces(head + part + tail)]


def list_pool(source) -> PoolIndex:
    """List a wild pool.

    source: a folder (read recursively; if it holds *.tar files at its top level it is a shard
    folder and only those shards are read), a single .tar path, or a list of .tar paths.
    """
    if isinstance(source, PoolIndex):
        return source
    if isinstance(source, (list, tuple)):
        if not source:
            raise InputError("wild pool: empty list of tar shards")
        paths = [os.fspath(p) for p in source]
        bad = [p for p in paths if not p.endswith(".tar")]
        if bad:
            raise InputError(f"wild pool: a list must hold .tar shard paths, got {bad[0]}")
        parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
        return _list_tars(paths, os.path.commonpath(parents))
    path = os.path.abspath(os.fspath(source))
    if not os.path.exists(path):
        raise InputError(f"wild pool {path}: no such file or folder")
    if os.path.isfile(path):
        if path.endswith(".tar"):
            return _list_tars([path], os.path.dirname(path))
        raise InputError(f"wild pool {path}: not a folder or a .tar shard")
    with os.scandir(path) as it:
        top = [e for e in it if not e.name.startswith(".")]
    if not top:
        raise InputError(f"wild pool folder {path} is empty (hidden files are ignored)")
    tars = [e.path for e in top if e.name.endswith(".tar") and e.is_file()]
    if tars:
        return _list_tars(tars, path)
    index = _list_folder(path)
    if index is None:
        raise InputError(f"wild pool folder {path}: no image files found (searched all sub-folders "
                         f"for {' '.join(IMG_EXTENSIONS)}, any case, hidden files skipped, and the "
                         "top level for *.tar shards)")
    return index


def pool_fingerprint(index: PoolIndex) -> str:
    """sha256 over ids + sizes + mtimes (folder) or shard names/sizes/mtimes + ids (tar).

    Cheap: uses the stat data gathered by list_pool, reads no image bytes. The pool's own
    location is not part of it, so a moved pool keeps its caches (a copy that resets mtimes
    does not)."""
    if index._fingerprint is not None:
        return index._fingerprint
    h = hashlib.sha256()
    n = len(index)
    if index.kind == "folder":
        h.update(f"folder v1 {n}\n".encode())
        sizes, mtimes = index._sizes.tolist(), index._mtimes.tolist()  # python ints: fast f-strings
        for a in range(0, n, 65536):
            b = min(n, a + 65536)
            h.update("".join(f"{index.ids[i]}\t{sizes[i]}\t{mtimes[i]}\n"
                             for i in range(a, b)).encode("utf-8", "surrogateescape"))
    else:
        h.update(f"tar v1 {len(index.shards)} {n}\n".encode())
        for name, size, mtime in index._shard_stats:
            h.update(f"{name}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
        for a in range(0, n, 65536):
            h.update("".join(i + "\n" for i in index.ids[a:a + 65536])
                     .encode("utf-8", "surrogateescape"))
    index._fingerprint = h.hexdigest()
    return index._fingerprint


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _truncated_images_decoded():
    """PIL decodes truncated files while this is active (the missing part filled as PIL fills it), as the
    published scripts' global ImageFile.LOAD_TRUNCATED_IMAGES = True made it; restored afterwards, so
    no other PIL use of the process sees the setting (decoding runs in one thread per process)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def decode_mode(fast_decode: bool) -> str:
    """The name of a decoding, as stored in cache metadata and score fingerprints."""
    return "published_loader_draft" if fast_decode else "published_loader"


def decode_image(data: bytes, size, in_chans: int, fast_decode: bool = False) -> np.ndarray:
    """Encoded bytes -> uint8 array (size, size, in_chans), or the native size when size is None.
    Raises BadImage with a reason when PIL cannot load the file (the published loader raised there).

    As the published loader and transform: PIL decodes (truncated files too), img.convert('RGB')
    (convert('L') when in_chans is 1), then Resize((size, size)) on the PIL image. fast_decode=True:
    JPEGs at least twice `size` on both sides are decoded by libjpeg at a reduced scale (1/2, 1/4 or
    1/8, never below `size`) via Image.draft before that resize."""
    check_channels(in_chans)
    if not data:
        raise BadImage("empty file (0 bytes)")
    with _truncated_images_decoded():
        try:
            with warnings.catch_warnings():
                # our MAX_PIXELS check below decides; PIL's warning band is normal for big photos
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadImage(f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise BadImage("not a recognised image format") from None
        except Exception as e:
            raise BadImage(f"cannot open: {type(e).__name__}: {e}") from None
        try:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise BadImage(f"empty image {w}x{h}")
            if w * h > MAX_PIXELS:
                raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {MAX_PIXELS}")
            if fast_decode and size and img.format in ("JPEG", "MPO") and (w >= 2 * size and h >= 2 * size):
                img.draft("RGB" if in_chans == 3 else "L", (size, size))
            out = img.convert("RGB" if in_chans == 3 else "L")   # torchvision's pil_loader
            if size:
                out = TF.resize(out, [size, size])   # the published Resize((s, s)) on the PIL image
            arr = np.array(out, dtype=np.uint8)  # copy: writable, detached from PIL
        except BadImage:
            raise
        except Exception as e:
            raise BadImage(f"corrupt: {type(e).__name__}: {e}") from None
        finally:
            img.close()
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


# why a skipped image is skipped, in skipped.txt: the published run stopped at the first such file
PUBLISHED_STOPPED = "PIL cannot load it; the published loader stopped the run here"


def _load(index: PoolIndex, i: int, size: int, in_chans: int, fast_decode: bool = False):
    """-> (uint8 (size,size,C) or None, reason '')."""
    try:
        data = index.read_bytes(i)
    except OSError as e:
        return None, f"unreadable: {type(e).__name__}: {e} ({PUBLISHED_STOPPED})"
    try:
        return decode_image(data, size, in_chans, fast_decode), ""
    except BadImage as e:
        return None, f"{str(e) or 'bad image'} ({PUBLISHED_STOPPED})"


def clean_reason(reason: str) -> str:
    return " ".join(str(reason).split()) or "bad image"


def write_skipped(path, entries):
    """entries: iterable of (id, reason) -> '<id>\\t<reason>' lines (atomic write)."""
    lines = [f"{i}\t{clean_reason(r)}\n" for i, r in entries]
    atomic_write_text(path, "".join(lines))


def read_skipped(path):
    """-> list of (id, reason) from a skipped.txt."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                i, _, r = line.partition("\t")
                out.append((i, r))
    return out


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class PoolDataset(torch.utils.data.Dataset):
    """Decodes pool images on the fly.

    Item k -> (uint8 tensor (C, size, size), global_index: int, ok: bool, reason: str).
    A bad image gives zeros, ok=False and the reason ('' when ok); the caller writes skipped.txt.
    `indices` (range / list / array of global indices) selects a subset, e.g. a rank's strided
    shard range(rank, N, world). Safe with DataLoader workers (tar fds reopened per process).
    fast_decode: reduced-scale JPEG decoding (see decode_image); default: the published decoding."""

    def __init__(self, index: PoolIndex, size: int, in_chans: int, indices=None, fast_decode: bool = False):
        self.index = index
        self.size = int(size)
        self.in_chans = int(in_chans)
        self.fast_decode = bool(fast_decode)
        n = len(index)
        if indices is None:
            indices = range(n)
        elif not isinstance(indices, range):
            indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (min(indices) < 0 or max(indices) >= n):
            raise IndexError(f"PoolDataset: indices outside 0..{n - 1}")
        self.indices = indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        gi = int(self.indices[k])
        arr, reason = _load(self.index, gi, self.size, self.in_chans, self.fast_decode)
        if arr is None:
            img = torch.zeros((self.in_chans, self.size, self.size), dtype=torch.uint8)
            return img, gi, False, reason
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), gi, True, ""


# ----------------------------------------------------------------------------------------------
# Decode-once cache
# ----------------------------------------------------------------------------------------------


class PoolCache:
    """A finished cache folder. images: read-only memmap uint8 (N, size, size, C), NHWC."""

    def __init__(self, cache_dir):
        cache_dir = os.path.abspath(os.fspath(cache_dir))
        meta_path = os.path.join(cache_dir, CACHE_META)
        if not os.path.isfile(meta_path):
            raise InputError(f"image cache {cache_dir}: no meta.json (not a cache folder)")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("version") != CACHE_VERSION or not meta.get("complete"):
            raise InputError(f"image cache {cache_dir}: unfinished or from another version "
                             "(run build_cache on it to finish it)")
        self.cache_dir = cache_dir
        self.meta = meta
        self.n = int(meta["n"])
        self.size = int(meta["size"])
        self.in_chans = int(meta["in_chans"])
        self.decode = meta["decode"]  # decode_mode's name
        self.fingerprint = meta["fingerprint"]
        img_path = os.path.join(cache_dir, CACHE_IMAGES)
        want = self.n * self.size * self.size * self.in_chans
        if not os.path.isfile(img_path) or os.path.getsize(img_path) != want:
            raise InputError(f"image cache {cache_dir}: images.u8 missing or not {want} bytes")
        self.ok = np.load(os.path.join(cache_dir, CACHE_OK))
        with open(os.path.join(cache_dir, CACHE_IDS), encoding="utf-8",
                  errors="surrogateescape") as f:
            self.ids = f.read().split("\n")[:-1]
        if len(self.ok) != self.n or len(self.ids) != self.n:
            raise InputError(f"image cache {cache_dir}: ok.npy/ids.txt do not have {self.n} entries")
        self._images = None
        self._pid = None

    @property
    def images(self) -> np.memmap:
        if self._images is None or self._pid != os.getpid():
            self._images = np.memmap(os.path.join(self.cache_dir, CACHE_IMAGES), dtype=np.uint8,
                                     mode="r", shape=(self.n, self.size, self.size, self.in_chans))
            self._pid = os.getpid()
        return self._images

    def __getstate__(self):  # never pickle the mapping itself (it would copy the whole cache)
        state = self.__dict__.copy()
        state["_images"] = None
        state["_pid"] = None
        return state

    def __len__(self):
        return self.n

    def batch(self, indices) -> torch.Tensor:
        """uint8 (B, C, H, W) for the given global indices (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        arr = self.images[idx]  # fancy indexing on a memmap -> in-memory copy (B,H,W,C)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def skipped(self):
        return read_skipped(os.path.join(self.cache_dir, "skipped.txt"))


def open_cache(cache_dir) -> PoolCache:
    return PoolCache(cache_dir)


class _ChunkBuilder:
    """Decodes whole chunks into images.u8; the done marker is written after the data is synced."""

    def __init__(self, index, cache_dir, size, in_chans, chunk_size, fast_decode=False):
        self.index = index
        self.fast_decode = fast_decode
        self.cache_dir = cache_dir
        self.size = size
        self.in_chans = in_chans
        self.chunk_size = chunk_size
        self.n = len(index)

    def run(self, k, stop=None):
        """-> (k, images, bad images); None, with no done marker, when the event `stop` was set mid-chunk."""
        start = k * self.chunk_size
        end = min(self.n, start + self.chunk_size)
        s, c = self.size, self.in_chans
        # map only this chunk's rows; flush() then msyncs just them
        mm = np.memmap(os.path.join(self.cache_dir, CACHE_IMAGES), dtype=np.uint8, mode="r+",
                       offset=start * s * s * c, shape=(end - start, s, s, c))
        bad = []
        for j, i in enumerate(range(start, end)):
            if stop is not None and stop.is_set():
                return None
            arr, reason = _load(self.index, i, s, c, self.fast_decode)
            if arr is None:
                mm[j] = 0  # a killed earlier attempt may have left bytes here
                bad.append([i, clean_reason(reason)])
            else:
                mm[j] = arr
        mm.flush()
        del mm
        atomic_write_text(_marker_path(self.cache_dir, k),
                          json.dumps({"chunk": k, "start": start, "end": end, "bad": bad}))
        return k, end - start, bad


def _mp_context():
    import multiprocessing as mp
    # fork: workers inherit the index (1M+ ids) without pickling it
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def _marker_path(cache_dir, k):
    return os.path.join(cache_dir, "chunks", f"{k:07d}.done")


class _ChunkItems(torch.utils.data.Dataset):
    """Item j decodes chunk todo[j] -> ('done', builder.run's result) or ('failed', its exception): the parent
    raises the exception itself (type, errno, message), not the DataLoader's traceback text of it."""

    def __init__(self, builder, todo, stop):
        self.builder, self.todo, self.stop = builder, todo, stop

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, j):
        try:
            return "done", self.builder.run(self.todo[j], self.stop)
        except Exception as e:
            try:  # one that does not survive the trip to the parent would be lost on the way: the loader would wait
                pickle.loads(pickle.dumps(e))
            except Exception:
                e = RuntimeError(f"{type(e).__name__}: {e}")
            return "failed", e


def _as_is(item):
    return item


def _cache_worker_init(_):
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # an inherited Python handler would outlive a stop


_RESUME = "the chunks decoded so far are kept: run the same command again to resume"


def _dead_worker_message(it, error):
    """The DataLoader's report of a dead worker, with the pid and signal or exit code of the process."""
    for proc in getattr(it, "_workers", ()):  # the loader's processes, a private name: without it, its message
        if proc.exitcode:  # polls the process, so a dead one has its code
            how = (f"killed by signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit code {proc.exitcode}")
            return f"a cache worker (pid {proc.pid}) died ({how}); {_RESUME}"
    return f"a cache worker died ({error}); {_RESUME}"


# written through memory maps: space not reserved first would end the build with SIGBUS
CACHE_WAY_OUT = ("free space there, put the cache on a larger disk with --cache_dir DIR, or decode the images "
                 "on the fly with --no_cache")


def build_cache(index: PoolIndex, cache_dir, size: int, in_chans: int, workers=None,
                chunk_size: int = 4096, progress: bool = True, force: bool = False,
                fast_decode: bool = False) -> PoolCache:
    """Decode the pool once into cache_dir (resumable) and return the opened cache.

    A finished cache for the same pool fingerprint/size/in_chans/decoding is reused at once, force or not
    (nothing it holds depends on anything else); an unfinished one resumes (chunks with a done marker are
    not decoded again). A cache for another pool/size/in_chans/decoding raises InputError unless
    force=True, which rebuilds it.
    workers <= 1 decodes in this process; otherwise a DataLoader of `workers` forked processes."""
    index = list_pool(index)
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    size, in_chans = int(size), int(in_chans)
    check_channels(in_chans)
    if size <= 0:
        raise ValueError(f"bad cache geometry size={size}")
    workers = cpu_cores() if workers is None else int(workers)
    n = len(index)
    want = {"version": CACHE_VERSION, "n": n, "size": size, "in_chans": in_chans, "fingerprint": pool_fingerprint(index),
            "decode": decode_mode(fast_decode)}
    meta = _start_cache(cache_dir, want, n * size * size * in_chans, chunk_size, force)
    if meta.get("complete"):
        return open_cache(cache_dir)
    chunk_size = int(meta["chunk_size"])  # a resumed build keeps its original chunking
    n_chunks = (n + chunk_size - 1) // chunk_size
    results = _chunks_done(cache_dir, n_chunks)  # chunk -> its bad images
    todo = [k for k in range(n_chunks) if k not in results]
    done_imgs = n - sum(min(n, (k + 1) * chunk_size) - k * chunk_size for k in todo)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, initial=done_imgs, unit="img", desc=f"cache {size}px", file=sys.stderr,
                   dynamic_ncols=True)
    t0 = time.time()
    set_phase("building the pool cache", "the cache chunks already decoded")
    builder = _ChunkBuilder(index, cache_dir, size, in_chans, chunk_size, fast_decode)

    def chunk_done(k, cnt, bad):
        results[k] = bad
        if bar:
            bar.update(cnt)

    try:
        _decode_chunks(builder, todo, workers, chunk_done)
    finally:
        if bar:
            bar.close()
    dt = time.time() - t0
    skipped = _finish_cache(cache_dir, index, results, meta)
    if progress:
        decoded = n - done_imgs
        rate = decoded / dt if dt > 0 else float("inf")
        print(f"cache {cache_dir}: decoded {decoded:,} of {n:,} images in {dt:.1f}s "
              f"({rate:,.0f} img/s, {max(1, workers)} worker(s)); {skipped:,} bad", file=sys.stderr)
    return open_cache(cache_dir)


def _start_cache(cache_dir, want, nbytes, chunk_size, force):
    """The cache's meta.json: a finished or resumable build's, else a fresh start's, with its images.u8
    on disk (space reserved; on a full disk nothing of a cache is left behind)."""
    meta_path = os.path.join(cache_dir, CACHE_META)
    img_path = os.path.join(cache_dir, CACHE_IMAGES)
    chunk_dir = os.path.join(cache_dir, "chunks")
    meta = read_fingerprint(meta_path)
    if meta is not None:
        diff = changed_keys(meta, want)
        if diff and not force:
            what = ", ".join(f"{k}: cache has {meta.get(k)!r}, wanted {want[k]!r}" for k in diff)
            raise InputError(f"image cache {cache_dir} was built for something else ({what}); "
                             "use another cache folder or rebuild it (force)")
        if diff:
            meta = None  # rebuild from scratch
        elif meta.get("complete"):
            return meta
    if meta is not None and os.path.isfile(img_path) and os.path.getsize(img_path) == nbytes:
        reserve_space(img_path, nbytes, "the image cache", CACHE_WAY_OUT)
        os.makedirs(chunk_dir, exist_ok=True)
        return meta
    # fresh start: drop our old files, create a sparse images.u8
    for name in (CACHE_META, CACHE_OK, CACHE_IDS, "skipped.txt", CACHE_IMAGES):
        p = os.path.join(cache_dir, name)
        if os.path.exists(p):
            os.unlink(p)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    allocate_file(img_path, nbytes, "the image cache", CACHE_WAY_OUT)
    os.makedirs(chunk_dir)
    meta = dict(want, chunk_size=int(chunk_size), complete=False)
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def _chunks_done(cache_dir, n_chunks):
    """{chunk: its bad images} of the chunks a done marker says are decoded (a damaged marker: redo it)."""
    results = {}
    for k in range(n_chunks):
        p = _marker_path(cache_dir, k)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    results[k] = json.load(f)["bad"]
            except (OSError, ValueError, KeyError):
                pass
    return results


def _decode_chunks(builder, todo, workers, chunk_done):
    """Decodes the chunks `todo`, calling chunk_done(chunk, images, bad images) as each finishes: in this process,
    or in a DataLoader of `workers` forked processes, one chunk per item. A worker that dies (the OOM killer, a
    signal) ends the build with an error at once, as one that fails does with its exception."""
    if workers <= 1 or len(todo) <= 1:
        for k in todo:
            chunk_done(*builder.run(k))
        return
    ctx = _mp_context()
    stop = ctx.Event()  # set on the way out: a busy worker leaves its chunk at the next image
    loader = torch.utils.data.DataLoader(
        _ChunkItems(builder, todo, stop), batch_size=None, collate_fn=_as_is, num_workers=min(workers, len(todo)),
        multiprocessing_context=ctx, worker_init_fn=_cache_worker_init, in_order=False,
        generator=torch.Generator())  # the workers' seeds from a generator of its own: the global RNG stays untouched
    it = died = None
    try:
        it = iter(loader)
        for status, result in it:
            if status == "failed":
                raise result
            chunk_done(*result)
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):
            raise
        died = _dead_worker_message(it, e)
    finally:
        stop.set()  # busy workers leave their chunk at the next image, so the shutdown is quick
        if it is not None:
            it._shutdown_workers()  # now: a traceback holding the iterator would keep its workers alive
    if died:
        raise RuntimeError(died)


def _finish_cache(cache_dir, index, results, meta):
    """ok.npy, skipped.txt, ids.txt and meta.json marked complete; the chunk markers go. -> bad images"""
    ok = np.ones(len(index), dtype=bool)
    skipped = []
    for k in sorted(results):
        for i, reason in results[k]:
            ok[i] = False
            skipped.append((i, reason))
    skipped.sort()
    buf = io.BytesIO()
    np.save(buf, ok)
    atomic_write_bytes(os.path.join(cache_dir, CACHE_OK), buf.getvalue())
    write_skipped(os.path.join(cache_dir, "skipped.txt"), [(index.ids[i], r) for i, r in skipped])
    atomic_write_bytes(os.path.join(cache_dir, CACHE_IDS),
                       "".join(i + "\n" for i in index.ids).encode("utf-8", "surrogateescape"))
    atomic_write_text(os.path.join(cache_dir, CACHE_META), json.dumps(dict(meta, complete=True), indent=1))
    shutil.rmtree(os.path.join(cache_dir, "chunks"), ignore_errors=True)
    return len(skipped)


def load_selected_uint8(index_or_cache, indices, size: int, in_chans: int, workers=0,
                        batch_size: int = 512, fast_decode: bool = False) -> torch.Tensor:
    """Gather the selected images into RAM: uint8 (K, C, size, size), in the order of `indices`.

    From a PoolCache (must match size/in_chans; it keeps the decoding it was built with) by reading
    the memmap in sorted order; from a PoolIndex by decoding with `workers` DataLoader workers
    (fast_decode as in PoolDataset). Bad images come back as zeros."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    k = len(idx)
    out = torch.empty((k, in_chans, size, size), dtype=torch.uint8)
    if isinstance(index_or_cache, PoolCache):
        cache = index_or_cache
        if cache.size != size or cache.in_chans != in_chans:
            raise InputError(f"image cache {cache.cache_dir} holds {cache.size}px/{cache.in_chans}ch "
                             f"images, but {size}px/{in_chans}ch are needed")
        if k and (idx.min() < 0 or idx.max() >= cache.n):
            raise IndexError(f"selected indices outside 0..{cache.n - 1}")
        order = np.argsort(idx, kind="stable")  # sorted reads: sequential on disk
        step = 16384
        for a in range(0, k, step):
            sel = order[a:a + step]
            out[torch.from_numpy(sel)] = cache.batch(idx[sel])
        return out
    index = list_pool(index_or_cache)
    ds = PoolDataset(index, size, in_chans, idx, fast_decode=fast_decode)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         num_workers=int(workers))
    pos = 0
    for img, _, _, _ in loader:
        out[pos:pos + len(img)] = img
        pos += len(img)
    return out
