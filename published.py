"""What the published code did (IIGROUP/AttentionProbe: DFND_DeiT-train.py, DFND_DeiT-imagenet.py, loss.py,
utils.py, vision_transformer.py, training*.sh): the defaults and constants ours follow, its epoch formula, and
every way ours differs, flag by flag and behaviour by behaviour. docs/differences.md is generated from this
module (defaults_table) and a test keeps the page equal to it.

A published command computes here what it computed there, except where a row below says otherwise.
"""

# Inputs above LARGE_INPUT px (the 224-px DeiTs) take the published 224-px paths (Resize + CenterCrop test
# images, random-crop positives, images decoded per step); smaller ones the 32-px paths (uint8 in memory).
LARGE_INPUT = 64

# ---- its defaults and constants ------------------------------------------------------------------
DATASET = "cifar10"                       # --dataset
TEACHER = "deit_base_patch4_32_teacher"   # --teacher
NUM_SELECT = 600000                       # --num_select (the run scripts pass 650000, 800000, 1000000)
ATTNLIER, OUTLIER = 0.05, 0.9             # value = attnlier · Σ_b value_blk{b} + outlier · value_out
PATCHATTN = 0.8                           # weight of probe distillation
KD_TEMPERATURE = 4                        # T of kdloss
LR_S = 7.5e-4                             # student AdamW learning rate (training.sh: 8.5e-4 for CIFAR-100)
WEIGHT_DECAY = 0.025                      # student AdamW weight decay
NOISE_LR = 1e-3                           # noise-adaptation layer's Adam learning rate
BATCH_SIZE = 256
SCHEDULE = [200, 300]                     # lr x 0.1 from each of these epochs on
CLASS_WEIGHT_NOISE = 0.1                  # `perturb`: class weights + U[0, 0.1) per class, drawn once
# the noise-adaptation diagonal (the teacher's test accuracy) the scripts hard-code, per --dataset
TEACHER_ACC = {"cifar10": 0.9665, "cifar100": 0.7630, "imagenet": 0.8118}
# ours: the formula's E - 1 epochs beyond this are refused, i.e. a selection of at most 16,380 images up to
# 64 px, at most 32,761 at 224 px (the formula was made for hundreds of thousands: 650,000 give 251)
MAX_FORMULA_EPOCHS = 10000


