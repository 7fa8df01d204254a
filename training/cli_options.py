"""The training command's options, saved so that `--help` and argparse's refusals answer before the stack loads.

Building the real parser imports transformers' `TrainingArguments`, hence torch and (through
`transformers.trainer_utils`) peft when it is installed: seconds before a single flag is read. `cli_options.json`
holds the parser's options as `python -m training.cli_options` writes them from the real parser
(tests/training/test_cli_options.py checks that they are equal). `answer_early` rebuilds an argparse parser from it
that prints `--help` and refuses what argparse refuses (an unknown option, a value of the wrong type, a choice not
offered) with the real parser's words. It never accepts for the real parser: whatever it lets through is parsed
again, and checked, by `training.train.parse_args`. It answers only for the transformers and deit-hf versions the
file was written with.
"""

import argparse
import json
import os
import sys
from importlib import metadata

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_options.json")
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


def versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("transformers", "deit-hf")}


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
    and when the saved options are not this installation's or a config file comes first (its values decide)."""
    if not os.path.exists(SNAPSHOT) or (argv and argv[0].endswith((".json", ".yaml", ".yml"))):
        return
    with open(SNAPSHOT) as file:
        saved = json.load(file)
    if saved["versions"] != versions():
        return
    parser = rebuild(saved)
    _, unknown = parser.parse_known_args(argv)  # exits on --help and on a value argparse refuses
    if unknown:
        parser.error(UNUSED_ARGUMENTS.format(unknown))


def write(path: str = SNAPSHOT) -> None:
    from training.train import build_parser

    with open(path, "w") as file:
        json.dump({"versions": versions(), **describe(build_parser())}, file, indent=1, ensure_ascii=False)
        file.write("\n")


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else SNAPSHOT)
    print(f"Wrote the training command's options for {versions()} to {SNAPSHOT}.")
