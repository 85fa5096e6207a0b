"""Checkpoints and run folders: what a run keeps on disk so that the same command, run again, continues
exactly, and the rules of such a resume.

    run = RunFolder(output_dir)                          # DFND_DeiT-train.py's folder
    ckpt = run.load(run.resume_point("auto"))            # student/last.pth, or None
    run.commit(epoch, record, student, noise, optimizers, last)   # checkpoints, then the log line

Every file is written whole or not at all (safety.py); an epoch's log line is written after the
checkpoint that holds it, so the log never holds an epoch no checkpoint backs.
"""
import json
import os

import torch

import plots
from safety import (append_line, atomic_torch_save, atomic_write_text, interrupts_deferred, json_lines, on_rank0,
                    remove_temp_files, set_phase, tell_once)
from selection import SELECTION_FILE
from utils import InputError, provenance, rank_world, safe_torch_load


def rng_state():
    """Global RNG states (the run itself reseeds per epoch; these restore anything else drawn)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    """Put back what rng_state() saved. CUDA's states (one per device) only where this process sees as many
    devices as the saving one: another count pairs no state with its device. A checkpoint saved without CUDA
    holds none; its generators then keep their seeds."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if not cuda or not torch.cuda.is_available():
        return
    if len(cuda) != torch.cuda.device_count():
        tell_once(f"note: the checkpoint holds the CUDA random states of {len(cuda)} device(s) but this process "
                  f"sees {torch.cuda.device_count()}: they are not restored")
        return
    torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path, **state):
    """Atomic save of plain tensors, state dicts and primitives (loadable with weights_only=True), with the
    provenance of the code that saved it."""
    atomic_torch_save({**state, "provenance": provenance()}, path)


def unwrap(module):
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(module, "module"):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def resume_path(flag, last_path):
    """--resume 'auto' | 'no' | PATH -> the checkpoint to resume from, or None."""
    if flag == "no":
        return None
    if flag == "auto":
        return last_path if os.path.exists(last_path) else None
    if not os.path.isfile(flag):
        raise InputError(f"--resume {flag}: no such file")
    return flag


def load_resume(path, required=(), script="this script"):
    """The resume checkpoint at `path` (None: None); refused unless it holds every key of `required`."""
    if path is None:
        return None
    try:
        ckpt = safe_torch_load(path)
    except InputError as err:
        raise InputError(f"cannot resume: {err}") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"cannot resume from {path}: it holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise InputError(f"--resume {path} is not a last.pth of {script} (no {', '.join(missing)})")
    return ckpt


# flags that cannot change what any resumed run computes: where and how fast it runs, how it reports, where it
# resumes from (each script's RESUME_IGNORES adds its own); config: where the values came from, not what they
# are; provenance: the code's versions (a resume after a commit continues)
RUN_ONLY = {"workers", "log_every", "device", "compile", "resume", "dist_timeout", "config", "provenance"}


def check_same_settings(saved, current, ignore, path, output_flag, why=None):
    """Refuse to resume `path` when its saved args differ from this command's (`current`, a dict) in a setting
    not in `ignore`: one error naming each changed flag, its old and new value (and `why[flag]` where given),
    and the way out."""
    changed = sorted(k for k in saved if k not in ignore and k in current and saved[k] != current[k])
    if changed:
        raise InputError(f"{path} belongs to a run with other settings: " + ", ".join(
            f"--{k} {saved[k]!r} (now {current[k]!r})" + ((why or {}).get(k) or "") for k in changed)
            + f"; rerun with the old values to continue it, or pass --resume no (or another {output_flag}) "
            "to start over")


def move_aside(paths):
    """Keep a previous run's files (and folders) beside the new run's: each of `paths` that exists becomes
    <stem>.<n><ext> (log.txt -> log.1.txt, student -> student.1), with one n free for all of them.
    Returns the new names."""
    present = [p for p in paths if os.path.exists(p)]

    def numbered(p, n):
        stem, ext = os.path.splitext(p)
        return f"{stem}.{n}{ext}"
    n = 1
    while any(os.path.exists(numbered(p, n)) for p in paths):
        n += 1
    for p in present:
        os.replace(p, numbered(p, n))
    return [numbered(p, n) for p in present]


def trim_log(path, resumed_epoch, record=None):
    """A resumed run's JSON-lines log keeps exactly the lines of epochs <= resumed_epoch (a kill may have
    torn a line); `record`, the resumed checkpoint's own line, is appended when a failure after its
    save cut it off. Pass `record` only for the log's own run: a checkpoint from another folder's run
    has no place in this log."""
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
    keep, logged = [], set()
    for line, rec in json_lines(lines):
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= resumed_epoch:
            keep.append(line if line.endswith("\n") else line + "\n")
            logged.add(rec["epoch"])
    if record is not None and resumed_epoch not in logged and (resumed_epoch == 0 or resumed_epoch - 1 in logged):
        keep.append(json.dumps(record) + "\n")   # a kill after epoch 0's save may leave no log at all
    if keep != lines:
        atomic_write_text(path, "".join(keep))


