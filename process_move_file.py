"""Flatten Tiny-ImageNet's train folders, in place.

    python process_move_file.py --root data/tiny-imagenet-200

Moves the images of ROOT/train/<wnid>/images/ up into ROOT/train/<wnid>/ and removes the
emptied images/ folder. Non-image files (anything not .jpg/.png/...) are left where they are;
<wnid>_boxes.txt already sits beside images/ and the loader ignores it. Safe to re-run.
"""
import argparse
import os

from pool import is_image_file
from safety import cli_main
from utils import InputError


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--root", required=True, help="Tiny-ImageNet root holding train/")
    return p


@cli_main
def main(args):
    train = os.path.join(args.root, "train")
    if not os.path.isdir(train):
        raise InputError(f"missing folder: {train}")
    moved = folders = 0
    conflicts = []
    for cls in sorted(e.path for e in os.scandir(train) if e.is_dir()):
        images = os.path.join(cls, "images")
        if not os.path.isdir(images):
            continue
        folders += 1
        for name in sorted(os.listdir(images)):
            src, dst = os.path.join(images, name), os.path.join(cls, name)
            if not is_image_file(name) or not os.path.isfile(src):
                continue
            if os.path.exists(dst):  # never overwrite a file already in the class folder
                conflicts.append(src)
                continue
            os.replace(src, dst)
            moved += 1
        if not os.listdir(images):
            os.rmdir(images)
    if not folders:
        print(f"{train}: no <class>/images folders, nothing to do")
        return
    print(f"{train}: {moved} images moved out of {folders} images/ folders"
          + (f"; {len(conflicts)} left in place, name taken (e.g. {conflicts[0]})" if conflicts else ""))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
