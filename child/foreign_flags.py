"""llama-server's flags that modelyard does not implement: recognised, so that a llama.cpp user's
command line and preset work unchanged (the router passes them to every child; the child says
once that each means nothing to it). A flag neither knows is still an error.

The table is child/llama_server_flags.py, generated from `llama-server --help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from child.llama_server_flags import LLAMA_SERVER_FLAGS


class UnknownFlag(ValueError):
    pass


@dataclass(frozen=True)
class ForeignFlag:
    long: str  # the long name it is passed on as, without dashes: "cache-type-k", "no-slots"
    values: int  # how many values follow it
    value_optional: bool


def _index() -> tuple[dict[str, ForeignFlag], dict[str, ForeignFlag]]:
    by_name: dict[str, ForeignFlag] = {}
    by_env: dict[str, ForeignFlag] = {}
    for names, values, optional, env in LLAMA_SERVER_FLAGS:
        longs = [n[2:] for n in names if n.startswith("--")] or [names[-1].lstrip("-")]
        positive = next((n for n in longs if not n.startswith("no-")), longs[0])
        negative = next((n for n in longs if n.startswith("no-")), positive)
        for name in names:
            bare = name.lstrip("-")
            chosen = negative if bare.startswith("no-") else positive
            by_name[name] = ForeignFlag(chosen, values, optional)
        if env:
            by_env[env] = ForeignFlag(positive, values, optional)
    return by_name, by_env


_BY_NAME, _BY_ENV = _index()


def foreign_flag(spelling: str) -> ForeignFlag | None:
    """The llama-server flag written as `spelling` ("-ctk", "--no-slots"), or None."""
    return _BY_NAME.get(spelling)


def foreign_preset_key(key: str) -> ForeignFlag | None:
    """The llama-server flag a preset key names: its long name (dashes or underscores) or its
    LLAMA_ARG_* variable."""
    bare = key.strip().lstrip("-")
    return _BY_NAME.get("--" + bare) or _BY_NAME.get("--" + bare.replace("_", "-")) or _BY_ENV.get(bare)


def split_foreign(tokens: list[str]) -> list[tuple[ForeignFlag, list[str]]]:
    """Command-line tokens that are llama-server flags with their values; UnknownFlag names the
    first token that is neither."""
    groups: list[tuple[ForeignFlag, list[str]]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, _, attached = token.partition("=") if token.startswith("--") else (token, "", "")
        flag = foreign_flag(name)
        if flag is None:
            raise UnknownFlag(f"unrecognized argument: {token}" if token.startswith("-")
                              else f"unexpected value: {token}")
        i += 1
        if attached:
            values = [attached]
        elif flag.value_optional:
            values = [tokens[i]] if i < len(tokens) and not tokens[i].startswith("-") else []
        else:
            values = tokens[i: i + flag.values]
            if len(values) < flag.values:
                raise UnknownFlag(f"{name} expects {flag.values} value(s)")
        i += len(values) - (0 if not attached else 1)
        groups.append((flag, values))
    return groups


def extract_foreign(argv: list[str], own: set[str]) -> tuple[list[str], list[tuple[ForeignFlag, list[str]]]]:
    """(argv without llama-server's flags we do not have, those flags with their values). Taken out
    before argparse sees them: argparse would read `-ctk q8_0` as `-c tk` and a stray `q8_0`."""
    rest: list[str] = []
    foreign: list[tuple[ForeignFlag, list[str]]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.partition("=")[0] if token.startswith("--") else token
        if name in own or foreign_flag(name) is None:
            rest.append(token)
            i += 1
            continue
        end = i + 1
        flag = foreign_flag(name)
        assert flag is not None
        if "=" not in token:
            if flag.value_optional:
                end += 1 if end < len(argv) and not argv[end].startswith("-") else 0
            else:
                end += flag.values
        foreign += split_foreign(argv[i:end])
        i = end
    return rest, foreign


def as_options(groups: list[tuple[ForeignFlag, list[str]]]) -> dict[str, str | bool]:
    """Flags as preset-style options (long name -> value, or True for a flag alone)."""
    return {flag.long: " ".join(values) if values else True for flag, values in groups}
