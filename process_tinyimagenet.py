"""Sort Tiny-ImageNet's val images into per-class folders, in place.

    python process_tinyimagenet.py --root data/tiny-imagenet-200

Moves ROOT/val/images/<file> to ROOT/val/<wnid>/<file> using ROOT/val/val_annotations.txt
(tab-separated: file, wnid, bbox...), then removes the emptied val/images. Safe to re-run or
to resume after an interruption (each move is one rename). Run process_move_file.py for train.
"""
import argparse
import os

from safety import cli_main
from utils import InputError


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--root", required=True, help="Tiny-ImageNet root holding val/")
    return p


def read_annotations(path):
    """-> [(file, wnid)]; the whole file is checked before anything moves."""
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise InputError(f"{path}:{n}: expected 'file<TAB>wnid<TAB>...', got {line.strip()!r}")
            name, wnid = fields[0].strip(), fields[1].strip()
            if os.path.basename(name) != name or wnid in (".", "..") or os.sep in wnid:
                raise InputError(f"{path}:{n}: bad file or class name {line.strip()!r}")
            pairs.append((name, wnid))
    return pairs


@cli_main
def main(args):
    val = os.path.join(args.root, "val")
    images = os.path.join(val, "images")
    ann = os.path.join(val, "val_annotations.txt")
    if not os.path.isdir(val):
        raise InputError(f"missing folder: {val}")
    if not os.path.isdir(images):
        if not any(e.is_dir() for e in os.scandir(val)):
            raise InputError(f"missing folder: {images}")
        print(f"{val}: already sorted into class folders, nothing to do")
        return
    if not os.path.isfile(ann):
        raise InputError(f"missing file: {ann}")
    moved = present = 0
    missing = []
    for name, wnid in read_annotations(ann):
        src, dst = os.path.join(images, name), os.path.join(val, wnid, name)
        if os.path.exists(src):
            if os.path.exists(dst):  # never overwrite: keep the source for the user to look at
                missing.append(src)
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
            moved += 1
        elif os.path.exists(dst):
            present += 1
        else:
            missing.append(src)
    left = os.listdir(images)
    if not left:
        os.rmdir(images)
    print(f"{val}: {moved} moved, {present} already in place"
          + (f", {len(missing)} listed but not found or in conflict (e.g. {missing[0]})" if missing else "")
          + (f"; {len(left)} unlisted files left in {images}" if left else ""))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