def crop_padding(img_size):
    """RandomCrop(size, padding=4) at 32 and 224 px, as published; img_size // 8 at sizes it never ran."""
    return 4 if img_size in (32, 224) else max(1, img_size // 8)


def epochs_numerator(img_size):
    """320000 in the published 32-px script's epoch formula, 640000 in the 224-px one's."""
    return 320000 if img_size <= LARGE_INPUT else 640000


def epochs(num_select, img_size):
    """The published E = int(numerator / num_select * 512); its loop `for e in range(1, E)` trains E - 1 epochs."""
    return int(epochs_numerator(img_size) / num_select * 512)


# ---- every difference, for docs/differences.md ---------------------------------------------------

# Every flag of the published DFND_DeiT-train.py / DFND_DeiT-imagenet.py: (its published default, why ours
# differs in meaning or default, whether that changes the numbers of a published command).
FLAGS = {
    "dataset": ("cifar10", "also `tinyimagenet` (the published parser rejected it), `fashionmnist`, `folder`; "
                "`--eval_only` takes the student checkpoint's", "no"),
    "data_cifar": ("a path on the authors' machine", "", ""),
    "data_imagenet": ("a path on the authors' machine: one ImageFolder root (`DFND_DeiT-train.py` line 142)",
                      "one folder of images (any depth); one folder of `.tar` shards (only its top-level `.tar` files "
                      "are read); one or more `.tar` paths, also as a brace range (`pool-{000000..000009}.tar`). "
                      "Refused with one `error:` line: several folders, a folder given with `.tar` paths, two shards "
                      "of one file name, an image file", "no"),
    "teacher": ("deit_base_patch4_32_teacher", "the model the teacher file names (DeiT `args.model`, timm `arch`) "
                "when it names one", "no: the published files name none, or the same"),
    "teacher_dir": ("a path on the authors' machine", "DeiT, timm, release, plain and safetensors files; "
                    "also `hf-hub:org/name` and timm pretrained tags, loaded by timm", "no"),
    "nb_classes": ("10", "read from the teacher's head; a wrong value failed to load in both", "no"),
    "num_select": ("600000", "the run scripts pass 650000 (CIFAR), 800000, 1000000; with `--selection_file` its size",
                   ""),
    "selected_file": ("a path on the authors' machine", "created when missing; may be read-only when it holds "
                      "complete scores; not needed with `--selection_file`", "no"),
    "output_dir": ("a path on the authors' machine", "created when missing", "no"),
    "attnprobe_sel": ("off; on selected WITHOUT the probe (inverted)",
                      "on adds the probe to the score: the published inversion is a defect", "yes: the selection"),
    "random": ("off; drew from range(1281167) whatever the pool", "draws from the real pool (a defect fixed)",
               "yes, with `--random` on a pool of another size"),
    "attnlier": ("0.05", "", ""),
    "outlier": ("0.9", "", ""),
    "attnprobe_dist": ("off", "", ""),
    "patchattn": ("0.8", "", ""),
    "robust": ("off", "class weights: see \"Class weights\" below", "see below"),
    "lr_S": ("0.00075", "training.sh passes 8.5e-4 for CIFAR-100", ""),
    "epochs": ("800 (`type=float`), ignored: E - 1 epochs, E = int(320000 / num_select * 512)",
               f"unset: the published E - 1 epochs, refused above {MAX_FORMULA_EPOCHS:,} (a small selection: pass "
               "--epochs); N: N epochs (a whole number: `--epochs 800.0` is refused)", "only when given"),
    "schedule": ("200 300", "", ""),
    "cos": ("off", "", ""),
    "pos_num": ("129 (only in the published 224-px script)",
                "one script for both sizes: adding labelled images is opt-in; the 224-px run scripts pass 50 / 129",
                "no"),
}
_UNSET_MEANS = {"data_cifar": "required", "data_imagenet": "required", "teacher_dir": "required",
                "selected_file": "required", "output_dir": "required", "nb_classes": "from the teacher file",
                "epochs": "the published formula", "dataset": DATASET, "teacher": TEACHER, "num_select": str(NUM_SELECT)}

# Every other difference found by reading the published scripts (DFND_DeiT-train.py, DFND_DeiT-imagenet.py,
# loss.py, utils.py, vision_transformer.py, training*.sh) line by line against ours:
# (what, published, ours, why, whether it changes the numbers of a published command).
BEHAVIOURS = [
    ("Files PIL cannot load (empty, not an image, cut inside the header, over PIL's pixel limit)",
     "the DataLoader raised: the run stopped", "skipped: scored +inf, never selected, listed with the reason in "
     "`skipped.txt`", "defect: one such file in a wild pool stopped the run", "only where the published run stopped"),
    ("Pool membership", "ImageFolder: images inside class folders, hidden files and folders included, images at "
     "the top ignored", "images at any depth, the top included; hidden files and folders skipped (in "
     "ImageFolder's order)", "pools without class folders (Flickr1M); caches and scores may live inside the pool",
     "only for pools with hidden or top-level images"),
    ("Reused score files", "any `value_out.pth`, `pred_out.pth`, `value_blk*.pth` in `--selected_file`, "
     "unchecked", "reused when their fingerprint (pool, teacher file hash, preprocessing, probe, decoding) "
     "matches; published files (no fingerprint) when their length equals the pool's; else an error",
     "scores of another pool or teacher were silently used", "no: refused instead"),
    ("Scoring pass", "two full fp32 passes, the qkv weight copied per image, batch 256",
     "one pass forming only head 0's CLS row; bf16 autocast on a GPU (`--amp off`: fp32), fp32 on the CPU; "
     "batch 512 (`--score_batch_size`)", "speed and memory", "bf16 rounding on a GPU only (tiny CPU check: "
     "confidence within 3 %, probe within 5e-3 of fp32, `tests/test_fast_paths.py`)"),
    ("Probe head geometry", "head count and width by `--dataset`: 12 heads of 64 for imagenet, 3 of 128 "
     "otherwise; a deit_small teacher (6 heads of 64) crashed with the imagenet geometry and had pairs of its "
     "heads merged into one with the other", "the teacher's own", "defect", "no: the probe scores entered no "
     "published selection (the inverted `--attnprobe_sel`), and the deit_small command could not start "
     "(`--dataset tinyimagenet` was rejected)"),
    ("Ranking", "`value.topk(num_select, largest=False)` in fp32 on the GPU", "a stable sort in float64; ties "
     "by pool order", "deterministic", "only among equal scores"),
    ("Several GPUs", "nn.DataParallel (`DFND_DeiT-train.py` line 98; the run scripts used one GPU, "
     "`training.sh` lines 13, 15). Read from the code, not run: scoring on several GPUs would have crashed before "
     "writing a score file (lines 452-455 save after both passes). The teacher call of line 264 gathers the "
     "replicas' (3, B/G, N, C) block features (`vision_transformer.py` lines 63-64) along dim 0, which needs equal "
     "chunks; ImageNet train's 1,281,167 images in batches of 256 (line 232) end with a batch of 143 (1,281,167 mod "
     "256), which 2 to 8 GPUs split unequally (3, 5, 6 or 7 GPUs split 256 unequally too). The probe hooks (lines "
     "253-260) fired once per replica and lines 268-279 used the first one's rows only (a device mismatch when it "
     "was not the first GPU's). Distillation on 4 GPUs from one GPU's score files (the published `README.md` line "
     "107) ran (256 and 650,000 mod 256 = 16 split evenly): the block features gathered along L left PD's value "
     "unchanged (the same rows, reordered)", "DistributedDataParallel; the pool scored in strided "
     "shards gathered by index; each epoch's images split evenly over the processes: fewer images than processes "
     "left out (up to 64 px) or repeated (224 px)", "defect; speed", "only on more than one GPU, through the "
     "images each step draws (no published score came from several GPUs)"),
    ("Class weights (`--robust`)", "teacher softmax summed per class over one augmented, shuffled pass of the "
     "training set: the selection and, at 224 px, the `--pos_num` images", "the selection's softmax stored by "
     "the scoring pass (resized, not augmented), plus the `--pos_num` images' (Resize, CenterCrop, not "
     "augmented)", "weights for any selection without another teacher pass", "yes, slightly (no augmentation)"),
    ("Class weights file", "`class_weights.pth` in `--selected_file` reused when present, even for another "
     "selection", "computed for every selection; the file is written, never read", "defect: stale weights",
     "only where the published run reused stale weights"),
    ("Class weights without `probs_out.npy` (published score files)", "softmax sums (its own pass)",
     "inverse counts of the teacher-predicted classes (the selection's and the `--pos_num` images'); rescore "
     "with `--force` for softmax sums", "published score files hold no softmax", "yes, with `--robust` on "
     "published score files"),
    ("Noise-adaptation diagonal", "by `--dataset`: CIFAR-10 0.9665, CIFAR-100 0.7630, ImageNet 0.8118",
     "`--teacher_acc`, else the teacher file's accuracy (`acc1` of `train_teacher.py` files, timm's top-1 "
     "`metric`), else the published constant; other datasets (Tiny-ImageNet, `fashionmnist`, `folder`) need one "
     "of the first two", "the teacher's own accuracy when it is known; no constant is invented",
     "yes, for teacher files that record an accuracy (the published ones do not)"),
    ("`DFND_DeiT-train.py --dataset imagenet` (224 px in the 32-px script)", "ImageNet mean/std for every "
     "image, test images Resize(256) then CenterCrop(224), 320000 in the epoch formula, no labelled images",
     "one script for both sizes: every 224-px run as DFND_DeiT-imagenet.py (test images Resize(224) then "
     "CenterCrop(224), 640000; `--pos_num`, `--mean/--std` as given)", "the published run scripts ran 224 px "
     "through DFND_DeiT-imagenet.py", "yes, for that command"),
    ("Tiny-ImageNet", "`--dataset tinyimagenet` rejected: `training_tinyimagenet.sh` could not run", "runs: 200 "
     "classes, noise adaptation from `--teacher_acc` (`TEACHER_ACC`) or the teacher file, test images val Resize(224) then CenterCrop(224), probe geometry of the "
     "teacher, 640000 in the epoch formula", "the published run script's intent", "not comparable: it never ran"),
    ("Normalisation at 32 px", "wild images (scoring, training) ImageNet mean/std; CIFAR test images CIFAR "
     "mean/std", "one mean/std for every image: `--mean/--std`, else the teacher file's, else ImageNet's",
     "defect: the student was tested on images normalised unlike its training images", "yes: test accuracy"),
    ("Normalisation at 224 px", "CIFAR mean/std for every image (wild, labelled, test) with an ImageNet teacher",
     "the 224-px run scripts pass it (`--mean/--std`); a command without them: the teacher file's, else "
     "ImageNet's", "the published scripts compute the published computation; own teachers their own "
     "statistics", "only for commands without `--mean/--std`"),
    ("Labelled images (`--pos_num`)", "the first K per class in ImageFolder order; the list reused from "
     "`--selected_file/labelset_index_dict.pth` when present; a class with fewer than K images crashed",
     "the first K per class in the same order, computed each run and written to `--output_dir`; a short class "
     "gives what it has", "the list belongs to the run", "only where the published run crashed or reused "
     "another list"),
    ("Labelled class folders", "ImageFolder: names sorted as strings, label = position ('10' before '2'); hidden "
     "ones included", "all-integer names ('7', '007', '07_bee') give that integer as label; other names as "
     "ImageFolder; hidden files and folders skipped", "integer-named folders of converters and users", "only "
     "for integer-named folders that are not zero-padded, and hidden files"),
    ("Student initialisation", "the timm of 2021-22 (not pinned): `cls_token` trunc_normal(std 0.02)",
     "the installed timm (>= 1.0): `cls_token` N(0, 1e-6); the other weights drawn from the same "
     "distributions", "timm's own model, not a fork", "yes: another random start"),
    ("ViT implementation", "its own TeacherVisionTransformer on the timm of the time, attention as explicit "
     "softmax", "timm's VisionTransformer with fused attention", "no fork of the ViT", "float rounding only"),
    ("Training and test precision", "fp32 (TF32 matrix products on Ampere GPUs: the default of torch 1.7 to "
     "1.11, and the published code ran torch 1.7.1)", "bf16 autocast and fused AdamW on a GPU (`--amp off`: fp32); fp32 "
     "on the CPU", "speed", "rounding on a GPU"),
    ("Last partial batch", "kept (DataLoader `drop_last=False`)", "kept; dropped only with `--compile "
     "--cuda_graphs`, which needs one batch shape", "", "only with `--cuda_graphs`"),
    ("Randomness", "nothing seeded (torch, numpy, random): every run differs", "`--seed` seeds the shuffle, "
     "crops, flips, the class-weight perturbation and the holdout, per epoch and process", "reproducible runs "
     "and exact resumes", "other draws from the same distributions"),
    ("Where images are decoded and augmented", "every epoch, by torchvision transforms in 8 DataLoader workers",
     "wild images up to 64 px decoded once into a uint8 cache; wild crops and flips on the device; labelled "
     "224-px images by the published transforms on the CPU", "speed", "no: the same pixels and transforms"),
    ("Reported accuracy", "the best test accuracy over epochs, printed; `student/checkpoint.pth` is that "
     "student (chosen on the test set)", "the same checkpoint and number, plus the last epoch's accuracy "
     "(`summary.json`, `student/final.pth`: the one to report) and, with `--holdout`, one chosen without test "
     "labels", "model selection on the test set", "no: more numbers"),
    ("Run files", "`student/checkpoint.pth` = the DataParallel state dict (`module.` keys); printed lines",
     "`{'model', 'epoch', 'acc1', 'acc5', 'mean', 'std', 'student', 'args'}` without prefix; `log.txt` "
     "(JSON lines), `args.json`, `summary.json`, `student/last.pth`; a rerun resumes", "", "no"),
    ("Crashes of the published scripts", "`import resnet` (absent from the repository); output folders never "
     "created; the 32-px script compared a number with an AverageMeter for top-5 (TypeError at the "
     "first test); `--dataset mnist` had no test set", "none of these", "defects", "no"),
    ("Teacher files", "`torch.load` (runs pickled code), `['model']`", "`weights_only` loading; DeiT, timm, "
     "release, plain and safetensors files; EMA weights with `--teacher_ema`", "safety", "no"),
    ("Unknown flags", "ignored (`parse_known_args`): a mistyped flag ran with the default", "an error naming "
     "it; no abbreviations", "", "only where a typo was ignored"),
    ("Process settings", "4 CPU threads (`torch.set_num_threads(4)`, OMP/MKL variables); all warnings hidden",
     "PyTorch's default threads; warnings shown", "", "no"),
    ("Converters `process_cifar10.py`, `process_cifar100.py`", "no arguments; the train split only (line 8 of "
     "each), written to `/database/cifar10/CIFAR10_image/<label>/<k>.png` and "
     "`/database/cifar100/CIFAR100_image/<label>/<k>.png` (hard-coded roots, line 4; `os.mkdir` at line 12 needs "
     "`CIFAR10_image/` or `CIFAR100_image/` to exist); labels not zero-padded, so an ImageFolder reading the "
     "CIFAR-100 tree sorts its classes as strings ('10' is class 2)", "ours: `--root`, `--out`: both splits to "
     "`OUT/{train,val}/<NN_name>/<k>.png`, in label order", "the published scripts ran only with the authors' "
     "paths; their CIFAR-100 tree mislabels classes", "no: the published commands read the pickles "
     "(`DFND_DeiT-train.py` lines 177, 183)"),
    ("Converters `process_tinyimagenet.py`, `process_move_file.py`", "a hard-coded `/database/tiny-imagenet/`; "
     "`process_move_file.py` as committed runs only the removal of `train/<wnid>/images/` (its moves are "
     "commented out), which fails on a fresh tree", "the same final tree (the images in `train/<wnid>/` and "
     "`val/<wnid>/`) from `--root ROOT`; the published README's commands without `--root` end with one error "
     "line naming it", "", "no"),
    ("Pool file names with a tab, newline or carriage return", "read by ImageFolder like any other name",
     "left out of the pool with one warning", "ids are lines of `selected.txt` and `skipped.txt`",
     "only for pools with such names"),
    ("Class-weight softmax", "each image's fp32 softmax (computed on the GPU) added on the CPU into a float64 NumPy "
     "array (`DFND_DeiT-train.py` lines 107, 117-119)", "stored as fp16 in `probs_out.npy` (each value rounded to "
     "within 2^-11, relative), summed in float64", "one N x C array serves every later selection", "rounding only: "
     "the fp16 storage of each value"),
    ("Noise-adaptation log", "`log(softmax(s) @ Q)` as it is", "the same, clamped at 1e-12 before the log",
     "a probability that underflows to 0 gives a finite loss", "only where the published value underflowed"),
    ("Labelled data readers", "torchvision's CIFAR classes (MD5-checked pickles) and ImageFolder",
     "CIFAR pickles read directly, converter ImageFolder trees, MNIST IDX files", "", "no"),
    ("Other input sizes", "32 and 224 px, three channels", "one-channel teachers (28 px, `convert('L')`); crop "
     "padding img_size // 8 at sizes other than 32 and 224; CIFAR/MNIST images resized (antialiased bilinear) "
     "for a teacher of another size", "extension", "not comparable: no published path"),
    ("Pictures", "none", "a selection report in `--selected_file/report/` (`--no_report` skips it) and `curves.png` "
     "beside every `log.txt`, drawn on rank 0", "see what was kept before spending GPU days on it", "no"),
]


def defaults_table(parser):
    """Markdown: every published flag (its published default and ours, read from `parser`, the parser of
    DFND_DeiT-train.py), then every other difference from the published code, each with why and whether it
    changes the numbers. docs/differences.md holds this table (a test keeps the two equal)."""
    rows = ["| flag or behaviour | published | ours | why | changes numbers |", "|---|---|---|---|---|"]
    for flag, (published, why, numbers) in FLAGS.items():
        value = parser.get_default(flag)
        ours = (_UNSET_MEANS[flag] if value is None else "on" if value is True else "off" if value is False
                else " ".join(map(str, value)) if isinstance(value, list) else str(value))
        rows.append(f"| `--{flag}` | {published} | {ours} | {why} | {numbers} |")
    for row in BEHAVIOURS:
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)
