"""Wild pool: listing, decoding of odd/bad files, tar shards, and the resumable uint8 cache."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import pool
from fixtures import encode, smooth_rgb
from fixtures import write_bytes as write
from pool import (BadImage, InputError, PoolDataset, build_cache, decode_image, list_pool,
                  load_selected_uint8, open_cache, pool_fingerprint, read_skipped, write_skipped)


# what PIL cannot load even with truncated images allowed, in pool order (top-level files first)
BAD = ["bomb.png", "bad/text.png", "bad/zero.jpg"]


@pytest.fixture
def folder_pool(tmp_path, monkeypatch):
    """Nested folder pool with good images of many modes and 4 bad files."""
    root = tmp_path / "pool"
    big = encode(smooth_rgb(500, 375, 0), "JPEG", quality=90)
    write(root / "a/img_000.jpg", big)
    write(root / "a/img_001.jpg", encode(smooth_rgb(500, 375, 1), "JPEG", quality=90))
    write(root / "a/b/c.png", encode(smooth_rgb(64, 48, 2), "PNG"))
    write(root / "z.jpeg", encode(smooth_rgb(40, 30, 3), "JPEG"))
    write(root / "UPPER.JPG", encode(smooth_rgb(120, 90, 4), "JPEG"))
    write(root / "modes/gray.jpg", encode(smooth_rgb(80, 60, 5).convert("L"), "JPEG"))
    write(root / "modes/pal.png", encode(smooth_rgb(50, 50, 6).convert("P"), "PNG"))
    write(root / "modes/rgba.png", encode(smooth_rgb(50, 40, 7).convert("RGBA"), "PNG"))
    write(root / "modes/cmyk.jpg", encode(smooth_rgb(70, 50, 8).convert("CMYK"), "JPEG"))
    write(root / "modes/deep16.png",
          encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"))
    write(root / "bad/zero.jpg", b"")
    write(root / "bad/trunc.jpg", big[: len(big) * 6 // 10])
    write(root / "bad/text.png", b"this is not a png\n" * 10)
    write(root / "bomb.png", encode(Image.new("RGB", (600, 500), (9, 9, 9)), "PNG"))
    write(root / "notes.txt", b"ignored")
    write(root / ".hidden/x.jpg", big)
    write(root / ".dot.jpg", big)
    monkeypatch.setattr(pool, "MAX_PIXELS", 250_000)  # 600x500 is a "bomb", 500x375 is not
    return root


EXPECTED_IDS = sorted(["a/img_000.jpg", "a/img_001.jpg", "a/b/c.png", "z.jpeg", "UPPER.JPG",
                       "modes/gray.jpg", "modes/pal.png", "modes/rgba.png", "modes/cmyk.jpg",
                       "modes/deep16.png", "bad/trunc.jpg"] + BAD)


def test_list_sorted_nested_hidden_ignored(folder_pool):
    idx = list_pool(folder_pool)
    assert sorted(idx.ids) == EXPECTED_IDS
    assert len(idx) == len(EXPECTED_IDS)
    # the images in class folders come in torchvision ImageFolder's order (the published score files'
    # order; 'a/b/c.png' after 'a/img_*'), hidden ones left out; top-level files, which it ignores, first
    from torchvision.datasets import ImageFolder
    published = [os.path.relpath(p, folder_pool) for p, _ in ImageFolder(str(folder_pool)).samples]
    published = [p for p in published if not p.startswith(".")]
    top = sorted(i for i in EXPECTED_IDS if "/" not in i)
    assert idx.ids == top + published
    assert idx.read_bytes(idx.ids.index("bad/zero.jpg")) == b""
    assert "14 images" in idx.describe() and str(folder_pool) in idx.describe()


def test_input_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope"):
        list_pool(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty.*is empty"):
        list_pool(empty)
    only_other = tmp_path / "other"
    write(only_other / "sub/readme.txt", b"x")
    write(only_other / ".hid/a.jpg", encode(smooth_rgb(8, 8, 0), "JPEG"))
    with pytest.raises(InputError, match=r"other.*no image files.*\.jpg"):
        list_pool(only_other)
    with pytest.raises(InputError, match="readme.txt"):
        list_pool(only_other / "sub/readme.txt")


def test_decode_modes(tmp_path):
    """The published loader's conversions: convert('RGB') (or 'L') drops alpha and transparency and clips
    16-bit values; PIL's own CMYK and bilevel conversions."""
    gray = encode(Image.new("L", (20, 20), 100), "PNG")
    assert (decode_image(gray, 8, 3) == 100).all()
    assert decode_image(gray, 8, 1).shape == (8, 8, 1)
    rgba = encode(Image.new("RGBA", (20, 20), (200, 100, 50, 128)), "PNG")
    assert (decode_image(rgba, 8, 3) == [200, 100, 50]).all()      # alpha dropped, not composited
    la = encode(Image.new("LA", (20, 20), (200, 0)), "PNG")
    assert (decode_image(la, 8, 1) == 200).all()
    p = Image.new("P", (20, 20), 1)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(0, (0, 0, 10, 20))
    pt = encode(p, "PNG", transparency=0)  # palette entry 0 (red) transparent: still red
    out = decode_image(pt, 20, 3)
    assert (out[:, :10] == [255, 0, 0]).all() and (out[:, 10:] == [0, 255, 0]).all()
    cmyk_img = Image.new("CMYK", (24, 24), (0, 255, 255, 0))
    cmyk = decode_image(encode(cmyk_img, "JPEG", quality=95), 24, 3).astype(int)
    assert cmyk.shape == (24, 24, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60
    deep = encode(Image.fromarray(np.full((10, 10), 40000, np.uint16)), "PNG")
    assert (decode_image(deep, 10, 1) == 255).all()  # clipped, as PIL converts 16-bit to 8-bit
    low = encode(Image.fromarray(np.full((10, 10), 200, np.uint16)), "PNG")
    assert (decode_image(low, 10, 3) == 200).all()
    bw = encode(Image.new("1", (10, 10), 1), "PNG")
    assert (decode_image(bw, 4, 1) == 255).all()
    rgb = smooth_rgb(30, 20, 1)
    out = decode_image(encode(rgb, "PNG"), 16, 3)
    ref = np.asarray(rgb.resize((16, 16), Image.Resampling.BILINEAR))
    assert out.dtype == np.uint8 and (out == ref).all()


def test_truncated_files_decode_and_the_setting_does_not_leak():
    """Truncated JPEG/PNG files decode (the missing part filled by PIL), as under the published scripts'
    ImageFile.LOAD_TRUNCATED_IMAGES = True; PIL's global is back to its value afterwards."""
    from PIL import ImageFile
    big = encode(smooth_rgb(500, 375, 0), "JPEG", quality=90)
    png = encode(smooth_rgb(64, 64, 0), "PNG")
    for fast in (True, False):
        out = decode_image(big[: len(big) // 2], 32, 3, fast_decode=fast)
        assert out.shape == (32, 32, 3)
    assert decode_image(png[: len(png) // 2], 32, 3).shape == (32, 32, 3)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(OSError):   # PIL itself still refuses them outside our decoding
        Image.open(io.BytesIO(big[: len(big) // 2])).load()


def test_bad_bytes_raise(monkeypatch):
    """What PIL cannot load even with truncated images allowed (the published loader raised there)."""
    big = encode(smooth_rgb(500, 375, 0), "JPEG", quality=90)
    with pytest.raises(BadImage, match="empty"):
        decode_image(b"", 32, 3)
    for fast in (True, False):
        with pytest.raises(BadImage, match="Truncated File Read"):   # cut inside the header
            decode_image(big[:300], 32, 3, fast_decode=fast)
    with pytest.raises(BadImage, match="not a recognised"):
        decode_image(b"hello world" * 20, 32, 3)
    png = encode(smooth_rgb(64, 64, 0), "PNG")
    with pytest.raises(BadImage):
        decode_image(png[:40], 32, 3)
    monkeypatch.setattr(pool, "MAX_PIXELS", 1000)
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(1))
    with pytest.raises(BadImage, match="bomb"):
        decode_image(png, 32, 3)
    assert not loaded  # rejected from the header, never decoded


def test_fast_decode_uses_draft_default_does_not(monkeypatch):
    data = encode(smooth_rgb(500, 375, 3), "JPEG", quality=90)
    calls = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        r = orig(self, mode, size)
        calls.append(self.size)  # size after the reduced-scale setup
        return r

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    published = decode_image(data, 32, 3).astype(int)
    assert calls == []  # default: full-size decode, as the published pipeline
    fast = decode_image(data, 32, 3, fast_decode=True).astype(int)
    assert calls == [(63, 47)]  # 1/8 scale: libjpeg decodes 63x47 instead of 500x375
    assert 0 < np.abs(fast - published).mean() < 8
    g = decode_image(data, 32, 1, fast_decode=True).astype(int)
    assert np.abs(g - decode_image(data, 32, 1)).mean() < 8


def test_cache_remembers_its_decoding(folder_pool, tmp_path):
    idx = list_pool(folder_pool)
    fast = build_cache(idx, tmp_path / "fast", 32, 3, workers=0, progress=False, fast_decode=True)
    published = build_cache(idx, tmp_path / "pub", 32, 3, workers=0, progress=False)
    assert (fast.decode, published.decode) == ("published_loader_draft", "published_loader")
    big = idx.ids.index("a/img_000.jpg")  # 500x375 JPEG: decoded at 1/8 scale by the fast path
    assert (fast.images[big] != published.images[big]).any()
    assert (np.asarray(published.images) == direct(idx, 32, 3)[0]).all()
    ds = PoolDataset(idx, 32, 3, indices=[big], fast_decode=True)
    assert (ds[0][0].permute(1, 2, 0).numpy() == fast.images[big]).all()
    # a cache built one way is never reused for the other
    with pytest.raises(InputError, match="decode"):
        build_cache(idx, tmp_path / "fast", 32, 3, workers=0, progress=False)
    with pytest.raises(InputError, match="decode"):
        build_cache(idx, tmp_path / "pub", 32, 3, workers=0, progress=False, fast_decode=True)


def make_shards(folder):
    """Two WebDataset-style shards; returns {id: original image bytes} in expected order."""
    expect = {}
    specs = [("00000.tar", [("zz", "jpg"), ("aa", "png"), ("sub/k3", "jpg")]),
             ("00001.tar", [("k4", "jpg"), ("k5", "JPEG"), ("d" * 120, "jpg")])]  # long name: pax header
    os.makedirs(folder, exist_ok=True)
    seed = 10
    for shard, members in specs:
        with tarfile.open(os.path.join(folder, shard), "w") as tf:
            def add(name, data):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            add("._junk.jpg", b"appledouble")  # hidden member: skipped
            for key, ext in members:
                seed += 1
                fmt = "PNG" if ext == "png" else "JPEG"
                data = encode(smooth_rgb(200, 150, seed), fmt)
                add(f"{key}.txt", b"caption")
                add(f"{key}.{ext}", data)
                add(f"{key}.cls", b"3")
                expect[f"{shard}:{key}"] = data
    return expect


def test_tar_shards(tmp_path):
    expect = make_shards(tmp_path / "shards")
    write(tmp_path / "shards/readme.md", b"not a shard")
    idx = list_pool(tmp_path / "shards")
    assert idx.kind == "tar" and idx.ids == list(expect)  # shards by name, members in tar order
    for i, key in enumerate(idx.ids):
        assert idx.read_bytes(i) == expect[key]
    one = list_pool(tmp_path / "shards/00001.tar")
    assert one.ids == ["00001.tar:k4", "00001.tar:k5", "00001.tar:" + "d" * 120]
    two = list_pool([tmp_path / "shards/00001.tar", tmp_path / "shards/00000.tar"])
    assert two.ids == idx.ids and pool_fingerprint(two) == pool_fingerprint(idx)
    ds = PoolDataset(idx, 32, 3)
    for k in range(len(ds)):
        img, gi, ok, reason = ds[k]
        ref = decode_image(expect[idx.ids[k]], 32, 3)
        assert ok and gi == k and reason == "" and (img.permute(1, 2, 0).numpy() == ref).all()
    cache = build_cache(idx, tmp_path / "c", 32, 3, workers=0, chunk_size=2, progress=False)
    assert (cache.batch(range(len(idx))) == torch.stack([ds[k][0] for k in range(len(ds))])).all()


def test_fingerprint(folder_pool, tmp_path):
    fp = pool_fingerprint(list_pool(folder_pool))
    assert fp == pool_fingerprint(list_pool(folder_pool))
    build_cache(list_pool(folder_pool), folder_pool / ".cache", 8, 3, workers=0, progress=False)
    assert pool_fingerprint(list_pool(folder_pool)) == fp  # hidden cache inside the pool
    write(folder_pool / "new/extra.png", encode(smooth_rgb(10, 10, 0), "PNG"))
    fp2 = pool_fingerprint(list_pool(folder_pool))
    assert fp2 != fp
    os.utime(folder_pool / "z.jpeg", (1_000_000, 1_000_000))
    assert pool_fingerprint(list_pool(folder_pool)) != fp2
    make_shards(tmp_path / "s")
    tfp = pool_fingerprint(list_pool(tmp_path / "s"))
    os.utime(tmp_path / "s/00001.tar", (1_000_000, 1_000_000))
    assert pool_fingerprint(list_pool(tmp_path / "s")) != tfp


def direct(idx, size, in_chans):
    """Reference: decode every image on its own. -> (N,H,W,C) uint8, ok (N,)"""
    imgs = np.zeros((len(idx), size, size, in_chans), np.uint8)
    ok = np.zeros(len(idx), bool)
    for i in range(len(idx)):
        try:
            imgs[i] = decode_image(idx.read_bytes(i), size, in_chans)
            ok[i] = True
        except BadImage:
            pass
    return imgs, ok


def test_cache_matches_direct_decode(folder_pool, tmp_path, monkeypatch):
    idx = list_pool(folder_pool)
    cache = build_cache(idx, tmp_path / "cache", 32, 3, workers=0, chunk_size=4, progress=False)
    ref, ref_ok = direct(idx, 32, 3)
    assert (np.asarray(cache.images) == ref).all()
    assert [idx.ids[i] for i in np.flatnonzero(~cache.ok)] == BAD
    assert (cache.ok == ref_ok).all()
    skipped = cache.skipped()
    assert [s[0] for s in skipped] == BAD and all(s[1] for s in skipped)
    assert cache.ids == idx.ids and len(cache) == len(idx)
    assert cache.fingerprint == pool_fingerprint(idx)
    # NHWC -> NCHW, order kept
    b = cache.batch([3, 0])
    assert b.shape == (2, 3, 32, 32) and (b[0].permute(1, 2, 0).numpy() == ref[3]).all()
    # finished cache is reused without decoding
    calls = []
    monkeypatch.setattr(pool, "decode_image", lambda *a, **k: calls.append(1))
    again = build_cache(idx, tmp_path / "cache", 32, 3, workers=0, progress=False)
    assert not calls and len(again) == len(idx)
    # other geometry -> InputError naming the folder; force rebuilds
    with pytest.raises(InputError, match="cache.*size"):
        build_cache(idx, tmp_path / "cache", 16, 3, workers=0, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(pool, "MAX_PIXELS", 250_000)
    g = build_cache(idx, tmp_path / "cache", 16, 1, workers=0, progress=False, force=True)
    assert g.images.shape == (len(idx), 16, 16, 1)
    assert (np.asarray(g.images) == direct(idx, 16, 1)[0]).all()


def test_cache_workers_equal_and_resume(folder_pool, tmp_path, monkeypatch):
    idx = list_pool(folder_pool)
    n = len(idx)
    ref = build_cache(idx, tmp_path / "ref", 32, 3, workers=2, chunk_size=3, progress=False)
    one = build_cache(idx, tmp_path / "one", 32, 3, workers=0, chunk_size=5, progress=False)
    for name in ("images.u8", "ok.npy", "skipped.txt", "ids.txt"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()

    orig = pool.decode_image
    calls = []

    def dying(*a, **k):  # simulated kill in the middle of the second chunk
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(pool, "decode_image", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(idx, tmp_path / "res", 32, 3, workers=0, chunk_size=3, progress=False)
    with pytest.raises(InputError, match="unfinished"):
        open_cache(tmp_path / "res")
    calls.clear()

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(pool, "decode_image", counting)
    # a different chunk_size on resume is ignored: the original chunking is kept
    res = build_cache(idx, tmp_path / "res", 32, 3, workers=0, chunk_size=100, progress=False)
    assert len(calls) == n - 3  # first chunk was not decoded again
    for name in ("images.u8", "ok.npy", "skipped.txt", "ids.txt"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "res" / name).read_bytes()
    assert (res.ok == ref.ok).all() and (res.ok == one.ok).all()
    assert not (tmp_path / "res/chunks").exists()


def test_cache_worker_killed_or_failing_ends_the_build_and_a_rerun_resumes(folder_pool, tmp_path, monkeypatch):
    """A worker the OOM killer takes ends the build with an error at once (a shared task queue would
    wait for its chunk for ever); a rerun resumes and gives the cache an unbroken build gives."""
    import signal
    idx = list_pool(folder_pool)
    ref = build_cache(idx, tmp_path / "ref", 32, 3, workers=0, chunk_size=3, progress=False)
    orig = pool.decode_image
    parent = os.getpid()

    def killed_at_one_image(data, *a, **k):  # runs in the forked workers
        if os.getpid() != parent and data == (folder_pool / "modes/rgba.png").read_bytes():
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(data, *a, **k)

    monkeypatch.setattr(pool, "decode_image", killed_at_one_image)
    with pytest.raises(RuntimeError, match=r"cache worker \(pid \d+\) died \(killed by signal 9\)"):
        build_cache(idx, tmp_path / "res", 32, 3, workers=2, chunk_size=3, progress=False)

    def failing(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pool, "decode_image", failing)
    with pytest.raises(OSError, match="Input/output error"):
        build_cache(idx, tmp_path / "failed", 32, 3, workers=2, chunk_size=3, progress=False)

    monkeypatch.setattr(pool, "decode_image", orig)
    res = build_cache(idx, tmp_path / "res", 32, 3, workers=2, chunk_size=3, progress=False)
    for name in ("images.u8", "ok.npy", "skipped.txt", "ids.txt"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "res" / name).read_bytes()
    assert (res.ok == ref.ok).all()


def test_cache_workers_raise_the_workers_exception_and_leave_the_global_rng_alone(folder_pool, tmp_path, monkeypatch):
    """The workers are a DataLoader's: a worker's exception reaches the caller as itself (errno kept), one that
    does not pickle as a RuntimeError naming it (not a wait for ever), and the loader's worker seeds come from
    a generator of its own (the global RNG, which later steps draw from, is left as it was)."""
    import errno
    idx = list_pool(folder_pool)
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    build_cache(idx, tmp_path / "ok", 32, 3, workers=2, chunk_size=3, progress=False)
    assert torch.equal(torch.rand(3), want)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pool, "decode_image", no_space)
    with pytest.raises(OSError) as got:
        build_cache(idx, tmp_path / "full", 32, 3, workers=2, chunk_size=3, progress=False)
    assert got.value.errno == errno.ENOSPC

    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("cannot pickle")

    def odd(*a, **k):
        raise Unpicklable("odd failure")

    monkeypatch.setattr(pool, "decode_image", odd)
    with pytest.raises(RuntimeError, match="Unpicklable: odd failure"):
        build_cache(idx, tmp_path / "odd", 32, 3, workers=2, chunk_size=3, progress=False)


def test_dataset_workers_and_strided_shards(tmp_path, folder_pool):
    make_shards(tmp_path / "shards")
    for idx in (list_pool(tmp_path / "shards"), list_pool(folder_pool)):
        idx.read_bytes(0)  # parent holds an open shard fd before the workers fork
        ds = PoolDataset(idx, 16, 3)
        got = []
        for nw in (0, 2):
            dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=nw)
            got.append([(b[0], b[1], b[2], list(b[3])) for b in dl])
        for (i0, g0, ok0, r0), (i2, g2, ok2, r2) in zip(*got):
            assert (i0 == i2).all() and (g0 == g2).all() and (ok0 == ok2).all() and r0 == r2
    # folder pool: bad ones are zeros with a reason
    ds = PoolDataset(idx, 16, 3)
    k = idx.ids.index("bad/zero.jpg")
    img, gi, ok, reason = ds[k]
    assert not ok and gi == k and "empty" in reason and not img.any()
    # strided rank shards partition the pool
    n, world = len(idx), 3
    seen = []
    for rank in range(world):
        part = PoolDataset(idx, 8, 3, indices=range(rank, n, world))
        seen += [part[j][1] for j in range(len(part))]
    assert sorted(seen) == list(range(n)) and len(seen) == n


def test_load_selected_uint8(folder_pool, tmp_path):
    idx = list_pool(folder_pool)
    cache = build_cache(idx, tmp_path / "c", 32, 3, workers=0, progress=False)
    sel = [5, 0, 3, 3, idx.ids.index("bad/text.png")]
    a = load_selected_uint8(cache, sel, 32, 3, workers=0)
    b = load_selected_uint8(idx, sel, 32, 3, workers=0)
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.uint8
    assert (a == b).all() and (a == cache.batch(sel)).all() and not a[4].any()
    with pytest.raises(InputError, match="32px"):
        load_selected_uint8(cache, sel, 16, 3)


def test_skipped_roundtrip(tmp_path):
    write_skipped(tmp_path / "s.txt", [("a/b.jpg", "corrupt:\tbad\nthing"), ("c.png", "")])
    assert read_skipped(tmp_path / "s.txt") == [("a/b.jpg", "corrupt: bad thing"),
                                                 ("c.png", "bad image")]
