"""What each flag accepts, declared where the flag is: the argparse `type=` functions of every script, the
parser they share (a refusal is one `error:` line, exit 2, before anything is read or written) and its rules
for flags that act only together with another one.

    parser = flags.Parser(description=..., parents=[flags.system_parser()])
    parser.add_argument("--chunk_size", type=flags.positive_int, default=65536)
    parser.needs("--patchattn", "--attnprobe_dist")     # --patchattn 0.5 alone: refused, naming both

A flag counts as given when its value differs from its default: the default given explicitly changes nothing.
Every parser takes `--config RUN/args.json` (a JSON object of flag dest -> value, as the scripts write args.json):
its values come before the command line's flags, which win (Parser.parse_known_args).
What needs the teacher or the pool (a probe head beyond the model, a selection file's pool, a padding wider than
the images) is checked where the run resolves them (settings.py, the scripts' first steps), before the first write.
"""
import argparse
import json
import math
import os
import re
import sys

from safety import tell_once
from utils import DIST_TIMEOUT, default_workers


# ---- value domains: each type function carries its `domain`, the words of its refusal and of the docs -----

def _domain(convert, accepts, domain):
    def parse(text):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {domain}, got {text!r}")
        return value
    parse.domain = domain
    parse.__name__ = domain   # argparse names a type by it in its own messages
    return parse


