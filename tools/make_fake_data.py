"""Generated inputs for a real DFND_DeiT-train.py run without any download (tools/gpu_check.sh part 2):
CIFAR-10 'python version' pickles, a wild pool of JPEG/PNG images and a randomly initialised teacher
file, all from tests/fixtures.py's generators. The numbers they give are meaningless; the point is
that the real command runs on the real file formats.

    python tools/make_fake_data.py OUT [--pool 4000] [--cifar_train 2000] [--cifar_test 1000]
                                   [--teacher deit_base_patch4_32_teacher]
writes OUT/cifar/cifar-10-batches-py/, OUT/pool/ and OUT/teacher.pth (skips what is already there).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import fixtures  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="generated CIFAR-10 pickles, image pool and teacher file",
                                allow_abbrev=False)
    p.add_argument("out")
    p.add_argument("--pool", type=int, default=4000, help="pool images (32x32, PNG and JPEG)")
    p.add_argument("--cifar_train", type=int, default=2000, help="train images (over the 5 batch files)")
    p.add_argument("--cifar_test", type=int, default=1000, help="test images")
    p.add_argument("--teacher", default="deit_base_patch4_32_teacher", help="teacher model name")
    args = p.parse_args(argv)
    import torch
    cifar = os.path.join(args.out, "cifar")
    if not os.path.exists(os.path.join(cifar, "cifar-10-batches-py", "test_batch")):
        fixtures.write_cifar(cifar, "cifar10", n_train=max(1, args.cifar_train // 5), n_test=args.cifar_test)
    pool = os.path.join(args.out, "pool")
    if not os.path.isdir(pool):
        # written under a temporary name: a run cut off mid-way leaves no half pool that looks whole
        fixtures.write_pool(pool + ".part", args.pool, size=32)
        os.replace(pool + ".part", pool)
    teacher = os.path.join(args.out, "teacher.pth")
    if not os.path.exists(teacher):
        fixtures.write_teacher(teacher + ".part", args.teacher, num_classes=10, acc1=91.0)
        ckpt = torch.load(teacher + ".part", weights_only=True)
        ckpt["model"]["head.weight"].mul_(40)   # confident, input-dependent logits: something to distill
        torch.save(ckpt, teacher + ".part")
        os.replace(teacher + ".part", teacher)
    print(f"fake data in {args.out}: cifar/ ({args.cifar_train} train, {args.cifar_test} test), "
          f"pool/ ({args.pool} images), teacher.pth ({args.teacher})")


if __name__ == "__main__":
    main()