def own_record(ckpt, resumed_from, own_last):
    """The log line saved in a resumed checkpoint, for trim_log: only when it is the run's own resume file."""
    if ckpt is None or not os.path.exists(own_last) or not os.path.samefile(resumed_from, own_last):
        return None
    return ckpt.get("record")


def commit_epoch(log_path, record, save):
    """End an epoch: save() its checkpoint, which must hold `record` (the resume restores a line a
    failure cut off), then log the line; so the log never holds an epoch that no checkpoint backs.
    SIGINT/SIGTERM wait until both are written. Runs on rank 0; under torchrun every rank raises
    rank 0's failure (a full disk: OutOfSpace on each). Then rank 0 redraws curves.png beside the log:
    after the commit, so that no rank waits on a picture and a picture that fails is one warning."""
    def commit():
        with interrupts_deferred():
            save()
            append_line(log_path, json.dumps(record))
    on_rank0(commit)
    if rank_world()[0] == 0:   # the other ranks go on to the next epoch meanwhile
        set_phase(f"drawing curves.png of epoch {record['epoch']}")
        plots.redraw_curves(log_path)


# ---- DFND_DeiT-train.py's run folder ------------------------------------------------------------

# settings that cannot change what a resumed run computes (--cuda_graphs can: it drops each epoch's last
# partial batch); --epochs is checked on its own. teacher_acc_resolved: the noise layer's value comes from the
# checkpoint; selected_file, selection_file: the images themselves are checked against output_dir/selection.pt
RESUME_IGNORES = RUN_ONLY | {"eval_every", "output_dir", "eval_only", "epochs", "epochs_resolved", "lr_offset",
                             "teacher_acc_resolved", "selected_file", "selection_file"}
LAST_KEYS = ("model", "noise", "optimizer", "optimizer_noise", "state")   # what student/last.pth must hold


