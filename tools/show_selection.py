"""Redraw a selection's report from its stored scores, for the stored choice or another one, in seconds:
no teacher pass (the probe heat maps, which need the teacher, are left out).

    python tools/show_selection.py SELECTED_DIR                          # the selection made there
    python tools/show_selection.py SELECTED_DIR --num_select 50000 --per_class 50 --out /tmp/balanced
    python tools/show_selection.py SELECTED_DIR --rule confidence+tok_norm_b2 --out /tmp/signal

SELECTED_DIR is a --selected_file folder (scores and selection.pt). The images come from its pool cache
when there is one, else from the pool files selection.pt names (--data_imagenet to point elsewhere).
Nothing in SELECTED_DIR changes except its report/ folder (use --out to keep that one).
"""
import glob
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flags  # noqa: E402
import pool  # noqa: E402
import report  # noqa: E402
import scoring  # noqa: E402
from safety import cli_main  # noqa: E402
from select_data import rank_pool, select_from_scores  # noqa: E402
from selection import RULE_SETTINGS, RULES, SELECTION_FILE, read_record  # noqa: E402
from utils import InputError, read_fingerprint  # noqa: E402


def get_args_parser():
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("selected_dir", help="a --selected_file folder: its scores and selection.pt")
    p.add_argument("--num_select", type=flags.positive_int, default=None, help="images to keep (default: as stored)")
    p.add_argument("--per_class", type=flags.positive_int, default=None, help="class-balanced: the best K per predicted class first")
    p.add_argument("--rule", default=None, choices=["published", *RULES], help="another rule (default: as stored)")
    p.add_argument("--attnprobe_sel", action="store_true", default=None, help="the published rule with the probe")
    p.add_argument("--data_imagenet", nargs="+", default=None, help="the pool, when it moved (default: as stored)")
    p.add_argument("--out", default=None, help="report folder (default: SELECTED_DIR/report)")
    return p


def stored_settings(folder):
    """The selection flags selection.pt recorded, with the defaults of the published command for older files."""
    path = os.path.join(folder, SELECTION_FILE)
    record = read_record(path)
    settings = record.get("settings")
    if settings is None:
        raise InputError(f"{path} does not record the flags that made it (written before this tool): rerun "
                         "select_data.py once, which reuses the scores")
    return record, {RULE_SETTINGS[key]: value for key, value in settings.items()}   # by flag dest


def image_source(folder, record, data_imagenet):
    """The pool cache in `folder` when one is complete, else the pool files."""
    for cache_dir in sorted(glob.glob(os.path.join(folder, "pool_cache_*"))):
        try:
            return pool.open_cache(cache_dir)
        except InputError:
            continue   # unfinished
    roots = data_imagenet or [record.get("pool_root")]
    if not roots[0] or not all(os.path.exists(r) for r in roots):
        raise InputError(f"the pool {' '.join(map(str, roots))} is not there and {folder} holds no pool cache: "
                         "pass --data_imagenet")
    return pool.list_pool(roots if len(roots) > 1 else roots[0])


@cli_main
def main(args):
    folder = args.selected_dir
    meta = read_fingerprint(os.path.join(folder, scoring.META_FILE))
    if meta is None:
        raise InputError(f"{folder} holds no complete scores ({scoring.META_FILE}): score the pool with select_data.py")
    record, knobs = stored_settings(folder)
    changed = {k: v for k, v in (("num_select", args.num_select), ("per_class", args.per_class),
                                 ("rule", args.rule), ("attnprobe_sel", args.attnprobe_sel)) if v is not None}
    knobs.update(changed)
    s = SimpleNamespace(selected_file=folder, **knobs)
    num_classes = int(meta["nb_classes"])
    source = image_source(folder, record, args.data_imagenet)
    ranking = rank_pool(s, meta["pool_size"])
    if changed:
        if len(source) != meta["pool_size"]:
            raise InputError(f"the pool has {len(source)} images but the scores in {folder} cover {meta['pool_size']}")
        picked = select_from_scores(s, num_classes, source, ranking)
        indices, rule_text = picked["indices"], picked["rule"]
    else:
        indices, rule_text = record["indices"], str(record.get("rule", "as stored"))
    return report.draw(s, ranking, indices, rule_text, num_classes, source, out_dir=args.out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
