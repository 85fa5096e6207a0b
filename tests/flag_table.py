"""Every flag of select_data.py, DFND_DeiT-train.py and train_teacher.py: bad values with the refusal they get,
and accepted values with the test that shows what they do.

tests/test_flags.py runs every refusal (exit 2, one `error:` line naming the flag, nothing written), checks
that every effect names a test that exists, and fails when a parser gains a flag without a row. A new flag needs
no edit here: its test carries its effect row (@pins(script, flag, value, what)), and a value outside its
`type=`'s domain (OUTSIDE) is refused by a row made from the parser.
tools/flag_docs.py writes docs/usage.md's flag reference and docs/failures.md's refusals from the parsers and
this table.

Placeholders in argv, filled by the test: {tmp} (the case's empty folder), {afile} (a regular file), {pool},
{pool_b} (another pool), {cifar}, {teacher}, {sel_a} (a selection.pt of {pool}), {sel_b} (one of {pool_b}),
{seed_json} (a config {"seed": -1}), {alien_json} (a config with a key no script writes).
"""
import ast
import glob
import os
from typing import NamedTuple

import distill
import flags
import select_data
import train_teacher

S, D, T = "select_data.py", "DFND_DeiT-train.py", "train_teacher.py"
SD, ALL = (S, D), (S, D, T)
PARSERS = {S: select_data.get_args_parser, D: distill.get_args_parser, T: train_teacher.get_args_parser}


class Refused(NamedTuple):
    scripts: tuple
    argv: list         # the flag under test first; added to (or replacing in) a valid command
    says: str          # what the error line holds besides the flag


class Effect(NamedTuple):
    scripts: tuple
    flag: str
    value: str
    test: str          # tests/FILE.py::NAME, the test that checks what the value does
    what: str


def refused(scripts, *argv, says):
    return Refused(scripts if isinstance(scripts, tuple) else (scripts,), list(argv), says)


def effect(scripts, flag, value, test, what):
    return Effect(scripts if isinstance(scripts, tuple) else (scripts,), flag, value, test, what)


INT1, INT0, POS, NONNEG = "an integer >= 1", "an integer >= 0", "a number > 0", "a number >= 0"
INCREASING = "values must increase, each given once"
FILE_DECIDES = "has no effect with --selection_file"