positive_int = _domain(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _domain(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _domain(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)")   # numpy's seed range
finite_float = _domain(float, lambda v: True, "a finite number")
positive_float = _domain(float, lambda v: v > 0, "a number > 0")
nonneg_float = _domain(float, lambda v: v >= 0, "a number >= 0")
accuracy = _domain(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
below_half = _domain(float, lambda v: 0 <= v < 0.5, "a fraction in [0, 0.5)")
below_one = _domain(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
device_name = _domain(str, lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None,
                      "cpu, cuda, cuda:N or auto")


def selection_count(value):
    """--num_select: an integer >= 1. `auto` (the pool's estimated in-domain count) is refused, saying why: neither
    estimator of pool_share.py held its pre-registered error on the demo's pools."""
    if value == "auto":
        raise argparse.ArgumentTypeError("auto is not offered: neither in-domain estimator of pool_share.py came "
                                         "within 25 % on the demo's pools (docs/demo_experiments.md, section 3); "
                                         "pass a count (report.md shows the rough estimate)")
    return positive_int(value)


selection_count.domain = positive_int.domain
selection_count.__name__ = positive_int.__name__


def text(domain):
    """A string flag whose domain is told in words (a path, a model name): checked where it is used."""
    def parse(value):
        return value
    parse.domain = domain
    parse.__name__ = domain
    return parse


path, model_name = text("a path"), text("a model name (timm's or models.py's)")
resume_point = text("auto, no or a checkpoint path")


class Increasing(argparse.Action):
    """A list (of blocks, of epochs) in increasing order, each value once: what the list names is what runs,
    in the order it runs (block features come back in depth order; milestones count once each)."""
    domain_suffix = ", increasing, each once"

    def __call__(self, parser, namespace, values, option_string=None):
        if not self.increasing(values):
            parser.error(f"argument {option_string}: values must increase, each given once, got "
                         + " ".join(map(str, values)))
        setattr(namespace, self.dest, values)

    @staticmethod
    def increasing(values):
        return all(a < b for a, b in zip(values, values[1:]))


# ---- the parser ----------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one `error: ...` line and exit 2 (rank 0 speaks under torchrun), with
    rules checked after parsing, each refused naming both flags: `needs` (a flag that acts only with another),
    `excludes` (two flags that cannot act together), `unused_with` / `only_with` (flags a mode ignores); and
    `check` (a refusal over several values)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.rules = []   # (kind, flag, other, why)
        self.recorded = [RECORDED]   # keys a config may hold that are no flag here (sets, or functions giving one)
        self.from_config = {}        # dest -> the --config path, for each value only the config gave (last parse)
        self.add_argument("--config", type=path, default=None, metavar="ARGS_JSON",
                          help="rerun a run: its args.json (a JSON object of flag -> value) gives every flag it "
                          "holds, the flags given here win; a value of it that a flag given here excludes or "
                          "makes unused is dropped; the values it records beside the flags are skipped")

    def error(self, message):
        tell_once(f"error: {message}")
        raise SystemExit(2)

    def needs(self, flag, other, why=""):
        """`flag` has an effect only when `other` is given."""
        self.rules.append(("needs", flag, other, why))

    def excludes(self, flag, other, why=""):
        """`flag` and `other` cannot both act."""
        self.rules.append(("excludes", flag, other, why))

    def check(self, refused, message):
        """A refusal over several values: `refused(args)` true -> one error line, `message`."""
        self.rules.append(("check", refused, message, ""))

    def unused_with(self, flag, others, why=""):
        """With `flag` given, each of `others` has no effect."""
        for other in others:
            self.rules.append(("unused", flag, other, why))

    def only_with(self, flag, allowed, why=""):
        """With `flag` given, every flag outside `allowed` has no effect."""
        for action in self._actions:
            option = long_option(action)
            if option and option not in (flag, "--config") and option not in allowed:   # the config's values are ruled
                self.rules.append(("unused", flag, option, why))

    def records(self, keys):
        """Keys this script's args.json holds beyond its flags (resolved values), or a function of the config's
        object giving them: --config skips them. Any other key that is no flag is refused."""
        self.recorded.append(keys)

    def given(self, args, flag):
        action = self.action(flag)
        return getattr(args, action.dest) != self.get_default(action.dest)

    def action(self, flag):
        return next(a for a in self._actions if flag in a.option_strings)

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        config = config_path(argv)
        tokens, supplied = self.config_tokens(config) if config is not None else ([], set())
        # the config's values as flags before the command line's: each passes its flag's checks, and the last wins
        parsed, rest = super().parse_known_args(tokens + argv, namespace)
        self.from_config = dict.fromkeys(supplied - self.dests_in(argv), config)
        self.apply_rules(parsed)
        return parsed, rest

    def apply_rules(self, parsed):
        """Refuse what the rules refuse. A value only the config gave yields first: it is dropped (back to its
        default) where a flag of the command line excludes it or makes it unused, or where the config's own
        values make it unused; so `--config RUN/args.json --selection_file F` needs no edited file."""
        came = lambda flag: self.action(flag).dest in self.from_config
        for kind, flag, other, _ in self.rules:
            if kind in ("unused", "excludes") and self.given(parsed, flag) and self.given(parsed, other):
                drop = (other if came(other) and (kind == "unused" or not came(flag)) else
                        flag if came(flag) and not came(other) else None)
                if drop is not None:
                    dest = self.action(drop).dest
                    setattr(parsed, dest, self.get_default(dest))
        for kind, flag, other, why in self.rules:
            if kind == "check" and flag(parsed):
                self.error(other)
            if kind == "needs" and self.given(parsed, flag) and not self.given(parsed, other):
                self.error(f"{self.shown(parsed, flag)} has no effect without {other}"
                           + (f" ({why})" if why else "") + f": add {other} or drop {flag}")
            if kind == "unused" and self.given(parsed, flag) and self.given(parsed, other):
                self.error(f"{self.shown(parsed, other)} has no effect with {flag} ({why}): drop {other}")
            if kind == "excludes" and self.given(parsed, flag) and self.given(parsed, other):
                self.error(f"{self.shown(parsed, flag)} and {self.shown(parsed, other)} exclude each other"
                           + (f": {why}" if why else ""))

    def shown(self, parsed, flag):
        """`--flag value` as given (a switch: `--flag`), and where from when the config gave it."""
        value = getattr(parsed, self.action(flag).dest)
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value))
        text = flag if isinstance(value, bool) else f"{flag} {value}"
        config = self.from_config.get(self.action(flag).dest)
        return text + (f" (from --config {config})" if config else "")

    def dests_in(self, argv):
        """The dests of the flags in argv (the command line's)."""
        dests = set()
        for token in argv:
            if token == "--":
                break
            action = self._option_string_actions.get(token.split("=", 1)[0]) if token.startswith("-") else None
            if action is not None:
                dests.add(action.dest)
        return dests

    def config_tokens(self, path):
        """--config's JSON object -> (the flags it gives as command-line words, their dests). A file that is no
        JSON object, a key that is neither a flag nor a value this script records, a value its flag would
        refuse: one error line naming --config and the file."""
        where = f"--config {path}"
        if not os.path.isfile(path):
            self.error(f"{where}: " + ("a folder: name its args.json" if os.path.isdir(path) else "no such file"))
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            self.error(f"{where}: not a readable JSON file ({e})")
        if not isinstance(config, dict):
            self.error(f"{where} must hold a JSON object of flag -> value (as a run's args.json), "
                       f"not a {type(config).__name__}")
        actions = {}
        for action in self._actions:
            if long_option(action) and action.default is not argparse.SUPPRESS:   # not select_data's --batch_size
                actions.setdefault(action.dest, action)
        recorded = None
        tokens, supplied = [], set()
        for key, value in config.items():
            if key in RECORDED or key not in actions:
                recorded = recorded if recorded is not None else set().union(
                    *(keys(config) if callable(keys) else keys for keys in self.recorded))
                if key in recorded:
                    continue
                self.error(f"{where}: {key!r} is not a flag of {self.prog} (nor a value its runs record)")
            action = actions[key]
            words = self.config_words(where, key, action, value)
            if words is not None:
                option = long_option(action)
                tokens += [f"{option}={words[0]}"] if action.nargs is None else [option, *words]
                supplied.add(key)
        return tokens, supplied

    def config_words(self, where, key, action, value):
        """A config value as the words its flag takes (None: the flag's default), checked as the flag checks them."""
        if value is None:
            return None
        if action.nargs == 0:   # a switch: true gives it, false leaves it off
            if not isinstance(value, bool):
                self.error(f"{where}: {key} is a switch: true or false, got {value!r}")
            return [] if value else None
        many = action.nargs not in (None, "?")
        values = value if isinstance(value, list) and many else [value]
        if any(isinstance(v, (list, dict)) for v in values):
            self.error(f"{where}: {key} takes {'a list of values' if many else 'one value'}, got {value!r}")
        if action.nargs == "+" and not values:
            self.error(f"{where}: {key} needs at least one value")
        words = [str(v) for v in values]
        try:
            converted = self._get_values(action, list(words))
        except argparse.ArgumentError as e:
            self.error(f"{where}: {e}")
        if isinstance(action, Increasing) and not Increasing.increasing(converted):
            self.error(f"{where}: {key}: values must increase, each given once, got {' '.join(words)}")
        return words


# keys any args.json may hold that are records, not flags: its own --config (never followed) and the code's
# versions (utils.provenance)
RECORDED = frozenset({"config", "provenance"})


def config_path(argv):
    """The file of the last --config in argv, or None."""
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token[len("--config="):]
    return found


def long_option(action):
    """The name a flag is known by: its first --long option (None for positionals and --help)."""
    if isinstance(action, argparse._HelpAction):
        return None
    return next((o for o in action.option_strings if o.startswith("--")), None)


def system_parser():
    """The machine's flags, shared by every script's parser as DeiT shares its own: parents=[system_parser()]."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = parser.add_argument_group("system")
    g.add_argument("--device", type=device_name, default=None, help="cuda, cuda:N or cpu (default: cuda when "
                   "available)")
    g.add_argument("--workers", "--num_workers", "--num-workers", type=nonneg_int, default=default_workers(),
                   help="image decoding processes (default: this machine's cores per process, at most 8; 0: in the "
                   "main process)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="autocast (auto: bf16 on CUDA; off: fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model passes")
    g.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    g.add_argument("--dist_timeout", "--dist-timeout", type=positive_float, default=DIST_TIMEOUT, metavar="SECONDS",
                   help=f"under torchrun: how long a rank waits for the others before the run ends with one error "
                   f"line naming the rank and step (default {DIST_TIMEOUT}; ours: torch's default is 30 min gloo, "
                   "10 min NCCL); rank 0's long solo work (the pool cache) is waited for as long as it lives")
    return parser


def domain(action):
    """What a flag accepts, in words (the docs' flag reference)."""
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    if action.nargs == 0:
        return "a switch"
    words = getattr(action.type, "domain", "text")
    if action.nargs in ("+", "*"):
        words = f"{'one or more' if action.nargs == '+' else 'zero or more'} of {words}"
        if isinstance(action, Increasing):
            words += Increasing.domain_suffix
    return words