class RunFolder:
    """output_dir of a distillation run: log.txt (one JSON line per epoch), args.json, summary.json,
    selection.pt (the images it trains on) and student/{last.pth (resume point), checkpoint.pth (best test
    acc1, as published), final.pth (the last epoch's student)}. `state` is the run's bookkeeping: the last
    epoch done and the best ones, saved in last.pth."""

    def __init__(self, output_dir):
        self.dir = output_dir
        self.student_dir = os.path.join(output_dir, "student")
        self.log = os.path.join(output_dir, "log.txt")
        self.last = os.path.join(self.student_dir, "last.pth")
        self.selection = os.path.join(output_dir, SELECTION_FILE)
        self.args = None   # the run's resolved args (settings.Plan.record): args.json and every checkpoint's
        self.state = {"epoch": -1, "best_acc1": -1.0, "best_epoch": -1, "best_agree": -1.0,
                      "acc1_at_best_agree": None, "best_agree_epoch": -1}

    @property
    def resumes(self):
        """What a restart of this run continues from (for the line a lost rank ends with)."""
        return f"the last finished epoch ({os.path.relpath(self.last, self.dir)})"

    def resume_point(self, flag):
        return resume_path(flag, self.last)

    def load(self, path):
        return load_resume(path, LAST_KEYS, "this script")

    @staticmethod
    def check_resume(saved, run_args, done, path):
        """Refuse a resume of `done` epochs whose settings would change the run; --epochs may extend a
        step-schedule run."""
        check_same_settings(saved, run_args, RESUME_IGNORES, path, "--output_dir")
        old, new = saved.get("epochs_resolved"), run_args["epochs_resolved"]
        if old is None or old == new:
            return
        if new <= done:
            raise InputError(f"{path} has already trained {done + 1} epochs; --epochs {new} would end before "
                             "them: pass a larger --epochs, or --resume no to start over")
        if run_args["cos"]:
            raise InputError(f"{path} is a --cos run of {old} epochs: its learning rate at every epoch depends on the "
                             f"epoch count, so {new} epochs would change the epochs already trained; pass --epochs "
                             f"{old} to finish it, or --resume no to start a new run")

    def restore(self, ckpt, student, noise, optimizers):
        """A resumed run's student, noise layer, optimizers, bookkeeping and global RNG from its last.pth."""
        student.load_state_dict(ckpt["model"])
        noise.load_state_dict(ckpt["noise"])
        optimizers[0].load_state_dict(ckpt["optimizer"])
        optimizers[1].load_state_dict(ckpt["optimizer_noise"])
        self.state.update(ckpt["state"])
        if "rng" in ckpt:
            restore_rng(ckpt["rng"])

    def prepare(self, resume, resumed_record):
        """Rank 0, before the first epoch: the log of a resumed run trimmed to its checkpoint, or a fresh
        start's previous files kept aside; temp files of a save a kill cut off removed (we hold the lock)."""
        if resume:
            trim_log(self.log, self.state["epoch"], resumed_record)
        else:
            paths = [os.path.join(self.dir, n) for n in ("log.txt", "summary.json", "args.json")] + [
                self.student_dir, self.selection]
            if any(os.path.exists(p) for p in paths[:2] + paths[3:]):   # args.json alone is rewritten
                moved = [os.path.basename(p) for p in move_aside(paths)]
                print(f"fresh start: the previous run's files are kept as {', '.join(moved)}")
        remove_temp_files(self.student_dir)

    def record_selection(self, selection, resuming):
        """Keep the selection in the run folder; a resumed run must train on the same images."""
        if resuming and os.path.exists(self.selection):
            old = safe_torch_load(self.selection, "selection record")
            if not torch.equal(torch.as_tensor(old["indices"]), selection.indices):
                raise InputError(f"{self.selection}: this run trained on another selection than the one chosen now "
                                 "(the scores in --selected_file changed?); pass --selection_file "
                                 f"{self.selection} to continue on its images, or --resume no to start over")
            return
        atomic_torch_save(selection.record(), self.selection)

    def write_args(self):
        record = {**self.args, "provenance": provenance()}
        atomic_write_text(os.path.join(self.dir, "args.json"), json.dumps(record, indent=1, sort_keys=True))

    def update_best(self, epoch, record):
        """The best test acc1 so far (the published checkpoint) and the best holdout agreement."""
        state = self.state
        if record["test_acc1"] > state["best_acc1"]:
            state.update(best_acc1=record["test_acc1"], best_epoch=epoch, new_best=True)
        else:
            state["new_best"] = False
        agree = record.get("holdout_agreement")
        if agree is not None and agree > state["best_agree"]:
            state.update(best_agree=agree, best_agree_epoch=epoch, acc1_at_best_agree=record["test_acc1"])
        state["last_acc1"], state["last_acc5"] = record["test_acc1"], record["test_acc5"]

    def commit(self, epoch, record, student, noise, optimizers, last=False):
        """The epoch's checkpoints (last.pth always; checkpoint.pth at a new best; final.pth at the end), then
        its log line."""
        self.state["epoch"] = epoch
        set_phase(f"saving epoch {epoch}")
        commit_epoch(self.log, record, lambda: self._save(epoch, record, student, noise, optimizers, last))

    def _save(self, epoch, record, student, noise, optimizers, last):
        opt_s, opt_n = optimizers
        run_args = self.args
        plain_args = {k: v for k, v in run_args.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        student_sd = unwrap(student).state_dict()
        student_file = dict(model=student_sd, epoch=epoch, acc1=record.get("test_acc1"), acc5=record.get("test_acc5"),
                            mean=run_args["mean"], std=run_args["std"], student=run_args["student"], args=plain_args)
        if self.state.pop("new_best", False):   # the published checkpoint: best test accuracy so far
            save_checkpoint(os.path.join(self.student_dir, "checkpoint.pth"), **student_file)
        if last:                                # the weights to report: the last epoch's
            save_checkpoint(os.path.join(self.student_dir, "final.pth"), **student_file)
        save_checkpoint(self.last, model=student_sd, noise=noise.state_dict(), optimizer=opt_s.state_dict(),
                        optimizer_noise=opt_n.state_dict(), epoch=epoch, state=dict(self.state), args=plain_args,
                        rng=rng_state(), record=record)

    def finish(self):
        """summary.json (rank 0) -> the final numbers, with their text line."""
        state = self.state
        text = (f"final acc1 {state.get('last_acc1', float('nan')):.2f} (epoch {state['epoch']}) | "
                f"best acc1 {state['best_acc1']:.2f} at epoch {state['best_epoch']} (chosen on the test set)")
        if state["acc1_at_best_agree"] is not None:
            text += (f" | acc1 {state['acc1_at_best_agree']:.2f} at the best holdout agreement "
                     f"{state['best_agree']:.2f}% (epoch {state['best_agree_epoch']}, chosen without test labels)")
        final = {"text": text, "epochs": state["epoch"] + 1, "final_acc1": state.get("last_acc1"),
                 "final_acc5": state.get("last_acc5"), "best_acc1": state["best_acc1"],
                 "best_epoch": state["best_epoch"], "acc1_at_best_agreement": state["acc1_at_best_agree"],
                 "best_agreement_epoch": state["best_agree_epoch"]}
        on_rank0(atomic_write_text, os.path.join(self.dir, "summary.json"), json.dumps(final, indent=1))
        return final