REFUSED = [
    # ---- system ----
    refused(ALL, "--device", "gpu", says="cpu, cuda, cuda:N or auto"),
    refused(ALL, "--workers", "-1", says=INT0),
    refused(ALL, "--amp", "fp16", says="invalid choice"),
    refused(ALL, "--seed", "-1", says="an integer in [0, 2^32)"),
    refused(ALL, "--dist_timeout", "0", says=POS),
    refused(ALL, "--config", "{tmp}/none.json", says="no such file"),
    refused(ALL, "--config", "{tmp}", says="a folder: name its args.json"),
    refused(ALL, "--config", "{afile}", says="not a readable JSON file"),
    refused(ALL, "--config", "{seed_json}", says="argument --seed: must be an integer in [0, 2^32)"),
    refused(ALL, "--config", "{alien_json}", says="'from_elsewhere' is not a flag of"),
    # ---- selection (stage 1) ----
    refused(SD, "--data_imagenet", "{tmp}/nope", says="no such file or folder"),
    refused(SD, "--teacher", "no_such_vit", says="unknown model"),
    refused(SD, "--teacher_dir", "{tmp}/none.pth", says="no such file"),
    refused(SD, "--teacher_ema", says="no EMA weights"),
    refused(SD, "--nb_classes", "0", says=INT1),
    refused(SD, "--nb_classes", "7", says="10 classes"),
    refused(SD, "--num_select", "0", says=INT1),
    refused(SD, "--num_select", "-3", says=INT1),
    refused(SD, "--num_select", "41", says="larger than the pool"),
    refused(SD, "--num_select", "auto", says="auto is not offered"),
    refused(SD, "--selected_file", "{afile}/s", says="cannot be written"),
    refused(SD, "--attnprobe_sel", "--random", says="exclude each other"),
    refused(SD, "--random", "--rule", "entropy", says="exclude each other"),
    refused(SD, "--attnlier", "-1", says=NONNEG),
    refused(SD, "--attnlier", "0.1", says="has no effect without --attnprobe_sel"),
    refused(SD, "--outlier", "-0.5", says=NONNEG),
    refused(SD, "--outlier", "0.5", says="has no effect without --attnprobe_sel"),
    refused(SD, "--attnlier", "0", "--outlier", "0", "--attnprobe_sel", says="weigh every score by zero"),
    refused(SD, "--rule", "nope", says="invalid choice"),
    refused(SD, "--rule", "entropy", "--attnprobe_sel", says="exclude each other"),
    refused(D, "--store_signals", "--selection_file", "{sel_a}", says=FILE_DECIDES),
    refused(D, "--flip_signal", "--selection_file", "{sel_a}", says=FILE_DECIDES),
    refused(SD, "--per_class", "0", says=INT1),
    refused(D, "--per_class", "2", "--selection_file", "{sel_a}", says=FILE_DECIDES),
    refused(SD, "--probe_blocks", "7", "3", says=INCREASING),
    refused(SD, "--probe_blocks", "3", "3", says=INCREASING),
    refused(SD, "--probe_blocks", "-1", says=INT0),
    refused(SD, "--probe_blocks", "3", "12", says="has 12 blocks"),
    refused(SD, "--probe_head", "2", says="has 2 heads"),
    refused(SD, "--probe_head", "-1", says=INT0),
    refused(SD, "--img_size", "0", says=INT1),
    refused(SD, "--img_size", "28", says="does not fit"),
    refused(SD, "--mean", "nan", says="a finite number"),
    refused(SD, "--mean", "0.5", "0.5", says="need 3 value(s)"),
    refused(SD, "--std", "0", says=POS),
    refused(SD, "--cache_dir", "{tmp}/cache", "--no_cache", says="exclude each other"),
    refused(SD, "--no_cache", "--cache_dir", "{tmp}/cache", says="exclude each other"),
    refused(SD, "--score_batch_size", "-4", says=INT1),
    refused(SD, "--score_batch_size", "0", says=INT1),
    refused(SD, "--chunk_size", "-5", says=INT1),
    refused(SD, "--chunk_size", "0", says=INT1),
    refused(D, "--force", "--selection_file", "{sel_a}", says=FILE_DECIDES),
    refused(D, "--no_report", "--selection_file", "{sel_a}", says=FILE_DECIDES),
    refused(D, "--random", "--selection_file", "{sel_a}", says=FILE_DECIDES),
    refused(D, "--attnprobe_sel", "--selection_file", "{sel_a}", says=FILE_DECIDES),
    refused(S, "--batch_size", "-4", says=INT1),
    # ---- distillation (stage 2) ----
    refused(D, "--dataset", "nope", says="invalid choice"),
    refused(D, "--data_cifar", "{tmp}/nope", says="no such folder"),
    refused(D, "--selection_file", "{sel_b}", says="another pool"),
    refused(D, "--selection_file", "{tmp}/none.pt", says="no such file"),
    refused(D, "--output_dir", "{afile}/o", says="cannot be written"),
    refused(D, "--student", "no_such_vit", says="unknown model"),
    refused(D, "--student", "deit_tiny_patch4_28", says="but the teacher takes"),
    refused(D, "--lr_S", "-1", says=POS),
    refused(D, "--lr_S", "0", says=POS),
    refused(D, "--weight_decay", "-0.1", says=NONNEG),
    refused(D, "--batch_size", "0", says=INT1),
    refused(D, "--epochs", "0", says=INT1),
    refused(D, "--schedule", "300", "200", says=INCREASING),
    refused(D, "--schedule", "200", "200", says=INCREASING),
    refused(D, "--schedule", "-5", says=INT0),
    refused(D, "--cos", "--schedule", "100", says="exclude each other"),
    refused(D, "--robust", "--eval_only", "{teacher}", says="has no effect with --eval_only"),
    refused(D, "--attnprobe_dist", "--eval_only", "{teacher}", says="has no effect with --eval_only"),
    refused(D, "--patchattn", "0", "--attnprobe_dist", says=POS),
    refused(D, "--patchattn", "-1", "--attnprobe_dist", says=POS),
    refused(D, "--patchattn", "0.5", says="has no effect without --attnprobe_dist"),
    refused(D, "--pd_loss", "nope", "--attnprobe_dist", says="invalid choice"),
    refused(D, "--pd_teacher_blocks", "11", "7", "3", "--attnprobe_dist", says=INCREASING),
    refused(D, "--pd_teacher_blocks", "3", "7", "11", says="has no effect without --attnprobe_dist"),
    refused(D, "--pd_teacher_blocks", "3", "7", "--attnprobe_dist", says="must name as many blocks"),
    refused(D, "--pd_teacher_blocks", "3", "7", "12", "--attnprobe_dist", says="12 blocks"),
    refused(D, "--pd_student_blocks", "11", "7", "3", "--attnprobe_dist", says=INCREASING),
    refused(D, "--pd_student_blocks", "1", "2", "3", says="has no effect without --attnprobe_dist"),
    refused(D, "--teacher_acc", "1.5", says="a fraction in (0, 1]"),
    refused(D, "--teacher_acc", "0", says="a fraction in (0, 1]"),
    refused(D, "--pos_num", "-1", says=INT0),
    refused(D, "--holdout", "0.5", says="a fraction in [0, 0.5)"),
    refused(D, "--holdout", "-0.1", says="a fraction in [0, 0.5)"),
    refused(D, "--eval_every", "0", says=INT1),
    refused(D, "--crop_padding", "-1", says=INT0),
    refused(D, "--crop_padding", "33", says="wider than the 32-px images"),
    refused(D, "--resume", "{tmp}/none.pth", says="no such file"),
    refused(D, "--eval_only", "{tmp}/none.pth", says="no such file"),
    refused(D, "--eval_only", "{teacher}", "--epochs", "3", says="has no effect with --eval_only"),
    refused(D, "--cuda_graphs", says="has no effect without --compile"),
    refused(D, "--compile", "--eval_only", "{teacher}", says="has no effect with --eval_only"),
    refused(D, "--fast_decode", "--eval_only", "{teacher}", says="has no effect with --eval_only"),
    refused(D, "--log_every", "0", says=INT1),
    # ---- train_teacher.py ----
    refused(T, "--dataset", "nope", says="invalid choice"),
    refused(T, "--data", "{tmp}/nope", says="nope"),
    refused(T, "--model", "no_such_vit", says="unknown model"),
    refused(T, "--nb_classes", "-3", says=INT1),
    refused(T, "--nb_classes", "0", says=INT1),
    refused(T, "--nb_classes", "5", says="fewer than the 10 classes of the train split"),
    refused(T, "--output", "{tmp}", says="is a folder"),
    refused(T, "--epochs", "0", says=INT1),
    refused(T, "--batch_size", "0", says=INT1),
    refused(T, "--lr", "-1", says=POS),
    refused(T, "--weight_decay", "-1", says=NONNEG),
    refused(T, "--warmup_epochs", "-1", says=INT0),
    refused(T, "--label_smoothing", "1", says="a fraction in [0, 1)"),
    refused(T, "--crop_padding", "-1", says=INT0),
    refused(T, "--crop_padding", "33", says="wider than the 32-px images"),
    refused(T, "--mean", "inf", says="a finite number"),
    refused(T, "--std", "-1", says=POS),
    refused(T, "--log_every", "0", says=INT1),
    refused(T, "--resume", "{tmp}/none.pth", says="no such file"),
]

