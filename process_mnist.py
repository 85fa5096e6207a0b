"""Convert MNIST / Fashion-MNIST IDX files (raw or .gz) into a PNG ImageFolder tree.

    python process_mnist.py --root /usr/share/datasets/fashion-mnist --out data/fashionmnist --names fashion
    python process_mnist.py --root data/mnist-idx --out data/mnist

Writes OUT/train/<class>/<index>.png and OUT/val/... (val = t10k). Class folders are the
zero-padded label, with the class name for --names fashion ('00_T-shirt-top', ..., '09_Ankle-boot')
and the label alone for --names digits ('00', ..., '09'); either way a string sort keeps label
order. Re-running skips images already written.
"""
import argparse

import data
from safety import cli_main


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--root", required=True, help="folder holding train-images-idx3-ubyte[.gz] etc.")
    p.add_argument("--out", required=True, help="output ImageFolder root")
    p.add_argument("--names", choices=["digits", "fashion"], default="digits",
                   help="class folder names: digits (MNIST) or fashion (Fashion-MNIST)")
    return p


@cli_main
def main(args):
    classes = data.FASHION_CLASSES if args.names == "fashion" else data.DIGIT_CLASSES
    data.export_idx_image_folder(args.root, args.out, classes)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
