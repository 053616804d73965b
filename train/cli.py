"""What every command line here shares: absl flags parsed so that any bad input is one line.

`run(main)` is absl's app.run with a parser that turns each way a command line can be wrong
(a missing or broken experiment file, an unknown flag, a bad --config.<key> override, a flag
out of its range, a required flag left out) into `error: ...` on stderr and exit status 2,
never a traceback. Range checks of a tool's flags are absl validators (`at_least`, `within`).
"""
import glob
import math
import os
import re
import sys

from absl import app, flags


def fail(message: str):
    """Prints one error line and exits with status 2 (a usage error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _flag_value(argv, name):
    """The value of --name=VALUE (or --name VALUE) in argv, else None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _one_line(text: str) -> str:
    return " ".join(re.sub(r"\\n|\n|[\\'\"]", " ", text).split())


def experiment_files() -> list[str]:
    """The experiment files (those defining get_config) under experiments/."""
    found = []
    for path in sorted(glob.glob("experiments/*.py")):
        with open(path, encoding="utf-8") as f:
            if re.search(r"^def get_config\(", f.read(), flags=re.MULTILINE):
                found.append(path)
    return found


def _check_experiment(argv):
    experiment = _flag_value(argv, "config")
    if experiment is not None and "config" in flags.FLAGS:
        path = experiment.split(":", 1)[0]
        if not os.path.isfile(path):
            fail(f"--config={experiment}: there is no experiment file {path}; pass one of "
                 f"{experiment_files()}, with a :variant")
    return experiment


def parse_flags(argv):
    """absl parsing, with every kind of bad command line turned into one readable line."""
    experiment = _check_experiment(argv)
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        fail(f"unknown flag --{e.flagname}; this command's flags are "
             f"{', '.join(_main_flags())}")
    except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
        detail = str(e)
        if "Error whilst parsing config file" in detail:
            # The experiment's get_config raised: its last line is the reason.
            reason = [line for line in detail.strip().splitlines() if line.strip()][-1]
            fail(f"--config={experiment}: {reason.split(': ', 1)[-1].strip()}")
        missing = re.search(r"Flag (--\w+) must have a value other than None", detail)
        if missing:
            fail(f"{missing.group(1)} is required ({flags.FLAGS[missing.group(1)[2:]].help})")
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        if (overrides and not isinstance(e, flags.IllegalFlagValueError)) or "--config." in detail:
            fail(f"bad config override among {overrides}: {_one_line(detail)}. Fix the key "
                 "(keys are listed in the experiment file's get_config) or the value's type")
        fail(" ".join(detail.removeprefix("flag ").split()))


def _main_flags() -> list[str]:
    """The flags the running command defines (not absl's or JAX's own)."""
    main = sys.modules["__main__"]
    names = flags.FLAGS.get_flags_for_module(main) if main else []
    return sorted(f"--{f.name}" for f in names) + (
        ["--config.<key>=value"] if "config" in flags.FLAGS else [])


def at_least(name: str, low, why: str = ""):
    """Registers a validator: --name must be a finite number >= low."""
    flags.register_validator(name, lambda v: v is None or (math.isfinite(v) and v >= low),
                             message=f"--{name} must be a number >= {low}{why}")


def within(name: str, low, high, why: str = "", low_open=False):
    """Registers a validator: --name must lie in [low, high] ((low, high] with low_open)."""
    left = "(" if low_open else "["
    flags.register_validator(
        name, lambda v: v is None or ((v > low if low_open else v >= low) and v <= high),
        message=f"--{name} must be in {left}{low}, {high}]{why}")


def define_sampling_flags(temperature: float, max_new_tokens: int, what: str):
    """--temperature, --top_k, --top_p, --max_new_tokens and --seed, with their checks: the
    sampling settings of the generating tools (sample, chat)."""
    flags.DEFINE_float("temperature", temperature, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = off).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
    flags.DEFINE_integer("max_new_tokens", max_new_tokens, f"Tokens to generate per {what}.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    at_least("temperature", 0.0, " (0 = greedy)")
    at_least("top_k", 0, " (0 = off)")
    within("top_p", 0.0, 1.0, " (1 = off)", low_open=True)
    at_least("max_new_tokens", 1)
    at_least("seed", 0)


def run(main):
    """absl's app.run(main) with parse_flags."""
    app.run(main, flags_parser=parse_flags)