W, SEL, SIG, MW, TF, FL = ("tests/test_method_wiring.py::", "tests/test_select.py::", "tests/test_signals.py::",
                          "tests/test_method_wiring.py::test_stage2_", "tests/test_teacher_files.py::",
                          "tests/test_flags.py::")
CV = "tests/test_conventions.py::"
EFFECTS = [
    # ---- system ----
    effect(ALL, "--compile", "", FL + "test_compile_compiles_the_model_passes", "torch.compile gets the scorer, the "
           "student and teacher passes, the teacher's training pass"),
    effect(SD, "--seed", "2", W + "test_random_selection_is_seeded_and_never_takes_unreadable_images",
           "--random draws another seeded sample"),
    effect(D, "--dist_timeout", "10", "tests/test_cluster.py::test_a_hung_rank_ends_the_run_within_dist_timeout",
           "a hung rank ends the run within it, one line naming it"),
    effect(S, "--workers", "2", "tests/test_pool.py::test_cache_workers_equal_and_resume",
           "the cache decoded by 2 processes equals the one of 0"),
    effect(D, "--config", "RUN/args.json", CV + "test_config_replays_a_distill_run_and_the_command_line_wins",
           "the run again: the same settings and log; a flag given beside it wins"),
    effect(S, "--config", "RUN/args.json", CV + "test_config_of_a_distill_run_reruns_its_selection",
           "that run's selection flags choose the same images"),
    effect(T, "--config", "RUN.args.json", CV + "test_config_replays_a_teacher_run", "the same log"),
    # ---- selection ----
    effect(S, "--data_imagenet", "POOL", SEL + "test_tar_shard_pool_scores_like_the_folder",
           "a folder of .tar shards scores as the same images in a folder"),
    effect(SD, "--teacher_dir", "teacher.pth", TF + "test_select_data_runs_on_each_teacher_file",
           "every teacher file kind gives the same selection"),
    effect(S, "--teacher", "deit_tiny_patch4_28_teacher",
           "tests/test_published_loader.py::test_greyscale_teacher_takes_convert_L",
           "scores equal a re-enactment with that architecture"),
    effect(S, "--teacher_ema", "", TF + "test_select_data_with_ema_scores_the_ema_teacher",
           "the EMA weights score the pool"),
    effect(SD, "--num_select", "6", W + "test_published_score_chooses_the_lowest_weighted_sum",
           "exactly the N lowest scores are kept"),
    effect(S, "--selected_file", "DIR", SEL + "test_scores_match_direct_computation",
           "the score files there equal an independent computation"),
    effect(S, "--attnprobe_sel", "", W + "test_published_score_chooses_the_lowest_weighted_sum",
           "the lowest 0.05 · Σ value_blk + 0.9 · value_out are kept"),
    effect(S, "--attnlier", "1", FL + "test_probe_weights_rank_the_pool",
           "the weights enter the score as given"),
    effect(S, "--outlier", "0", FL + "test_probe_weights_rank_the_pool", "the weights enter the score as given"),
    effect(S, "--random", "", W + "test_random_selection_is_seeded_and_never_takes_unreadable_images",
           "a seeded uniform draw that never takes an unreadable image"),
    effect(S, "--rule", "entropy", SIG + "test_rule_selects_by_its_signals", "the rule's score ranks the pool"),
    effect(S, "--store_signals", "", FL + "test_store_signals_stores_every_signal_and_a_later_rule_does_not_rescore",
           "sig_<name>.pth stored; a later --rule reads them without rescoring"),
    effect(S, "--flip_signal", "", SIG + "test_published_files_and_default_selection_unchanged",
           "flip_agree and flip_kl stored, the published files unchanged"),
    effect(S, "--per_class", "1", SEL + "test_per_class_balanced_selection", "at most N per predicted class"),
    effect(S, "--per_class", "1", FL + "test_random_per_class_from_the_command_line_is_recorded_and_holds",
           "with --random: N per class drawn at random, recorded as class-balanced"),
    effect(S, "--probe_blocks", "1 5", FL + "test_probe_blocks_and_head_are_the_ones_scored",
           "value_blk1 and value_blk5 are those blocks' probe scores"),
    effect(S, "--probe_head", "1", FL + "test_probe_blocks_and_head_are_the_ones_scored",
           "the probe scores are head 1's"),
    effect(S, "--mean", "0.449", "tests/test_published_loader.py::test_greyscale_teacher_takes_convert_L",
           "scores equal a re-enactment normalised with it"),
    effect(S, "--std", "0.226", "tests/test_published_loader.py::test_greyscale_teacher_takes_convert_L",
           "scores equal a re-enactment normalised with it"),
    effect(S, "--cache_dir", "DIR", "tests/test_out_of_space.py::test_cache_without_room_is_refused_before_decoding",
           "the cache is built there"),
    effect(S, "--no_cache", "", FL + "test_no_cache_builds_no_cache_and_scores_the_same",
           "no cache is written; the scores equal the cached path's"),
    effect(S, "--fast_decode", "", SEL + "test_default_decoding_scores_equal_the_published_transform",
           "a _fast cache, other scores, reuse across decodings refused"),
    effect(S, "--score_batch_size", "7", FL + "test_no_cache_builds_no_cache_and_scores_the_same",
           "the scores do not depend on the batch"),
    effect(S, "--chunk_size", "6", "tests/test_robustness.py::test_scoring_sigterm_then_sigkill_resumes_to_identical_scores",
           "scoring resumes chunk by chunk (20 chunks of 6)"),
    effect(S, "--force", "", SIG + "test_default_pass_stores_no_signals_and_a_rule_adds_them",
           "the pool is rescored, the old signals removed"),
    effect(S, "--no_report", "", "tests/test_report.py::test_show_selection_redraws_what_select_data_would_choose",
           "no report is drawn"),
    effect(S, "--batch_size", "7", FL + "test_no_cache_builds_no_cache_and_scores_the_same",
           "the old spelling of --score_batch_size"),
    # ---- distillation ----
    effect(D, "--dataset", "tinyimagenet", "tests/test_distill.py::test_224px_pipeline_with_pos_num",
           "the Tiny-ImageNet layout is read"),
    effect(D, "--data_cifar", "ROOT", MW + "evaluates_on_the_test_set", "the student is tested on its test split"),
    effect(D, "--data_imagenet", "POOL", MW + "trains_the_published_selection_minus_the_holdout",
           "the trained images are that pool's"),
    effect(D, "--attnprobe_sel", "", "tests/test_distill.py::test_published_readme_command",
           "selected.txt follows the published order"),
    effect(D, "--selected_file", "DIR",
           "tests/test_own_teacher.py::test_run_folder_records_its_selection_and_read_only_scores_are_used",
           "a read-only folder: its finished scores are used, nothing is written there"),
    effect(D, "--selection_file", "selection.pt",
           "tests/test_own_teacher.py::test_run_folder_records_its_selection_and_read_only_scores_are_used",
           "trains on exactly those images"),
    effect(D, "--output_dir", "DIR", "tests/test_distill.py::test_end_to_end_losses_fall",
           "log, summary, checkpoints and args.json are written there"),
    effect(D, "--lr_S", "1e-3", MW + "uses_the_published_augmentation_noise_blocks_and_lr", "AdamW's lr"),
    effect(D, "--weight_decay", "0.1", MW + "options_do_what_their_help_says", "AdamW's weight decay"),
    effect(D, "--batch_size", "3", MW + "trains_the_published_selection_minus_the_holdout", "images per step"),
    effect(D, "--epochs", "3", MW + "options_do_what_their_help_says", "epochs trained, the cosine over them"),
    effect(D, "--schedule", "2 3", MW + "uses_the_published_augmentation_noise_blocks_and_lr",
           "lr × 0.1 from each milestone on"),
    effect(D, "--cos", "", MW + "options_do_what_their_help_says", "lr_S · 0.5 · (1 + cos(π e / E))"),
    effect(D, "--robust", "", MW + "robust_kd_uses_the_perturbed_selection_weights_by_teacher_class",
           "KD weighted by the teacher class's perturbed weight"),
    effect(D, "--attnprobe_dist", "", MW + "uses_the_published_augmentation_noise_blocks_and_lr",
           "loss = KD + NA + 0.8 · PD over blocks 3, 7, 11"),
    effect(D, "--patchattn", "0.5", MW + "options_do_what_their_help_says", "loss = KD + NA + 0.5 · PD"),
    effect(D, "--pd_loss", "cls_gram", "tests/test_losses.py::test_probe_loss_zero_and_known_value",
           "the published CLS-row Gram loss (the only choice)"),
    effect(D, "--pd_teacher_blocks", "1 5 9", MW + "options_do_what_their_help_says",
           "the teacher's features of these blocks"),
    effect(D, "--pd_student_blocks", "2 6 10", MW + "options_do_what_their_help_says",
           "the student's features of these blocks, paired in order"),
    effect(D, "--teacher_acc", "0.7", MW + "noise_diagonal_without_accuracy_in_the_teacher_file",
           "the noise-adaptation diagonal"),
    effect(D, "--pos_num", "2", "tests/test_distill.py::test_224px_pipeline_with_pos_num",
           "the first 2 labelled images per class are added"),
    effect(D, "--holdout", "0.25", MW + "trains_the_published_selection_minus_the_holdout",
           "that share is held out, never trained on"),
    effect(D, "--eval_every", "2", MW + "options_do_what_their_help_says", "tested every 2nd epoch and at the last"),
    effect(D, "--crop_padding", "2", MW + "options_do_what_their_help_says", "the random crop's padding"),
    effect(D, "--resume", "no", "tests/test_resume_rules.py::test_resume_no_starts_a_fresh_log_and_keeps_the_old_run",
           "a fresh log, the old run kept"),
    effect(D, "--eval_only", "CKPT", "tests/test_distill.py::test_eval_only_reads_dataparallel_checkpoint",
           "the checkpoint's accuracy, as computed by hand"),
    effect(D, "--mean", "0.4914 0.4822 0.4465", "tests/test_own_teacher.py::test_eval_only_takes_the_checkpoint_settings_and_runs_under_torchrun",
           "the test loss changes with it"),
    # ---- train_teacher.py ----
    effect(T, "--output", "teacher.pth", "tests/test_train_teacher.py::test_killed_teacher_run_resumes_to_the_uninterrupted_result",
           "the teacher and <stem>.last.pth, .log.txt, .args.json beside it"),
    effect(T, "--epochs", "4", "tests/test_train_teacher.py::test_killed_teacher_run_resumes_to_the_uninterrupted_result",
           "epochs 0..3 logged"),
    effect(T, "--resume", "no", "tests/test_train_teacher.py::test_changed_settings_are_refused_and_resume_no_starts_a_fresh_log",
           "a fresh log, the old one kept"),
]


