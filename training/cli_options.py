"""The training command's options, kept so that `--help` and argparse's refusals answer before the stack loads.

Building the real parser imports transformers' `TrainingArguments`, hence torch and (through
`transformers.trainer_utils`) peft when it is installed: seconds before a single flag is read. Each time
`training.train.parse_args` builds the real parser it saves the parser's options (`save`) in a cache file named by
what decides them: the transformers version and a hash of deit-hf's own sources. `answer_early` rebuilds an argparse
parser from that file, when there is one, that prints `--help` and refuses what argparse refuses (an unknown option,
a value of the wrong type, a choice not offered) with the real parser's words (tests/training/test_cli_options.py
checks both). It never accepts for the real parser: whatever it lets through is parsed again, and checked, by
`training.train.parse_args`. The cache lives in `$DEIT_HF_CACHE`, else `$XDG_CACHE_HOME/deit-hf`, else
`~/.cache/deit-hf`; one that cannot be written is skipped (the answers then come from the real parser).
"""

import argparse
import hashlib
import json
import os
from importlib import metadata

# deit-hf's sources: the options' help and defaults come from them (and from transformers, named by its version).
SOURCE_DIRECTORIES = ("training", "deit_hf")
# Defaults that depend on the machine (`training.train.parse_args`): shown as the rule that decides them.
MACHINE_DEFAULTS = {
    "use_cpu": "True where no accelerator is found, else False",
    "dataloader_pin_memory": "False where no accelerator is found, else True",
}
# What a value of each option type is converted with (`transformers.HfArgumentParser`'s types, by name); a type not
# named here is read as a string, and left to the real parser.
CHECKED_TYPES = ("int", "float", "string_to_bool")
ACTIONS = {
    argparse._StoreAction: "store",
    argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false",
    argparse._HelpAction: "help",
}
# The refusal `HfArgumentParser.parse_args_into_dataclasses` raises for unknown options (transformers' words).
UNUSED_ARGUMENTS = "Some specified arguments are not used by the HfArgumentParser: {}"


def cache_path() -> str:
    """The cache file of this installation's options: named by the transformers version and deit-hf's sources."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256(metadata.version("transformers").encode())
    for directory in SOURCE_DIRECTORIES:
        for folder, _, files in sorted(os.walk(os.path.join(root, directory))):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), "rb") as file:
                        digest.update(name.encode() + file.read())
    cache = os.environ.get("DEIT_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deit-hf")
    return os.path.join(cache, f"train-options-{digest.hexdigest()[:16]}.json")


def _json_value(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def describe(parser: argparse.ArgumentParser) -> dict:
    """The parser's usage and options, as JSON-serialisable data (each default as its help shows it)."""
    options = []
    for action in parser._actions:
        type_name = getattr(action.type, "__name__", None)
        options.append({
            "action": ACTIONS[type(action)],
            "option_strings": action.option_strings,
            "dest": action.dest,
            "nargs": action.nargs,
            "const": _json_value(action.const),
            "default": MACHINE_DEFAULTS.get(action.dest, str(action.default)),
            "type": type_name if type_name in CHECKED_TYPES else ("choice" if action.choices else None),
            "choices": None if action.choices is None else [_json_value(choice) for choice in action.choices],
            "required": action.required,
            "help": action.help,
            "metavar": action.metavar,
        })
    return {"usage": parser.usage, "options": options}


class _Shown:
    """A default as `--help` shows it; not a string, which argparse would convert with the option's type."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


def _suppressed(value):
    return argparse.SUPPRESS if value == argparse.SUPPRESS else value  # argparse tests it by identity


def rebuild(description: dict, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with the described options (`describe`), formatted as `HfArgumentParser` formats them."""
    from transformers.hf_argparser import make_choice_type_function, string_to_bool  # no torch behind it

    types = {"int": int, "float": float, "string_to_bool": string_to_bool}
    parser = argparse.ArgumentParser(prog=prog, usage=description["usage"], add_help=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for option in description["options"]:
        default = _suppressed(option["default"])
        kwargs = {"dest": option["dest"], "help": _suppressed(option["help"]),
                  "default": default if default is argparse.SUPPRESS else _Shown(default)}
        if option["action"] in ("store_true", "store_false", "help"):
            kwargs["action"] = option["action"]
            if option["action"] == "help":
                del kwargs["dest"]
            parser.add_argument(*option["option_strings"], **kwargs)
            continue
        if option["type"] == "choice":
            kwargs["type"] = make_choice_type_function(option["choices"])
        elif option["type"] in types:
            kwargs["type"] = types[option["type"]]
        kwargs.update(nargs=option["nargs"], choices=option["choices"], required=option["required"],
                      metavar=option["metavar"])
        if option["nargs"] == "?":
            kwargs["const"] = option["const"]
        parser.add_argument(*option["option_strings"], **kwargs)
    return parser


def answer_early(argv: list[str]) -> None:
    """Print `--help`, or refuse what argparse refuses (exit status 2), from the saved options; return otherwise,
    and when no options are saved for this installation or a config file comes first (its values decide)."""
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        return
    try:
        with open(cache_path()) as file:
            saved = json.load(file)
    except (OSError, ValueError):
        return
    parser = rebuild(saved)
    _, unknown = parser.parse_known_args(argv)  # exits on --help and on a value argparse refuses
    if unknown:
        parser.error(UNUSED_ARGUMENTS.format(unknown))


def save(parser: argparse.ArgumentParser) -> None:
    """Keep the parser's options for `answer_early`, unless they are kept already or the cache cannot be written."""
    path = cache_path()
    if os.path.exists(path):
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staged = f"{path}.{os.getpid()}"  # a reader never sees a half-written file
        with open(staged, "w") as file:
            json.dump(describe(parser), file, ensure_ascii=False)
        os.replace(staged, path)
    except OSError:
        pass  # a read-only home: --help answers from the real parser
