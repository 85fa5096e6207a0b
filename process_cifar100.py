"""Convert the CIFAR-100 python pickles into a PNG ImageFolder tree.

    python process_cifar100.py --root data --out data/cifar100 [--download]

--root holds cifar-100-python/ (or is that folder). Writes
OUT/train/<NN_class>/<index>.png and OUT/val/... (val = the test set); the zero-padded label
prefix keeps class order under a string sort. Re-running skips images already written.
"""
import data
from safety import cli_main


def get_args_parser():
    return data.cifar_export_parser("cifar100")


@cli_main
def main(args):
    data.export_cifar_image_folder(args.root, "cifar100", args.out, download=args.download)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