# ---- rows made from the tests and the parsers ------------------------------------------------------------------

def pins(scripts, flag, value, what):
    """@pins(D, "--flag", "value", "what it does") on the test that shows it: the flag's effect row, beside its
    test (read from the source by declared_effects; the decorator changes nothing)."""
    return lambda test: test


def declared_effects(folder=os.path.dirname(os.path.abspath(__file__))):
    """The effect rows of @pins(...) on the tests of folder/test_*.py (script constants S, D, T, SD, ALL or
    strings; the other arguments strings)."""
    names = {"S": S, "D": D, "T": T, "SD": SD, "ALL": ALL}
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "test_*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            for deco in getattr(node, "decorator_list", []):
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", getattr(deco.func, "attr", "")) == "pins":
                    script, *rest = deco.args
                    scripts = names[script.id] if isinstance(script, ast.Name) else ast.literal_eval(script)
                    rows.append(effect(scripts, *map(ast.literal_eval, rest[:1]), ast.literal_eval(rest[1]),
                                       f"tests/{os.path.basename(path)}::{node.name}", ast.literal_eval(rest[2])))
    return rows


EFFECTS += declared_effects()

# a value just outside each domain of flags.py: refused for every flag of that type without a refusal row of its own
OUTSIDE = {flags.positive_int.domain: "0", flags.nonneg_int.domain: "-1", flags.seed_int.domain: "-1",
           flags.finite_float.domain: "nan", flags.positive_float.domain: "0", flags.nonneg_float.domain: "-1",
           flags.accuracy.domain: "0", flags.below_half.domain: "0.5", flags.below_one.domain: "1",
           flags.device_name.domain: "gpu"}


def typed_refusals(parsers=PARSERS):
    """A refusal row per flag whose type= has a domain in OUTSIDE and that no row of REFUSED tries."""
    rows = []
    for script, make in parsers.items():
        tried = {r.argv[0] for r in REFUSED if script in r.scripts}
        for action in make()._actions:
            option, domain = flags.long_option(action), getattr(action.type, "domain", None)
            if option and option not in tried and domain in OUTSIDE:
                rows.append(refused(script, option, OUTSIDE[domain], says=domain))
    return rows


REFUSED += typed_refusals()
